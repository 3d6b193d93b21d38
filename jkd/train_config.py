"""TrainConfig: config.train + config.distill (+ seed) as one frozen dataclass, and the training
checks that run before anything compiles. Every check names its config key.

Field names and defaults are NeMo-Aligner's (gpt_knowledge_distillation.yaml); the jkd loss
options beyond NeMo (tail, student_norm, beta, temperature) default to off. `jkd.train`
re-exports everything here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jkd import losses, model, sharding
from jkd.kernels import fused_topk_kd

PRECISIONS = {'bf16': 'bfloat16', 'fp32': 'float32'}  # NeMo trainer.precision -> compute dtype
REDUCTIONS = ('nemo', 'global_token_mean')
LOSS_IMPLS = ('fused', 'reference')
_DISTILL = ('kd_loss', 'kd_loss_weight', 'sft_loss_weight', 'logits_scale',
            'target_logits_scale', 'top_k', 'cross_tokenizer', 'tail', 'student_norm', 'beta',
            'temperature', 'reduction', 'loss_impl', 'fused_implementation')
_LOSS_OPTIONS = ('kd_loss', 'kd_loss_weight', 'sft_loss_weight', 'target_logits_scale', 'tail',
                 'student_norm', 'beta', 'temperature')


def _key(field):  # the config key a TrainConfig field comes from (for error messages)
  return 'seed' if field == 'seed' else f"{'distill' if field in _DISTILL else 'train'}.{field}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """config.train + config.distill (+ seed); names and defaults as NeMo-Aligner's KD YAML."""
  global_batch_size: int = 64
  micro_batch_size: int = 1
  lr: float = 3e-5
  min_lr: float = 9e-7
  warmup_steps: int = 10
  constant_steps: int = 1000
  max_steps: int = -1  # -1: from max_epochs (the loop resolves it before building the step)
  max_epochs: int = 1  # as NeMo, also a bound when max_steps is set; -1: none (needs max_steps)
  weight_decay: float = 0.01
  betas: tuple[float, float] = (0.9, 0.98)
  eps: float = 1e-8
  do_layer_norm_weight_decay: bool = False
  decay_norm_scales: bool = True
  gradient_clip_val: float = 1.0
  precision: str = 'bf16'
  remat_policy: str = 'none'
  attention: str = 'auto'
  scan_unroll: int = 1
  pack: bool = False
  val_check_interval: int = 100
  save_interval: int = 100
  limit_val_batches: int = -1
  limit_train_batches: int = -1
  student: str = ''
  store: str = ''
  restore_from_path: str = ''
  seed: int = 0
  kd_loss: str = 'fwd_kl'
  kd_loss_weight: float = 1.0
  sft_loss_weight: float = 0.0
  logits_scale: float = 1.0
  target_logits_scale: float = 1.0
  top_k: int | None = None
  cross_tokenizer: bool = False
  tail: bool = False
  student_norm: str | None = None
  beta: float = 0.5
  temperature: float = 1.0
  reduction: str = 'nemo'
  loss_impl: str = 'fused'
  fused_implementation: str = 'auto'

  def __post_init__(self):
    def fail(field, msg):
      raise ValueError(f'{_key(field)}={getattr(self, field)!r}: {msg}')

    for f in ('global_batch_size', 'micro_batch_size', 'val_check_interval', 'save_interval'):
      if getattr(self, f) <= 0:
        fail(f, 'must be positive')
    for f in ('warmup_steps', 'constant_steps', 'weight_decay', 'gradient_clip_val', 'min_lr'):
      if not getattr(self, f) >= 0:
        fail(f, 'must be >= 0')
    if not self.lr > 0:
      fail('lr', 'must be > 0')
    if self.min_lr > self.lr or (self.constant_steps > 0 and self.min_lr == self.lr):
      fail('min_lr', f'must be below lr={self.lr} (NeMo CosineAnnealing)')
    if self.max_steps == 0 or self.max_steps < -1:
      fail('max_steps', 'must be positive, or -1 to run max_epochs')
    if self.limit_train_batches == 0 or self.limit_train_batches < -1:
      fail('limit_train_batches', 'must be positive, or -1 for all')
    if self.limit_val_batches < -1:
      fail('limit_val_batches', 'must be >= 0, or -1 for the whole split')
    if self.max_epochs == 0 or self.max_epochs < -1:
      fail('max_epochs', 'must be positive, or -1 for no bound (with train.max_steps)')
    if self.max_steps == -1 and self.max_epochs == -1:
      fail('max_epochs', 'train.max_steps=-1 and max_epochs=-1: nothing bounds the run')
    if self.limit_train_batches > 0 and self.max_epochs == -1:  # it would bound nothing
      fail('limit_train_batches', 'bounds an epoch, and train.max_epochs=-1 counts none: set '
           'max_epochs, or leave limit_train_batches at -1')
    if self.max_steps > 0 and self.warmup_steps + self.constant_steps > self.max_steps:
      fail('constant_steps', f'warmup_steps={self.warmup_steps} + constant_steps exceed '
           f'max_steps={self.max_steps} (NeMo would run the rest at min_lr without decay)')
    if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
      fail('betas', 'expected two values in [0, 1)')
    if not self.eps > 0:
      fail('eps', 'must be > 0')
    if self.precision not in PRECISIONS:
      fail('precision', f'expected one of {tuple(PRECISIONS)}')
    if self.remat_policy not in model.REMAT_POLICIES:
      fail('remat_policy', f'expected one of {tuple(model.REMAT_POLICIES)}')
    if self.attention not in model.ATTENTIONS:
      fail('attention', f'expected one of {model.ATTENTIONS}')
    if self.attention == 'cudnn' and self.precision != 'bf16':
      fail('attention', f"cuDNN's flash attention needs train.precision='bf16' (not "
                        f'{self.precision!r}); use auto or xla')
    if self.scan_unroll < 0:
      fail('scan_unroll', 'must be >= 0 (0 unrolls every layer)')
    if self.reduction not in REDUCTIONS:
      fail('reduction', f'expected one of {REDUCTIONS}')
    if self.loss_impl not in LOSS_IMPLS:
      fail('loss_impl', f'expected one of {LOSS_IMPLS}')
    if self.fused_implementation not in fused_topk_kd.IMPLEMENTATIONS:
      fail('fused_implementation', f'expected one of {fused_topk_kd.IMPLEMENTATIONS}')
    if self.top_k is not None and self.top_k <= 0:
      fail('top_k', 'must be positive (or None for the stored K)')
    if not self.logits_scale > 0:
      fail('logits_scale', 'must be > 0')
    try:
      losses.resolve_options(**self.loss_options, has_teacher_lse=True)
    except ValueError as e:
      raise ValueError(f'distill.{e}') from None

  @property
  def loss_options(self) -> dict[str, Any]:
    return {f: getattr(self, f) for f in _LOSS_OPTIONS}


def train_config(config) -> TrainConfig:
  """config (a ConfigDict with train, distill, seed) -> a validated TrainConfig."""
  kw = {}
  for f in dataclasses.fields(TrainConfig):
    node = config
    for part in _key(f.name).split('.'):
      node = node[part]
    kw[f.name] = node
  try:
    kw['betas'] = tuple(float(b) for b in kw['betas'])
  except (TypeError, ValueError):
    raise ValueError(f"train.betas={kw['betas']!r}: expected two numbers in [0, 1)") from None
  return TrainConfig(**kw)


def logical_axis_size(mesh_shape: dict[str, int], rules, logical: str) -> int:
  """Into how many parts the mesh splits a logical axis (its mesh axes' sizes multiplied)."""
  return math.prod(mesh_shape[a] for a in sharding.rule_axes(rules, logical))


def data_parallel_size(mesh_shape: dict[str, int], rules) -> int:
  return logical_axis_size(mesh_shape, rules, 'act_batch')


def validate_config(config, stored_k: int | None = None, n_devices: int | None = None):
  """Training checks that need no compile; ValueError naming the key. stored_k: the store's K."""
  from jkd import config as jkd_config
  tc = train_config(config)
  mc = jkd_config.mesh_config(config)
  if n_devices is None:
    import jax
    n_devices = jax.device_count()
  shape = sharding.mesh_shape(mc.shape, n_devices)
  dp = data_parallel_size(dict(zip(mc.axes, shape)), mc.rules)
  if tc.global_batch_size % (tc.micro_batch_size * dp):
    raise ValueError(f'train.global_batch_size={tc.global_batch_size}: not divisible by '
                     f'micro_batch_size={tc.micro_batch_size} x data-parallel size {dp}')
  if tc.limit_val_batches != 0 and tc.save_interval % tc.val_check_interval:
    raise ValueError(f'train.save_interval={tc.save_interval}: must be a multiple of '
                     f'val_check_interval={tc.val_check_interval} (NeMo asserts it when '
                     'validation is on: train.limit_val_batches != 0)')
  if tc.top_k is not None and stored_k is not None and tc.top_k > stored_k:
    raise ValueError(f'distill.top_k={tc.top_k}: exceeds the teacher\'s K={stored_k} '
                     '(extract.top_k, the K of the logit store)')
  return tc
