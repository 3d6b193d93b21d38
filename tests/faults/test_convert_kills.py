"""SIGKILL during `mode=convert` (a .nemo streamed into a model directory part by part) at
seeded random points: after each kill the directory reads as incomplete (no model_config.json,
which `model.load` requires), and after the restarts it equals an uninterrupted convert's. A
Ctrl-C ends it at once, with one line."""

import signal
import sys

import jax
import numpy as np

from jkd import model
from tests import nemo_fixtures as fx
from tests.faults import harness
from tests.test_from_nemo import _hf


def test_convert_after_kills_equals_an_uninterrupted_one(tmp_path):
  fx.write_legacy(tmp_path / 'm.nemo', 'llama', _hf('llama'), pp=2)
  environ = harness.env(tmp_path)

  def argv(out):
    return [sys.executable, '-m', 'jkd.main', '--config', 'configs/convert.py',
            f'--config.convert.source={tmp_path}/m.nemo', f'--config.convert.output={out}']

  points = harness.trace(argv(tmp_path / 'whole'), environ, tmp_path / 'trace.whole')
  assert points.count('model.part_saved') >= 5 and points[-1] == 'model.params_finalized'
  want_cfg, want = model.load(str(tmp_path / 'whole'))
  # 4 random points, then once more where every param is written but the config is not
  for out, only, n, kills in (('cut', '', len(points), 4),
                              ('cut_final', 'model.params_finalized', 1, 1)):
    incomplete = []

    def look(out=out):
      incomplete.append(not (tmp_path / out / model.CONFIG_FILE).exists())
    landed = harness.kill_chain(argv(tmp_path / out), environ, tmp_path, n_points=n,
                                kills=kills, seed=5, only=only, after_kill=look)
    assert len(landed) == kills and all(incomplete), (landed, incomplete)
    cfg, params = model.load(str(tmp_path / out))
    assert cfg == want_cfg
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, want)))
  # Ctrl-C keeps its usual effect here, at once; the CLI says so in one line, no traceback
  proc = harness.signal_at(argv(tmp_path / 'int'), environ, 'model.part_saved', 2, 'INT')
  assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == 'jkd: interrupted (Ctrl-C)', proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and not (tmp_path / 'int' / model.CONFIG_FILE).exists()
