"""Named fault points, where the fault suite (tests/faults/) kills a real jkd process.

Code that commits state calls `point('stage.what')` at the moments a crash could land between
two writes. Environment variables drive it; with none set (every real run), a point is one
boolean test.

- `JKD_FAULT_TRACE=FILE`: each point appends its name as one line to FILE, written straight to
  the kernel (O_APPEND), so the trace survives a SIGKILL of the process.
- `JKD_FAULT_KILL=[NAME@]N[:SECONDS]`: the N-th point this process passes (counting from 1,
  after it is traced; only points called NAME when given) sends SIGKILL to the process, at once
  or SECONDS later from a timer thread, so the kill lands inside whatever runs next (an
  asynchronous checkpoint write, a block of store writes).
- `JKD_FAULT_SIGNAL=TERM` or `INT`: that point sends SIGTERM or SIGINT instead, to the
  process's whole group, as Slurm and a VM's shutdown, or Ctrl-C in a terminal, do (the
  process must lead its group: the suite starts it in a session of its own).

The suite runs a job once with a trace to count its points, then kills it at seeded random
points of that count, restarting it after each kill, and compares what the interrupted job
wrote with the uninterrupted one's (docs/reliability.md).
"""

from __future__ import annotations

import os
import signal
import threading


def _kill_plan(spec: str) -> tuple[str, int, float]:
  """'[NAME@]N[:SECONDS]' -> (NAME or '', N, SECONDS or 0); '' -> N = 0, never."""
  if not spec:
    return '', 0, 0.0
  name, _, rest = spec.rpartition('@')
  n, _, delay = rest.partition(':')
  try:
    return name, int(n), float(delay or 0)
  except ValueError:
    raise ValueError(f'JKD_FAULT_KILL={spec!r}: expected [NAME@]N[:SECONDS]') from None


_TRACE = os.environ.get('JKD_FAULT_TRACE', '')
_ONLY, _KILL_AT, _DELAY = _kill_plan(os.environ.get('JKD_FAULT_KILL', ''))
_SIGNAL = {'': signal.SIGKILL, 'KILL': signal.SIGKILL, 'TERM': signal.SIGTERM,
           'INT': signal.SIGINT}.get(os.environ.get('JKD_FAULT_SIGNAL', ''))
if _SIGNAL is None:
  raise ValueError(f'JKD_FAULT_SIGNAL={os.environ["JKD_FAULT_SIGNAL"]!r}: expected KILL, TERM '
                   'or INT')
_ON = bool(_TRACE or _KILL_AT)
_passed = 0


def point(name: str) -> None:
  """A place where a crash must lose nothing; a no-op unless the fault suite is running."""
  global _passed
  if not _ON:
    return
  if _TRACE:
    fd = os.open(_TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      os.write(fd, f'{name}\n'.encode())
    finally:
      os.close(fd)
  if not _KILL_AT or (_ONLY and name != _ONLY):
    return
  _passed += 1
  if _passed == _KILL_AT:
    send = os.kill
    if _SIGNAL != signal.SIGKILL:
      if os.getpgrp() != os.getpid():
        raise RuntimeError(f'JKD_FAULT_SIGNAL={_SIGNAL.name[3:]}: this process does not lead its '
                           'process group (start it with start_new_session=True)')
      send = os.killpg
    if _DELAY > 0:
      threading.Timer(_DELAY, send, (os.getpid(), _SIGNAL)).start()
    else:
      send(os.getpid(), _SIGNAL)
