"""GGUF (llama.cpp) Llama-architecture checkpoints -> jkd ModelConfig + Flax params.

Reads with the `gguf` package and numpy only; quantized tensors (Q4_*, Q8_0, ...) are
dequantized to fp32 one tensor at a time and streamed out group by group (assemble.py). Types
gguf.quants cannot dequantize (Q8_1, Q8_K, I8..I64, Q1_0) are refused before anything is read;
F64 is read directly.

llama.cpp stores attn_q / attn_k rows permuted for its interleaved RoPE
(`reshape(n, 2, H/2, D).swapaxes(1, 2)` per head); the importer undoes that so the weights
are in the rotate-half order jkd (and Megatron, and HF Llama) use.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Callable, Iterator

import gguf
import numpy as np

from jkd import model
from third_party.convert.assemble import Source, Target, assemble, collect

# GGUF llama metadata key (after the 'llama.' prefix) -> ModelConfig field.
_CONFIG_KEYS = {
    'block_count': 'num_layers',
    'embedding_length': 'hidden_size',
    'feed_forward_length': 'ffn_hidden_size',
    'attention.head_count': 'num_attention_heads',
    'attention.head_count_kv': 'num_query_groups',
    'attention.layer_norm_rms_epsilon': 'layernorm_epsilon',
    'rope.freq_base': 'rotary_base',
    'context_length': 'max_position_embeddings',
}
# Keys llama.cpp reads as optional, with its defaults (older Llama-2 conversions lack them).
_CONFIG_DEFAULTS = {'rope.freq_base': 10000.0}
# Metadata that would change the forward pass in ways this importer does not implement.
_UNSUPPORTED_KEYS = ('rope.scaling.type', 'rope.scaling.factor', 'expert_count',
                     'attention.sliding_window', 'attn_logit_softcapping')


def _unpermute(w_RxD: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation (interleaved -> rotate-half order)."""
  r = w_RxD.shape[0]
  return w_RxD.reshape(n_heads, r // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w_RxD.shape)


# GGUF tensor name -> (jkd param path, transform(w, cfg) -> value for that layer's slot).
# Torch-style [out, in] weights become [in, ...out] kernels. The gated fc1 kernel is
# [L, D, 2, F]; gate and up go to slot 0 and 1 of its third axis (the GATE / UP paths).
_GATE, _UP = (slice(None), 0), (slice(None), 1)
_LAYER_TABLE: dict[str, tuple[tuple, Callable]] = {
    'attn_norm.weight': (('layers', 'attn_norm', 'scale'), lambda w, c: w),
    'ffn_norm.weight': (('layers', 'mlp_norm', 'scale'), lambda w, c: w),
    'attn_q.weight': (('layers', 'attn', 'q', 'kernel'), lambda w, c: _unpermute(
        w, c.num_attention_heads).T.reshape(c.hidden_size, c.num_attention_heads, c.head_dim)),
    'attn_k.weight': (('layers', 'attn', 'k', 'kernel'), lambda w, c: _unpermute(
        w, c.num_groups).T.reshape(c.hidden_size, c.num_groups, c.head_dim)),
    'attn_v.weight': (('layers', 'attn', 'v', 'kernel'), lambda w, c: w.T.reshape(
        c.hidden_size, c.num_groups, c.head_dim)),
    'attn_output.weight': (('layers', 'attn', 'o', 'kernel'), lambda w, c: w.T.reshape(
        c.num_attention_heads, c.head_dim, c.hidden_size)),
    'ffn_gate.weight': (('layers', 'mlp', 'fc1', 'kernel', _GATE), lambda w, c: w.T),
    'ffn_up.weight': (('layers', 'mlp', 'fc1', 'kernel', _UP), lambda w, c: w.T),
    'ffn_down.weight': (('layers', 'mlp', 'fc2', 'kernel'), lambda w, c: w.T),
}
_GLOBAL_TABLE: dict[str, tuple[tuple, Callable]] = {
    'token_embd.weight': (('embed',), lambda w, c: w),
    'output_norm.weight': (('final_norm', 'scale'), lambda w, c: w),
    'output.weight': (('lm_head',), lambda w, c: w.T),
}
_LAYER_NAME = re.compile(r'blk\.(\d+)\.(.+)')


def _field(reader: gguf.GGUFReader, key: str):
  f = reader.fields.get(key)
  return None if f is None else f.contents()


def read_config(reader: gguf.GGUFReader, path: str) -> model.ModelConfig:
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f'{path}: GGUF architecture {arch!r} is not supported (only llama)')
  for key in _UNSUPPORTED_KEYS:
    if _field(reader, f'llama.{key}') is not None:
      raise ValueError(f'{path}: GGUF key llama.{key} is set; not supported by jkd')
  kwargs = {}
  for key, name in _CONFIG_KEYS.items():
    value = _field(reader, f'llama.{key}')
    value = _CONFIG_DEFAULTS.get(key) if value is None else value
    if value is None and name != 'num_query_groups':
      raise ValueError(f'{path}: GGUF metadata llama.{key} is missing')
    if value is not None:
      kwargs[name] = value
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  vocab = _field(reader, 'llama.vocab_size') or (len(tokens) if tokens is not None else None)
  embd = next((t for t in reader.tensors if t.name == 'token_embd.weight'), None)
  if embd is None:
    raise ValueError(f'{path}: tensor token_embd.weight is missing')
  head_dim = kwargs['hidden_size'] // kwargs['num_attention_heads']
  key_length = _field(reader, 'llama.attention.key_length')
  if key_length is not None and key_length != head_dim:
    kwargs['kv_channels'] = head_dim = key_length
  rope_dim = _field(reader, 'llama.rope.dimension_count') or head_dim  # llama.cpp: key length
  return model.ModelConfig(
      **{k: (float(v) if isinstance(v, float) else int(v)) for k, v in kwargs.items()},
      vocab_size=int(vocab or embd.shape[1]),
      padded_vocab_size=int(embd.shape[1]),
      normalization='rmsnorm', activation='swiglu', bias=False,
      position_embedding_type='rope', rotary_percentage=rope_dim / head_dim,
      share_embeddings_and_output_weights=not any(t.name == 'output.weight'
                                                  for t in reader.tensors))


@functools.cache
def _dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
  """Whether gguf.quants.dequantize reads this type (tried on one block of zeros)."""
  _, type_size = gguf.GGML_QUANT_SIZES[qtype]
  try:
    gguf.quants.dequantize(np.zeros(type_size, np.uint8), qtype)
  except NotImplementedError:  # I8..I64, Q8_1, Q8_K, ...
    return False
  return True


def _dequantize(t) -> np.ndarray:
  """One GGUF tensor as fp32 in torch [out, in] order."""
  if t.tensor_type == gguf.GGMLQuantizationType.F64:  # gguf.quants does not read F64
    w = t.data  # GGUFReader gives float64 values (in the file's byte order)
  else:
    w = gguf.quants.dequantize(t.data, t.tensor_type)
  return np.asarray(w, np.float32).reshape(_torch_shape(t))


def _torch_shape(t) -> tuple[int, ...]:
  return tuple(int(d) for d in reversed(t.shape))


def _source(t, path: str, num_layers: int) -> tuple[Source, tuple, Callable]:
  """(Source, jkd path, transform) for one GGUF tensor."""
  where = f'{path}: tensor {t.name}'
  m = _LAYER_NAME.fullmatch(t.name)
  if m:
    layer, suffix = int(m.group(1)), m.group(2)
    if suffix not in _LAYER_TABLE:
      raise ValueError(f'{where}: unknown layer tensor')
    if layer >= num_layers:
      raise ValueError(f'{where}: layer {layer} >= block_count {num_layers}')
    dest, transform = _LAYER_TABLE[suffix]
  elif t.name in _GLOBAL_TABLE:
    layer, (dest, transform) = None, _GLOBAL_TABLE[t.name]
  elif t.name == 'rope_freqs.weight':
    raise ValueError(f'{where}: RoPE frequency factors are not supported')
  else:
    raise ValueError(f'{where}: unknown tensor')
  if t.tensor_type != gguf.GGMLQuantizationType.F64 and not _dequantizable(t.tensor_type):
    raise ValueError(f'{where}: ggml type {t.tensor_type.name} is not supported (see '
                     'docs/checkpoints.md); re-convert the model to e.g. F16 or Q8_0')
  source = Source(layer, t.name, _torch_shape(t), np.dtype(np.float32),
                  lambda t=t: _dequantize(t), where)
  return source, dest, transform


def open_gguf(path: str) -> tuple[model.ModelConfig, Iterator[model.Params]]:
  """A Llama GGUF file -> (ModelConfig, partial fp32 params trees, produced lazily)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError, IndexError, KeyError, RecursionError) as e:  # nested arrays
    raise ValueError(f'{path}: not a readable GGUF file ({e})') from None
  cfg = read_config(reader, path)
  routes = {}
  for t in reader.tensors:
    source, dest, transform = _source(t, path, cfg.num_layers)
    routes[t.name] = (source, dest, transform)

  def targets(src: Source) -> list[Target]:
    _, dest, transform = routes[src.name]
    dest, sub = (dest[:-1], dest[-1]) if isinstance(dest[-1], tuple) else (dest, ())
    index = ((src.layer,) if src.layer is not None else ()) + sub
    return [Target(dest, index, lambda w: transform(w, cfg))]

  return cfg, assemble(cfg, [r[0] for r in routes.values()], targets, path)


def load_gguf(path: str) -> tuple[model.ModelConfig, model.Params]:
  """Reads a Llama GGUF file -> (ModelConfig, fp32 numpy params)."""
  cfg, parts = open_gguf(path)
  return cfg, collect(parts)
