"""jkd.files: the path helpers the exporters and config checks share, and the process locks."""

import os
import subprocess
import sys

import pytest

from jkd import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_missing_dirs_and_the_existing_ancestor(tmp_path):
  new = tmp_path / 'a' / 'b' / 'c'
  assert files.missing_dirs(str(new)) == [str(new), str(new.parent), str(new.parent.parent)]
  assert files.existing_ancestor(str(new)) == str(tmp_path)
  assert files.missing_dirs(str(tmp_path)) == [] and files.existing_ancestor(
      str(tmp_path)) == str(tmp_path)
  (tmp_path / 'dangling').symlink_to(tmp_path / 'nowhere')  # a link is there, if broken
  assert files.existing_ancestor(str(tmp_path / 'dangling' / 'x')) == str(tmp_path / 'dangling')


def test_a_lock_is_one_process_s_and_counted_within_it(tmp_path):
  path = str(tmp_path / '.lock')
  assert files.lock(path, 'busy') == path and files.lock(path, 'busy') == path  # two holders
  files.unlock(path)  # one left: another process is still kept out
  other = [sys.executable, '-c', 'import sys; from jkd import files; files.lock(sys.argv[1], '
           '"busy")', path]
  refused = subprocess.run(other, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert refused.returncode == 1 and 'ValueError: busy' in refused.stderr
  files.unlock(path)
  assert subprocess.run(other, cwd=REPO, capture_output=True, timeout=60).returncode == 0
  with pytest.raises(ValueError, match='busy'):  # held by a child while it runs
    child = subprocess.Popen([sys.executable, '-c', 'import sys, time; from jkd import files; '
                              'files.lock(sys.argv[1], "x"); print(1, flush=True); '
                              'time.sleep(60)', path], cwd=REPO, stdout=subprocess.PIPE)
    try:
      assert child.stdout.readline().strip() == b'1'
      files.lock(path, 'busy')
    finally:
      child.kill()
      child.wait()
