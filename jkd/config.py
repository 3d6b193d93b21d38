"""The edge between ml_collections ConfigDicts and the library's frozen dataclasses.

Library functions take dataclasses or explicit keyword arguments, never a ConfigDict.
Validation happens here, before any compile or write, and names the offending key: first the
config's keys and types against configs/base.py (`check_keys`), then values and their
combinations (`validate`), which reads only the small metadata files of the inputs a run names
(a model's model_config.json, a store's manifest.json).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any

from ml_collections import ConfigDict

from jkd import model
from jkd.data import chat

# Declares every key; found next to the jkd package (a source checkout, `pip install -e .`).
BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs', 'base.py')

MODES = ('pipeline', 'convert', 'extract', 'train', 'eval', 'export')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  axes: tuple[str, ...]
  shape: tuple[int, ...]
  rules: tuple[tuple[str, Any], ...]


def mesh_config(config) -> MeshConfig:
  axes, shape = tuple(config.mesh.axes), tuple(config.mesh.shape)
  if not all(type(n) is int for n in shape):  # 1.5 ran as 1; None, '1' or True slipped through
    raise ValueError(f'mesh.shape={shape}: sizes must be integers (-1: the rest)')
  if len(axes) != len(shape):
    raise ValueError(f'mesh.shape={shape} has {len(shape)} entries but mesh.axes={axes} '
                     f'has {len(axes)}')
  if not all(isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
             for r in config.mesh.rules):
    raise ValueError(f'mesh.rules={config.mesh.rules!r}: expected (logical axis name, mesh '
                     'axis, axes or None) pairs')
  rules = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in config.mesh.rules)
  known = [name for name, _ in _base_module().LOGICAL_AXIS_RULES]  # the names the model uses
  names = [name for name, _ in rules]
  for name in names:
    if name not in known or names.count(name) > 1:  # a typo's axis is replicated unsaid
      raise ValueError(f'mesh.rules: logical axis {name!r} ' + (
          'has two rules' if name in known else
          f'is not one jkd uses (expected {", ".join(known)}; one left out is replicated)'))
  for name, target in rules:
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is not None and axis not in axes:
        raise ValueError(f'mesh.rules: logical axis {name!r} maps to {axis!r}, '
                         f'which is not in mesh.axes={axes}')
  return MeshConfig(axes=axes, shape=shape, rules=rules)


def model_config(config) -> model.ModelConfig:
  """config.model (a ConfigDict) -> a validated ModelConfig."""
  return model.ModelConfig.from_dict(config.model.to_dict())


@functools.cache
def _base_module():
  if not os.path.isfile(BASE_CONFIG):
    raise ImportError(f'{BASE_CONFIG}: missing; jkd checks every config against the keys it '
                      'declares, which a source checkout has (pip install -e .)')
  spec = importlib.util.spec_from_file_location('jkd_configs_base', BASE_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def check_keys(config) -> None:
  """Every key of configs/base.py present with its declared type, and no other key; one
  ValueError naming them all. Ints pass for floats, lists for tuples, None only for keys whose
  base value is None."""
  problems = {'missing': [], 'wrong type': [], 'unknown': []}
  _compare(_base_module().get_config(), config, '', problems)
  found = [f'{what} {", ".join(keys)}' for what, keys in problems.items() if keys]
  if found:
    raise ValueError(f'config: {"; ".join(found)} (configs/base.py declares every key and its '
                     'type)')


def _compare(base, config, prefix, problems) -> None:
  for key in base.keys():
    name, want = prefix + key, base[key]
    if key not in config:
      problems['missing'].append(name)
      continue
    got = config[key]
    if isinstance(want, ConfigDict):
      if isinstance(got, ConfigDict):
        _compare(want, got, name + '.', problems)
      else:
        problems['wrong type'].append(f'{name}={got!r} (a section in base)')
      continue
    declared = base.get_ref(key).get_type()  # a placeholder's type, though its value is None
    if not _type_ok(declared, want, got):
      problems['wrong type'].append(f'{name}={got!r} ({type(got).__name__}, base has '
                                    f'{declared.__name__})')
  problems['unknown'] += [prefix + k for k in config.keys() if k not in base]


def _type_ok(declared, base_value, value) -> bool:
  if value is None:
    return base_value is None  # a placeholder
  if declared is bool or isinstance(value, bool):  # a bool is an int: never mix them
    return declared is bool and isinstance(value, bool)
  if declared in (tuple, list):
    return isinstance(value, (tuple, list))
  if declared is float:
    return isinstance(value, (int, float))
  return isinstance(value, declared)


def validate(config) -> None:
  """Checks the whole config up front; raises ValueError naming the key.

  Per mode, config-only checks come first, then the paths: inputs must exist, and no output
  may be an input, lie inside one, or be another output. The model_config.json of a teacher or
  student directory and a store's manifest.json are read for what they rule out (positions,
  vocabulary, K); nothing is written or compiled.
  """
  check_keys(config)
  if config.mode not in MODES:
    raise ValueError(f'mode={config.mode!r}: unknown; expected one of {MODES}')
  from jkd import distributed
  distributed.settings(config)  # jkd.main has initialized from it already; checks the keys
  mesh = mesh_config(config)
  import jax  # deferred: the backend starts only once the config is known to be sane
  from jkd import sharding
  shape = sharding.mesh_shape(mesh.shape, jax.device_count())
  _validate_profile(config)
  if config.mode in ('train', 'pipeline') and not config.workdir:
    raise ValueError(f'workdir is empty: set --config.workdir=DIR (where mode={config.mode} '
                     'writes)')
  {'pipeline': _validate_pipeline, 'convert': _validate_convert, 'extract': _validate_extract,
   'train': _validate_train, 'eval': _validate_eval, 'export': _validate_export}[config.mode](
       config, shape)


# Keys mode=pipeline sets itself (its own data, teacher, store, students and exports under the
# workdir; extraction of whole splits, training from the pruned student): given, they would be
# ignored yet recorded, and a change would ask to delete stages for nothing.
PIPELINE_SETS = ('data.train_file', 'data.validation_file', 'extract.teacher', 'extract.output',
                 'extract.start_idx', 'extract.end_idx', 'extract.examples_per_chunk',
                 'extract.chunk_index', 'train.student', 'train.store', 'train.restore_from_path',
                 'train.export_nemo', 'train.export_hf', 'train.save_nemo_on_train_end')
# ... and keys that only other modes read, with every eval.* key (export.dtype is the
# pipeline's too: its exports').
OTHER_MODES_KEYS = ('convert.source', 'convert.output', 'export.source', 'export.nemo',
                    'export.hf')


def _validate_pipeline(config, mesh_shape) -> None:
  p = config.pipeline
  _one_process(config)
  given = _given(config, PIPELINE_SETS + OTHER_MODES_KEYS
                 + tuple(f'eval.{k}' for k in _base_module().get_config().eval))
  if given:
    raise ValueError(f'mode=pipeline: {", ".join(given)}: set by the pipeline itself (its data, '
                     'teacher, store, students and exports are under the workdir) or read by '
                     'other modes only (convert.*, export.source/nemo/hf, eval.*), so given '
                     'here they would be ignored; leave them out')
  for key, choices in (('teacher', 'smollm2, random or a path'),
                       ('corpus', 'chatterbot or a path')):
    if not p[key]:
      raise ValueError(f'pipeline.{key} is empty: {choices} (configs/base.py)')
  fetched = {'teacher': ('smollm2', 'random'), 'corpus': ('chatterbot',)}  # names, not paths
  _check_paths(config, tuple(f'pipeline.{key}' for key, names in fetched.items()
                             if p[key] not in names), ())
  if p.teacher != 'random':
    _refuse_model_keys(config, f'pipeline.teacher={p.teacher!r} is no random one')
  if p.teacher == 'random':
    cfg = model_config(config)  # its vocabulary becomes SmolLM2's, padded to fit the mesh
    _check_model(cfg, config, 'config.model', mesh_shape, vocab_padded=True)
    if p.student_layers > cfg.num_layers:
      raise ValueError(f'pipeline.student_layers={p.student_layers}: exceeds the random '
                       f'teacher\'s model.num_layers={cfg.num_layers}')
  for key in ('student_layers', 'num_samples', 'max_new_tokens', 'sft_only_weight'):
    if not p[key] > 0:
      raise ValueError(f'pipeline.{key}={p[key]}: must be positive')
  if p.calibration_examples < 0:
    raise ValueError(f'pipeline.calibration_examples={p.calibration_examples}: must be >= 0')
  _pipeline_runs(config)
  _extract_settings(config, mesh_shape)  # the stages it runs, before any of them starts
  _train_settings(config, stored_k=config.extract.top_k)
  _check_export_dtype(config)  # the .nemo round trips and the students' exports
  _needs_torch('mode=pipeline', 'exporting .nemo')


def _pipeline_runs(config) -> None:
  """What the pipeline's stages need of the train, distill and data keys."""
  p, t, d = config.pipeline, config.train, config.distill
  if d.teacher_source != 'store':
    raise ValueError(f'distill.teacher_source={d.teacher_source!r}: ' + (
        "mode=pipeline extracts the teacher's top-K into a store and trains from it ('store')"
        if d.teacher_source == 'online' else 'expected store or online'))
  if config.data.format == 'plain':  # an unknown one: the extraction checks below name it
    raise ValueError(f'data.format={config.data.format!r}: mode=pipeline trains and prompts on '
                     "chat conversations ('chat' or 'chatml')")
  # Each curve starts at the evaluated CE of the init (the whole split, a token mean); its
  # later points are the runs' val/sft_loss, which measure the same only under these settings.
  if not d.sft_loss_weight > 0:
    raise ValueError(f'distill.sft_loss_weight={d.sft_loss_weight}: mode=pipeline plots the '
                     'validation CE, which training logs (val/sft_loss) only with an SFT term')
  if d.reduction == 'nemo':  # an unknown one: the training checks below name it
    raise ValueError("distill.reduction='nemo': mode=pipeline needs 'global_token_mean', so "
                     'that validation CE is a token mean over the split, as evaluated at step 0')
  if d.logits_scale != 1:
    raise ValueError(f'distill.logits_scale={d.logits_scale}: mode=pipeline needs 1, so that '
                     'validation CE (val/sft_loss, on the scaled logits) is the CE evaluated at '
                     'step 0 and in the metrics table')
  if t.limit_val_batches not in (-1, 0):
    raise ValueError(f'train.limit_val_batches={t.limit_val_batches}: mode=pipeline needs -1 '
                     '(the whole split, as evaluated at step 0) or 0 (no validation curves)')
  for key, split in (('max_train_examples', 'train'), ('max_val_examples', 'validation')):
    if p[key] == 0 or p[key] < -1:  # the validation split is evaluated, with or without curves
      raise ValueError(f'pipeline.{key}={p[key]}: ' + (
          f'no {split} conversations' if p[key] == 0 else 'expected a count') + '; -1 = all')
  if t.limit_val_batches != 0 and 0 <= p.max_val_examples < t.global_batch_size:
    raise ValueError(f'pipeline.max_val_examples={p.max_val_examples}: fewer than one batch '
                     f'(train.global_batch_size={t.global_batch_size}) to validate on; set '
                     'train.limit_val_batches=0 for no validation')


# The modes that run in one process (their files written once, their data read whole) -> what
# to do instead.
ONE_PROCESS_MODES = {
    'pipeline': 'for several, run mode=extract and mode=train (docs/multihost.md)',
    'convert': '', 'export': '', 'eval': ''}


def check_processes(config) -> None:
  """Before jax.distributed starts: a one-process mode asked to run as several is refused
  here, not once every process has joined (a lone one waited for its peers, then aborted)."""
  from jkd import distributed
  s = distributed.settings(config)
  n = s.num_processes if s is not None else None
  if config.mode in ONE_PROCESS_MODES and n is not None and n > 1:
    _one_process_error(config, f'{n} asked by distributed.num_processes or JAX_NUM_PROCESSES')


def _one_process(config) -> None:
  import jax
  if jax.process_count() > 1:  # several found by JAX's cluster detection
    _one_process_error(config, f'{jax.process_count()} started')


def _one_process_error(config, how_many: str):
  hint = ONE_PROCESS_MODES[config.mode]
  raise ValueError(f'mode={config.mode}: runs in one process ({how_many})'
                   + (f'; {hint}' if hint else ''))


def _validate_convert(config, mesh_shape) -> None:
  _one_process(config)  # every process would write the same model directory
  for key in ('source', 'output'):
    if not config.convert[key]:
      raise ValueError(f'convert.{key} is empty: set --config.convert.{key}=PATH')
  _check_paths(config, ('convert.source',), ('convert.output',))
  output = config.convert.output
  model.check_overwritable(output, f'convert.output={output}')
  if os.path.isfile(os.path.join(output, model.CONFIG_FILE)):  # as export refuses a .nemo
    raise ValueError(f'convert.output={output}: already holds a jkd model ({model.CONFIG_FILE}), '
                     'which the conversion would replace: remove it or choose another '
                     'convert.output')


def _validate_extract(config, mesh_shape) -> None:
  for key in ('teacher', 'output'):
    if not config.extract[key]:
      raise ValueError(f'extract.{key} is empty: set --config.extract.{key}=PATH')
  if not config.data.train_file and not config.data.validation_file:
    raise ValueError('data.train_file and data.validation_file are both empty')
  _extract_settings(config, mesh_shape)
  _check_paths(config, ('extract.teacher', 'data.train_file', 'data.validation_file'),
               ('extract.output',))
  _check_teacher(config, mesh_shape)


def _validate_train(config, mesh_shape) -> None:
  source = config.distill.teacher_source
  if source not in ('store', 'online'):
    raise ValueError(f'distill.teacher_source={source!r}: expected store or online')
  online = source == 'online'
  if not online and not config.train.store:
    raise ValueError('train.store is empty: set --config.train.store=STORE (from mode=extract)'
                     " or distill.teacher_source='online'")
  if online and (not config.extract.teacher or not config.data.train_file):
    raise ValueError("distill.teacher_source='online' needs extract.teacher and "
                     'data.train_file')
  if online and config.distill.cross_tokenizer:  # the student would read teacher token ids
    raise ValueError("distill.cross_tokenizer=True: distill.teacher_source='online' feeds the "
                     "student the teacher's tokens, so both need one tokenizer")
  if online:  # the extraction's settings, in the step
    _teacher_forward_settings(config)
    e = config.extract
    if _given(config, ('extract.start_idx', 'extract.end_idx', 'extract.examples_per_chunk',
                       'extract.chunk_index')):
      raise ValueError(f'extract.start_idx={e.start_idx}, end_idx={e.end_idx}, '
                       f'examples_per_chunk={e.examples_per_chunk}, chunk_index={e.chunk_index}: '
                       "select an extraction's examples; distill.teacher_source='online' "
                       'trains on the whole data.train_file (to train on part of it, give a '
                       'file of that part)')
  _train_settings(config, stored_k=config.extract.top_k if online else None)
  if config.train.save_nemo_on_train_end or config.train.export_nemo or config.train.export_hf:
    _check_export_dtype(config)  # the exports' weights
  if config.train.save_nemo_on_train_end or config.train.export_nemo:
    _needs_torch('train.export_nemo' if config.train.export_nemo
                 else 'train.save_nemo_on_train_end', 'writing .nemo')
  inputs = ('train.student', 'train.store', 'train.restore_from_path')
  _check_paths(config, inputs + (('extract.teacher', 'data.train_file', 'data.validation_file')
                                 if online else ()),
               ('workdir', 'train.export_nemo', 'train.export_hf'))
  final = os.path.realpath(os.path.join(config.workdir, 'student'))  # written at the end
  for key in ('train.export_nemo', 'train.export_hf'):
    real = os.path.realpath(_get(config, key) or os.sep)
    if real == final or real.startswith(final + os.sep):
      raise ValueError(f'{key}={_get(config, key)!r}: lies in {final}, the model directory the '
                       'run writes at its end (a rerun would find it there); choose a path '
                       'outside it')
  if config.train.student:  # config.model is not read
    _refuse_model_keys(config, f'train.student={config.train.student!r} brings its own '
                       f'({model.CONFIG_FILE})')
    student = model.load_config(config.train.student)
    where = os.path.join(config.train.student, model.CONFIG_FILE)
  else:  # random init
    student, where = model_config(config), 'config.model'
  _check_model(student, config, where, mesh_shape)
  if config.train.restore_from_path:  # its params, before anything is loaded or compiled
    from jkd import train_loop
    train_loop.check_checkpoint(student, config.train.restore_from_path,
                                f'train.restore_from_path, for the student of {where}')
  from jkd import train
  try:  # the student as training runs it (a head dim cuDNN takes, say)
    train.run_config(student, train.train_config(config))
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None
  if online:
    teacher_vocab = _check_teacher(config, mesh_shape).vocab_size
    teacher_where = os.path.join(config.extract.teacher, model.CONFIG_FILE)
  else:  # the store's manifest (the loop checks the same once more when it opens the store)
    from jkd.data import logit_store
    split = os.path.join(config.train.store, 'train')
    meta, teacher_where = logit_store.read_meta(split), os.path.join(split, 'manifest.json')
    top_k, teacher_vocab = config.distill.top_k, meta.vocab_size
    if top_k is not None and top_k > meta.k:
      raise ValueError(f'distill.top_k={top_k}: exceeds k={meta.k} of {teacher_where}')
  check_same_vocab(student.vocab_size, teacher_vocab, config.distill.cross_tokenizer, where,
                   teacher_where)
  from jkd import export  # the HF class now, not after training (what the exports would
  # replace: train_loop, which knows the run's own earlier ones)
  export.check_targets(student, hf=config.train.export_hf, where=f'train.export_hf, {where}',
                       own=(config.train.export_hf,))


def check_same_vocab(student_vocab: int, teacher_vocab: int, cross_tokenizer: bool,
                     student_where: str, teacher_where: str) -> None:
  """ValueError when the vocabularies differ without distill.cross_tokenizer."""
  if student_vocab != teacher_vocab and not cross_tokenizer:
    raise ValueError(f'{teacher_where}: the teacher\'s vocab_size {teacher_vocab} differs from '
                     f'the student\'s {student_vocab} ({student_where}): the student reads the '
                     'teacher\'s token ids, so both need one tokenizer (distill.cross_tokenizer, '
                     'NeMo\'s pairing of the K by rank, is only for a student that reads the '
                     'teacher\'s ids as its own)')


def _validate_eval(config, mesh_shape) -> None:
  _one_process(config)  # each would read its own shard of the split
  e = config.eval
  for key in ('model', 'store'):
    if not e[key]:
      raise ValueError(f'eval.{key} is empty: set --config.eval.{key}=PATH')
  if e.batch_size < 1:
    raise ValueError(f'eval.batch_size={e.batch_size}: must be >= 1')
  if e.max_batches == 0 or e.max_batches < -1:
    raise ValueError(f'eval.max_batches={e.max_batches}: must be positive, or -1 for all')
  _check_padded_length(config, 'evaluation')
  from jkd.data import logit_store
  _check_paths(config, ('eval.model', 'eval.store'), ('eval.output',))
  if e.output and os.path.isdir(e.output):
    raise IsADirectoryError(f'eval.output={e.output!r}: is a directory; name the JSON file to '
                            'write')
  if e.output and not os.path.isdir(os.path.dirname(os.path.abspath(e.output))):
    raise FileNotFoundError(f'{os.path.dirname(os.path.abspath(e.output))}: no such directory '
                            f'(eval.output={e.output!r})')
  split = os.path.join(e.store, e.split)
  if not os.path.isdir(split):
    raise FileNotFoundError(f'{split}: no such split in eval.store (eval.split={e.split!r})')
  logit_store.check_finished(e.store, e.split)
  meta = logit_store.read_meta(split)
  student = model.load_config(e.model)
  _check_positions(student, config, os.path.join(e.model, model.CONFIG_FILE))
  if student.vocab_size != meta.vocab_size:
    raise ValueError(f'{os.path.join(split, "manifest.json")}: the teacher\'s vocab_size '
                     f'{meta.vocab_size} differs from the model\'s {student.vocab_size} '
                     f'({os.path.join(e.model, model.CONFIG_FILE)}): agreement and KL compare '
                     'token ids, so both need one tokenizer')


def _validate_export(config, mesh_shape) -> None:
  _one_process(config)  # every process would write the same files
  if not config.export.source:
    raise ValueError('export.source is empty: set --config.export.source=MODEL_DIR')
  if not config.export.nemo and not config.export.hf:
    raise ValueError('export.nemo and export.hf are both empty: set at least one')
  _check_export_dtype(config)
  if config.export.nemo:
    _needs_torch('export.nemo', 'writing .nemo')
  _check_paths(config, ('export.source',), ('export.nemo', 'export.hf'))
  from jkd import export
  source = config.export.source
  export.check_targets(model.load_config(source), nemo=config.export.nemo, hf=config.export.hf,
                       where=f'export.hf, {os.path.join(source, model.CONFIG_FILE)}')


def _check_padded_length(config, what: str) -> None:
  """data.max_seq_length as the loader needs it (rows are padded to multiples of PAD_MULTIPLE)."""
  from jkd.data import loader
  n = config.data.max_seq_length
  if n < loader.PAD_MULTIPLE or n % loader.PAD_MULTIPLE:
    raise ValueError(f'data.max_seq_length={n}: {what} needs a positive multiple of '
                     f'{loader.PAD_MULTIPLE} (rows are padded to multiples of it)')


def _train_settings(config, stored_k) -> None:
  """The training keys (jkd.train_config, then the loop's own); stored_k: the teacher's K."""
  from jkd import train
  train.validate_config(config, stored_k=stored_k)
  _check_padded_length(config, 'training')
  if config.train.wandb_project:  # not once the run has started
    _needs('wandb', 'train.wandb_project', 'logging to Weights & Biases needs wandb', 'wandb')
  for key, low in (('checkpoint_max_to_keep', 1), ('worker_count', 0)):
    if config.train[key] < low:
      raise ValueError(f'train.{key}={config.train[key]}: must be >= {low}')
  if config.train.pack and (config.train.max_steps < 0 or config.train.max_epochs != -1):
    raise ValueError('train.pack=True: needs train.max_steps and train.max_epochs=-1 (how many '
                     'packed batches an epoch makes is known only once packed, so epochs can '
                     'neither set nor bound the steps)')
  import jax
  if config.train.attention == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(f"train.attention='cudnn': cuDNN's flash attention runs on a GPU, this run's "
                     f"backend is {jax.default_backend()}; use auto (cuDNN where it can) or xla")
  if jax.process_count() > 1 and not config.train.pad_to_max_length:  # rows share one L
    raise ValueError(f'train.pad_to_max_length=False: needs one process '
                     f'({jax.process_count()} would pad their rows to different lengths)')
  if jax.process_count() > 1 and config.train.pack:  # each packs its own examples
    raise ValueError(f'train.pack=True: needs one process ({jax.process_count()} would pack '
                     'their own examples into different numbers of batches, and wait on each '
                     'other at the end of validation)')
  if jax.process_count() > 1:  # each process feeds its own G/N rows of every batch
    from jkd import sharding
    mesh_cfg = mesh_config(config)
    mesh = sharding.make_mesh(mesh_cfg.axes, mesh_cfg.shape)
    problem = sharding.process_rows_problem(sharding.batch_sharding(mesh, mesh_cfg.rules),
                                            config.train.global_batch_size, jax.process_count())
    if problem:
      raise ValueError(f'mesh.shape={tuple(config.mesh.shape)}: {problem}; with '
                       f'{jax.process_count()} processes the batch axes (mesh.rules act_batch: '
                       f'{dict(mesh_cfg.rules).get("act_batch")}) must split over the processes')


def _check_model(cfg: model.ModelConfig, config, where: str, mesh_shape,
                 vocab_padded: bool = False) -> None:
  """What a model's architecture rules out: positions beyond a learned position table, a mesh
  that does not split its parameters evenly (heads or groups over the tensor axis, say; not
  the vocabulary when it is yet to be padded to fit, `vocab_padded`)."""
  import jax
  from jkd import sharding
  mesh = mesh_config(config)
  sharding.check_divisible(lambda: model.init(cfg, jax.random.key(0), boxed=True),
                           dict(zip(mesh.axes, mesh_shape)), mesh.rules, where,
                           skip=('vocab',) if vocab_padded else ())
  _check_positions(cfg, config, where)


def _check_positions(cfg: model.ModelConfig, config, where: str) -> None:
  """data.max_seq_length beyond a learned position table."""
  n = config.data.max_seq_length
  if cfg.position_embedding_type == 'learned_absolute' and n > cfg.max_position_embeddings:
    raise ValueError(f'data.max_seq_length={n}: exceeds max_position_embeddings='
                     f'{cfg.max_position_embeddings} of {where} (learned_absolute positions '
                     'have no embedding beyond it)')


def _check_teacher(config, mesh_shape) -> model.ModelConfig:
  """extract.teacher's model config, after what it rules out."""
  path = os.path.join(config.extract.teacher, model.CONFIG_FILE)
  cfg = model.load_config(config.extract.teacher)
  _check_model(cfg, config, path, mesh_shape)
  if config.extract.top_k > cfg.vocab_size:
    raise ValueError(f'extract.top_k={config.extract.top_k}: exceeds vocab_size={cfg.vocab_size}'
                     f' of {path}')
  return cfg


def _refuse_model_keys(config, why: str) -> None:
  """ValueError naming the config.model keys given (not base.py's) where none is read."""
  given = _given(config, tuple(f'model.{k}' for k in config.model))
  if given:
    raise ValueError(f'{", ".join(given)}: config.model is the architecture of a random init, '
                     f'not read here ({why}); leave them out')


def _check_export_dtype(config) -> None:
  if config.export.dtype not in ('bfloat16', 'float32'):
    raise ValueError(f'export.dtype={config.export.dtype!r}: expected bfloat16 or float32')


def _needs_torch(key: str, what: str) -> None:
  _needs('torch', key, f'{what} needs torch (CPU is enough)', '"jkd[convert]"')


def _needs(module: str, key: str, what: str, package: str) -> None:
  """ImportError, before anything starts, for an optional module that a set key needs."""
  if importlib.util.find_spec(module) is None:
    raise ImportError(f'{key}: {what}, which is not installed: pip install {package}')


def _check_paths(config, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
  """Set inputs exist; no set output is an input, lies inside one, or repeats an output."""
  seen: dict[str, str] = {}  # real path -> key
  for key in inputs + outputs:
    path = _get(config, key)
    if not path:
      continue
    real = os.path.realpath(path)
    if key in inputs and not os.path.exists(path):
      raise FileNotFoundError(f'{path}: no such file or directory ({key})')
    for other, other_key in seen.items():
      if key in outputs and (real == other or (other_key in inputs and real.startswith(
          other + os.sep))):
        raise ValueError(f'{key}={path!r}: {"is" if real == other else "lies inside"} '
                         f'{other_key}={_get(config, other_key)!r}; outputs must not touch '
                         'inputs or each other')
    seen.setdefault(real, key)


def _get(config, key: str):
  for part in key.split('.'):
    config = config[part]
  return config


def _given(config, keys: tuple[str, ...]) -> list[str]:
  """The `keys` ('section.key') whose values differ from configs/base.py's."""
  base = _base_module().get_config()
  return [k for k in keys if _get(config, k) != _get(base, k)]


def _validate_profile(config) -> None:
  p = config.profile
  if p.start_step != -1 and p.start_step < 1:
    raise ValueError(f'profile.start_step={p.start_step}: must be -1 (off) or >= 1 (steps and '
                     'batches count from 1)')
  if p.start_step >= 1 and p.steps <= 0:
    raise ValueError(f'profile.steps={p.steps}: must be positive when profile.start_step is set')
  if not 0 <= p.host_tracer_level <= 3:
    raise ValueError(f'profile.host_tracer_level={p.host_tracer_level}: expected 0..3')
  if p.start_step < 1:
    return
  if config.mode not in ('train', 'extract', 'pipeline'):
    raise ValueError(f'profile.start_step={p.start_step}: mode={config.mode} has no steps to '
                     'profile (mode=train and mode=extract do); set it back to -1')
  from jkd import files
  directory = p.dir or os.path.join(config.workdir, 'profile')
  made_from = files.existing_ancestor(directory)  # the trace's directory is made at its end
  if not os.path.isdir(made_from) or not files.can_make_dirs_in(made_from):
    raise ValueError(f'profile.dir={directory!r}: cannot be made or written ({made_from} is '
                     f'{"not writable" if os.path.isdir(made_from) else "not a directory"})')


def _extract_settings(config, mesh_shape: tuple[int, ...]) -> None:
  """mode=extract's settings, paths aside; mesh_shape: config.mesh.shape resolved."""
  e = config.extract
  if e.examples_per_chunk < 0 or e.chunk_index < 0:
    raise ValueError('extract.examples_per_chunk and extract.chunk_index must be >= 0')
  if e.chunk_index and not e.examples_per_chunk:  # the whole range would run, not the chunk
    raise ValueError(f'extract.chunk_index={e.chunk_index}: needs extract.examples_per_chunk '
                     '> 0 (the examples a chunk holds)')
  # A chunk is the range: a range given with it would be ignored.
  if e.examples_per_chunk and _given(config, ('extract.start_idx', 'extract.end_idx')):
    raise ValueError(f'extract.examples_per_chunk={e.examples_per_chunk}: a chunk sets the '
                     f'range itself, so extract.start_idx={e.start_idx} and extract.end_idx='
                     f'{e.end_idx} would be ignored; leave them at 0 and -1')
  if e.start_idx < 0 or e.end_idx < -1 or 0 <= e.end_idx < e.start_idx:
    raise ValueError(f'extract.start_idx={e.start_idx}, extract.end_idx={e.end_idx}: expected '
                     '0 <= start_idx <= end_idx, or end_idx=-1 (to the end)')
  for key in ('batch_size', 'min_bucket'):
    if e[key] <= 0:
      raise ValueError(f'extract.{key}={e[key]}: must be positive')
  _teacher_forward_settings(config)
  if config.data.max_seq_length <= 0:
    raise ValueError(f'data.max_seq_length={config.data.max_seq_length}: must be positive')
  from jkd.train_config import data_parallel_size
  mesh = mesh_config(config)
  shards = data_parallel_size(dict(zip(mesh.axes, mesh_shape)), mesh.rules)
  if e.batch_size % shards:  # every batch row lives on one data-parallel shard
    raise ValueError(f'extract.batch_size={e.batch_size}: must be a multiple of the {shards} '
                     f'devices the batch is split over (mesh.shape={mesh_shape})')
  from jkd.data import logit_store
  for key, allowed in (('values_dtype', logit_store.VALUES_DTYPES),
                       ('codec', logit_store.CODECS)):
    if e[key] not in allowed:
      raise ValueError(f'extract.{key}={e[key]!r}: expected one of {allowed}')


def _teacher_forward_settings(config) -> None:
  """What the teacher's forward reads, in a store's extraction or online in training: its K,
  vocabulary tile and dtype, and how the examples are tokenized."""
  e = config.extract
  for key in ('top_k', 'vocab_tile'):
    if e[key] <= 0:
      raise ValueError(f'extract.{key}={e[key]}: must be positive')
  if e.dtype not in model.DTYPES:
    raise ValueError(f'extract.dtype={e.dtype!r}: expected one of {tuple(model.DTYPES)}')
  if config.data.format not in chat.FORMATS:
    raise ValueError(f'data.format={config.data.format!r}: expected one of '
                     f'{", ".join(chat.FORMATS)}')
