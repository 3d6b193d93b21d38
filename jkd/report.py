"""The demo's report: `report.md` and the validation-CE plot `val_ce.png` next to it.

The demo trains two students from the same initialisation for the same number of steps, one
with KD + SFT ('kd') and one with SFT only ('sft'), validates both every few steps, evaluates
both and the teacher on held-out data and samples replies. `write_report` takes a `Results`:

  teacher, student, data  str: what the teacher and student are, which data (free text)
  steps          int: optimizer steps of each student run
  val            {'kd' | 'sft': (steps [int], val CE [float, nats/token])}, steps increasing;
                 a run with no validation points is ([], []) or absent
  metrics        {'teacher' | 'init' | 'kd' | 'sft': jkd.evaluate.summarize() dict}: ce, perplexity,
                 agreement, kl_topk, ece on held-out data; a missing key or run shows as '—'
  samples        [{'prompt', 'teacher', 'kd', 'sft': str}], raw text (escaped here)
  timings        [(stage, seconds, cached)]: wall seconds of each stage in this run
  artifacts      {name: path} (.nemo files, HF exports, logit store, run dirs); written as
                 absolute paths, with the plot's path appended
  target_fraction  float: the headline target, KD + SFT reaching SFT-only's final validation CE
                 within this fraction of the steps

`check_report` reads a written report back and returns the artifact paths it names.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from typing import Mapping, Sequence

RUNS = {'kd': 'KD + SFT', 'sft': 'SFT only'}
ROWS = {'teacher': 'Teacher', 'init': 'Student at init', 'kd': 'KD + SFT student',
        'sft': 'SFT-only student'}
METRICS = {'ce': 'CE (nats/token)', 'perplexity': 'perplexity',
           'agreement': 'teacher top-1 agreement', 'kl_topk': 'KL to teacher top-K',
           'ece': 'ECE'}
SECTIONS = ('Summary', 'Metrics', 'Validation CE', 'Sample replies', 'Timings', 'Artifacts')
PLOT_NAME = 'val_ce.png'
DASH = '—'


@dataclasses.dataclass(frozen=True)
class Results:
  teacher: str  # teacher model, e.g. 'Nemotron-4 8B (teacher.nemo)'
  student: str  # student architecture and size
  data: str  # dataset, splits and sizes
  steps: int  # optimizer steps of each student run
  val: Mapping[str, tuple[Sequence[int], Sequence[float]]]  # run -> (steps, val CE)
  metrics: Mapping[str, Mapping[str, float]]  # 'teacher'/'init'/'kd'/'sft' -> summarize()
  samples: Sequence[Mapping[str, str]]  # {'prompt', 'teacher', 'kd', 'sft'}
  timings: Sequence[tuple[str, float, bool]]  # (stage, wall seconds, cached)
  artifacts: Mapping[str, str]  # name -> path
  target_fraction: float = 0.7  # headline target: crossing step / steps <= this

  def __post_init__(self):
    if not isinstance(self.steps, numbers.Integral) or self.steps < 1:
      raise ValueError(f'steps={self.steps!r}: must be a positive integer')
    if not 0 < self.target_fraction <= 1:
      raise ValueError(f'target_fraction={self.target_fraction!r}: must be in (0, 1]')
    for name, keys in (('val', RUNS), ('metrics', ROWS)):
      if unknown := set(getattr(self, name)) - set(keys):
        raise ValueError(f'{name}: unknown runs {sorted(unknown)}, expected {sorted(keys)}')
    for name, path in self.artifacts.items():
      if any(c in str(path) + name for c in '`\n'):
        raise ValueError(f'artifact {name!r}: backticks and newlines are not allowed')


def crossing_step(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
  """The first step (steps increasing) whose value is <= target; None if there is none."""
  if len(steps) != len(values):
    raise ValueError(f'{len(steps)} steps but {len(values)} values')
  if any(b <= a for a, b in zip(steps, steps[1:])):
    raise ValueError(f'steps must be strictly increasing: {list(steps)}')
  return next((s for s, v in zip(steps, values) if v <= target), None)


def plot_val_ce(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str, *,
                target: float | None = None, target_label: str = 'target',
                mark: tuple[int, float] | None = None, mark_label: str | None = None,
                title: str = 'Validation cross-entropy', dpi: int = 120) -> str:
  """Writes a PNG of validation CE vs step, one line per {label: (steps, ces)}; returns path.

  `target` draws a dashed horizontal line (legend entry `target_label`); `mark` = (step, ce)
  draws a star with its step on a dotted drop line (legend entry `mark_label`). The image
  is 7 x 4.2 inches at `dpi`.
  """
  # Lazy and pyplot-free: importing jkd stays fast and no global backend state is touched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4.2), dpi=dpi, layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for label, (steps, ces) in curves.items():
    if len(steps):
      ax.plot(steps, ces, marker='o', markersize=3, linewidth=1.5, label=label)
  if not any(len(s) for s, _ in curves.values()):
    ax.text(0.5, 0.5, 'no validation points', ha='center', va='center',
            transform=ax.transAxes, color='gray')
  if target is not None:
    ax.axhline(target, linestyle='--', color='gray', linewidth=1, label=target_label)
  zoom = zoomed_range(curves, [v for v in (target, mark and mark[1]) if v is not None])
  if zoom is not None:  # the step-0 CE would flatten every curve: cut it off, and say so
    ax.set_ylim(*zoom)
    step0, ce0 = min((s[0], c[0]) for s, c in curves.values() if len(s))
    ax.text(0.01, 0.98, f'\u2191 step {step0}: {ce0:.2f}', transform=ax.transAxes, va='top',
            ha='left', color='gray', zorder=6,
            bbox={'facecolor': 'white', 'edgecolor': 'none', 'pad': 1})
  if mark is not None:
    ax.plot(*mark, marker='*', markersize=14, color='C3', zorder=5, linestyle='none',
            label=mark_label)
    lo, hi = ax.get_ylim()
    lo = min(lo, mark[1] - 0.15 * (hi - lo))  # room for the step label under the mark
    ax.set_ylim(lo, hi)
    ax.vlines(mark[0], lo, mark[1], colors='C3', linestyles=':', linewidth=1)
    # Left of a first crossing and below the target there is no curve; near the left edge
    # the label goes right of the line instead.
    left, right = ax.get_xlim()
    ha = 'right' if mark[0] - left > 0.2 * (right - left) else 'left'
    ax.text(mark[0], 0.02, f' step {mark[0]} ', transform=ax.get_xaxis_transform(), ha=ha,
            va='bottom', color='C3')
  ax.set(xlabel='optimizer step', ylabel='validation CE (nats/token)', title=title)
  ax.grid(True, alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  fig.savefig(path, dpi=dpi)
  return path


def zoomed_range(curves, extra=()) -> tuple[float, float] | None:
  """Y limits without the first point of each curve, when those points lie so far above the
  rest (a student at init) that the rest would fill under a third of the axis; else None."""
  rest = [float(c) for _, ces in curves.values() for c in list(ces)[1:]] + list(extra)
  firsts = [float(ces[0]) for _, ces in curves.values() if len(ces)]
  if not rest or not firsts:
    return None
  lo, hi = min(rest), max(rest)
  pad = 0.1 * max(hi - lo, 0.05)
  if max(firsts) - lo < 3 * (hi - lo + 2 * pad):
    return None
  return lo - pad, hi + pad


def _fmt(x) -> str:
  """4 significant digits; thousands separators for large values, leading zeros for small
  ones, never an exponent."""
  if x is None:
    return DASH
  x = float(x)
  # Compared after rounding: 9999.7 rounds to 1.000e+04 in 4 digits.
  if abs(float(f'{x:.4g}')) >= 1e4:
    return f'{x:,.0f}'
  if 0 < abs(x) < 1e-4:  # where the g format turns to an exponent: as many decimals instead
    exponent = int(f'{x:.3e}'.split('e')[1])  # of the value rounded to 4 digits
    return f'{x:.{3 - exponent}f}'
  return f'{x:#.4g}'.rstrip('.')


def _cell(text: str) -> str:
  """Raw model text as one markdown table cell: punctuation escaped, newlines as <br>."""
  text = re.sub(r'([\\`*_\[\]<>|])', r'\\\1', str(text))
  return re.sub(r'\r\n|\r|\n', '<br>', text).strip() or ' '


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def _trained(r: Results, run: str) -> tuple[list[int], list[float]]:
  """A run's validation points after training began: a step-0 point is the initial model
  both runs share, which both 'reach'."""
  points = [(s, v) for s, v in zip(*r.val.get(run, ([], []))) if s > 0]
  return [s for s, _ in points], [v for _, v in points]


def _headline(r: Results) -> tuple[str, int | None]:
  """The headline sentence and the step at which KD + SFT reached the target (or None)."""
  (kd_steps, kd_ces), (_, sft_ces) = _trained(r, 'kd'), _trained(r, 'sft')
  goal = f'target ≤ {100 * r.target_fraction:.3g}%'
  if not len(sft_ces):
    return (f'The SFT-only run has no validation points, so there is no target CE; '
            f'{goal}: not measured.'), None
  target = sft_ces[-1]
  if not len(kd_ces):
    return (f'The KD + SFT run has no validation points, so it cannot be compared with '
            f"SFT-only's final validation CE ({_fmt(target)}); {goal}: not measured."), None
  step = crossing_step(kd_steps, kd_ces, target)
  if step is None:
    best = min(range(len(kd_ces)), key=lambda i: kd_ces[i])
    return (f"KD + SFT never reached SFT-only's final validation CE ({_fmt(target)}) in "
            f'{r.steps} steps (its best: {_fmt(kd_ces[best])} at step {kd_steps[best]}); '
            f'{goal}: missed.'), None
  met = 'met' if step <= r.target_fraction * r.steps else 'missed'
  return (f"KD + SFT reached SFT-only's final validation CE ({_fmt(target)}) at step {step} "
          f'of {r.steps} ({100 * step / r.steps:.4g}% of the steps); {goal}: {met}.'), step


def write_report(path: str, results: Results) -> None:
  """Writes the markdown report to `path` and the validation-CE plot next to it."""
  r = results
  val = {k: r.val.get(k, ([], [])) for k in RUNS}
  headline, step = _headline(r)
  plot_path = os.path.abspath(os.path.join(os.path.dirname(path), PLOT_NAME))
  sft_ces, (kd_steps, kd_ces) = _trained(r, 'sft')[1], val['kd']
  target = sft_ces[-1] if sft_ces else None  # as in the headline: none without trained points
  mark = None if step is None else (step, kd_ces[list(kd_steps).index(step)])
  plot_val_ce({RUNS[k]: v for k, v in val.items()}, plot_path, target=target,
              target_label='SFT only: final CE', mark=mark, mark_label='KD + SFT reaches it')

  out = ['# Knowledge distillation report', '', '## Summary', '',
         f'Teacher: {r.teacher}. Student: {r.student}, trained twice from the same '
         f'initialisation for {r.steps} optimizer steps on {r.data}: once with KD + SFT and '
         'once with SFT only. Both students and the teacher are evaluated on held-out data.',
         '', f'**{headline}**']
  intervals = {b - a for a, b in zip(kd_steps, kd_steps[1:])}
  if step is not None and len(intervals) == 1:
    out.append(f'(Validation runs every {intervals.pop()} steps, so the step is known to '
               'within that.)')

  out += ['', '## Metrics', '', 'Token means on held-out data. Agreement is the share of '
          "tokens where the student's argmax is the teacher's top-1; KL is KL(teacher ‖ "
          "student) over the teacher's top-K ids; both are undefined for the teacher.", '']
  rows = []
  for key, label in ROWS.items():
    m = r.metrics.get(key, {})
    rows.append([label] + [DASH if key == 'teacher' and name in ('agreement', 'kl_topk')
                           else _fmt(m.get(name)) for name in METRICS])
  out += _table(['model', *METRICS.values()], rows)

  out += ['', '## Validation CE', '', f'![validation CE]({PLOT_NAME})', '']
  by_step = [dict(zip(*val[k])) for k in RUNS]
  all_steps = sorted(set().union(*by_step))
  if all_steps:
    rows = [[str(s)] + [_fmt(d.get(s)) for d in by_step] for s in all_steps]
    if step is not None:  # bold the KD + SFT value where it first reaches the target
      rows[all_steps.index(step)][1] = f'**{rows[all_steps.index(step)][1]}**'
    out += _table(['step', *RUNS.values()], rows)
  else:
    out.append('No validation points were recorded for either run.')

  out += ['', '## Sample replies', '']
  for i, sample in enumerate(r.samples, 1):
    out += [f'### Sample {i}', '']
    out += _table(['', 'text'], [[f'**{label}**', _cell(sample.get(key, DASH))] for key, label
                                 in (('prompt', 'Prompt'), ('teacher', 'Teacher'),
                                     ('kd', 'KD + SFT'), ('sft', 'SFT only'))])
    out.append('')
  if not r.samples:
    out += ['No samples were generated.', '']

  out += ['## Timings', '']
  rows = [[_cell(stage), _fmt(sec), 'yes' if cached else 'no'] for stage, sec, cached
          in r.timings]
  out += _table(['stage', 'seconds', 'cached'],
                rows + [['**total**', _fmt(sum(t[1] for t in r.timings)), '']])

  out += ['', '## Artifacts', '']
  artifacts = {**r.artifacts, 'validation CE plot': plot_path}
  out += [f'- {name}: `{os.path.abspath(p)}`' for name, p in artifacts.items()]
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(out) + '\n')


def check_report(path: str) -> list[str]:
  """The artifact paths a written report names; ValueError if a section or artifact is missing."""
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  found = {line[3:].strip(): i for i, line in enumerate(lines) if line.startswith('## ')}
  if missing := [s for s in SECTIONS if s not in found]:
    raise ValueError(f'{path}: missing sections {missing}')
  paths = []
  for line in lines[found['Artifacts'] + 1:]:
    if line.startswith('#'):
      break
    if m := re.fullmatch(r'- (.+?): `([^`]+)`', line.strip()):
      paths.append(m.group(2))
  if not paths:
    raise ValueError(f'{path}: the Artifacts section names no artifact')
  return paths
