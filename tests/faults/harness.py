"""Kill a real jkd job with SIGKILL at seeded random fault points, restarting it after each kill.

A job is an argv run in the repo (`python -m jkd.main ...` or `python -c ...`). `trace` runs it
once, uninterrupted, and returns the names of the fault points it passed (jkd/faults.py).
`kill_chain` picks `kills` of those points at random (seeded) and runs the job again and again
in its own output directory: each run is killed at the next chosen point, counted over all the
runs so far, and a last run finishes the job. Every point chosen is reached: a restarted job
redoes what the kill lost, so the runs together pass at least as many points as one whole run.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env(tmp, **extra) -> dict[str, str]:
  """8 simulated CPU devices; one JAX compilation cache for all runs of a chain (it only saves
  compile time: a cached executable is the one a fresh compile builds)."""
  out = {k: v for k, v in os.environ.items() if not k.startswith('JKD_FAULT_')}
  out.update({'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu',
              'JAX_COMPILATION_CACHE_DIR': str(tmp / 'jax_cache'),
              'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
              'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0', **extra})
  return out


def _run(argv, environ, timeout=600, **kw):
  return subprocess.run(argv, cwd=REPO, env=environ, capture_output=True, text=True,
                        timeout=timeout, **kw)


def signal_at(argv, environ, point: str, n: int, sig: str = 'TERM'):
  """Runs `argv` in a session of its own, its process group sent SIGTERM (as Slurm or a VM's
  shutdown sends it to every process of the job) or SIGINT (`sig='INT'`: Ctrl-C in a
  terminal) at the n-th fault point called `point`."""
  return _run(argv, {**environ, 'JKD_FAULT_KILL': f'{point}@{n}', 'JKD_FAULT_SIGNAL': sig},
              start_new_session=True)


def trace(argv, environ, trace_file) -> list[str]:
  proc = _run(argv, {**environ, 'JKD_FAULT_TRACE': str(trace_file)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return open(trace_file).read().split()


@dataclasses.dataclass
class Kill:
  position: int  # among all points passed by the chain's runs (or those named `only`)
  point: str  # the point's name
  returncode: int


def kill_chain(argv, environ, tmp, *, n_points: int, kills: int, seed: int, only: str = '',
               max_delay: float = 0.0, after_kill=None) -> list[Kill]:
  """Runs `argv` until it finishes, killed at `kills` seeded random points of 1..n_points.

  With `only`, points are counted among those of that name; with `max_delay`, each kill comes a
  seeded random 0..max_delay seconds after its point (a run that finishes first ends the chain).
  `after_kill()` is called after each kill, before the restart (to look at what it left).
  Returns the kills that landed; the final run must exit 0.
  """
  rng = np.random.default_rng(seed)
  positions = sorted(rng.choice(np.arange(1, n_points + 1), min(kills, n_points), replace=False))
  done, landed = 0, []
  for position in positions:
    if position <= done:  # a delayed kill ran past this point already
      continue
    trace_file = tmp / f'trace.{len(landed)}'
    trace_file.unlink(missing_ok=True)  # another chain's, in the same directory
    delay = f':{rng.uniform(0, max_delay):.3f}' if max_delay else ''
    spec = f'{only}@{position - done}{delay}' if only else f'{position - done}{delay}'
    proc = _run(argv, {**environ, 'JKD_FAULT_TRACE': str(trace_file), 'JKD_FAULT_KILL': spec})
    passed = open(trace_file).read().split() if trace_file.exists() else []
    if proc.returncode == 0 and max_delay:  # the job ended before the timer fired
      return landed
    assert proc.returncode == -signal.SIGKILL, (spec, proc.returncode, proc.stderr[-3000:])
    counted = [p for p in passed if not only or p == only]
    landed.append(Kill(position, counted[position - done - 1], proc.returncode))
    if after_kill is not None:
      after_kill()
    done += len(counted)
  proc = _run(argv, environ)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return landed


def tree_bytes(root) -> dict[str, bytes]:
  """{relative path: contents} of every file under root."""
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out
