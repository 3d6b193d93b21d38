"""jkd.report: crossing step, the PNG plot, the markdown report and check_report's round trip."""

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jkd import report

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
STEPS = [0, 20, 40, 60, 80, 100]
# SFT only ends at 3.0; KD + SFT first reaches <= 3.0 at step 60 (3.0 exactly: ties count).
KD_CE = [11.0, 6.0, 4.0, 3.0, 2.9, 2.8]
SFT_CE = [11.0, 8.0, 6.0, 4.5, 3.5, 3.0]


def make_results(tmp_path, **changes):
  base = report.Results(
      teacher='Teacher-8B', student='Student-2B', data='OASST1 en (90 / 10 conversations)',
      steps=100, val={'kd': (STEPS, KD_CE), 'sft': (STEPS, SFT_CE)},
      metrics={'teacher': {'ce': 1.23456, 'perplexity': math.exp(1.23456), 'agreement': 1.0,
                           'kl_topk': 0.0, 'ece': 0.0123},
               'kd': {'ce': 2.8, 'perplexity': math.exp(2.8), 'agreement': 0.61234,
                      'kl_topk': 0.4321, 'ece': 0.034},
               'sft': {'ce': 3.0, 'perplexity': math.exp(3.0), 'agreement': 0.5,
                       'kl_topk': 0.9, 'ece': float('nan')}},
      samples=[{'prompt': 'a | b?', 'teacher': 'line one\nline two | x', 'kd': 'use `|`',
                'sft': '<s> *hi*'}],
      timings=[('extract', 12.3456, False), ('train kd', 45678.9, False), ('convert', 1.0, True)],
      artifacts={'teacher .nemo': str(tmp_path / 'teacher.nemo'),
                 'logit store': str(tmp_path / 'store')})
  return dataclasses.replace(base, **changes)


def write(tmp_path, **changes):
  path = tmp_path / 'report.md'
  report.write_report(str(path), make_results(tmp_path, **changes))
  return path.read_text()


def section(text, title):
  """The body of one '## title' section."""
  body = text.split(f'\n## {title}\n', 1)[1]
  return body.split('\n## ', 1)[0]


def test_crossing_step():
  """First step at or below the target; None when never; order as given, ties count."""
  assert report.crossing_step(STEPS, KD_CE, 3.0) == 60
  assert report.crossing_step(STEPS, KD_CE, 2.95) == 80
  assert report.crossing_step(STEPS, KD_CE, 100.0) == 0
  assert report.crossing_step(STEPS, KD_CE, 1.0) is None
  assert report.crossing_step([], [], 1.0) is None
  assert report.crossing_step([5, 10], [float('nan'), 0.5], 1.0) == 10
  assert report.crossing_step(np.array([1, 2]), np.array([3.0, 2.0]), 2.5) == 2


def test_crossing_step_rejects_bad_input():
  with pytest.raises(ValueError, match='2 steps but 1 values'):
    report.crossing_step([1, 2], [1.0], 0.0)
  with pytest.raises(ValueError, match='increasing'):
    report.crossing_step([2, 1], [1.0, 1.0], 0.0)


@pytest.mark.parametrize('mark', [(60, 3.0), None])
def test_plot_writes_png_of_expected_size(tmp_path, mark):
  """A readable PNG of 7 x 4.2 inches at the dpi, with and without a mark."""
  path = str(tmp_path / 'val.png')
  out = report.plot_val_ce({'KD + SFT': (STEPS, KD_CE), 'SFT only': (STEPS, SFT_CE)}, path,
                           target=3.0, target_label='SFT only: final CE', mark=mark,
                           mark_label='KD + SFT reaches it', dpi=100)
  assert out == path
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  with Image.open(path) as im:
    assert im.size == (700, 420)


def test_zoom_leaves_out_a_far_initial_point_only():
  """The demo's curves (init CE 13.13, then 4.5-6) zoom to the rest, the target included;
  curves whose first point is not far above the rest keep matplotlib's own limits."""
  kd = ([0, 10, 20, 100], [13.13, 5.84, 5.01, 4.62])
  sft = ([0, 10, 20, 100], [13.13, 5.96, 5.04, 5.13])
  lo, hi = report.zoomed_range({'kd': kd, 'sft': sft}, [4.4])
  assert lo < 4.4 and 5.96 < hi < 7
  assert report.zoomed_range({'kd': ([0, 10], [6.0, 5.0]), 'sft': ([0, 10], [6.0, 5.5])}) is None
  assert report.zoomed_range({'kd': ([0], [6.0])}) is None  # nothing after the first point


def test_plot_without_points(tmp_path):
  """No validation points at all still gives a valid PNG (dpi 120 default)."""
  path = str(tmp_path / 'empty.png')
  report.plot_val_ce({'KD + SFT': ([], []), 'SFT only': ([], [])}, path)
  with Image.open(path) as im:
    assert im.size == (840, 504)


def test_importing_jkd_report_does_not_import_matplotlib():
  code = 'import sys, jkd.report; assert "matplotlib" not in sys.modules'
  subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(
      os.path.dirname(os.path.abspath(__file__))))


def test_report_sections_tables_and_plot(tmp_path):
  text = write(tmp_path)
  assert [line[3:] for line in text.splitlines() if line.startswith('## ')] == list(
      report.SECTIONS)
  assert (tmp_path / 'val_ce.png').read_bytes()[:8] == PNG_SIGNATURE
  assert '![validation CE](val_ce.png)' in section(text, 'Validation CE')
  metrics = section(text, 'Metrics')
  # 4 significant digits; the teacher has no agreement / KL with itself; NaN shows as nan.
  assert '| Teacher | 1.235 | 3.437 | — | — | 0.01230 |' in metrics
  assert '| KD + SFT student | 2.800 | 16.44 | 0.6123 | 0.4321 | 0.03400 |' in metrics
  assert '| SFT-only student | 3.000 | 20.09 | 0.5000 | 0.9000 | nan |' in metrics
  val = section(text, 'Validation CE')
  assert '| step | KD + SFT | SFT only |' in val
  assert '| 60 | **3.000** | 4.500 |' in val  # the crossing is bold
  assert '| 100 | 2.800 | 3.000 |' in val
  timings = section(text, 'Timings')
  assert '| extract | 12.35 | no |' in timings
  assert '| train kd | 45,679 | no |' in timings
  assert '| convert | 1.000 | yes |' in timings
  assert '| **total** | 45,692 |  |' in timings
  summary = section(text, 'Summary')
  assert 'Teacher: Teacher-8B' in summary and 'Student-2B' in summary
  assert 'OASST1 en' in summary and '100 optimizer steps' in summary
  assert 'Validation runs every 20 steps' in summary


@pytest.mark.parametrize('steps,fraction,expected', [
    (100, 0.7, "KD + SFT reached SFT-only's final validation CE (3.000) at step 60 of 100 "
               '(60% of the steps); target ≤ 70%: met.'),
    (100, 0.5, "KD + SFT reached SFT-only's final validation CE (3.000) at step 60 of 100 "
               '(60% of the steps); target ≤ 50%: missed.'),
    (80, 0.75, 'at step 60 of 80 (75% of the steps); target ≤ 75%: met.'),  # boundary
])
def test_headline_met_or_missed(tmp_path, steps, fraction, expected):
  assert expected in section(write(tmp_path, steps=steps, target_fraction=fraction), 'Summary')


def test_headline_never_reached(tmp_path):
  """KD + SFT stays above the target: said plainly, with its best point, and no bold row."""
  kd = [11.0, 9.0, 7.0, 5.0, 4.0, 3.5]
  text = write(tmp_path, val={'kd': (STEPS, kd), 'sft': (STEPS, SFT_CE)})
  assert ("KD + SFT never reached SFT-only's final validation CE (3.000) in 100 steps "
          '(its best: 3.500 at step 100); target ≤ 70%: missed.') in section(text, 'Summary')
  assert '**' not in section(text, 'Validation CE')
  assert 'Validation runs every' not in text
  assert (tmp_path / 'val_ce.png').exists()


def test_headline_does_not_count_the_shared_initial_point(tmp_path, monkeypatch):
  """Both curves start at the init's CE (step 0): SFT-only ending above it is not reached by
  KD + SFT at step 0, and curves with the step-0 point alone have no validation points, so
  the plot has no target line either."""
  kd, sft = [11.0, 11.5, 11.6, 11.7, 11.8, 11.9], [11.0, 11.2, 11.3, 11.2, 11.1, 11.05]
  text = section(write(tmp_path, val={'kd': (STEPS, kd), 'sft': (STEPS, sft)}), 'Summary')
  assert "KD + SFT never reached SFT-only's final validation CE (11.05)" in text
  plotted = []
  monkeypatch.setattr(report, 'plot_val_ce', lambda *a, **kw: plotted.append(kw))
  text = write(tmp_path, val={'kd': ([0], [11.0]), 'sft': ([0], [11.0])})
  assert 'The SFT-only run has no validation points' in text
  assert plotted[-1]['target'] is None and plotted[-1]['mark'] is None


@pytest.mark.parametrize('val,expected', [
    ({'kd': (STEPS, KD_CE)}, 'The SFT-only run has no validation points'),
    ({'kd': (STEPS, KD_CE), 'sft': ([], [])}, 'The SFT-only run has no validation points'),
    ({'sft': (STEPS, SFT_CE)}, 'The KD + SFT run has no validation points'),
])
def test_headline_without_validation_points(tmp_path, val, expected):
  text = write(tmp_path, val=val)
  assert expected in text and 'target ≤ 70%: not measured.' in text
  assert '| 60 | ' in section(text, 'Validation CE') and '—' in section(text, 'Validation CE')


def test_report_without_any_points_samples_or_metrics(tmp_path):
  text = write(tmp_path, val={}, samples=[], metrics={})
  assert 'No validation points were recorded for either run.' in text
  assert 'No samples were generated.' in text
  assert '| Teacher | — | — | — | — | — |' in text
  assert report.check_report(str(tmp_path / 'report.md'))


def test_replies_are_escaped_into_single_table_rows(tmp_path):
  """Pipes, newlines, backticks, HTML-like tags and emphasis in model text stay literal."""
  samples = section(write(tmp_path), 'Sample replies')
  assert '| **Prompt** | a \\| b? |' in samples
  assert '| **Teacher** | line one<br>line two \\| x |' in samples
  assert '| **KD + SFT** | use \\`\\|\\` |' in samples
  assert '| **SFT only** | \\<s\\> \\*hi\\* |' in samples
  rows = [line for line in samples.splitlines() if line.startswith('|')]
  # Every row has exactly the table's 3 unescaped pipes.
  assert all(len(line.replace('\\|', '').split('|')) == 4 for line in rows), rows


def test_check_report_round_trip(tmp_path):
  write(tmp_path)
  paths = report.check_report(str(tmp_path / 'report.md'))
  assert paths == [str(tmp_path / 'teacher.nemo'), str(tmp_path / 'store'),
                   str(tmp_path / 'val_ce.png')]
  assert os.path.exists(paths[-1])


def test_check_report_relative_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  report.write_report('report.md', make_results(tmp_path, artifacts={'run dir': 'runs/kd'}))
  assert report.check_report('report.md') == [str(tmp_path / 'runs/kd'),
                                              str(tmp_path / 'val_ce.png')]


@pytest.mark.parametrize('title', report.SECTIONS)
def test_check_report_missing_section(tmp_path, title):
  path = tmp_path / 'report.md'
  write(tmp_path)
  path.write_text(path.read_text().replace(f'## {title}\n', ''))
  with pytest.raises(ValueError, match=f"missing sections \\['{title}'\\]"):
    report.check_report(str(path))


def test_check_report_without_artifacts(tmp_path):
  path = tmp_path / 'report.md'
  path.write_text(''.join(f'## {s}\n\ntext\n\n' for s in report.SECTIONS))
  with pytest.raises(ValueError, match='names no artifact'):
    report.check_report(str(path))


def test_results_validation(tmp_path):
  with pytest.raises(ValueError, match='steps'):
    make_results(tmp_path, steps=0)
  with pytest.raises(ValueError, match='target_fraction'):
    make_results(tmp_path, target_fraction=1.5)
  with pytest.raises(ValueError, match="unknown runs \\['student'\\]"):
    make_results(tmp_path, metrics={'student': {}})
  with pytest.raises(ValueError, match='backticks'):
    make_results(tmp_path, artifacts={'x': 'a`b'})


@pytest.mark.parametrize('x,text', [(0.08812, '0.08812'), (4.618, '4.618'), (9999.4, '9999'),
                                    (9999.7, '10,000'), (12345.6, '12,346'), (None, report.DASH),
                                    (1.2345e-5, '0.00001234'), (-2.5e-7, '-0.0000002500'),
                                    (0.0, '0.000')])
def test_numbers_have_4_digits_or_thousands_separators_never_an_exponent(x, text):
  assert report._fmt(x) == text
