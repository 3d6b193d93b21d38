"""NeMo `.nemo` GPT checkpoints -> jkd ModelConfig + params.

Layouts (../shared/docs/nemo_checkpoint_format.md §1–§3):
  L1  legacy single file `model_weights.ckpt` (keys `model.language_model.*`, e.g. GPT-2B-001)
  L2  legacy per-rank files `mp_rank_XX/` or `tp_rank_XX_pp_rank_YYY/`, merged here
  Dz  Megatron-Core distributed checkpoint `model_weights/`, zarr backend
  Dt  Megatron-Core distributed checkpoint `model_weights/`, torch_dist backend
(distributed checkpoints with layers stacked on axis 0 or with per-layer keys).

Every source key is first normalised to a canonical name (a small table per layout), then
one table of per-tensor transforms turns canonical torch [out, in] tensors into jkd kernels.
Each layout only lists its tensors (`Source`s); `assemble` reads them group by group, so
conversion streams: the model is never held in memory whole.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Callable

import numpy as np
import yaml

from jkd import model, tokenizer
from third_party.convert import nemo_archive, torch_dist, torch_pickle
from third_party.convert.assemble import Source, Target, assemble, collect

_log = logging.getLogger(__name__)


# --- model_config.yaml -> ModelConfig -------------------------------------------------------

# Settings that change the forward pass in ways jkd does not implement: key -> allowed values.
_MUST_BE = {
    'megatron_legacy': (False, None), 'apply_embedding_scaling': (False, None),
    'headscale': (False, None), 'qk_layernorm': (False, None),
    'rotary_interleaved': (False, None), 'seq_len_interpolation_factor': (None, 1, 1.0),
    'scale_positional_embedding': (False, None), 'normalize_attention_scores': (True, None),
    'transformer_block_type': ('pre_ln', None), 'num_moe_experts': (None, 0, 1),
    'qkv_bias': (False, None), 'fp8': (False, None),
    'window_size': (None, [-1, -1], [-1, 0]),  # sliding-window attention (Mistral)
}
_NORMALIZATIONS = {'layernorm': 'layernorm', 'layernorm1p': 'layernorm1p', 'rmsnorm': 'rmsnorm',
                   'low_precision_layernorm': 'layernorm'}


def model_config(raw: dict, *, vocab_size: int | None, padded_vocab: int, where: str,
                 positions: int | None = None) -> model.ModelConfig:
  """Maps NeMo's model section (code defaults of megatron_gpt_model.py) to a ModelConfig;
  `positions`: the rows of a stored learned position table, which win over the config's keys
  (legacy NeMo sizes it by max_position_embeddings, Megatron-Core by encoder_seq_length)."""
  for key, allowed in _MUST_BE.items():
    if raw.get(key) not in allowed:
      raise ValueError(f'{where}: unsupported setting {key}={raw.get(key)!r}')
  for key in ('num_layers', 'hidden_size', 'ffn_hidden_size', 'num_attention_heads'):
    if not isinstance(raw.get(key), int):  # a bool is refused by ModelConfig, naming the key
      raise ValueError(f'{where}: {key} is missing or not an integer ({raw.get(key)!r})')
  norm = raw.get('normalization', 'layernorm')
  if norm not in _NORMALIZATIONS:
    raise ValueError(f'{where}: unsupported setting normalization={norm!r}')
  norm = _NORMALIZATIONS[norm]
  if raw.get('layernorm_zero_centered_gamma'):  # the stored scale is gamma - 1
    if norm == 'rmsnorm':
      raise ValueError(f'{where}: unsupported setting layernorm_zero_centered_gamma=True with '
                       f'normalization={raw.get("normalization")!r}')
    norm = 'layernorm1p'  # layernorm1p says the same
  activation = raw.get('activation', 'gelu')
  if activation not in model.ACTIVATIONS:
    raise ValueError(f'{where}: unsupported setting activation={activation!r}')
  gelu_tanh = _gelu_tanh(raw, activation, where)
  pos = raw.get('position_embedding_type', 'learned_absolute')
  if pos not in model.POSITION_EMBEDDINGS:
    raise ValueError(f'{where}: unsupported setting position_embedding_type={pos!r}')
  try:
    return model.ModelConfig(
        num_layers=raw['num_layers'], hidden_size=raw['hidden_size'],
        ffn_hidden_size=raw['ffn_hidden_size'], num_attention_heads=raw['num_attention_heads'],
        num_query_groups=raw.get('num_query_groups'), kv_channels=raw.get('kv_channels'),
        vocab_size=vocab_size or padded_vocab, padded_vocab_size=padded_vocab,
        normalization=norm, layernorm_epsilon=_number(raw, 'layernorm_epsilon', 1e-5),
        activation=activation, gelu_tanh=gelu_tanh, bias=raw.get('bias', True),
        position_embedding_type=pos,
        rotary_percentage=_number(raw, 'rotary_percentage', 1.0),
        rotary_base=_number(raw, 'rotary_base', 10000),
        max_position_embeddings=int(positions or raw.get('max_position_embeddings')
                                    or raw.get('encoder_seq_length', 512)),
        share_embeddings_and_output_weights=raw.get('share_embeddings_and_output_weights',
                                                    True))
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


def _number(raw: dict, key: str, default: float) -> float:
  """raw[key] (default when absent) as a float; a ValueError naming the key otherwise (null,
  a list, a word)."""
  value = raw.get(key, default)
  try:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
      raise ValueError
    return float(value)
  except ValueError:
    raise ValueError(f'{key}={value!r} is not a number') from None


def _gelu_tanh(raw: dict, activation: str, where: str) -> bool:
  """Whether NeMo computes this model's GELU in its tanh form. Both the legacy ParallelMLP and
  Megatron-Core's MLP run the fused bias-GELU (-GeGLU) kernels, which are the tanh form, when
  bias_activation_fusion is set (NeMo's default); openai_gelu asks for the tanh form too."""
  fusion, openai = raw.get('bias_activation_fusion', True), raw.get('openai_gelu')
  if activation not in model.GELUS:
    if openai:
      raise ValueError(f'{where}: unsupported setting openai_gelu=True with '
                       f'activation={activation!r}')
    return False
  if fusion and activation == 'gelu' and not raw.get('bias', True):
    raise ValueError(f'{where}: bias_activation_fusion=True with activation=gelu and bias=False'
                     ' (NeMo refuses it: its fused kernel adds a bias)')
  return bool(fusion or openai)


def read_raw_config(archive: nemo_archive.NemoArchive) -> dict:
  where = f'{archive.path}: model_config.yaml'
  if not archive.exists('model_config.yaml'):
    raise ValueError(f'{archive.path}: model_config.yaml is missing')
  try:
    raw = yaml.safe_load(archive.read_text('model_config.yaml'))
  except yaml.YAMLError as e:
    raise ValueError(f'{where}: invalid YAML ({str(e).splitlines()[0]})') from None
  if isinstance(raw, dict) and isinstance(raw.get('model'), dict):
    raw = raw['model']
  if not isinstance(raw, dict):
    raise ValueError(f'{where}: expected a mapping')
  return raw


# --- source keys -> canonical names ---------------------------------------------------------
# Canonical names: per layer 'qkv.*', 'proj.*', 'input_norm.*', 'mlp_norm.*', 'fc1.*',
# 'fc1_2.*' (legacy non-fast GLU up branch), 'fc2.*'; global 'embedding', 'position_embedding',
# 'final_norm.*', 'output.weight'.

def _wb(src: str, dst: str) -> dict[str, str]:
  return {f'{src}.weight': f'{dst}.weight', f'{src}.bias': f'{dst}.bias'}


_LEGACY_LAYER = {**_wb('input_layernorm', 'input_norm'),
                 **_wb('self_attention.query_key_value', 'qkv'),
                 **_wb('self_attention.dense', 'proj'),
                 **_wb('post_attention_layernorm', 'mlp_norm'),
                 **_wb('mlp.dense_h_to_4h', 'fc1'), **_wb('mlp.dense_h_to_4h_2', 'fc1_2'),
                 **_wb('mlp.dense_4h_to_h', 'fc2')}
_LEGACY_GLOBAL = {'language_model.embedding.word_embeddings.weight': 'embedding',
                  'language_model.embedding.position_embeddings.weight': 'position_embedding',
                  **_wb('language_model.encoder.final_layernorm', 'final_norm'),
                  'language_model.output_layer.weight': 'output.weight'}
_MCORE_LAYER = {'self_attention.linear_qkv.layer_norm_weight': 'input_norm.weight',
                'self_attention.linear_qkv.layer_norm_bias': 'input_norm.bias',
                **_wb('input_layernorm', 'input_norm'),
                **_wb('self_attention.linear_qkv', 'qkv'),
                **_wb('self_attention.linear_proj', 'proj'),
                'mlp.linear_fc1.layer_norm_weight': 'mlp_norm.weight',
                'mlp.linear_fc1.layer_norm_bias': 'mlp_norm.bias',
                **_wb('pre_mlp_layernorm', 'mlp_norm'),
                **_wb('mlp.linear_fc1', 'fc1'), **_wb('mlp.linear_fc2', 'fc2')}
_MCORE_GLOBAL = {'embedding.word_embeddings.weight': 'embedding',
                 'embedding.position_embeddings.weight': 'position_embedding',
                 **_wb('decoder.final_layernorm', 'final_norm'),
                 'output_layer.weight': 'output.weight'}
_LEGACY_LAYER_KEY = re.compile(r'language_model\.encoder\.layers\.(\d+)\.(.+)')
_MCORE_LAYER_KEY = re.compile(r'decoder\.layers\.(\d+)\.(.+)')


def _ignored(key: str) -> bool:
  return key.endswith('_extra_state') or key.endswith('inv_freq') or key == 'word_embeddings.weight'


def canonical(key: str, where: str) -> tuple[int | None, str] | None:
  """Source key -> (layer or None, canonical name); None for keys that carry no weights."""
  key = key.removeprefix('model.').removeprefix('module.')
  if _ignored(key):
    return None
  for pattern, table in ((_LEGACY_LAYER_KEY, _LEGACY_LAYER), (_MCORE_LAYER_KEY, _MCORE_LAYER)):
    m = pattern.fullmatch(key)
    if m and m.group(2) in table:
      return int(m.group(1)), table[m.group(2)]
  for table in (_LEGACY_GLOBAL, _MCORE_GLOBAL):
    if key in table:
      return None, table[key]
  raise ValueError(f'{where}: unknown tensor {key!r}')


# --- tensor-parallel merge rules (§3.3) -----------------------------------------------------
_TP_CONCAT_AXIS = {'embedding': 0, 'output.weight': 0, 'qkv.weight': 0, 'qkv.bias': 0,
                   'fc1.weight': 0, 'fc1.bias': 0, 'fc1_2.weight': 0, 'fc1_2.bias': 0,
                   'proj.weight': 1, 'fc2.weight': 1}


# Replicated copies may differ by this fraction of the tensor's largest value: Megatron's
# replicated norms drift apart across ranks under sequence parallelism, by rounding.
REPLICA_TOLERANCE = 1e-2


def merge_tp(name: str, shards: list[np.ndarray], fused_glu: bool, where: str = '') -> np.ndarray:
  """Merges per-rank shards of one canonical tensor; fused GLU fc1 shards are [gate_r; up_r].
  Of a replicated tensor rank 0's copy is taken, as Megatron's checkpoint converter does;
  copies that differ are said (naming `where`), and refused past REPLICA_TOLERANCE."""
  if len(shards) == 1:
    return shards[0]
  axis = _TP_CONCAT_AXIS.get(name)
  if axis is None:  # replicated: norms, row-parallel biases, position embeddings
    first = shards[0].astype(np.float32)
    if not all(np.array_equal(first, s) for s in shards[1:]):  # NaN included
      worst = max(float(np.max(np.abs(s.astype(np.float32) - first))) for s in shards[1:])
      scale = float(np.max(np.abs(first)))
      if not worst <= REPLICA_TOLERANCE * scale + 1e-6:  # NaN fails too
        raise ValueError(f'the tensor-parallel ranks hold different values of this replicated '
                         f'tensor (by up to {worst:.3g}, its values up to {scale:.3g}): ranks '
                         'of different checkpoints?')
      _log.warning('%s: the tensor-parallel ranks\' copies of this replicated tensor differ by '
                   'up to %.3g (as under sequence parallelism); rank 0\'s is taken', where, worst)
    return shards[0]
  if fused_glu and name in ('fc1.weight', 'fc1.bias'):
    halves = [np.split(s, 2, axis=0) for s in shards]
    return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
  return np.concatenate(shards, axis=axis)


# --- canonical torch tensors -> jkd params --------------------------------------------------

def _qkv(c: model.ModelConfig, w: np.ndarray, which: str) -> np.ndarray:
  """Group-major fused QKV rows [G, N/G + 2, H, ...] -> one of q [.., N, H] / k / v [.., G, H]."""
  hpg = c.num_attention_heads // c.num_groups
  w = w.reshape(c.num_groups, hpg + 2, c.head_dim, *w.shape[1:])
  part = {'q': w[:, :hpg], 'k': w[:, hpg], 'v': w[:, hpg + 1]}[which]
  heads = c.num_attention_heads if which == 'q' else c.num_groups
  part = part.reshape(heads, c.head_dim, *w.shape[3:])
  return np.moveaxis(part, -1, 0) if part.ndim == 3 else part  # weight -> [D, heads, H]


def _fc1(c: model.ModelConfig, w: np.ndarray) -> np.ndarray:
  if not c.gated:
    return w.T if w.ndim == 2 else w
  f = c.ffn_hidden_size
  return w.reshape(2, f, -1).transpose(2, 0, 1) if w.ndim == 2 else w.reshape(2, f)


# canonical name -> [(jkd path, transform)]; a trailing tuple in a path is a sub-index.
_TRANSFORMS: dict[str, list[tuple[tuple, Callable]]] = {
    'qkv.weight': [(('attn', w, 'kernel'), lambda c, t, w=w: _qkv(c, t, w)) for w in 'qkv'],
    'qkv.bias': [(('attn', w, 'bias'), lambda c, t, w=w: _qkv(c, t, w)) for w in 'qkv'],
    'proj.weight': [(('attn', 'o', 'kernel'), lambda c, t: t.T.reshape(
        c.num_attention_heads, c.head_dim, c.hidden_size))],
    'proj.bias': [(('attn', 'o', 'bias'), lambda c, t: t)],
    'fc1.weight': [(('mlp', 'fc1', 'kernel'), lambda c, t: _fc1(c, t))],
    'fc1.bias': [(('mlp', 'fc1', 'bias'), lambda c, t: _fc1(c, t))],
    'fc2.weight': [(('mlp', 'fc2', 'kernel'), lambda c, t: t.T)],
    'fc2.bias': [(('mlp', 'fc2', 'bias'), lambda c, t: t)],
    # jkd's layernorm1p keeps NeMo's zero-centred weight as-is (1 + w happens in the model).
    'input_norm.weight': [(('attn_norm', 'scale'), lambda c, t: t)],
    'input_norm.bias': [(('attn_norm', 'bias'), lambda c, t: t)],
    'mlp_norm.weight': [(('mlp_norm', 'scale'), lambda c, t: t)],
    'mlp_norm.bias': [(('mlp_norm', 'bias'), lambda c, t: t)],
    'embedding': [(('embed',), lambda c, t: t)],
    'position_embedding': [(('pos_embed',), lambda c, t: t)],
    'final_norm.weight': [(('final_norm', 'scale'), lambda c, t: t)],
    'final_norm.bias': [(('final_norm', 'bias'), lambda c, t: t)],
    'output.weight': [(('lm_head',), lambda c, t: t.T)],
}


# Legacy non-fast GLU stores the gated fc1 in two tensors: dense_h_to_4h is the gate (slot 0),
# dense_h_to_4h_2 (canonical 'fc1_2') the up branch (slot 1).
_GLU_HALF = {
    'weight': lambda slot: [(('mlp', 'fc1', 'kernel', (slice(None), slot)), lambda c, t: t.T)],
    'bias': lambda slot: [(('mlp', 'fc1', 'bias', (slot,)), lambda c, t: t)],
}


def _targets(cfg: model.ModelConfig, src: Source) -> list[Target]:
  """Where one canonical tensor lands; per-layer paths live under 'layers'."""
  module, leaf = src.name.split('.') if '.' in src.name else (src.name, '')
  if module == 'fc1_2':
    targets = _GLU_HALF[leaf](1)
  elif module == 'fc1' and cfg.gated and src.shape[0] == cfg.ffn_hidden_size:
    targets = _GLU_HALF[leaf](0)
  else:
    targets = _TRANSFORMS[src.name]
  out = []
  for path, transform in targets:
    path, sub = (path[:-1], path[-1]) if isinstance(path[-1], tuple) else (path, ())
    if src.layer is not None:
      path, sub = ('layers',) + path, (src.layer,) + sub
    out.append(Target(path, sub, functools.partial(transform, cfg)))
  return out


# --- layouts: each lists Sources (tensors not read yet) -------------------------------------
_RANK_DIR = re.compile(r'(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))/model_weights\.ckpt')


def _where(archive, name: str, layer: int | None) -> str:
  return f'{archive.path}: {name}' + (f' (layer {layer})' if layer is not None else '')


def _merged_shape(name: str, shapes: list[tuple]) -> tuple:
  axis = _TP_CONCAT_AXIS.get(name)
  if len(shapes) == 1 or axis is None:
    return shapes[0]
  merged = list(shapes[0])
  merged[axis] = sum(s[axis] for s in shapes)
  return tuple(merged)


def _legacy_sources(archive, raw: dict) -> list[Source]:
  """L1 or L2 files: TP shards merged on read, PP layers renumbered."""
  gated = str(raw.get('activation', 'gelu')).endswith('glu')
  num_layers = int(raw.get('num_layers') or 1)
  ranks = {}
  for name in archive.names():
    m = _RANK_DIR.fullmatch(name)
    if m:
      tp = int(m.group(1) if m.group(1) is not None else m.group(2))
      pp = int(m.group(3) or 0)
      ranks[(tp, pp)] = name
  if archive.exists('model_weights.ckpt'):
    ranks = {(0, 0): 'model_weights.ckpt'}
  if not ranks:
    raise ValueError(f'{archive.path}: no weights found (model_weights.ckpt, mp_rank_XX/, '
                     'tp_rank_XX_pp_rank_YYY/ or model_weights/)')
  tp_size = 1 + max(t for t, _ in ranks)
  pp_size = 1 + max(p for _, p in ranks)
  for key, found in (('tensor_model_parallel_size', tp_size),
                     ('pipeline_model_parallel_size', pp_size)):
    if raw.get(key) is not None and (0, 0) in ranks and ranks[(0, 0)] != 'model_weights.ckpt' \
        and int(raw[key]) != found:
      raise ValueError(f'{archive.path}: model_config.yaml has {key}={raw[key]} but the rank '
                       f'folders found make {found}: {sorted(ranks.values())}')
  if len(ranks) != tp_size * pp_size:
    raise ValueError(f'{archive.path}: rank files are incomplete: found {sorted(ranks)}')
  sources = []
  for pp in range(pp_size):
    # Only the pickles are read here; tensors stay in the (seekable) zip members.
    dicts = [torch_pickle.load(archive.open(ranks[(tp, pp)]), f'{archive.path}: '
                               f'{ranks[(tp, pp)]}') for tp in range(tp_size)]
    for tp, d in enumerate(dicts):
      if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        kind = 'tensor' if isinstance(d, torch_pickle.LazyTensor) else type(d).__name__
        raise ValueError(f'{archive.path}: {ranks[(tp, pp)]}: not a state dict (names to '
                         f'tensors): a {kind}')
    # fast-*glu fuses [gate_r; up_r] per rank; non-fast GLU keeps the up branch apart.
    fused_glu = gated and not any(k.endswith('dense_h_to_4h_2.weight') for k in dicts[0])
    for tp, d in enumerate(dicts[1:], 1):  # rank 0's keys are read: one only elsewhere is lost
      extra = [k for k in d if k not in dicts[0]
               and canonical(k, f'{archive.path}: {ranks[(tp, pp)]}') is not None]
      if extra:
        raise ValueError(f'{archive.path}: {ranks[(tp, pp)]}: tensor {extra[0]} is not in '
                         f'{ranks[(0, pp)]} (tensor-parallel ranks hold the same tensors)')
    for key in dicts[0]:
      named = canonical(key, f'{archive.path}: {ranks[(0, pp)]}')
      if named is None:
        continue
      layer, cname = named
      if layer is not None:
        layer += pp * (num_layers // pp_size)
      shards = []
      for tp, d in enumerate(dicts):
        if key not in d or not isinstance(d[key], torch_pickle.LazyTensor):
          raise ValueError(f'{archive.path}: {ranks[(tp, pp)]}: tensor {key} is missing')
        shards.append(d[key])
      where = _where(archive, cname, layer)
      read = lambda cname=cname, shards=shards, where=where: merge_tp(
          cname, [s.load() for s in shards], fused_glu, where)
      sources.append(Source(layer, cname, _merged_shape(cname, [s.shape for s in shards]),
                            shards[0].dtype, read, where))
  return sources


def _split_stacked(key: str) -> tuple[bool, str]:
  """Distributed checkpoints stack homogeneous layers on axis 0 under a key without index."""
  stripped = key.removeprefix('model.')
  stacked = stripped.startswith('decoder.layers.') and not _MCORE_LAYER_KEY.fullmatch(stripped)
  lookup = f'decoder.layers.0.{stripped[len("decoder.layers."):]}' if stacked else stripped
  return stacked, lookup


def _dist_sources(archive, key: str, shape: tuple, dtype, read_layer, read_all) -> list[Source]:
  """Sources of one distributed-checkpoint array: one per layer if stacked."""
  stacked, lookup = _split_stacked(key)
  named = canonical(lookup, f'{archive.path}: model_weights/{key}')
  if named is None:
    return []
  layer, cname = named
  if stacked:
    return [Source(i, cname, tuple(shape[1:]), dtype, functools.partial(read_layer, i),
                   _where(archive, cname, i)) for i in range(shape[0])]
  return [Source(layer, cname, tuple(shape), dtype, read_all, _where(archive, cname, layer))]


def _zarr_sources(archive, weights_dir: str) -> list[Source]:
  import tensorstore as ts
  root = archive.local_dir(weights_dir)
  sources = []
  for key in sorted(os.listdir(root)):
    path = os.path.join(root, key)
    if not os.path.isfile(os.path.join(path, '.zarray')):
      continue  # _extra_state directories, common.pt, metadata.json
    try:
      # A missing chunk file (an incomplete copy) is an error, not fill-value zeros.
      arr = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': path},
                     'fill_missing_data_reads': False}).result()
    except ValueError as e:
      raise ValueError(f'{archive.path}: {weights_dir}/{key}: unreadable zarr array ({e})') from None
    sources += _dist_sources(archive, key, arr.shape, arr.dtype.numpy_dtype,
                             lambda i, arr=arr: arr[i].read().result(),
                             lambda arr=arr: arr.read().result())
  return sources


def _torch_dist_sources(archive, weights_dir: str) -> list[Source]:
  reader = torch_dist.Reader(archive.local_dir(weights_dir), f'{archive.path}: {weights_dir}')
  sources = []
  for key, info in sorted(reader.tensors.items()):
    sources += _dist_sources(archive, key, info.shape, info.dtype,
                             lambda i, key=key: reader.read(key, layer=i),
                             lambda key=key: reader.read(key))
  return sources


_DIST_BACKENDS = {'zarr': _zarr_sources, 'torch_dist': _torch_dist_sources}


def open_nemo(archive: nemo_archive.NemoArchive):
  """A .nemo in any supported layout -> (ModelConfig, Tokenizer or None, params parts).

  The parts are partial params trees in the stored dtype, produced lazily one group of
  leaves at a time (see assemble.py); the archive must stay open until they are consumed.
  The vocabulary size comes from the tokenizer, the padded size from the embedding.
  """
  raw = read_raw_config(archive)
  tok = None
  if raw.get('tokenizer'):
    if not isinstance(raw['tokenizer'], dict):
      raise ValueError(f'{archive.path}: model_config.yaml: tokenizer={raw["tokenizer"]!r} is not '
                       'a section (library, model, ...)')
    tok = tokenizer.from_nemo(archive, raw['tokenizer'], f'{archive.path}: model_config.yaml')
  if archive.exists('model_weights/metadata.json'):
    try:
      meta = json.loads(archive.read_text('model_weights/metadata.json'))
    except json.JSONDecodeError as e:
      raise ValueError(f'{archive.path}: model_weights/metadata.json: invalid JSON ({e})') from None
    backend = meta.get('sharded_backend') if isinstance(meta, dict) else None
    if not isinstance(backend, str) or backend not in _DIST_BACKENDS:
      raise ValueError(f'{archive.path}: model_weights/metadata.json: sharded_backend='
                       f'{backend!r} is not supported (supported: {sorted(_DIST_BACKENDS)})')
    sources = _DIST_BACKENDS[backend](archive, 'model_weights')
  else:
    sources = _legacy_sources(archive, raw)
  embedding = [s for s in sources if s.name == 'embedding']
  if not embedding:
    raise ValueError(f'{archive.path}: the word embedding tensor is missing')
  table = [s.shape[0] for s in sources if s.name == 'position_embedding']
  cfg = model_config(raw, vocab_size=tok.vocab_size if tok else None,
                     padded_vocab=embedding[0].shape[0], where=f'{archive.path}: model_config.yaml',
                     positions=table[0] if table else None)
  return cfg, tok, assemble(cfg, sources, functools.partial(_targets, cfg), archive.path)


def load_nemo(path: str) -> tuple[model.ModelConfig, model.Params]:
  """Reads a .nemo (tar or directory) -> (ModelConfig, params in the stored dtype)."""
  with nemo_archive.NemoArchive(path) as archive:
    cfg, _, parts = open_nemo(archive)
    return cfg, collect(parts)
