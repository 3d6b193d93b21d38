"""XLA profiler sessions over a window of loop steps: `config.profile` (docs/profiling.md).

    python -m jkd.main --config configs/smoke.py --config.profile.start_step=5 \
        --config.profile.steps=3 --config.profile.create_perfetto_trace=True

Steps are train steps in mode=train and teacher batches in mode=extract, counting from 1. The
session writes `<dir>/plugins/profile/<timestamp>/<host>.xplane.pb` (TensorBoard's profile
plugin, XProf) and, with `create_perfetto_trace`, `perfetto_trace.json.gz` beside it
(ui.perfetto.dev). Every process traces its own devices and host; with several processes, each
into `<dir>/process_<i>` (hosts' sessions would otherwise share a timestamp folder, where the
Perfetto conversion expects one host's trace, and two processes of one host one file name).
"""

from __future__ import annotations

import dataclasses
import os

import jax
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
  start_step: int  # first traced step; -1 = off
  steps: int  # steps in the trace
  dir: str  # trace directory (resolved)
  host_tracer_level: int  # 0 off .. 3 verbose host (TraceMe) events
  python_tracer: bool  # trace Python function calls too (slow; for host-side gaps)
  create_perfetto_trace: bool  # also perfetto_trace.json.gz


def settings(config, process_index: int | None = None,
             process_count: int | None = None) -> ProfileSettings:
  """config.profile (checked by jkd.config.validate) -> ProfileSettings; '' dir = workdir/profile,
  and with several processes (default: this run's) the process's own folder under it."""
  p = config.profile
  directory = p.dir or os.path.join(config.workdir, 'profile')
  if (jax.process_count() if process_count is None else process_count) > 1:
    index = jax.process_index() if process_index is None else process_index
    directory = os.path.join(directory, f'process_{index}')
  return ProfileSettings(
      start_step=p.start_step, steps=p.steps, dir=directory,
      host_tracer_level=p.host_tracer_level, python_tracer=p.python_tracer,
      create_perfetto_trace=p.create_perfetto_trace)


def _say(line: str) -> None:
  """A line on stdout that starts a line of its own beside the loop's progress bar (stderr;
  `2>&1` logs had it glued to the bar's last state)."""
  tqdm.write(line)


class Profiler:
  """Traces steps [start_step, start_step + steps): call `step(n)` before step n's work and
  `close()` after the loop (a `with` block does); a window past the loop's end is cut there."""

  def __init__(self, s: ProfileSettings):
    self.s, self.n, self.first, self.active = s, 0, None, False
    self.done = s.start_step < 0

  def step(self, n: int | None = None, wait=None) -> None:
    """Before step n (the previous n + 1 when omitted); `wait`: arrays of the previous step,
    finished before the trace stops so its device work lands in the trace."""
    n = self.n + 1 if n is None else n
    end = self.s.start_step + self.s.steps  # the first step past the window
    if self.active and n >= end:
      self.close(wait)  # self.n: the last traced step
    self.n = n
    if not self.done and not self.active and n >= end:  # a run resumed past the window
      _say(f'[profile] steps {self.s.start_step}..{end - 1} ran before step {n}, where this '
            'run starts: nothing traced')
      self.done = True
    if not self.done and not self.active and self.s.start_step <= n < end:  # n > start: resumed
      options = jax.profiler.ProfileOptions()
      options.host_tracer_level = self.s.host_tracer_level
      options.python_tracer_level = int(self.s.python_tracer)
      jax.profiler.start_trace(self.s.dir, create_perfetto_trace=self.s.create_perfetto_trace,
                               profiler_options=options)
      self.active, self.first = True, n

  def close(self, wait=None) -> None:
    if not self.active:
      if not self.done and self.n:  # the loop ended before the window
        _say(f'[profile] the run ended at step {self.n}, before profile.start_step='
              f'{self.s.start_step}: nothing traced')
        self.done = True
      return
    try:
      try:
        if wait is not None:
          jax.block_until_ready(wait)
      finally:  # a wait cut short (a second Ctrl-C) still ends the session
        try:
          jax.profiler.stop_trace()
        except RuntimeError as e:  # JaxRuntimeError too: the trace's files could not be written
          raise OSError(f'profile.dir={self.s.dir!r}: writing the trace of steps '
                        f'{self.first}..{self.n} failed: {e}') from None  # one line, not a trace
    finally:  # once only: a failed stop (raised to the loop) is not retried by its cleanup
      self.active, self.done = False, True
    _say(f'[profile] steps {self.first}..{self.n} -> {self.s.dir}')

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
