"""mode=train end to end on a smoke store: checkpoints, validation, metrics, NaN stop, online
teacher (kills and restarts: tests/faults/)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests import test_extract as te

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  root = te.make_teacher(tmp_path_factory.mktemp('kd'))
  proc = _run(te._extract_cli(root, root / 'store',
                                        f'--config.data.validation_file={root}/train.jsonl'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / 'store'


def _train_cli(store, workdir, *extra):
  """A training command; its random student's vocabulary is the store's (train.student in
  `extra` brings its own)."""
  student = any(arg.startswith('--config.train.student=') for arg in extra)
  return [sys.executable, '-m', 'jkd.main', '--config', 'configs/base.py', '--config.mode=train',
          f'--config.train.store={store}', f'--config.workdir={workdir}',
          *(() if student else ('--config.model.vocab_size=300',
                                '--config.model.padded_vocab_size=320')),
          '--config.data.max_seq_length=64', '--config.train.global_batch_size=8',
          '--config.train.warmup_steps=1', '--config.train.constant_steps=0',
          '--config.train.lr=1e-3', '--config.train.precision=fp32',
          '--config.train.max_epochs=-1',  # 48 examples are 6 steps an epoch: runs go past
          '--config.distill.sft_loss_weight=0.4', *extra]


def _run(cmd, **env):
  return subprocess.run(cmd, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True,
                        timeout=600)


def _metrics(workdir) -> dict[int, dict]:
  """Last logged values per step (a resumed run logs the steps after its checkpoint again)."""
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    row = json.loads(line)
    out.setdefault(row['step'], {}).update(row)
  return out


def _tensorboard(workdir) -> dict[int, dict]:
  """{step: {tag: value}} of the TensorBoard event files (TFRecord framing: length, its CRC,
  the Event, its CRC), as float32 holds them."""
  import glob
  import struct

  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    i = 0
    while i + 12 <= len(data):
      n = struct.unpack('<Q', data[i:i + 8])[0]
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        assert v.tag not in out.get(event.step, {}), (v.tag, event.step)  # each logged once
        out.setdefault(event.step, {})[v.tag] = v.simple_value
  return out


def _final_params(workdir):
  """(last step, its params) of a workdir's checkpoints, restored onto one device (whatever
  devices and processes saved them)."""
  import jax
  import orbax.checkpoint as ocp
  ckpt = os.path.join(workdir, 'checkpoints')
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  path = os.path.join(ckpt, str(step), 'state')
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          ckptr.metadata(path).item_metadata.tree)
    return step, ckptr.restore(path, target)['params']


@pytest.mark.parametrize('keys,n_train,want', [
    (dict(max_steps=-1, max_epochs=1), 100, (12, 12)),  # 100 // 8: the epoch sets both
    (dict(max_steps=-1, max_epochs=3), 100, (36, 36)),
    (dict(max_steps=30, max_epochs=1), 100, (12, 30)),  # NeMo: the epoch ends the run first
    (dict(max_steps=30, max_epochs=3), 100, (30, 30)),
    (dict(max_steps=30, max_epochs=-1), 100, (30, 30)),  # jkd's -1: no epoch bound
    (dict(max_steps=-1, max_epochs=2, limit_train_batches=5), 100, (10, 10)),
    (dict(max_steps=30, max_epochs=2, limit_train_batches=5), 100, (10, 30)),
])
def test_run_length_is_nemos(keys, n_train, want, capsys):
  """NeMo-Aligner's SupervisedTrainer: min(steps per epoch x max_epochs, max_steps), the
  schedule over max_steps; an epoch-bounded run says where it ends."""
  from jkd import train, train_loop
  tc = train.TrainConfig(global_batch_size=8, warmup_steps=0, constant_steps=0, **keys)
  assert train_loop.run_length(tc, n_train) == want
  assert ('ends the run at step' in capsys.readouterr().out) == (want[0] < want[1])


def test_an_online_resume_keeps_the_data_format(tmp_path):
  """Online, the data file's records are tokenised at every start: a resume under another
  data.format would continue the restored stream over other tokens (it was accepted)."""
  from configs import base
  from jkd import train_config, train_loop
  config = base.get_config()
  config.workdir, config.distill.teacher_source = str(tmp_path), 'online'
  config.data.train_file, config.train.max_steps = str(tmp_path / 'train.jsonl'), 10
  config.train.warmup_steps = config.train.constant_steps = 0
  ls, tc = train_loop.loop_settings(config), train_config.train_config(config)
  teacher = {'extract.top_k': 4, 'extract.teacher': '/t'}
  record = train_loop._check_resumable(ls, config, tc, 0, 10, 48, teacher)  # a fresh start
  train_loop._write_run(str(tmp_path / train_loop.RUN_FILE), record)
  assert train_loop._check_resumable(ls, config, tc, 5, 10, 48, teacher) is None  # it stands
  config.data.format = 'chatml'
  with pytest.raises(ValueError, match=r"saved with data\.format='chat' \(now 'chatml'\)"):
    train_loop._check_resumable(ls, config, tc, 5, 10, 48, teacher)


def test_a_resume_by_another_number_of_processes_is_refused(tmp_path, monkeypatch):
  """The data iterator's state is saved one file per process (process_I-of-N.json): resumed by
  another number of processes (a 2-VM job restarted on the one VM left), Grain failed naming a
  file, not the cause."""
  from configs import base
  from jkd import train_config, train_loop
  config = base.get_config()
  config.workdir, config.train.store = str(tmp_path), str(tmp_path / 'store')
  ls, tc = train_loop.loop_settings(config), train_config.train_config(config)
  monkeypatch.setattr(train_loop.jax, 'process_count', lambda: 2)
  record = train_loop._check_resumable(ls, config, tc, 0, 10, 48, {})
  train_loop._write_run(str(tmp_path / train_loop.RUN_FILE), record)
  monkeypatch.undo()
  with pytest.raises(ValueError, match=r'saved with processes=2 \(now 1\)'):
    train_loop._check_resumable(ls, config, tc, 5, 10, 48, {})


def test_a_second_run_in_a_training_workdir_is_refused(store, tmp_path):
  """Two runs in one workdir broke both (the second removed the first's checkpoint in the
  writing as a leftover of its own, and rewrote its metrics): a run holds the workdir."""
  (tmp_path / 'run').mkdir()
  lock = tmp_path / 'run' / '.train.p00000.lock'
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from jkd import files; '
       'files.lock(sys.argv[1], "held"); print("held", flush=True); time.sleep(120)',
       str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    second = _run(_train_cli(store, tmp_path / 'run', '--config.train.max_steps=2'))
  finally:
    holder.kill()
    holder.wait()
  assert second.returncode == 2 and (f'{tmp_path}/run: another run is training in this workdir '
                                     f'(it holds {lock})') in second.stderr, second.stderr[-3000:]
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not os.listdir(
      tmp_path / 'run' / 'checkpoints')


def test_run_length_with_nothing_to_do():
  from jkd import train, train_loop
  tc = train.TrainConfig(global_batch_size=8, warmup_steps=0, constant_steps=0)
  with pytest.raises(ValueError, match=r'^train\.max_epochs=1: runs no step, an epoch of 7 train '
                     r'examples holding no full batch of train\.global_batch_size=8; .*'
                     r'train\.max_epochs=-1'):
    train_loop.run_length(tc, 7)


def test_train_validates_checkpoints_and_logs(store, tmp_path):
  args = ('--config.train.max_steps=6', '--config.train.val_check_interval=2',
          '--config.train.save_interval=4', '--config.train.limit_val_batches=2',
          '--config.train.save_nemo_on_train_end=True', f'--config.train.export_hf={tmp_path}/hf',
          '--config.export.dtype=float32')
  proc = _run(_train_cli(store, tmp_path / 'run', *args))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _metrics(tmp_path / 'run')
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]
  assert all('train/loss' in r and 'train/tokens_per_sec' in r for r in rows.values())
  assert [s for s, r in rows.items() if 'val/loss' in r] == [2, 4, 6]
  assert rows[6]['train/consumed_samples'] == 48
  # val/sft_loss at the end: NeMo's reduction (the mean of micro-batch token means; rows cut
  # at data.max_seq_length=64 may keep no trained token and count as 0) over the first
  # limit_val_batches=2 batches of 8 rows (micro-batches of 1), from the exported final student
  # and the store's records, in numpy.
  import jax
  import numpy as np
  from jkd import model
  from jkd.data import logit_store
  cfg, params = model.load(str(tmp_path / 'run' / 'student'))
  forward = jax.jit(model.forward, static_argnums=0)
  row_means = []
  for rec in (logit_store.Reader(str(store), 'validation')[i] for i in range(16)):
    tokens, labels, mask = rec.tokens[:64], rec.labels[:64], rec.loss_mask[:64]
    logits = np.asarray(forward(cfg, params, tokens[None]), np.float64)[0]
    z = logits.max(-1)
    lse = z + np.log(np.exp(logits - z[:, None]).sum(-1))
    ce = lse - np.take_along_axis(logits, labels[:, None].astype(np.int64), -1)[:, 0]
    row_means.append((ce * mask).sum() / max(mask.sum(), 1))
  assert 0 < sum(m == 0 for m in row_means) < 16  # the cut rows are in the mean, as in NeMo
  assert rows[6]['val/sft_loss'] == pytest.approx(np.mean(row_means), rel=1e-5)
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['4', '6']
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(tmp_path / 'run' / 'tensorboard'))
  assert 'teacher' not in json.dumps(os.listdir(tmp_path / 'run' / 'checkpoints' / '6'))
  assert not os.path.exists(tmp_path / 'run' / 'profile')  # profile.start_step=-1: no trace
  # save_nemo_on_train_end: the final student as a model dir, a .nemo and (asked) HF
  from third_party.convert import from_nemo
  cfg, params = from_nemo.load_nemo(str(tmp_path / 'run' / 'student.nemo'))
  assert cfg.num_layers == 2 and cfg.padded_vocab == 320  # no tokenizer here: V reads as P
  assert os.path.isfile(tmp_path / 'hf' / 'model.safetensors')
  assert (f"the student: {tmp_path / 'run' / 'student'} (exported: "
          f"{tmp_path / 'run' / 'student.nemo'}, {tmp_path}/hf)") in proc.stdout, proc.stdout
  from safetensors.numpy import load_file  # in export.dtype (training's exports were bf16 always)
  assert {str(a.dtype) for a in load_file(tmp_path / 'hf' / 'model.safetensors').values()} == {
      'float32'}
  assert {str(p.dtype) for p in jax.tree.leaves(params)} == {'float32'}
  # A rerun of the finished run (as after a kill during the export) redoes only the exports.
  nemo = tmp_path / 'run' / 'student.nemo'
  again = _run(_train_cli(store, tmp_path / 'run', *args))
  assert again.returncode == 0 and 'at step 6' in again.stdout, again.stderr[-3000:]
  assert 'learning-rate schedule' not in again.stdout  # the same schedule: nothing to say
  summary = [[line for line in p.stdout.splitlines() if line.startswith('[train] 6 steps; ')]
             for p in (proc, again)]
  assert summary[0] == summary[1] and 'val/loss' in summary[0][0], summary  # the run's values
  # Extended to 8 steps, the run resumes at 6 and replaces its own export at the end. Its
  # schedule is the config's, over 8 steps, and it says so: step 7 is past the decay of the
  # 6-step one (min_lr; a NeMo run would stay there), not of this one.
  before = os.path.getmtime(nemo)
  longer = _run(_train_cli(store, tmp_path / 'run', *args, '--config.train.max_steps=8',
                          '--config.distill.kd_loss_weight=0.5'))
  assert longer.returncode == 0 and 'at step 6' in longer.stdout, longer.stderr[-3000:]
  assert ('resuming at step 6 under other distill settings (distill.kd_loss_weight=1.0 -> 0.5): '
          'the loss is another from step 7 on') in longer.stdout  # allowed, as in NeMo, and said
  rows = _metrics(tmp_path / 'run')
  assert os.path.getmtime(nemo) > before and sorted(rows) == list(range(1, 9))
  from jkd import train
  lr = {m: float(train.make_schedule(train.TrainConfig(
      lr=1e-3, min_lr=9e-7, warmup_steps=1, constant_steps=0, max_steps=m))(6)) for m in (6, 8)}
  assert lr[6] == pytest.approx(9e-7) and rows[7]['train/lr'] == pytest.approx(lr[8], rel=1e-6)
  assert ('resuming at step 6 under another learning-rate schedule (train.max_steps=6 -> 8): '
          f'step 7 at lr {lr[8]:.4g}, {lr[6]:.4g} under the old one') in longer.stdout
  recorded = json.loads((tmp_path / 'run' / 'run.json').read_text())
  assert recorded['schedule']['max_steps'] == 8 and recorded['distill']['kd_loss_weight'] == 0.5
  # Extended again and killed after its last checkpoint (16), before its export: the rerun
  # resumes there and replaces the .nemo, which run.json records as the one its end wrote (it
  # is older than checkpoint 16, which an export newer than its checkpoint alone would not tell).
  killed = _run(_train_cli(store, tmp_path / 'run', *args, '--config.train.max_steps=16'),
                JKD_FAULT_KILL='train.export@1')
  assert killed.returncode == -9 and os.path.isdir(tmp_path / 'run' / 'checkpoints' / '16')
  resumed = _run(_train_cli(store, tmp_path / 'run', *args, '--config.train.max_steps=16'))
  assert resumed.returncode == 0 and 'at step 16' in resumed.stdout, resumed.stderr[-3000:]
  exports = json.loads((tmp_path / 'run' / 'run.json').read_text())['exports']
  assert sorted(exports) == [str(tmp_path / 'hf' / 'config.json'), str(nemo)]
  assert os.path.getmtime(nemo) * 1e9 == pytest.approx(exports[str(nemo)][0], abs=1e3)
  # A checkpoint past max_steps, and a .nemo older than the latest checkpoint (not this run's),
  # are refused before training, and nothing is overwritten.
  recorded = (tmp_path / 'run' / 'run.json').read_text()
  shorter = _run(_train_cli(store, tmp_path / 'run', *args))
  assert shorter.returncode == 2 and 'past this run\'s last step 6' in shorter.stderr, shorter.stderr
  # Neither a refused run nor a rerun of the finished one (no step runs) records its settings:
  # the record is of how the checkpoints were made (both rewrote it, and the first also said
  # it was resuming under its schedule).
  assert (tmp_path / 'run' / 'run.json').read_text() == recorded and (
      'learning-rate schedule' not in shorter.stdout)
  finished = _run(_train_cli(store, tmp_path / 'run', *args, '--config.train.max_steps=16',
                             '--config.distill.kd_loss_weight=0.25'))
  assert finished.returncode == 0 and 'other distill settings' not in finished.stdout, (
      finished.stderr[-3000:])
  assert json.loads((tmp_path / 'run' / 'run.json').read_text())['distill'] == json.loads(
      recorded)['distill']
  # Another seed would restore an iterator of another data stream: refused, named.
  # Another worker_count, an iterator state of another form (a bare KeyError from Grain).
  reseeded = _run(_train_cli(store, tmp_path / 'run', *args, '--config.train.max_steps=8',
                             '--config.seed=1', '--config.train.worker_count=1'))
  assert reseeded.returncode == 2 and (
      'saved with seed=0, train.worker_count=0 (now 1, 1)' in reseeded.stderr), reseeded.stderr
  # A store of another size (grown by more extraction jobs) shuffles into another stream too.
  run_json = tmp_path / 'run' / 'run.json'
  saved = run_json.read_text()
  run_json.write_text(json.dumps({**json.loads(saved), 'train split examples': 40}))
  grown = _run(_train_cli(store, tmp_path / 'run', *args, '--config.train.max_steps=8'))
  assert grown.returncode == 2 and (
      'saved with train split examples=40 (now 48)' in grown.stderr), grown.stderr
  # A store at the same path with another teacher's top-K (or another K): another objective.
  run_json.write_text(json.dumps({**json.loads(saved), 'store teacher': 'another'}))
  retaught = _run(_train_cli(store, tmp_path / 'run', *args, '--config.train.max_steps=8'))
  assert retaught.returncode == 2 and "saved with store teacher='another'" in retaught.stderr, (
      retaught.stderr)
  run_json.write_text(saved)
  # Another student (config.model here): its params are not the checkpoints', refused naming
  # them before the student is built (orbax's own error comes deep inside its restore).
  deeper = _run(_train_cli(store, tmp_path / 'run', *args, '--config.train.max_steps=16',
                           '--config.model.num_layers=3'))
  assert deeper.returncode == 2 and 'parameters do not match the model config' in deeper.stderr
  assert 'checkpoints are of another student' in deeper.stderr.strip().splitlines()[-1]
  os.utime(nemo, (0, 0))
  old = _run(_train_cli(store, tmp_path / 'run', *args, '--config.train.max_steps=16'))
  assert old.returncode == 2 and 'student.nemo: already exists' in old.stderr, old.stderr
  assert os.path.getmtime(nemo) == 0 and 'train: ' not in old.stderr


def test_models_at_the_export_paths_are_refused_unless_the_runs_own(store, tmp_path):
  """Another model at a run's export paths (a user's copy, another run's export) is refused
  before the run trains: a resumed run used to take any .nemo newer than its checkpoint for its
  own and delete it, and the HF export wrote over any directory's config, weights and
  tokenizer. The run's own, also one a kill left half-written (recorded as pending), is
  replaced."""
  nemo, hf = tmp_path / 'out' / 'student_nemo', tmp_path / 'out' / 'hf'
  common = ('--config.train.val_check_interval=2', '--config.train.save_interval=2')
  first = _run(_train_cli(store, tmp_path / 'run', *common, '--config.train.max_steps=2'))
  assert first.returncode == 0, first.stderr[-3000:]
  (nemo / 'model_weights').mkdir(parents=True)  # both newer than checkpoint 2
  hf.mkdir()
  for path in (nemo / 'model_config.yaml', hf / 'config.json', hf / 'tokenizer.json'):
    path.write_text('theirs')
  args = (*common, '--config.train.max_steps=4', f'--config.train.export_nemo={nemo}',
          f'--config.train.export_hf={hf}')
  for drop in (None, nemo):
    if drop:
      shutil.rmtree(drop)
    refused = _run(_train_cli(store, tmp_path / 'run', *args))
    marker = hf / 'config.json' if drop else nemo
    assert refused.returncode == 2 and (f'{marker}: already exists and is not this run\'s '
                                        'export') in refused.stderr, refused.stderr[-3000:]
    assert (hf / 'tokenizer.json').read_text() == 'theirs'
    assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['2']
  shutil.rmtree(hf)
  done = _run(_train_cli(store, tmp_path / 'run', *args))
  assert done.returncode == 0 and 'at step 2' in done.stdout, done.stderr[-3000:]
  assert (nemo / 'model_config.yaml').read_text() != 'theirs' and (hf / 'config.json').is_file()
  # Killed inside its export: run.json says pending, the files are in any state; the rerun (of
  # the finished run: exports only) replaces them.
  run_json = tmp_path / 'run' / 'run.json'
  record = json.loads(run_json.read_text())
  record['exports'] = {k: 'pending' for k in record['exports']}
  run_json.write_text(json.dumps(record))
  (hf / 'config.json').write_text('{}')
  again = _run(_train_cli(store, tmp_path / 'run', *args))
  assert again.returncode == 0, again.stderr[-3000:]
  exports = json.loads(run_json.read_text())['exports']
  assert sorted(exports) == [str(hf / 'config.json'), str(nemo)]
  assert all(isinstance(v, list) for v in exports.values()), exports
  # Another model put at a path during training: refused at the end, and not recorded as
  # pending first (the next rerun took it for its own half-written export and deleted it).
  during = ('import sys; from jkd import main, model; save = model.save\n'
            'def save_then_theirs(*a, **k):\n'
            '  save(*a, **k)\n'
            f'  open({str(hf / "config.json")!r}, "w").write("theirs")\n'
            'model.save = save_then_theirs\n'
            'main.app.run(main.main, flags_parser=main._parse_flags)')
  cli = _train_cli(store, tmp_path / 'run', *args)
  placed = _run([sys.executable, '-c', during, *cli[3:]])
  assert placed.returncode == 2 and f'{hf}: holds a Hugging Face model' in placed.stderr, (
      placed.stderr[-3000:])
  assert json.loads(run_json.read_text())['exports'] == exports
  refused = _run(cli)
  assert refused.returncode == 2 and (hf / 'config.json').read_text() == 'theirs', (
      refused.stderr[-3000:])


def test_a_directory_nemo_export_is_redone_by_its_run_and_refused_to_another(store, tmp_path):
  """train.export_nemo without the .nemo suffix writes a directory: a rerun of the finished run
  redoes it (it is the run's own), another workdir's run is refused before it trains."""
  target = tmp_path / 'student_nemo'
  args = ('--config.train.max_steps=2', '--config.train.val_check_interval=2',
          '--config.train.save_interval=2', f'--config.train.export_nemo={target}')
  first = _run(_train_cli(store, tmp_path / 'run', *args))
  assert first.returncode == 0 and (target / 'model_config.yaml').is_file(), first.stderr[-3000:]
  again = _run(_train_cli(store, tmp_path / 'run', *args))
  assert again.returncode == 0 and 'at step 2' in again.stdout, again.stderr[-3000:]
  other = _run(_train_cli(store, tmp_path / 'other', *args))
  assert other.returncode == 2 and f'{target}: already exists and is not this run' in other.stderr
  assert not (tmp_path / 'other' / 'checkpoints').exists() or not os.listdir(
      tmp_path / 'other' / 'checkpoints')


def test_restore_from_path_starts_from_its_params_with_a_new_schedule(store, tmp_path):
  """A new run from another run's checkpoint takes its params only: step 1 has the first
  step's learning rate (as the first run's step 1) but not its loss (same batch and seed,
  other params), and the checkpoints count from 1. Its optimizer may differ: decaying norms too
  gives an optimizer state of another structure than the checkpoint's, which is not read."""
  args = ('--config.train.val_check_interval=2', '--config.train.save_interval=2',
          '--config.train.limit_val_batches=1')
  first = _run(_train_cli(store, tmp_path / 'first', '--config.train.max_steps=2', *args))
  assert first.returncode == 0, first.stderr[-3000:]
  second = _run(_train_cli(store, tmp_path / 'second', '--config.train.max_steps=2', *args,
                           f'--config.train.restore_from_path={tmp_path}/first/checkpoints/2',
                           '--config.train.do_layer_norm_weight_decay=True'))
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'started from the params of' in second.stdout
  a, b = _metrics(tmp_path / 'first'), _metrics(tmp_path / 'second')
  assert [b[s]['train/lr'] for s in (1, 2)] == [a[s]['train/lr'] for s in (1, 2)]
  assert b[1]['train/loss'] < a[1]['train/loss'] - 1e-4
  assert sorted(os.listdir(tmp_path / 'second' / 'checkpoints')) == ['2']
  # A path that is no checkpoint step, or a step of another student: refused by the config
  # checks, naming the key.
  for bad, message in ((f'{tmp_path}/first/checkpoints', 'is no checkpoint step'),
                       (f'{tmp_path}/first/checkpoints/2', 'parameters do not match')):
    proc = _run(_train_cli(store, tmp_path / 'third', '--config.train.max_steps=2', *args,
                           f'--config.train.restore_from_path={bad}',
                           '--config.model.num_layers=3'))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and message in last and 'train.restore_from_path' in last, last


def test_a_validation_split_without_a_full_batch_is_refused(store, tmp_path, monkeypatch):
  """Validation runs on full global batches: a split smaller than one is refused before
  training (48 examples, global batch 56), limit_val_batches=0 turns validation off, and a
  validation that yields no batch at all (packed rows, say) raises instead of logging nothing."""
  args = ('--config.train.global_batch_size=56', '--config.train.max_steps=1',
          '--config.train.val_check_interval=1', '--config.train.save_interval=1')
  small = _run(_train_cli(store, tmp_path / 'run', *args))
  assert small.returncode == 2 and 'validation split has 48 examples' in small.stderr, (
      small.stderr[-3000:])
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
  # Validation off: the validation split is not read, so an unfinished one does not matter
  # (it was refused as unfinished).
  shutil.copytree(store, tmp_path / 'store')
  os.remove(tmp_path / 'store' / 'validation' / 'finished.json')
  off = _run(_train_cli(tmp_path / 'store', tmp_path / 'off', *args,
                        '--config.train.limit_val_batches=0'))
  assert off.returncode == 0, off.stderr[-3000:]
  assert not any('val/loss' in r for r in _metrics(tmp_path / 'off').values())
  assert 'no validation split' not in off.stdout
  # A store without a validation split (a NeMo chunk import, say) validates nothing, and says so
  shutil.rmtree(tmp_path / 'store' / 'validation')
  none = _run(_train_cli(tmp_path / 'store', tmp_path / 'none', *args))
  assert none.returncode == 0 and f'no validation split ({tmp_path}/store has no validation/)' \
      in none.stdout, none.stderr[-3000:]
  # Packed into rows of 256 tokens, 48 examples give fewer rows than a batch of 16: refused
  # before training (it failed at the first validation, with no checkpoint saved).
  packed = _run(_train_cli(store, tmp_path / 'packed', *args[1:], '--config.train.pack=True',
                           '--config.train.global_batch_size=16',
                           '--config.data.max_seq_length=256'))
  assert packed.returncode == 2 and "the validation split's 48 examples pack into fewer rows " \
      'than one batch of train.global_batch_size=16' in packed.stderr, packed.stderr[-3000:]
  assert '[train]' not in packed.stdout
  assert not os.path.exists(tmp_path / 'packed' / 'metrics.jsonl')

  from jkd import train, train_loop
  monkeypatch.setattr(train_loop, '_loader', lambda *a, **k: (b for b in ()))  # closable
  tc = train.TrainConfig(global_batch_size=8, limit_val_batches=-1)
  with pytest.raises(ValueError, match='no full batch of train.global_batch_size=8'):
    train_loop._validate(None, None, tc, None, 0, None, {}, ())


def test_profile_traces_the_chosen_train_steps(store, tmp_path):
  """config.profile on a smoke run: one session under profile.dir with an xplane and a
  Perfetto trace, holding exactly profile.steps runs of the train step."""
  from tests.test_profiling import executions
  proc = _run(_train_cli(store, tmp_path / 'run', '--config.train.max_steps=5',
                         '--config.train.val_check_interval=5', '--config.train.save_interval=5',
                         '--config.profile.start_step=2', '--config.profile.steps=2',
                         f'--config.profile.dir={tmp_path}/trace',
                         '--config.profile.create_perfetto_trace=True'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'[profile] steps 2..3 -> {tmp_path}/trace' in proc.stdout
  sessions = os.listdir(tmp_path / 'trace' / 'plugins' / 'profile')
  assert len(sessions) == 1, sessions
  files = os.listdir(tmp_path / 'trace' / 'plugins' / 'profile' / sessions[0])
  assert any(f.endswith('.xplane.pb') for f in files) and 'perfetto_trace.json.gz' in files
  assert executions(tmp_path / 'trace', 'step') == 2
  assert not os.path.exists(tmp_path / 'run' / 'profile')  # profile.dir moved it


def test_non_finite_loss_stops_with_the_step(store, tmp_path):
  proc = _run(_train_cli(store, tmp_path / 'run', '--config.train.max_steps=4',
                                   '--config.train.val_check_interval=2',
                                   '--config.train.save_interval=2',
                                   '--config.distill.logits_scale=1e38'))
  assert proc.returncode == 2
  assert 'jkd: error: train/' in proc.stderr and 'at step 1' in proc.stderr


def online_args(root, validation_file=None, dtype='float32'):
  """Overrides for distill.teacher_source='online' on the smoke teacher and its plain data
  under `root` (validation: the train file unless given; dtype None: base.py's)."""
  return ('--config.distill.teacher_source=online', f'--config.extract.teacher={root}/teacher',
          f'--config.data.train_file={root}/train.jsonl',
          f'--config.data.validation_file={validation_file or f"{root}/train.jsonl"}',
          '--config.data.format=plain', '--config.extract.top_k=8',
          '--config.extract.vocab_tile=64',
          *((f'--config.extract.dtype={dtype}',) if dtype else ()))


def test_online_teacher_equals_training_from_the_store(store, tmp_path):
  """distill.teacher_source='online' (the step runs the teacher on the data file) gives the
  same per-step losses as training from the store extracted by the same teacher (fp32 both)."""
  root = store.parent
  short = tmp_path / 'store64'  # examples cut as the online run cuts them (NeMo's truncation)
  proc = _run(te._extract_cli(root, short, '--config.data.max_seq_length=64',
                                        f'--config.data.validation_file={root}/train.jsonl'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  args = ('--config.train.max_steps=3', '--config.train.val_check_interval=3',
          '--config.train.save_interval=3', '--config.train.limit_val_batches=1')
  offline = _run(_train_cli(short, tmp_path / 'offline', *args))
  assert offline.returncode == 0, offline.stderr[-3000:]
  online = _run(_train_cli('', tmp_path / 'online', *args, *online_args(root)))
  assert online.returncode == 0, online.stderr[-3000:]
  a, b = _metrics(tmp_path / 'offline'), _metrics(tmp_path / 'online')
  assert sorted(a) == sorted(b) == [1, 2, 3]
  for step in a:
    for key in ('train/loss', 'train/kd_loss', 'train/sft_loss'):
      assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
  assert b[3]['val/loss'] == pytest.approx(a[3]['val/loss'], rel=1e-4)
  # Without validation the validation file is not read (a bad one stopped the run).
  (tmp_path / 'bad.jsonl').write_text('{not json\n')
  noval = _run(_train_cli(
      '', tmp_path / 'noval', '--config.train.max_steps=1', '--config.train.limit_val_batches=0',
      *online_args(root, validation_file=f'{tmp_path}/bad.jsonl', dtype=None)))
  assert noval.returncode == 0, noval.stderr[-3000:]
  # Resumed with the teacher in another precision: another objective, refused as another store
  # teacher is (it went on, its KD loss another from the resumed step on).
  bf16 = _run(_train_cli('', tmp_path / 'online', *args, '--config.train.max_steps=4',
                         *online_args(root, dtype='bfloat16')))
  assert bf16.returncode == 2 and (
      "saved with extract.dtype='float32' (now 'bfloat16')" in bf16.stderr), bf16.stderr[-3000:]


def test_wandb_run_continues_across_restarts(tmp_path, monkeypatch):
  """With train.wandb_project set, every resume of one workdir logs to one W&B run (its id is
  kept in the workdir), as every step is logged once elsewhere; a start from step 0 to a new
  one (W&B drops steps below those logged: the old run's curve stayed)."""
  import types

  from configs import base
  from jkd import train_loop
  calls = []

  class Run:
    def log(self, values, step):
      pass

    def finish(self):
      pass

  fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or Run())
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  config = base.get_config()
  config.workdir, config.train.wandb_project = str(tmp_path), 'kd'
  for start in (0, 4, 0):  # a start from scratch (killed before its first checkpoint): anew
    train_loop._Metrics(train_loop.loop_settings(config), config, start).close()
  assert [c['project'] for c in calls] == ['kd', 'kd', 'kd'] and calls[0]['id'] == calls[1]['id']
  assert calls[2]['id'] != calls[1]['id'] and (tmp_path / 'wandb_id').read_text() == calls[2]['id']


_READ_EVENTS = '''
import struct, sys
from jkd import train_loop
w = train_loop._summary_writer(sys.argv[1])
w.add_scalar('train/loss', 2.5, 3)
w.close()
print('torch' in sys.modules)
import os, torch  # still importable afterwards
from tensorboardX.proto import event_pb2
for name in os.listdir(sys.argv[1]):
  data = open(os.path.join(sys.argv[1], name), 'rb').read()
  while data:  # TFRecords: length, its crc, the event, its crc
    n = struct.unpack('<Q', data[:8])[0]
    e = event_pb2.Event.FromString(data[12:12 + n])
    data = data[16 + n:]
    for v in e.summary.value:
      print(e.step, v.tag, v.simple_value)
'''


def test_summary_writer_leaves_torch_unimported(tmp_path):
  """tensorboardX imports torch, where installed, to accept its tensors (~2 s per training
  start); jkd's writer hides it from that import, and the events still hold the scalars."""
  proc = subprocess.run([sys.executable, '-c', _READ_EVENTS, str(tmp_path)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split('\n')[:2] == ['False', '3 train/loss 2.5'], proc.stdout


def test_a_student_tokenizer_other_than_the_stores_is_warned_about(store, tmp_path, capsys):
  """The store records its teacher tokenizer's fingerprint: a student whose tokenizer differs
  (here in its pad id; same vocabulary size, which the config checks cannot tell apart) trains
  with a warning, one with the store's tokenizer without; evaluation on the store too."""
  from jkd import evaluate, tokenizer
  teacher = store.parent / 'teacher'
  for name, pad_id in (('same', None), ('other', 7)):
    student = tmp_path / name
    shutil.copytree(teacher, student)
    if pad_id is not None:
      tok = tokenizer.load(str(teacher))
      tokenizer.save(tokenizer.Tokenizer(tok.library, tok.files, bos_id=tok.bos_id,
                                         eos_id=tok.eos_id, pad_id=pad_id), str(student))
    proc = _run(_train_cli(store, tmp_path / f'run_{name}', '--config.train.max_steps=1',
                           '--config.train.limit_val_batches=0', '--config.train.save_interval=1',
                           f'--config.train.student={student}'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = f'warning: the tokenizer of {student} is not the one {store} was extracted with'
    assert (warned in proc.stdout) == (pad_id is not None), proc.stdout[-2000:]
    capsys.readouterr()
    evaluate.evaluate_store(str(student), str(store), batch_size=8, max_seq_length=64,
                            max_batches=1)
    assert (warned in capsys.readouterr().out) == (pad_id is not None)


def test_a_failed_trace_stop_at_the_end_still_closes_the_run(store, tmp_path, monkeypatch,
                                                             devices8):
  """A profile window past the last step is stopped in the loop's cleanup; when stopping the
  trace fails there (a bad trace folder, say), the error reaches the caller and the checkpoint
  manager (and loader, metrics) are still closed."""
  import jax
  import orbax.checkpoint as ocp

  from configs import base
  from jkd import config as jkd_config
  from jkd import train_loop
  c = base.get_config()
  c.mode, c.workdir, c.train.store = 'train', str(tmp_path / 'run'), str(store)
  c.model.vocab_size, c.model.padded_vocab_size = 300, 320
  c.data.max_seq_length, c.train.global_batch_size = 64, 8
  c.train.warmup_steps, c.train.constant_steps, c.train.lr = 1, 0, 1e-3
  c.train.precision, c.train.max_epochs, c.train.max_steps = 'fp32', -1, 2
  c.train.limit_val_batches, c.train.save_interval = 0, 2
  c.profile.start_step, c.profile.steps = 2, 5
  jkd_config.validate(c)
  stop, closed = jax.profiler.stop_trace, []

  def failing_stop():
    stop()
    raise RuntimeError('Invalid trace folder')
  monkeypatch.setattr(jax.profiler, 'stop_trace', failing_stop)
  close = ocp.CheckpointManager.close
  monkeypatch.setattr(ocp.CheckpointManager, 'close',
                      lambda self: (closed.append(True), close(self))[1])
  with pytest.raises(OSError, match=r"profile\.dir='.*': writing the trace of steps 2\.\.2 "
                     'failed: Invalid trace folder'):  # one line from jkd.main
    train_loop.run(c)
  assert closed and os.path.isdir(tmp_path / 'run' / 'checkpoints' / '2')
