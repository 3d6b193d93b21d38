"""The edge between ml_collections ConfigDicts and the library's frozen dataclasses.

Library functions take dataclasses or explicit keyword arguments, never a ConfigDict.
Validation happens here, before any compile or I/O, and names the offending key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jkd import model
from jkd.data import chat

MODES = ('pipeline', 'convert', 'extract', 'train', 'export')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  axes: tuple[str, ...]
  shape: tuple[int, ...]
  rules: tuple[tuple[str, Any], ...]


def mesh_config(config) -> MeshConfig:
  axes, shape = tuple(config.mesh.axes), tuple(config.mesh.shape)
  if len(axes) != len(shape):
    raise ValueError(f'mesh.shape={shape} has {len(shape)} entries but mesh.axes={axes} '
                     f'has {len(axes)}')
  rules = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in config.mesh.rules)
  for name, target in rules:
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is not None and axis not in axes:
        raise ValueError(f'mesh.rules: logical axis {name!r} maps to {axis!r}, '
                         f'which is not in mesh.axes={axes}')
  return MeshConfig(axes=axes, shape=shape, rules=rules)


def model_config(config) -> model.ModelConfig:
  """config.model (a ConfigDict) -> a validated ModelConfig."""
  return model.ModelConfig.from_dict(config.model.to_dict())


def validate(config) -> None:
  """Checks the whole config up front; raises ValueError naming the key."""
  if config.mode not in MODES:
    raise ValueError(f'mode={config.mode!r}: unknown; expected one of {MODES}')
  from jkd import distributed
  distributed.settings(config)  # jkd.main has initialized from it already; checks the keys
  mesh = mesh_config(config)
  import jax  # deferred: the backend starts only once the config is known to be sane
  from jkd import sharding
  sharding.mesh_shape(mesh.shape, jax.device_count())
  _validate_profile(config)
  if config.mode == 'pipeline':
    p = config.pipeline
    if p.teacher == 'random':
      model_config(config)
    for key in ('student_layers', 'num_samples', 'max_new_tokens'):
      if p[key] <= 0:
        raise ValueError(f'pipeline.{key}={p[key]}: must be positive')
    if p.calibration_examples < 0:
      raise ValueError(f'pipeline.calibration_examples={p.calibration_examples}: must be >= 0')
    _validate_extract(config)  # the stages it runs, before any of them starts
    from jkd import train
    train.validate_config(config)
  if config.mode == 'convert':
    for key in ('source', 'output'):
      if not config.convert[key]:
        raise ValueError(f'convert.{key} is empty: set --config.convert.{key}=PATH')
  if config.mode == 'extract':
    for key in ('teacher', 'output'):
      if not config.extract[key]:
        raise ValueError(f'extract.{key} is empty: set --config.extract.{key}=PATH')
    if not config.data.train_file and not config.data.validation_file:
      raise ValueError('data.train_file and data.validation_file are both empty')
    _validate_extract(config)
  if config.mode == 'train':
    if not config.train.student:  # random init: the model comes from config.model
      model_config(config)
    source = config.distill.teacher_source
    if source not in ('store', 'online'):
      raise ValueError(f'distill.teacher_source={source!r}: expected store or online')
    if source == 'store' and not config.train.store:
      raise ValueError('train.store is empty: set --config.train.store=STORE (from mode=extract)'
                       " or distill.teacher_source='online'")
    if source == 'online' and (not config.extract.teacher or not config.data.train_file):
      raise ValueError("distill.teacher_source='online' needs extract.teacher and "
                       'data.train_file')
    from jkd import train  # the store's K is checked again by the loop once the store is open
    train.validate_config(config)
  if config.mode == 'export':
    if not config.export.source:
      raise ValueError('export.source is empty: set --config.export.source=MODEL_DIR')
    if not config.export.nemo and not config.export.hf:
      raise ValueError('export.nemo and export.hf are both empty: set at least one')
    if config.export.dtype not in ('bfloat16', 'float32'):
      raise ValueError(f'export.dtype={config.export.dtype!r}: expected bfloat16 or float32')


def _validate_profile(config) -> None:
  p = config.profile
  if p.start_step != -1 and p.start_step < 1:
    raise ValueError(f'profile.start_step={p.start_step}: must be -1 (off) or >= 1 (steps and '
                     'batches count from 1)')
  if p.start_step >= 1 and p.steps <= 0:
    raise ValueError(f'profile.steps={p.steps}: must be positive when profile.start_step is set')
  if not 0 <= p.host_tracer_level <= 3:
    raise ValueError(f'profile.host_tracer_level={p.host_tracer_level}: expected 0..3')


def _validate_extract(config) -> None:
  """mode=extract's settings, paths aside."""
  if config.extract.examples_per_chunk < 0 or config.extract.chunk_index < 0:
    raise ValueError('extract.examples_per_chunk and extract.chunk_index must be >= 0')
  for key in ('top_k', 'batch_size', 'vocab_tile', 'min_bucket'):
    if config.extract[key] <= 0:
      raise ValueError(f'extract.{key}={config.extract[key]}: must be positive')
  if config.data.format not in chat.FORMATS:
    raise ValueError(f'data.format={config.data.format!r}: expected one of '
                     f'{", ".join(chat.FORMATS)}')
  for key, allowed in (('values_dtype', ('bfloat16', 'float32')),
                       ('dtype', ('bfloat16', 'float32'))):
    if config.extract[key] not in allowed:
      raise ValueError(f'extract.{key}={config.extract[key]!r}: expected one of {allowed}')
