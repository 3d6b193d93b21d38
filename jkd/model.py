"""Megatron-GPT-compatible decoder in Flax linen.

Covers what GPT-2B-001, Nemotron-3/4, Llama-style and classic NeMo GPT-3 checkpoints
need (see ../shared/docs/nemo_checkpoint_format.md §6 for the forward pass it follows).

Letter legend for tensor names:
  B batch, T sequence length, D hidden size, N query heads, G key/value groups,
  H head dim, F ffn hidden size, V tokenizer vocabulary, P padded vocabulary (>= V),
  L layers.

Parameters are a plain nested dict (fp32 master weights); layers are stacked on a leading
L axis and run with `nn.scan`. Model code names logical axes only; `jkd.sharding` maps
them to the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import shlex
import shutil
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from jkd import faults, sharding

Params = dict[str, Any]

# name -> (activation, gated). Gated ones read fc1 as [gate; up] and compute act(gate) * up.
# The GELU ones are exact (erf); ModelConfig.gelu_tanh selects the tanh form.
ACTIVATIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], bool]] = {
    'gelu': (functools.partial(jax.nn.gelu, approximate=False), False),
    'squared-relu': (lambda x: jnp.square(jax.nn.relu(x)), False),
    'swiglu': (jax.nn.silu, True),
    'fast-swiglu': (jax.nn.silu, True),
    'geglu': (functools.partial(jax.nn.gelu, approximate=False), True),
    'fast-geglu': (functools.partial(jax.nn.gelu, approximate=False), True),
    'reglu': (jax.nn.relu, True),
    'fast-reglu': (jax.nn.relu, True),
}
GELUS = ('gelu', 'geglu', 'fast-geglu')
NORMALIZATIONS = ('layernorm', 'layernorm1p', 'rmsnorm')
POSITION_EMBEDDINGS = ('rope', 'learned_absolute')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# What the backward pass keeps instead of recomputing ('none' = no rematerialisation).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable,
        jax.checkpoint_policies.save_only_these_names('dense')),
    'dots_no_batch': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names('dense')),
}  # 'dense': Dense's products on CPU, which `dense_dot` computes inside a custom VJP
# jax.nn.dot_product_attention's implementation; 'auto' = `attention_implementation`'s choice.
ATTENTIONS = ('auto', 'xla', 'cudnn')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Megatron GPT. Field names follow NeMo's model_config.yaml."""

  num_layers: int
  hidden_size: int
  ffn_hidden_size: int
  num_attention_heads: int
  vocab_size: int  # tokenizer vocabulary V: the logits callers see have this width
  padded_vocab_size: int | None = None  # rows stored in the embedding / head (None = V)
  num_query_groups: int | None = None  # None = multi-head attention
  kv_channels: int | None = None  # head dim; None = hidden_size / num_attention_heads
  normalization: str = 'layernorm'
  layernorm_epsilon: float = 1e-5
  activation: str = 'gelu'
  # GELU as 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))), not erf: what Megatron computes with
  # NeMo's default bias_activation_fusion=True (its fused bias-GELU kernels), or openai_gelu.
  gelu_tanh: bool = False
  bias: bool = True  # biases on every linear layer (norm biases follow the norm type)
  position_embedding_type: str = 'learned_absolute'
  rotary_percentage: float = 1.0
  rotary_base: float = 10000.0
  max_position_embeddings: int = 4096
  share_embeddings_and_output_weights: bool = True
  init_method_std: float = 0.02
  dtype: str = 'float32'  # compute dtype; params are always fp32
  remat_policy: str = 'none'
  attention: str = 'auto'  # auto | xla | cudnn (flash attention; GPU, bf16)
  scan_unroll: int = 1  # layers per iteration of the layer scan; 0 = all (no loop)

  def __post_init__(self):
    def fail(key, msg):
      raise ValueError(f'model.{key}={getattr(self, key)!r}: {msg}')

    # Each value of its field's type, however the config was built (a model_config.json's
    # "false", a string, was true; `true` the integer 1).
    for field in dataclasses.fields(self):
      kind, _, optional = field.type.partition(' | ')
      value = getattr(self, field.name)
      if value is None and optional == 'None':
        continue
      if not (isinstance(value, _KINDS[kind]) and (kind == 'bool') == isinstance(value, bool)):
        fail(field.name, f'must be {_KIND_NAMES[kind]}' + (' or null' if optional else ''))
    for key in ('num_layers', 'hidden_size', 'ffn_hidden_size', 'num_attention_heads',
                'vocab_size', 'max_position_embeddings'):
      if getattr(self, key) <= 0:  # integers, by the loop above
        fail(key, 'must be a positive integer')
    for key in ('padded_vocab_size', 'num_query_groups', 'kv_channels'):
      value = getattr(self, key)
      if value is not None and value <= 0:
        fail(key, 'must be None or a positive integer')
    if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
      fail('num_attention_heads',
           f'does not divide hidden_size={self.hidden_size} (set kv_channels to override)')
    if self.num_attention_heads % self.num_groups:
      fail('num_query_groups',
           f'must divide num_attention_heads={self.num_attention_heads}')
    if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
      fail('padded_vocab_size', f'is smaller than vocab_size={self.vocab_size}')
    if self.normalization not in NORMALIZATIONS:
      fail('normalization', f'unknown; expected one of {NORMALIZATIONS}')
    if self.activation not in ACTIVATIONS:
      fail('activation', f'unknown; expected one of {tuple(ACTIVATIONS)}')
    if self.gelu_tanh and self.activation not in GELUS:
      fail('gelu_tanh', f'needs a GELU activation {GELUS}, not {self.activation!r}')
    if self.position_embedding_type not in POSITION_EMBEDDINGS:
      fail('position_embedding_type', f'unknown; expected one of {POSITION_EMBEDDINGS}')
    if not 0.0 < self.rotary_percentage <= 1.0:
      fail('rotary_percentage', 'must be in (0, 1]')
    if self.position_embedding_type == 'rope' and (self.rotary_dim == 0 or self.rotary_dim % 2):
      fail('rotary_percentage', f'gives an odd or empty rotary dim {self.rotary_dim}')
    if self.dtype not in DTYPES:
      fail('dtype', f'unknown; expected one of {tuple(DTYPES)}')
    if self.remat_policy not in REMAT_POLICIES:
      fail('remat_policy', f'unknown; expected one of {tuple(REMAT_POLICIES)}')
    if self.attention not in ATTENTIONS:
      fail('attention', f'unknown; expected one of {ATTENTIONS}')
    if self.attention == 'cudnn' and not _cudnn_fits(self):
      fail('attention', f'cuDNN\'s flash attention needs bfloat16 compute and a head dim that is '
                        f'a multiple of 8, at most 128 (dtype {self.dtype}, head dim '
                        f'{self.head_dim}); use auto or xla')
    if self.scan_unroll < 0:
      fail('scan_unroll', 'must be >= 0 (0 unrolls every layer)')
    if not self.layernorm_epsilon > 0:
      fail('layernorm_epsilon', 'must be positive')
    if not self.rotary_base > 0:
      fail('rotary_base', 'must be positive')

  @property
  def num_groups(self) -> int:
    return self.num_query_groups or self.num_attention_heads

  @property
  def head_dim(self) -> int:
    return self.kv_channels or self.hidden_size // self.num_attention_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_percentage)

  @property
  def layers_per_scan_step(self) -> int:
    """Layers one iteration of the layer scan runs (scan_unroll; 0 and >= num_layers: all)."""
    return min(self.scan_unroll or self.num_layers, self.num_layers)

  @property
  def padded_vocab(self) -> int:
    return self.padded_vocab_size or self.vocab_size

  @property
  def gated(self) -> bool:
    return ACTIVATIONS[self.activation][1]

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any], saved: bool = False) -> 'ModelConfig':
    """From a dict (a model_config.json, config.model). `saved`: a model directory's file,
    which must name every setting of the architecture (SAVED_KEYS): one left out took its
    default silently (a missing rotary_base moved the logits by 2e-2)."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f'model config: unknown keys {unknown}')
    if saved:
      missing = [k for k in SAVED_KEYS if k not in d
                 and (k != 'gelu_tanh' or d.get('activation', 'gelu') in GELUS)]
      if missing:
        hint = ('; jkd before 2026-11-29 wrote no gelu_tanh: add "gelu_tanh": false, the erf '
                'form it computed' if missing == ['gelu_tanh'] else '')
        raise ValueError(f'model config: missing keys {missing} (a saved config names every '
                         f'setting of the architecture){hint}')
    return cls(**d)


_KINDS = {'int': int, 'float': (int, float), 'bool': bool, 'str': str}
_KIND_NAMES = {'int': 'an integer', 'float': 'a number', 'bool': 'true or false',
               'str': 'a string'}
# The keys a saved model_config.json must hold: every setting that changes the forward pass
# (gelu_tanh for GELU activations). The rest (init, compute dtype, remat, attention kernel,
# scan unrolling) change how it runs, and take their defaults.
SAVED_KEYS = ('num_layers', 'hidden_size', 'ffn_hidden_size', 'num_attention_heads',
              'vocab_size', 'padded_vocab_size', 'num_query_groups', 'kv_channels',
              'normalization', 'layernorm_epsilon', 'activation', 'gelu_tanh', 'bias',
              'position_embedding_type', 'rotary_percentage', 'rotary_base',
              'max_position_embeddings', 'share_embeddings_and_output_weights')


def _param(init, axes):
  return nn.with_logical_partitioning(init, axes)


def _dense_dims(x_ndim, n_in):
  return (tuple(range(x_ndim - n_in, x_ndim)), tuple(range(n_in))), ((), ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_f32_accumulate(x, w, n_in):
  """x . w accumulated in fp32 and rounded to x's dtype; the backward's two products too."""
  return jax.lax.dot_general(x, w, _dense_dims(x.ndim, n_in),
                             preferred_element_type=jnp.float32).astype(x.dtype)


def _dot_f32_accumulate_fwd(x, w, n_in):
  return _dot_f32_accumulate(x, w, n_in), (x, w)


def _dot_f32_accumulate_bwd(n_in, res, g):
  x, w = res
  batch = tuple(range(x.ndim - n_in))
  d_x = jax.lax.dot_general(g, w, ((tuple(range(len(batch), g.ndim)), tuple(range(n_in, w.ndim))),
                                   ((), ())), preferred_element_type=jnp.float32)
  d_w = jax.lax.dot_general(x, g, ((batch, batch), ((), ())), preferred_element_type=jnp.float32)
  return d_x.astype(x.dtype), d_w.astype(w.dtype)


_dot_f32_accumulate.defvjp(_dot_f32_accumulate_fwd, _dot_f32_accumulate_bwd)


def dense_dot(x, w, n_in=1):
  """x . w over x's last n_in axes and w's first, in x's dtype (x and w alike).

  On CPU a bf16 product is asked for as bf16 x bf16 -> fp32, rounded to bf16, forward and
  backward: XLA:CPU runs a bf16 -> bf16 dot as an fp32 one (both operands upcast), at about half
  the speed of its bf16 kernels. Elsewhere (GPUs accumulate bf16 products in fp32 anyway) it is
  the plain dot. lax.platform_dependent lowers only the branch of the platform compiled for."""
  def plain(x, w):
    return jax.lax.dot_general(x, w, _dense_dims(x.ndim, n_in))
  if x.dtype == jnp.float32:
    return plain(x, w)

  def cpu(x, w):
    return checkpoint_name(_dot_f32_accumulate(x, w, n_in), 'dense')
  return jax.lax.platform_dependent(x, w, cpu=cpu, default=plain)


class Dense(nn.Module):
  """x @ kernel (+ bias) over the last `n_in` axes of x; fp32 params, compute in cfg.dtype."""
  cfg: ModelConfig
  features: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axes of the kernel: n_in input axes, then outputs
  n_in: int = 1
  std: float | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    in_shape = x.shape[x.ndim - self.n_in:]
    init = nn.initializers.normal(self.std or cfg.init_method_std)
    kernel = self.param('kernel', _param(init, self.axes), in_shape + self.features, jnp.float32)
    dt = cfg.compute_dtype
    y = dense_dot(x.astype(dt), kernel.astype(dt), self.n_in)
    if cfg.bias:
      bias = self.param('bias', _param(nn.initializers.zeros, self.axes[self.n_in:]),
                        self.features, jnp.float32)
      y = y + bias.astype(dt)
    return y


class Norm(nn.Module):
  """LayerNorm, zero-centred-gamma LayerNorm (layernorm1p: scale 1 + w) or RMSNorm, in fp32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    d = x_BxTxD.shape[-1]
    zero_centred = cfg.normalization == 'layernorm1p'
    init = nn.initializers.zeros if zero_centred else nn.initializers.ones
    scale_D = self.param('scale', _param(init, ('norm',)), (d,), jnp.float32)
    x = x_BxTxD.astype(jnp.float32)
    if cfg.normalization == 'rmsnorm':
      y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + cfg.layernorm_epsilon)
      return (y * scale_D).astype(x_BxTxD.dtype)
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + cfg.layernorm_epsilon)
    # Norm biases exist for both layernorm variants even when cfg.bias is False (Megatron).
    bias_D = self.param('bias', _param(nn.initializers.zeros, ('norm',)), (d,), jnp.float32)
    return (y * (1.0 + scale_D if zero_centred else scale_D) + bias_D).astype(x_BxTxD.dtype)


def apply_rope(x_BxTxNxH, positions_BxT, rotary_dim: int, base: float):
  """Rotate-half RoPE on the first `rotary_dim` channels of each head (Megatron / HF Llama)."""
  inv_freq = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
  angles_BxTxR2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  angles_BxTx1xR = jnp.concatenate([angles_BxTxR2, angles_BxTxR2], -1)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  rot, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], -1)
  rot = rot * jnp.cos(angles_BxTx1xR) + rotated * jnp.sin(angles_BxTx1xR)
  return jnp.concatenate([rot, passthrough], -1).astype(x_BxTxNxH.dtype)


def attention_implementation(cfg: ModelConfig) -> str:
  """'xla' or 'cudnn' for cfg.attention. 'auto' takes cuDNN's flash attention (no [T, T] scores
  in memory) when jax's backend is a GPU, the compute is bf16 and the head dim one cuDNN takes
  (a multiple of 8, at most 128), XLA's otherwise. Packed rows' segment mask becomes cuDNN's
  bias input, though: a [B, 1, T, T] bf16 tensor, and in the backward its (unused) gradient
  per layer (jax 0.10 always forms it; seen in the program lowered for cuda, not measured)."""
  if cfg.attention != 'auto':
    return cfg.attention
  return 'cudnn' if _cudnn_fits(cfg) and jax.default_backend() == 'gpu' else 'xla'


def _cudnn_fits(cfg: ModelConfig) -> bool:
  return cfg.dtype == 'bfloat16' and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT):
    cfg = self.cfg
    n, g, h = cfg.num_attention_heads, cfg.num_groups, cfg.head_dim
    q_BxTxNxH = Dense(cfg, (n, h), ('embed', 'heads', 'head_dim'), name='q')(x_BxTxD)
    k_BxTxGxH = Dense(cfg, (g, h), ('embed', 'kv_heads', 'head_dim'), name='k')(x_BxTxD)
    v_BxTxGxH = Dense(cfg, (g, h), ('embed', 'kv_heads', 'head_dim'), name='v')(x_BxTxD)
    if cfg.position_embedding_type == 'rope':
      q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rotary_dim, cfg.rotary_base)
      k_BxTxGxH = apply_rope(k_BxTxGxH, positions_BxT, cfg.rotary_dim, cfg.rotary_base)
    # Scores and softmax run in fp32 inside dot_product_attention; query head n uses
    # KV group n // (N/G), Megatron's grouping.
    ctx_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxGxH, v_BxTxGxH, mask=mask_Bx1xTxT, is_causal=True,
        scale=1.0 / math.sqrt(h), implementation=attention_implementation(cfg))
    out_std = cfg.init_method_std / math.sqrt(2 * cfg.num_layers)
    return Dense(cfg, (cfg.hidden_size,), ('heads', 'head_dim', 'embed'), n_in=2,
                 std=out_std, name='o')(ctx_BxTxNxH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_act(act, u_Xx2xF):
  """act(gate) * up for u = [gate, up] on axis -2, in u's dtype; the backward keeps only u and
  computes both halves of d u in fp32 in one pass (autodiff of the slices and products would
  keep act(gate) and up apart, round to u's dtype after every op and assemble d u from padded
  halves: XLA:CPU's slowest elementwise fusion of the layer)."""
  return act(u_Xx2xF[..., 0, :]) * u_Xx2xF[..., 1, :]


def _gated_fwd(act, u_Xx2xF):
  return gated_act(act, u_Xx2xF), u_Xx2xF


def _gated_bwd(act, u_Xx2xF, g_XxF):
  u = u_Xx2xF.astype(jnp.float32)
  a_XxF, d_act = jax.vjp(act, u[..., 0, :])
  g = g_XxF.astype(jnp.float32)
  d_gate_XxF, = d_act(g * u[..., 1, :])
  return (jnp.stack([d_gate_XxF, g * a_XxF], -2).astype(u_Xx2xF.dtype),)


gated_act.defvjp(_gated_fwd, _gated_bwd)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    act, gated = ACTIVATIONS[cfg.activation]
    if cfg.gelu_tanh:
      act = functools.partial(jax.nn.gelu, approximate=True)
    f = cfg.ffn_hidden_size
    if gated:  # fc1 kernel [D, 2, F]: index 0 is the (activated) gate, 1 the linear up branch
      u_BxTx2xF = Dense(cfg, (2, f), ('embed', None, 'mlp'), name='fc1')(x_BxTxD)
      h_BxTxF = gated_act(act, u_BxTx2xF)
    else:
      h_BxTxF = act(Dense(cfg, (f,), ('embed', 'mlp'), name='fc1')(x_BxTxD))
    out_std = cfg.init_method_std / math.sqrt(2 * cfg.num_layers)
    return Dense(cfg, (cfg.hidden_size,), ('mlp', 'embed'), std=out_std, name='fc2')(h_BxTxF)


class Block(nn.Module):
  """Pre-LN transformer layer; returns (x, None) so it can be scanned."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT):
    h = Norm(self.cfg, name='attn_norm')(x_BxTxD)
    x_BxTxD = x_BxTxD + Attention(self.cfg, name='attn')(h, positions_BxT, mask_Bx1xTxT)
    h = Norm(self.cfg, name='mlp_norm')(x_BxTxD)
    x_BxTxD = x_BxTxD + Mlp(self.cfg, name='mlp')(h)
    return nn.with_logical_constraint(x_BxTxD, ('act_batch', 'act_len', 'act_embed')), None


def _in_table_layout(x_BxTxD):
  """Embedding rows [B, T, D] laid out as the table holds D: rows over the batch axes that do
  not split D, D over those that do ('embed', FSDP); the forward's rows and the backward's
  cotangent pass through it, so both sides move by an all-to-all. Without it, on a mesh with
  data and fsdp both > 1 (multi-host's (-1, 8, 1)), XLA's partitioner replicated the whole
  [R, T, D] cotangent on every device on its way to the table's gradient (and with tensor > 1
  the looked-up rows too)."""
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  if mesh.empty or not rules:  # one device, or no rules to place it by
    return x_BxTxD
  return jax.lax.with_sharding_constraint(
      x_BxTxD, jax.sharding.NamedSharding(mesh, sharding.table_layout_spec(rules)))


class Decoder(nn.Module):
  """Embedding -> scanned blocks -> final norm. Returns the final hidden state [B, T, D]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, mask_Bx1xTxT):
    cfg = self.cfg
    embed = self.param('embed', _param(nn.initializers.normal(cfg.init_method_std),
                                       ('vocab', 'embed')),
                       (cfg.padded_vocab, cfg.hidden_size), jnp.float32)
    x_BxTxD = jnp.take(embed, tokens_BxT, axis=0)  # ids past the table: NaN (take's fill)
    if cfg.position_embedding_type == 'learned_absolute':
      if tokens_BxT.shape[1] > cfg.max_position_embeddings:  # NaN rows otherwise, all of them
        raise ValueError(f'rows of {tokens_BxT.shape[1]} tokens: the learned position table of '
                         f'model.max_position_embeddings={cfg.max_position_embeddings} has no '
                         'row past it')
      pos_embed = self.param('pos_embed', _param(nn.initializers.normal(cfg.init_method_std),
                                                 (None, 'embed')),
                             (cfg.max_position_embeddings, cfg.hidden_size), jnp.float32)
      x_BxTxD = x_BxTxD + jnp.take(pos_embed, positions_BxT, axis=0)
    x_BxTxD = _in_table_layout(x_BxTxD.astype(cfg.compute_dtype))
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ('act_batch', 'act_len', 'act_embed'))
    block = Block
    if REMAT_POLICIES[cfg.remat_policy] is not None:
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    layers = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                     metadata_params={nn.PARTITION_NAME: 'layers'},
                     unroll=cfg.layers_per_scan_step)
    x_BxTxD, _ = layers(cfg, name='layers')(x_BxTxD, positions_BxT, mask_Bx1xTxT)
    x_BxTxD = Norm(cfg, name='final_norm')(x_BxTxD)
    if not cfg.share_embeddings_and_output_weights:
      self.param('lm_head', _param(nn.initializers.normal(cfg.init_method_std),
                                   ('embed', 'vocab')),
                 (cfg.hidden_size, cfg.padded_vocab), jnp.float32)
    return x_BxTxD


def segment_positions(segment_ids_BxT):
  """Positions that restart at 0 wherever the segment id changes along a row."""
  t_BxT = jnp.broadcast_to(jnp.arange(segment_ids_BxT.shape[1]), segment_ids_BxT.shape)
  starts_BxT = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                                segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  return t_BxT - jax.lax.cummax(jnp.where(starts_BxT, t_BxT, 0), axis=1)


def _inputs(tokens_BxT, segment_ids_BxT, positions_BxT):
  """(positions, attention mask); positions default to restarting at each segment."""
  if positions_BxT is None:
    positions_BxT = (jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
                     if segment_ids_BxT is None else segment_positions(segment_ids_BxT))
  mask_Bx1xTxT = None
  if segment_ids_BxT is not None:  # packed sequences: attend only within one segment
    mask_Bx1xTxT = (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])
  return positions_BxT, mask_Bx1xTxT


def init(cfg: ModelConfig, rng: jax.Array, boxed: bool = False) -> Params:
  """Random fp32 parameters (boxed=True keeps flax's logical-axis metadata)."""
  tokens_BxT = jnp.zeros((1, 1), jnp.int32)
  variables = Decoder(cfg).init(rng, tokens_BxT, *_inputs(tokens_BxT, None, None))
  return variables['params'] if boxed else nn.meta.unbox(variables['params'])


def hidden(cfg: ModelConfig, params: Params, tokens_BxT, *, segment_ids_BxT=None,
           positions_BxT=None):
  """Final-norm hidden states [B, T, D] in the compute dtype."""
  return Decoder(cfg).apply({'params': params}, tokens_BxT,
                            *_inputs(tokens_BxT, segment_ids_BxT, positions_BxT))


def output_weights(cfg: ModelConfig, params: Params):
  """The LM head as a [D, P] matrix (the tied embedding transposed, or the untied head)."""
  if cfg.share_embeddings_and_output_weights:
    return params['embed'].T
  return params['lm_head']


def logits_from_hidden(cfg: ModelConfig, params: Params, hidden_BxTxD):
  """fp32 logits over the tokenizer vocabulary [B, T, V]; padded columns are dropped."""
  w_DxP = output_weights(cfg, params).astype(cfg.compute_dtype)
  logits_BxTxP = jnp.einsum('btd,dp->btp', hidden_BxTxD.astype(cfg.compute_dtype), w_DxP,
                            preferred_element_type=jnp.float32)
  logits_BxTxP = nn.with_logical_constraint(logits_BxTxP, ('act_batch', 'act_len', 'act_vocab'))
  return logits_BxTxP[..., :cfg.vocab_size]


def forward(cfg: ModelConfig, params: Params, tokens_BxT, *, segment_ids_BxT=None,
            positions_BxT=None):
  """fp32 logits [B, T, V] for int tokens [B, T]; causal, packed when segment ids are given.
  Token ids lie in [0, padded vocab): others make the row's logits NaN.

  Not jitted here: wrap in `jax.jit` (cfg static) inside `jkd.sharding.activate(...)` to get
  the activation sharding constraints.
  """
  h_BxTxD = hidden(cfg, params, tokens_BxT, segment_ids_BxT=segment_ids_BxT,
                   positions_BxT=positions_BxT)
  return logits_from_hidden(cfg, params, h_BxTxD)


def check_params(cfg: ModelConfig, params: Params, source: str = 'params') -> None:
  """Raises ValueError naming every path whose shape differs from what `cfg` builds."""
  expected = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): tuple(x.shape)
         for p, x in jax.tree_util.tree_leaves_with_path(params)}
  problems = [f'missing {k} {v}' for k, v in want.items() if k not in got]
  problems += [f'unexpected {k} {v}' for k, v in got.items() if k not in want]
  problems += [f'{k}: shape {got[k]} != expected {v}' for k, v in want.items()
               if k in got and got[k] != v]
  if problems:
    raise ValueError(f'{source}: parameters do not match the model config: '
                     + '; '.join(problems[:8]) + (' ...' if len(problems) > 8 else ''))


# --- Model directories: params (orbax) + model_config.json (+ tokenizer files) -------------

CONFIG_FILE = 'model_config.json'
PARAMS_DIR = 'params'


def check_overwritable(directory: str, what: str = '') -> None:
  """ValueError when `directory` is a file, or a directory holding entries no model directory
  has (hidden ones aside): writing a model directory there replaces its params/ and config.
  A model directory, complete or not (a killed write), may be written over."""
  if not os.path.lexists(directory):
    return
  where = what or directory
  if not os.path.isdir(directory):
    raise ValueError(f'{where}: exists and is not a directory')
  own = (CONFIG_FILE, CONFIG_FILE + '.tmp', PARAMS_DIR, 'tokenizer', 'tokenizer.tmp')
  foreign = sorted(e for e in os.listdir(directory) if not e.startswith('.') and e not in own
                   and not e.startswith(PARAMS_DIR + '.'))  # orbax's leftovers of a killed save
  if foreign:
    raise ValueError(f'{where}: holds {", ".join(foreign[:5])}{" ..." if len(foreign) > 5 else ""}'
                     ', which no jkd model directory has; a model written there would replace '
                     'its params/: choose a new or empty directory')


def save(directory: str, cfg: ModelConfig, params: Params, tok=None) -> None:
  """Writes a model directory that `load` reads; params keep their dtype; `tok`: its
  tokenizer (jkd.tokenizer), or None."""
  save_parts(directory, cfg, [params], tok)


def save_parts(directory: str, cfg: ModelConfig, parts: Iterable[Params], tok=None) -> None:
  """Writes a model directory from partial params trees with disjoint leaves, one at a time,
  with tokenizer `tok` (None: none; an earlier one is removed, as it would be paired with
  these weights).

  Each part is written (orbax partial save) before the next is asked for, so a converter
  can stream a model that does not fit in memory. `model_config.json` is written last: a
  directory without it is an incomplete write. A directory holding what no model directory
  has is refused before anything is removed (`check_overwritable`). With several processes (a
  directory all of them see), every one calls this with its shards; process 0 alone clears the
  directory and writes the tokenizer and the config.
  """
  from orbax.checkpoint import v1 as ocp

  from jkd import distributed, tokenizer
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  params_dir = os.path.join(directory, PARAMS_DIR)
  primary = jax.process_index() == 0
  check_overwritable(directory)  # every process: each would fail alone
  if primary:
    if os.path.exists(config_path):
      os.remove(config_path)  # the directory is incomplete until the new config lands
    # A killed earlier write may have left orbax's `params.partial_save*` (or other temporary
    # `params.*`) behind.
    for stale in [params_dir] + glob.glob(params_dir + '.*'):
      shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    if tok is not None:
      tokenizer.save(tok, directory)
    else:
      shutil.rmtree(os.path.join(directory, 'tokenizer'), ignore_errors=True)
  distributed.sync('jkd model.save: cleared')  # one name on every host, whatever its mounts
  written: dict = {}  # shapes only, to check the whole tree before finalizing
  ctx = ocp.Context()
  # Weights barely compress (random mantissas), and zstd costs a second copy of each leaf in
  # memory while writing (measured: +2x leaf size vs +1x without; scripts/bench_convert.py).
  ctx.array.saving.use_compression = False
  with ctx:
    for part in parts:
      ocp.partial.save(params_dir, part)
      faults.point('model.part_saved')
      _merge(written, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), part))
      del part  # before the next part is built: one part in memory at a time
    check_params(cfg, written, directory)
    ocp.partial.finalize(params_dir)
    faults.point('model.params_finalized')  # complete, but not until the config lands
  if primary:
    tmp = config_path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, config_path)
  distributed.sync('jkd model.save: written')


def _merge(into: dict, part: dict) -> None:
  for key, value in part.items():
    if isinstance(value, dict):
      _merge(into.setdefault(key, {}), value)
    else:
      into[key] = value


def load_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    hint = ''
    if os.path.isfile(directory):  # a .nemo, .gguf or checkpoint file, say
      hint = ('; convert it into one first with mode=convert (configs/convert.py, '
              f'--config.convert.source={shlex.quote(directory)} --config.convert.output=DIR)')
    raise FileNotFoundError(f'{path}: not a jkd model directory (no {CONFIG_FILE}){hint}')
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: invalid JSON: {e}') from None
  if not isinstance(d, dict):
    raise ValueError(f'{path}: holds a JSON {type(d).__name__}, not an object')
  try:
    return ModelConfig.from_dict(d, saved=True)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{path}: {e}') from None


def load(directory: str, shardings=None, dtype=jnp.float32) -> tuple[ModelConfig, Params]:
  """Reads a model directory -> (ModelConfig, params in `dtype`), placed with `shardings`;
  dtype=None keeps each leaf's stored dtype (no fp32 copy of a bf16 model)."""
  from orbax.checkpoint import v1 as ocp
  directory = os.path.abspath(directory)
  path = os.path.join(directory, PARAMS_DIR)
  cfg = load_config(directory)
  abstract = jax.eval_shape(lambda: init(cfg, jax.random.key(0)))
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                             abstract)
  # Checked before reading: orbax's own error names neither the file nor the config.
  stored = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        ocp.metadata(path).metadata, is_leaf=lambda m: hasattr(m, 'dtype'))
  check_params(cfg, stored, f'{path} (its {CONFIG_FILE})')
  if dtype is None:
    stored = {jax.tree_util.keystr(p): m.dtype
              for p, m in jax.tree_util.tree_leaves_with_path(stored)}
    dtypes = jax.tree_util.tree_map_with_path(lambda p, _: stored[jax.tree_util.keystr(p)],
                                              abstract)
  else:
    dtypes = jax.tree.map(lambda _: dtype, abstract)
  abstract = jax.tree.map(lambda a, s, d: jax.ShapeDtypeStruct(a.shape, d, sharding=s),
                          abstract, shardings, dtypes)
  return cfg, ocp.load(path, abstract)
