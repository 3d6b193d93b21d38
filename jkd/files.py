"""File-system helpers the writers share: where making a path would start, and the locks that
keep a second job off the files one is writing (a training workdir, a logit-store split)."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile


def missing_dirs(path: str) -> list[str]:
  """`path` and those of its parents that do not exist yet, deepest first (what making it
  creates, to remove on a failure)."""
  out = []
  path = os.path.abspath(path)
  while not os.path.lexists(path) and os.path.dirname(path) != path:
    out.append(path)
    path = os.path.dirname(path)
  return out


def existing_ancestor(path: str) -> str:
  """`path` itself, or the first of its parents that exists (where making it would start)."""
  missing = missing_dirs(path)
  return os.path.dirname(missing[-1]) if missing else os.path.abspath(path)


def can_make_dirs_in(directory: str) -> bool:
  """Whether a directory can be made in `directory`, tried (and removed): os.access says yes
  to root for read-only mounts and pseudo-filesystems (/proc, /sys)."""
  try:
    os.rmdir(tempfile.mkdtemp(prefix='.jkd-probe-', dir=directory))
  except OSError:
    return False
  return True


_HELD: dict[str, list] = {}  # lock file -> [its open file, holders in this process]


def lock(path: str, busy: str) -> str:
  """Holds `path` as this process's POSIX lock, or raises ValueError(`busy`) when another
  process holds it (a second job on the same files); returns `path` for `unlock`. The lock is
  released when the process ends however it ends, or when any descriptor of the file closes,
  so each file is opened once per process and its holders counted. Where the file system has
  no locks, nothing is checked."""
  if path in _HELD:
    _HELD[path][1] += 1
    return path
  f = open(path, 'a')
  try:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    f.close()
    if e.errno in (errno.EACCES, errno.EAGAIN):
      raise ValueError(busy) from None
  _HELD[path] = [f, 1]
  return path


def unlock(path: str) -> None:
  held = _HELD.get(path)
  if held is not None:
    held[1] -= 1
    if held[1] == 0:
      del _HELD[path]
      held[0].close()
