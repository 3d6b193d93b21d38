"""SIGKILL during training: at 10 seeded random fault points (after a step, after validation,
while an asynchronous checkpoint is being written), and at seeded random moments 0-0.3 s into 6
of the 12 checkpoint saves. After the restarts, metrics.jsonl logs every step once with the
uninterrupted run's values, bit for bit, and the final params are identical. SIGTERM to the
process group, and Ctrl-C, stop the run after a step it saves, and the rerun ends as the
uninterrupted run does."""

import collections
import json
import os
import re
import signal

import jax
import numpy as np
import pytest

from jkd import distributed
from tests import test_extract as te
from tests import test_train_loop as tl
from tests.faults import harness

ARGS = ('--config.train.max_steps=24', '--config.train.val_check_interval=2',
        '--config.train.save_interval=2', '--config.train.limit_val_batches=1')
TIMING = ('train/step_time', 'train/tokens_per_sec')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(store, env, the uninterrupted run's workdir, its fault points)."""
  tmp = tmp_path_factory.mktemp('train_kills')
  root = te.make_teacher(tmp / 'teacher')
  environ = harness.env(tmp)
  proc = harness._run(te._extract_cli(root, tmp / 'store',
                                      f'--config.data.validation_file={root}/train.jsonl'),
                      environ)
  assert proc.returncode == 0, proc.stderr[-3000:]
  points = harness.trace(tl._train_cli(tmp / 'store', tmp / 'whole', *ARGS), environ,
                         tmp / 'trace.whole')
  return tmp / 'store', environ, tmp / 'whole', points


def _rows(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _check_same_run(whole, cut):
  a, b = _rows(whole), _rows(cut)
  assert [r['step'] for r in b] == [r['step'] for r in a]  # each step logged once, in order
  assert a == b
  # TensorBoard holds the same rows, each step once (a kill may leave its own files unflushed)
  board = tl._tensorboard(cut)
  assert sorted(board) == sorted({r['step'] for r in b})
  for row in b:
    got = board[row['step']]
    assert all(got[k] == np.float32(v) for k, v in row.items() if k != 'step'), row['step']
  (sa, pa), (sb, pb) = tl._final_params(whole), tl._final_params(cut)
  assert sa == sb == 24
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, pa, pb)))


def test_ten_kills_at_random_points_then_restarts_reproduce_the_run(run, tmp_path):
  store, environ, whole, points = run
  kills = harness.kill_chain(tl._train_cli(store, tmp_path / 'cut', *ARGS), environ, tmp_path,
                             n_points=len(points), kills=10, seed=1)
  assert len(kills) == 10
  assert len({k.point for k in kills}) == 3, collections.Counter(k.point for k in kills)
  _check_same_run(whole, tmp_path / 'cut')
  print(f'{len(points)} fault points; killed at', [(k.position, k.point) for k in kills])


def test_kills_inside_checkpoint_saves_lose_nothing(run, tmp_path):
  store, environ, whole, points = run
  saves = points.count('train.save_started')
  ckpt = tmp_path / 'cut' / 'checkpoints'
  unfinished = []  # orbax's temporary directories a kill left behind

  def look():
    unfinished.append([d for d in os.listdir(ckpt) if not d.isdigit()])
  kills = harness.kill_chain(tl._train_cli(store, tmp_path / 'cut', *ARGS), environ, tmp_path,
                             n_points=saves, kills=6, seed=2, only='train.save_started',
                             max_delay=0.3, after_kill=look)
  assert len(kills) >= 4, kills  # a delayed kill can run past the next chosen save
  assert sum(map(bool, unfinished)) >= 3, unfinished  # most kills landed inside a write
  assert not [d for d in os.listdir(ckpt) if not d.isdigit()]  # and restarts cleaned them up
  _check_same_run(whole, tmp_path / 'cut')
  print(f'{saves} saves; killed at saves', [k.position for k in kills], unfinished)


def test_ctrl_c_and_sigterm_to_the_process_group_stop_after_a_saved_step(run, tmp_path):
  """Ctrl-C (SIGINT to the terminal's process group), then SIGTERM to every process of the job
  (Slurm's time limit, a Spot VM's shutdown), a Grain worker included each time: as step 5
  ends, then as the rerun's 3rd step does, in a run that saves every 2 steps. Each run stops
  after the first step checked once the handler ran (that one, or a later one on a busy
  machine), saves it, and ends with a line saying so, by SIGINT as Python ends on Ctrl-C (no
  traceback) or with exit 143; the last rerun resumes there and ends as the uninterrupted run
  (no workers: the same batches) does, bit for bit."""
  store, environ, whole, _ = run
  cut = tmp_path / 'cut'
  argv = tl._train_cli(store, cut, *ARGS, '--config.train.worker_count=1')
  step = 0
  for sig, name, n, code in (('INT', 'Ctrl-C', 5, -signal.SIGINT),
                             ('TERM', 'SIGTERM', 3, distributed.STOPPED_EXIT)):
    proc = harness.signal_at(argv, environ, 'train.step', n, sig)
    assert proc.returncode == code, proc.stderr[-3000:]
    stopped = re.search(rf'{name}: stopped training after step (\d+) \(its checkpoint is saved '
                        rf'in {re.escape(str(cut))}', proc.stderr)
    assert stopped and step + n <= int(stopped[1]) < 24, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]  # nor did a worker die of it
    step = int(stopped[1])
    assert max(int(d) for d in os.listdir(cut / 'checkpoints')) == step
    assert [r['step'] for r in _rows(cut)][-1] == step
  proc = harness._run(argv, environ)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'checkpoints at step {step}' in proc.stdout, proc.stdout[-2000:]
  _check_same_run(whole, cut)
