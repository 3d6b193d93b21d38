"""The bad-input corpus (tests/bad_inputs/): every kind ends with a non-zero exit and one stderr
line that names the file at fault, never a traceback, and leaves no output that looks complete.

A full disk is simulated with RLIMIT_FSIZE (SIGXFSZ ignored, so a write past the limit fails
with EFBIG, 'File too large'): mounting a size-limited file system needs privileges tests
should not assume. A read-only directory is mode 0555; when the tests run as root, the command
also drops CAP_DAC_OVERRIDE from its capability bounding set (so its exec keeps it off), or
root would write there anyway.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.bad_inputs import make_corpus

REPO = str(make_corpus.REPO)
# Applies a case's limits, then execs its command (no Python runs between fork and exec in this
# multithreaded process). 24, 1: PR_CAPBSET_DROP, CAP_DAC_OVERRIDE.
_LAUNCHER = """
import ctypes, json, os, resource, signal, sys
limits = json.loads(sys.argv[1])
if 'fsize' in limits:
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limits['fsize'],) * 2)
if limits.get('read_only') and os.geteuid() == 0:
  if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0):
    sys.exit('prctl(PR_CAPBSET_DROP): ' + os.strerror(ctypes.get_errno()))
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp('bad_inputs')
  make_corpus.build(out)
  return out


def _run(case_dir, case):
  limits = case.get('limits', {})
  env = {**os.environ, 'PYTHONPATH': REPO}
  env.pop('JKD_TRACEBACK', None)
  read_only = [case_dir / p for p in limits.get('read_only', [])]
  for p in read_only:
    p.chmod(0o555)
  try:
    argv = [a.replace('{repo}', REPO) for a in case['argv']]
    return subprocess.run([sys.executable, '-c', _LAUNCHER, json.dumps(limits), *argv],
                          cwd=case_dir, env=env, capture_output=True, text=True, timeout=300)
  finally:
    for p in read_only:
      p.chmod(0o755)


def _looks_complete(path, marker) -> bool:
  """Whether an output would pass for finished: see make_corpus's docstring for markers."""
  if marker.startswith('examples<='):
    from jkd.data import logit_store
    try:
      n = len(logit_store.Reader(str(path), 'train', validate=False))
    except (OSError, ValueError):
      return False
    return n > int(marker.removeprefix('examples<='))
  return os.path.lexists(path / marker if marker else path)


@pytest.mark.parametrize('kind', sorted(make_corpus.KINDS))
def test_bad_input_fails_with_one_line_naming_the_file(corpus, kind):
  case_dir = corpus / kind
  case = json.loads((case_dir / 'case.json').read_text())
  proc = _run(case_dir, case)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == case['exit'] != 0, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert re.fullmatch(case['stderr'], lines[0]), lines[0]
  assert case['names'] in lines[0]
  for path, marker in case['outputs']:
    assert not _looks_complete(case_dir / path, marker), f'{path} looks complete ({marker})'


def test_readme_lists_every_kind():
  readme = (make_corpus.REPO / 'tests' / 'bad_inputs' / 'README.md').read_text()
  listed = re.findall(r'^\| `(\w+)` \|', readme, re.M)
  assert listed == list(make_corpus.KINDS)
