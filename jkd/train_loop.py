"""mode=train: the student's loop around `jkd.train`'s step.

    python -m jkd.main --config configs/nemotron8b_gpt2b.py --config.workdir=/tmp/run

Stages, top to bottom: mesh → data → model and optimizer → shardings and init → restore →
step functions → loop. One orbax CheckpointManager under `<workdir>/checkpoints` holds
{state, Grain iterator}; an existing run directory resumes exactly where it stopped (same data
order, same losses). With `distill.teacher_source='online'` there is no store: the data
files are tokenized with the teacher's tokenizer and the step computes the teacher's top-K
(extract.* settings) itself. The loop dispatches step n before it reads the metrics of step n-1, and
stops with the step in the message when a loss or gradient norm is not finite. Metrics go to
TensorBoard event files under `<workdir>/tensorboard`, to `<workdir>/metrics.jsonl` (one JSON
object per step, one more per validation) and to a progress bar; W&B too when
`train.wandb_project` is set: the step's losses, grad_norm and lr, consumed_samples, step_time
(wall time from dispatching the step to reading its metrics; a step that compiled, the first
of a run or of a new batch length, includes its compile) and tokens_per_sec (the global
batch's real tokens over step_time). The teacher never enters a checkpoint. `config.profile`
traces a window of steps (jkd/profiling.py). SIGTERM (or a first Ctrl-C) stops the run after a
step it saves, exit 143 (Ctrl-C: KeyboardInterrupt) (jkd.distributed.Preemption).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import json
import math
import os
import shutil
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jkd import config as jkd_config
from jkd import distributed, faults, files, model, profiling, sharding, tokenizer, train


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  workdir: str
  checkpoint_max_to_keep: int
  pack: bool
  pad_to_max_length: bool
  worker_count: int
  wandb_project: str
  save_nemo_on_train_end: bool
  export_nemo: str
  export_hf: str
  export_dtype: str  # the exports' stored weights (export.dtype, as mode=export's)
  max_seq_length: int


def loop_settings(config) -> LoopSettings:
  t = config.train
  return LoopSettings(
      workdir=config.workdir, checkpoint_max_to_keep=t.checkpoint_max_to_keep, pack=t.pack,
      pad_to_max_length=t.pad_to_max_length, worker_count=t.worker_count,
      wandb_project=t.wandb_project, save_nemo_on_train_end=t.save_nemo_on_train_end,
      export_nemo=t.export_nemo, export_hf=t.export_hf, export_dtype=config.export.dtype,
      max_seq_length=config.data.max_seq_length)


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch: where torch is installed (the convert
  extra), tensorboardX imports it only to accept torch tensors, ~2 s of every training start;
  jkd logs Python floats."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` raises ImportError for this import only
  try:
    import tensorboardX
  finally:
    if hide:
      del sys.modules['torch']
  return tensorboardX.SummaryWriter(logdir)


class _Metrics:
  """TensorBoard + metrics.jsonl (+ W&B) on process 0; scalars only. A run starting at step
  `start` (0, or a resumed checkpoint's) first drops what was logged after it (steps it is about
  to run again), so every step is logged once, as an uninterrupted run logs it. metrics.jsonl
  (flushed every step) is the record: TensorBoard's files, which a killed run may not have
  flushed, are written anew from it."""

  def __init__(self, ls: LoopSettings, config, start: int):
    self.on = jax.process_index() == 0
    self.tb = self.jsonl = self.wandb = None
    self.at_start: dict[str, float] = {}  # the values logged at step `start` (a resume's)
    if not self.on:
      return
    path = os.path.join(ls.workdir, 'metrics.jsonl')
    kept = []
    if os.path.exists(path):  # a fresh start (0) keeps nothing of a run killed before a save
      with open(path) as f:
        kept = [line for line in f if line.endswith('\n') and json.loads(line)['step'] <= start]
      with open(path + '.tmp', 'w') as f:
        f.writelines(kept)
      os.replace(path + '.tmp', path)
    tb_dir = os.path.join(ls.workdir, 'tensorboard')
    for old in glob.glob(os.path.join(tb_dir, 'events.out.tfevents.*')):
      os.remove(old)
    self.tb = _summary_writer(tb_dir)
    for line in kept:
      row = json.loads(line)
      step = row.pop('step')
      self._tb_row(step, row)
      if step == start:
        self.at_start.update(row)
    self.jsonl = open(path, 'a')
    if ls.wandb_project:
      try:
        import wandb
      except ImportError:
        raise ImportError('train.wandb_project is set but wandb is not installed: '
                          'pip install wandb') from None
      # One W&B run per workdir: a resumed run continues it (its id kept in the workdir); a
      # fresh start, one of its own (W&B would drop its steps below those already logged).
      id_file = os.path.join(ls.workdir, 'wandb_id')
      if start == 0 or not os.path.isfile(id_file):
        with open(id_file + '.tmp', 'w') as f:
          f.write(uuid.uuid4().hex[:16])
        os.replace(id_file + '.tmp', id_file)
      with open(id_file) as f:
        run_id = f.read().strip()
      self.wandb = wandb.init(project=ls.wandb_project, dir=ls.workdir, id=run_id,
                              config=config.to_dict(), resume='allow')

  def _tb_row(self, step: int, values: dict[str, float]) -> None:
    for name, value in values.items():
      self.tb.add_scalar(name, value, step)

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.on:
      return
    self._tb_row(step, values)
    self.jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self.jsonl.flush()
    if self.wandb is not None:
      self.wandb.log(values, step=step)

  def close(self):
    if self.on:
      self.tb.close()
      self.jsonl.close()
      if self.wandb is not None:
        self.wandb.finish()


def _scalars(metrics, prefix: str) -> dict[str, float]:
  """Host values of a step's metrics: (sum, count) pairs are divided here, after aggregation."""
  out = {}
  for name, value in jax.device_get(metrics).items():
    if isinstance(value, (tuple, list)):
      total, count = (float(np.sum(v)) for v in value)
      out[f'{prefix}/{name}'] = total / max(count, 1.0)
    else:
      out[f'{prefix}/{name}'] = float(value)
  return out


def _check_finite(values: dict[str, float], step: int) -> None:
  for name, value in values.items():
    if not math.isfinite(value):
      raise FloatingPointError(f'{name} is {value} at step {step}; stopping (the last '
                               'checkpoint is intact)')


_real_tokens = jax.jit(lambda segment_ids: jnp.sum(segment_ids > 0))  # padding has segment 0


def _global(batch: dict, shardings: dict) -> dict:
  """Process-local numpy rows -> global arrays laid out by the step's batch shardings."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v)
          for k, v in batch.items() if k in shardings}


def _loader(tc, ls, split: str, *, shuffle: bool, num_epochs, pad_id: int, seed: int,
            sources: dict):
  """Batches of the store split, or of `sources[split]` (online: examples, no teacher records)."""
  from jkd.data import loader
  per_process = tc.global_batch_size // jax.process_count()
  return loader.make_loader(
      tc.store, split, batch_size=per_process, seed=seed, shuffle=shuffle,
      num_epochs=num_epochs, top_k=tc.top_k, pack=ls.pack, max_seq_length=ls.max_seq_length,
      pad_id=pad_id, worker_count=ls.worker_count, drop_remainder=True,
      pad_to_max=ls.pad_to_max_length, source=sources.get(split), workers_ignore_signals=True)


def _val_loader(tc, ls, pad_id: int, sources: dict):
  """The validation split's full batches, in order, once."""
  return _loader(tc, ls, 'validation', shuffle=False, num_epochs=1, pad_id=pad_id, seed=0,
                 sources=sources)


RUN_FILE = 'run.json'  # in the workdir: the settings its checkpoints can only be resumed with
# The learning-rate schedule's settings (max_steps: its length), recorded in RUN_FILE too.
SCHEDULE_KEYS = ('lr', 'min_lr', 'warmup_steps', 'constant_steps', 'max_steps')


def _check_resumable(ls, config, tc, start: int, last_step: int, n_train: int,
                     teacher_id: dict) -> dict | None:
  """A workdir's checkpoints continue only the data stream and optimizer they were saved with:
  a resumed run with another seed, batch size, packing, length or data (another path, or a
  store that has grown: the shuffle is over its `n_train` examples, or that holds another
  teacher's top-K, `teacher_id`: the KD objective would change) would restore an iterator of
  a different stream; another worker_count or number of processes an iterator state of another
  form; another do_layer_norm_weight_decay an optimizer state of another structure. Such a
  resume is refused, naming the keys (keys a run.json from an older jkd lacks are not
  compared). A fresh run records its settings.

  The learning-rate schedule is the config's, resumed or not (NeMo instead restores its
  scheduler's max_steps from the checkpoint, so a NeMo run extended by train.max_steps stays at
  min_lr): a resume under another schedule (an extended run, say) says so, with the next step's
  learning rate under both, and records the new one. So do other distill settings (the loss:
  allowed, as in NeMo, and said). Returns the record to write, None when it stands: the caller
  writes it once every check has passed, and only a run with steps to run (before
  `last_step`) changes it: a refused or finished run's settings made no checkpoint."""
  online = config.distill.teacher_source == 'online'
  data = config.data.train_file if online else config.train.store
  now = {'seed': config.seed, 'train.global_batch_size': config.train.global_batch_size,
         'train.pack': config.train.pack, 'data.max_seq_length': config.data.max_seq_length,
         'data.train_file' if online else 'train.store': os.path.abspath(data),
         'train split examples': n_train, 'train.worker_count': config.train.worker_count,
         'processes': jax.process_count(),  # the iterator state is one file per process
         **({'data.format': config.data.format} if online else {}),  # the store fixes it
         'train.do_layer_norm_weight_decay': config.train.do_layer_norm_weight_decay,
         **teacher_id}
  schedule = {k: getattr(tc, k) for k in SCHEDULE_KEYS}
  distill = config.distill.to_dict()
  path = os.path.join(ls.workdir, RUN_FILE)
  if start > 0 and os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f)
    changed = [k for k in sorted(now) if k in saved and now[k] != saved[k]]
    if changed:
      raise ValueError(f'{path}: this workdir\'s checkpoints were saved with '
                       + ', '.join(f'{k}={saved.get(k)!r}' for k in changed) + ' (now '
                       + ', '.join(f'{now.get(k)!r}' for k in changed) + '); set those back, '
                       'or start another workdir with train.restore_from_path=<checkpoint>')
    if start >= last_step:  # no step runs: nothing is trained under these settings
      return None
    before = saved.get('schedule', schedule)
    if before != schedule:
      old = train.make_schedule(dataclasses.replace(tc, **before))
      print(f'[train] resuming at step {start} under another learning-rate schedule ('
            + ', '.join(f'train.{k}={before[k]} -> {schedule[k]}' for k in SCHEDULE_KEYS
                        if before[k] != schedule[k])
            + f'): step {start + 1} at lr {float(train.make_schedule(tc)(start)):.4g}, '
            f'{float(old(start)):.4g} under the old one')
    was = saved.get('distill', distill)  # a run.json of an older jkd: recorded from now on
    if was != distill:
      print(f'[train] resuming at step {start} under other distill settings ('
            + ', '.join(f'distill.{k}={was.get(k)!r} -> {distill.get(k)!r}'
                        for k in sorted(set(was) | set(distill)) if was.get(k) != distill.get(k))
            + f'): the loss is another from step {start + 1} on')
    if before == schedule and saved.get('distill') == distill:
      return None
    now = {**saved, **now}  # the record of the run's exports, too
  now['schedule'], now['distill'] = schedule, distill
  return now


def check_checkpoint(cfg, step_dir: str, where: str) -> None:
  """ValueError, before any restore, when checkpoint step `step_dir` (`<run>/checkpoints/<step>`)
  is none or holds params of other shapes than `cfg` builds (orbax would fail deep inside its
  restore); `where` names what pointed at it and the fix."""
  import orbax.checkpoint as ocp
  from etils import epath
  state = os.path.join(step_dir, 'state')
  if not os.path.isdir(state):
    raise ValueError(f'{where}: {step_dir} is no checkpoint step (expected '
                     '<workdir>/checkpoints/<step>, a directory holding state/)')
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state)).tree
  shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree.get('params', {}),
                        is_leaf=lambda m: hasattr(m, 'shape'))
  try:
    model.check_params(cfg, shapes, state)
  except ValueError as e:
    raise ValueError(f'{e} ({where})') from None


def _write_run(path: str, record: dict) -> None:
  """run.json from process 0, atomically (temp file, rename)."""
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(record, f, indent=1, sort_keys=True)
    os.replace(path + '.tmp', path)


def _stamp(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_mtime_ns, st.st_size if os.path.isfile(path) else -1]


PENDING = 'pending'  # run.json's record of an export begun: a kill may leave it in any state


def _recorded_export(ls, marker: str) -> bool:
  """Whether `marker` (a .nemo, an HF export's config.json) is the one this workdir's run
  wrote at its end, unchanged since, or one its export was writing when it was killed."""
  run = os.path.join(ls.workdir, RUN_FILE)
  if not os.path.isfile(run):
    return False
  with open(run) as f:
    was = json.load(f).get('exports', {}).get(os.path.abspath(marker))
  return was == PENDING or was == _stamp(marker)


def _record_exports(ls, markers: list[str], pending: bool) -> None:
  """Records in run.json (process 0; temp file, rename) the exports about to be written
  (`pending`), or written: each marker's mtime and size."""
  run = os.path.join(ls.workdir, RUN_FILE)
  if jax.process_index() != 0 or not os.path.isfile(run) or not markers:
    return
  with open(run) as f:
    saved = json.load(f)
  exports = saved.setdefault('exports', {})
  for marker in markers:
    exports[os.path.abspath(marker)] = PENDING if pending else _stamp(marker)
  _write_run(run, saved)


def _validate(eval_fn, state, tc, ls, pad_id, shardings, sources, extra) -> dict[str, float]:
  """Summed (sum, count) metrics over the first limit_val_batches full batches of the
  validation split (all of them when -1)."""
  from jkd import evaluate
  it = _val_loader(tc, ls, pad_id, sources)
  total = None
  try:
    for batch in itertools.islice(it, tc.limit_val_batches if tc.limit_val_batches >= 0
                                  else None):
      metrics = eval_fn(state.params, _global(batch, shardings), *extra)
      total = evaluate.add_pairs(total, jax.device_get(metrics))
  finally:
    it.close()  # its workers ignore SIGTERM and SIGINT (_loader): they stop here
  if total is None:  # checked before training (run): nothing to log would be a silent gap
    raise _no_val_batch(tc, 'validation: the split gives no full batch')
  return _scalars(total, 'val')


def _no_val_batch(tc, why: str) -> ValueError:
  return ValueError(f'{why} of train.global_batch_size={tc.global_batch_size} rows: validation '
                    'would log nothing; use more validation examples or set '
                    'train.limit_val_batches=0 (no validation)')


def run_length(tc, n_train: int) -> tuple[int, int]:
  """(the run's last step, the schedule's length), as NeMo's SupervisedTrainer counts them:
  max_epochs epochs of n_train // global_batch_size batches (at most limit_train_batches), cut
  at max_steps when that is set. The schedule spans max_steps (trainer.max_steps) even when the
  epochs end the run first, which is then said. max_epochs=-1 (jkd's) bounds nothing."""
  per_epoch = n_train // tc.global_batch_size
  if tc.limit_train_batches >= 0:
    per_epoch = min(per_epoch, tc.limit_train_batches)
  epoch_steps = per_epoch * tc.max_epochs if tc.max_epochs > 0 else None
  schedule_steps = tc.max_steps if tc.max_steps > 0 else epoch_steps
  last_step = schedule_steps if epoch_steps is None else min(schedule_steps, epoch_steps)
  if last_step <= 0:  # only epochs of no full batch make none
    raise ValueError(f'train.max_epochs={tc.max_epochs}: runs no step, an epoch of {n_train} '
                     f'train examples holding no full batch of train.global_batch_size='
                     f'{tc.global_batch_size}; use more examples, or set train.max_steps with '
                     'train.max_epochs=-1 (the stream repeats)')
  if last_step < schedule_steps:
    print(f'[train] train.max_epochs={tc.max_epochs} ends the run at step {last_step} of '
          f'train.max_steps={schedule_steps} ({per_epoch} steps an epoch), as in NeMo: the '
          'schedule still spans max_steps; train.max_epochs=-1 runs them all')
  return last_step, schedule_steps


def run(config) -> dict[str, float]:
  """Trains the student (config.train), resuming this workdir's run; the last metrics."""
  with contextlib.ExitStack() as held:  # the workdir's lock, from when it is known to be used
    return _run(config, held)


def _run(config, held: contextlib.ExitStack) -> dict[str, float]:
  import grain
  import orbax.checkpoint as ocp

  from jkd.data import logit_store
  tc, ls = train.train_config(config), loop_settings(config)

  # Mesh: over every process's devices; each process feeds the batch rows of its own (with
  # one padded length: jkd.config refuses train.pad_to_max_length=False for several processes).
  mesh_cfg = jkd_config.mesh_config(config)
  mesh = sharding.make_mesh(mesh_cfg.axes, mesh_cfg.shape)
  rules = mesh_cfg.rules

  # Data: the store's K and size (or, online, the teacher's K and the examples) are known
  # before anything compiles.
  online = config.distill.teacher_source == 'online'
  sources, teacher, n_val = {}, None, None  # n_val: validation examples (None: no split)
  if online:
    from jkd.data import chat, loader
    ext = config.extract
    teacher_cfg = dataclasses.replace(model.load_config(ext.teacher), dtype=ext.dtype)
    teacher_tok = tokenizer.load(ext.teacher)
    for split, path in (('train', config.data.train_file),
                        ('validation', config.data.validation_file)):
      if path and (split == 'train' or tc.limit_val_batches != 0):  # not read without validation
        sources[split] = loader.ExamplesSource(chat.read_jsonl(
            path, teacher_tok, fmt=config.data.format, max_seq_length=ls.max_seq_length), path)
    stored_k, teacher_vocab, n_train = ext.top_k, teacher_cfg.vocab_size, len(sources['train'])
    teacher_id = {'extract.top_k': ext.top_k, 'extract.teacher': os.path.abspath(ext.teacher),
                  'extract.dtype': ext.dtype}  # the teacher's logits, as a store's teacher_dtype
    if 'validation' in sources:
      n_val = len(sources['validation'])
  else:
    meta = logit_store.read_meta(os.path.join(tc.store, 'train'))
    stored_k, teacher_vocab = meta.k, meta.vocab_size
    teacher_id = {'store k': meta.k, 'store teacher': meta.teacher_fingerprint}
    n_train = logit_store.check_finished(tc.store, 'train')
    if tc.limit_val_batches != 0 and os.path.isdir(os.path.join(tc.store, 'validation')):
      n_val = logit_store.check_finished(tc.store, 'validation')  # not read without validation
  train.validate_config(config, stored_k=stored_k, n_devices=jax.device_count())
  last_step, schedule_steps = run_length(tc, n_train)
  tc = dataclasses.replace(tc, max_steps=schedule_steps)  # validated again: before any write
  has_val = n_val is not None and tc.limit_val_batches != 0
  if n_val is None and tc.limit_val_batches != 0:  # said: the run logs no val/* at all
    print('[train] no validation split (' + ('data.validation_file is empty' if online else
                                            f'{tc.store} has no validation/') +
          '): nothing is validated; train.limit_val_batches=0 says so without this note')
  if has_val and n_val < tc.global_batch_size:
    raise _no_val_batch(tc, f'the validation split has {n_val} examples, fewer than one batch')

  # This workdir's checkpoints, and what resuming them must agree with: checked before anything
  # is loaded or compiled.
  os.makedirs(ls.workdir, exist_ok=True)
  # One run a workdir (a second would remove the first's checkpoint in the writing as its own
  # leftover, and rewrite its metrics): each process holds its own lock, so a second job's
  # processes stop here (those of a job with more processes than the first end with its
  # process 0, as JAX ends a job whose process died).
  lock = os.path.join(ls.workdir, f'.train.p{jax.process_index():05d}.lock')
  held.callback(files.unlock, files.lock(
      lock, f'{ls.workdir}: another run is training in this workdir (it holds {lock}); wait '
      'for it to end, or use another workdir'))
  mngr = ocp.CheckpointManager(
      os.path.join(os.path.abspath(ls.workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=ls.checkpoint_max_to_keep,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True))
  start = mngr.latest_step() or 0  # steps count from 1
  record = _check_resumable(ls, config, tc, start, last_step, n_train, teacher_id)
  if start > last_step:  # would skip training and export a later state as this run's end
    raise ValueError(f'{ls.workdir}/checkpoints: the latest checkpoint is at step {start}, '
                     f'past this run\'s last step {last_step} (train.max_steps, max_epochs); '
                     'raise them or use another workdir')
  # A .nemo (a file, or a directory) or an HF model (its config.json) already at an export path
  # is written over only if it is this run's own (recorded in run.json): the one its end wrote
  # (a run extended since resumes from later checkpoints), or one it was writing when killed.
  from jkd import export
  nemo = ls.export_nemo or (os.path.join(ls.workdir, 'student.nemo')
                            if ls.save_nemo_on_train_end else '')
  markers = [m for m in (nemo, ls.export_hf and export.hf_marker(ls.export_hf)) if m]
  for marker in markers:
    if os.path.exists(marker) and not (start > 0 and _recorded_export(ls, marker)):
      key = 'train.export_nemo' if marker == nemo else 'train.export_hf'
      raise FileExistsError(f'{marker}: already exists and is not this run\'s export (recorded '
                            f'in {ls.workdir}/{RUN_FILE}); remove it or choose another {key}')

  # Model and optimizer: the student's params, or a random init of config.model.
  tok = None
  if tc.student:
    cfg = model.load_config(tc.student)
    tok = tokenizer.load_if_saved(tc.student)
  else:
    cfg = jkd_config.model_config(config)
  student_where = (os.path.join(tc.student, model.CONFIG_FILE) if tc.student else
                   'config.model')
  jkd_config.check_same_vocab(cfg.vocab_size, teacher_vocab, tc.cross_tokenizer, student_where,
                              config.extract.teacher if online else tc.store)
  if not online and not tc.cross_tokenizer and jax.process_index() == 0:
    tokenizer.warn_if_not_the_stores(tok, tc.student, tc.store, meta.tokenizer_fingerprint,
                                     'train')
  if online and tok is None:
    tok = teacher_tok
  pad_id = tok.eos_id if tok is not None and tok.eos_id is not None else 0  # NeMo pads with eos
  if has_val and ls.pack:  # packed rows can be fewer than one batch: known only by packing
    it = _val_loader(tc, dataclasses.replace(ls, worker_count=0), pad_id, sources)
    try:
      if next(it, None) is None:
        raise _no_val_batch(tc, f'the validation split\'s {n_val} examples pack into fewer '
                                'rows than one batch')
    finally:
      it.close()

  if start:  # before the student is loaded
    check_checkpoint(cfg, os.path.join(os.path.abspath(ls.workdir), 'checkpoints', str(start)),
                     'this workdir\'s checkpoints are of another student than train.student '
                     'or config.model: set those back, or use another workdir')

  # Shardings and init.
  param_shardings = sharding.shardings_for(
      lambda: model.init(cfg, jax.random.key(tc.seed), boxed=True), mesh, rules)
  if tc.student:
    _, params = model.load(tc.student, param_shardings)
  else:
    params = jax.jit(lambda r: model.init(cfg, r), out_shardings=param_shardings)(
        jax.random.key(tc.seed))
  state, state_shardings = train.init_state(cfg, tc, params, mesh, rules)
  del params
  extra = ()  # online: the teacher's params, a step argument that is never differentiated
  if online:
    teacher_shardings = sharding.shardings_for(
        lambda: model.init(teacher_cfg, jax.random.key(0), boxed=True), mesh, rules)
    _, teacher_params = model.load(config.extract.teacher, teacher_shardings,
                                   dtype=model.DTYPES[config.extract.dtype])
    teacher = train.OnlineTeacher(teacher_cfg, teacher_shardings, config.extract.top_k,
                                  config.extract.vocab_tile)
    extra = (teacher_params,)

  # Restore: this run's latest checkpoint > train.restore_from_path > the converted student.
  train_it = _loader(tc, ls, 'train', shuffle=True, num_epochs=None, pad_id=pad_id,
                     seed=tc.seed, sources=sources)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_shardings)
  if start:
    restored = mngr.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(
            train_it)))
    state = restored.state
    print(f'[train] resumed from {ls.workdir}/checkpoints at step {start}')
  elif tc.restore_from_path:  # its weights, as NeMo restores a .nemo: optimizer and schedule new
    target = {'params': abstract.params}  # only these are read: any optimizer settings may differ
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      saved = ckptr.restore(os.path.join(tc.restore_from_path, 'state'),
                            args=ocp.args.PyTreeRestore(
                                target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True))
    state = state.replace(params=saved['params'])
    del saved
    print(f'[train] started from the params of {tc.restore_from_path}')

  # Step functions.
  step_fn = train.make_train_step(cfg, tc, mesh, rules, state_shardings, teacher)
  eval_fn = train.make_eval_step(cfg, tc, mesh, rules, state_shardings, teacher)
  batch_shardings = train.batch_shardings(
      mesh, rules, train.RAW_KEYS if online else train.BATCH_KEYS)

  # Loop: the settings its checkpoints will be saved with are recorded first.
  if record is not None:
    _write_run(os.path.join(ls.workdir, RUN_FILE), record)
  metrics_out = _Metrics(ls, config, start)
  last: dict[str, float] = dict(metrics_out.at_start)  # a finished run's, when rerun
  pending = None  # (step, metrics, dispatch time, real tokens) of the step in flight

  def settle():  # reads the metrics of the step in flight
    nonlocal pending, last
    if pending is None:
      return
    step, metrics, t0, tokens = pending
    pending = None
    values = _scalars(metrics, 'train')
    _check_finite(values, step)
    elapsed = time.perf_counter() - t0
    values.update({'train/consumed_samples': float(step * tc.global_batch_size),
                   'train/step_time': elapsed, 'train/tokens_per_sec': float(tokens) / elapsed})
    metrics_out.write(step, values)
    last = values
    bar.set_postfix(loss=f'{values["train/loss"]:.4f}', lr=f'{values["train/lr"]:.2e}')

  profiler = profiling.Profiler(profiling.settings(config))
  bar = tqdm(total=last_step, initial=start, desc='train', unit='step',
             disable=jax.process_index() != 0, file=distributed.progress_file())
  # SIGTERM, Ctrl-C: stop after a step, saved; the workers of the loaders made inside leave
  # the signals to it
  with distributed.Preemption(children=ls.worker_count > 0) as preemption:
    try:
      for step in range(start + 1, last_step + 1):
        profiler.step(step, wait=state)  # starts or stops the trace (config.profile)
        batch = _global(next(train_it), batch_shardings)
        tokens = _real_tokens(batch['segment_ids'])  # of the global batch, every process's rows
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch, *extra)
        settle()  # step n-1, while step n runs
        pending = (step, metrics, t0, tokens)
        bar.update(1)
        faults.point('train.step')
        stop = preemption.reached()  # a stop: this step is validated if due, then saved
        boundary = step == last_step
        if step % tc.val_check_interval == 0 or boundary:
          settle()
          if has_val:
            values = _validate(eval_fn, state, tc, ls, pad_id, batch_shardings, sources, extra)
            _check_finite(values, step)
            metrics_out.write(step, values)
            last.update(values)
            faults.point('train.validated')
        if step % tc.save_interval == 0 or boundary or stop:
          settle()
          mngr.save(step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_it)))
          faults.point('train.save_started')  # the write goes on in the background
        if stop:
          break
      settle()
    finally:
      try:
        profiler.close()  # a window reaching past the last step ends with the run
      finally:  # and the rest closes even if stopping the trace fails
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
        train_it.close()  # stops its workers, which leave SIGTERM and SIGINT to this loop
        metrics_out.close()
  if preemption.stopping:  # after `step`, its checkpoint saved
    preemption.stop(f'training after step {step} (its checkpoint is saved in '
                    f'{ls.workdir}/checkpoints)')

  # The student as a model directory, always (what mode=eval and mode=export read; a run
  # without exports left only checkpoints, which nothing else reads), and .nemo / HF when asked.
  # A rerun (after a kill in here, or of a finished or extended run) redoes them, over this
  # run's own .nemo. Several processes save the model directory together; process 0 writes the
  # exports from the whole params.
  final = os.path.join(ls.workdir, 'student')
  faults.point('train.export')
  model.save(final, cfg, state.params, tok)
  if ls.save_nemo_on_train_end or ls.export_nemo or ls.export_hf:
    params = distributed.whole_on_process_0(state.params)
    try:
      if jax.process_index() == 0:
        # What is at the paths now (a model put there during training is refused, before it
        # could be recorded as this run's own), then the record, then the writes.
        own = tuple(m for m in markers if os.path.exists(m) and _recorded_export(ls, m))
        own_hf = ls.export_hf if ls.export_hf and export.hf_marker(ls.export_hf) in own else ''
        export.check_targets(cfg, nemo=nemo, hf=ls.export_hf, own=(own_hf, *own))
        _record_exports(ls, markers, pending=True)
        if nemo in own and os.path.isdir(nemo):
          shutil.rmtree(nemo)
        elif nemo in own:
          os.remove(nemo)
        export.export_params(cfg, params, tok, nemo=nemo, hf=ls.export_hf, dtype=ls.export_dtype,
                             source=final)
        _record_exports(ls, markers, pending=False)
    finally:  # the others wait here, also for a process 0 that failed (its error is the run's)
      del params
      distributed.sync('jkd train: exported')
  losses = ', '.join(f'{k} {v:.4g}' for k, v in sorted(last.items()) if k.endswith('loss'))
  exported = [p for p in (nemo, ls.export_hf) if p]
  print(f'[train] {last_step} steps; {losses}; the student: {final}'
        + (f' (exported: {", ".join(exported)})' if exported else ''))
  return last
