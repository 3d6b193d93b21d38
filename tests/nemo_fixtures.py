"""Tiny .nemo checkpoints in the real layouts, built from the HF reference models.

Written by following nemo_checkpoint_format.md directly (not through jkd's importer): fused
QKV group-major, GLU fc1 as [gate; up], per-rank [gate_r; up_r] shards, PP stages with local
layer numbers, Megatron-Core keys stacked on a leading layer axis for the zarr backend.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import torch
import yaml

from tests import hf_reference as ref


def _t(a) -> np.ndarray:
  return a.detach().float().numpy().copy() if isinstance(a, torch.Tensor) else np.asarray(a)


def canonical_state(arch: str, hf) -> tuple[dict, dict]:
  """(NeMo model section, {(layer|None, canonical name): torch-layout np array})."""
  sd = {k: _t(v) for k, v in hf.state_dict().items()}
  L, D, N = ref.L, ref.D, ref.N
  H = D // N
  out = {}
  if arch == 'gpt3':
    # Exact GELU (HF's 'gelu'): NeMo computes it with the fused bias-GELU kernel off.
    cfg = dict(normalization='layernorm', activation='gelu', bias=True,
               bias_activation_fusion=hf.config.activation_function != 'gelu',
               position_embedding_type='learned_absolute', share_embeddings_and_output_weights=True)
    out[(None, 'embedding')] = sd['transformer.wte.weight']
    out[(None, 'position_embedding')] = sd['transformer.wpe.weight']
    out[(None, 'final_norm.weight')] = sd['transformer.ln_f.weight']
    out[(None, 'final_norm.bias')] = sd['transformer.ln_f.bias']
    for i in range(L):
      p = f'transformer.h.{i}.'
      w, b = sd[p + 'attn.c_attn.weight'].T, sd[p + 'attn.c_attn.bias']  # [3D, D], [3D]
      # [Q_all; K_all; V_all] head-major -> per-head [q, k, v] (MHA: G = N).
      out[(i, 'qkv.weight')] = w.reshape(3, N, H, D).transpose(1, 0, 2, 3).reshape(3 * D, D)
      out[(i, 'qkv.bias')] = b.reshape(3, N, H).transpose(1, 0, 2).reshape(3 * D)
      out[(i, 'proj.weight')] = sd[p + 'attn.c_proj.weight'].T
      out[(i, 'proj.bias')] = sd[p + 'attn.c_proj.bias']
      out[(i, 'fc1.weight')] = sd[p + 'mlp.c_fc.weight'].T
      out[(i, 'fc1.bias')] = sd[p + 'mlp.c_fc.bias']
      out[(i, 'fc2.weight')] = sd[p + 'mlp.c_proj.weight'].T
      out[(i, 'fc2.bias')] = sd[p + 'mlp.c_proj.bias']
      for n, src in (('input_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
        out[(i, f'{n}.weight')], out[(i, f'{n}.bias')] = sd[p + src + '.weight'], sd[p + src + '.bias']
    return {**_dims(), **cfg}, out

  G = ref.G if arch == 'llama' else N
  cfg = {'llama': dict(normalization='rmsnorm', activation='fast-swiglu', num_query_groups=G,
                       rotary_base=5000.0),
         'nemotron': dict(normalization='layernorm1p', activation='squared-relu',
                          rotary_percentage=0.5),
         'gpt2b': dict(normalization='layernorm1p', activation='fast-swiglu',
                       rotary_percentage=0.5)}[arch]
  cfg.update(bias=False, position_embedding_type='rope', share_embeddings_and_output_weights=False)
  minus = 1.0 if arch == 'gpt2b' else 0.0  # StableLm holds 1 + w; NeMo holds w
  out[(None, 'embedding')] = sd['model.embed_tokens.weight']
  out[(None, 'output.weight')] = sd['lm_head.weight']
  out[(None, 'final_norm.weight')] = sd['model.norm.weight'] - minus
  if arch != 'llama':
    out[(None, 'final_norm.bias')] = sd['model.norm.bias']
  for i in range(L):
    p = f'model.layers.{i}.'
    q = sd[p + 'self_attn.q_proj.weight'].reshape(G, N // G, H, D)
    k = sd[p + 'self_attn.k_proj.weight'].reshape(G, 1, H, D)
    v = sd[p + 'self_attn.v_proj.weight'].reshape(G, 1, H, D)
    out[(i, 'qkv.weight')] = np.concatenate([q, k, v], 1).reshape(-1, D)
    out[(i, 'proj.weight')] = sd[p + 'self_attn.o_proj.weight']
    if arch == 'nemotron':
      out[(i, 'fc1.weight')] = sd[p + 'mlp.up_proj.weight']
    else:
      out[(i, 'fc1.weight')] = np.concatenate([sd[p + 'mlp.gate_proj.weight'],
                                               sd[p + 'mlp.up_proj.weight']])
    out[(i, 'fc2.weight')] = sd[p + 'mlp.down_proj.weight']
    for n, src in (('input_norm', 'input_layernorm'), ('mlp_norm', 'post_attention_layernorm')):
      out[(i, f'{n}.weight')] = sd[p + src + '.weight'] - minus
      if arch != 'llama':
        out[(i, f'{n}.bias')] = sd[p + src + '.bias']
  return {**_dims(), **cfg}, out


def _dims():
  return dict(num_layers=ref.L, hidden_size=ref.D, ffn_hidden_size=ref.F,
              num_attention_heads=ref.N, max_position_embeddings=64, encoder_seq_length=64,
              layernorm_epsilon=1e-5)


_LEGACY = {'embedding': 'model.language_model.embedding.word_embeddings.weight',
           'position_embedding': 'model.language_model.embedding.position_embeddings.weight',
           'final_norm.weight': 'model.language_model.encoder.final_layernorm.weight',
           'final_norm.bias': 'model.language_model.encoder.final_layernorm.bias',
           'output.weight': 'model.language_model.output_layer.weight'}
_LEGACY_LAYER = {'input_norm': 'input_layernorm', 'qkv': 'self_attention.query_key_value',
                 'proj': 'self_attention.dense', 'mlp_norm': 'post_attention_layernorm',
                 'fc1': 'mlp.dense_h_to_4h', 'fc1_2': 'mlp.dense_h_to_4h_2',
                 'fc2': 'mlp.dense_4h_to_h'}
_MCORE = {'embedding': 'model.embedding.word_embeddings.weight',
          'position_embedding': 'model.embedding.position_embeddings.weight',
          'final_norm.weight': 'model.decoder.final_layernorm.weight',
          'final_norm.bias': 'model.decoder.final_layernorm.bias',
          'output.weight': 'model.output_layer.weight'}
_MCORE_LAYER = {'input_norm.weight': 'self_attention.linear_qkv.layer_norm_weight',
                'input_norm.bias': 'self_attention.linear_qkv.layer_norm_bias',
                'qkv.weight': 'self_attention.linear_qkv.weight',
                'qkv.bias': 'self_attention.linear_qkv.bias',
                'proj.weight': 'self_attention.linear_proj.weight',
                'proj.bias': 'self_attention.linear_proj.bias',
                'mlp_norm.weight': 'mlp.linear_fc1.layer_norm_weight',
                'mlp_norm.bias': 'mlp.linear_fc1.layer_norm_bias',
                'fc1.weight': 'mlp.linear_fc1.weight', 'fc1.bias': 'mlp.linear_fc1.bias',
                'fc2.weight': 'mlp.linear_fc2.weight', 'fc2.bias': 'mlp.linear_fc2.bias'}


def _legacy_key(layer, name):
  if layer is None:
    return _LEGACY[name]
  module, leaf = name.split('.')
  return f'model.language_model.encoder.layers.{layer}.{_LEGACY_LAYER[module]}.{leaf}'


def _shard(name, a, r, tp, gated, naive_glu=False):
  """Rank r's shard of one canonical tensor under Megatron's TP rules (§3.3)."""
  if tp == 1:
    return a
  column = name in ('embedding', 'output.weight', 'qkv.weight', 'qkv.bias', 'fc1.weight',
                    'fc1.bias', 'fc1_2.weight')
  row = name in ('proj.weight', 'fc2.weight')
  if column and gated and name.startswith('fc1') and not naive_glu:
    g, u = np.split(a, 2, axis=0)
    return np.concatenate([np.split(g, tp, 0)[r], np.split(u, tp, 0)[r]])
  if column:
    return np.split(a, tp, axis=0)[r]
  if row:
    return np.split(a, tp, axis=1)[r]
  return a


def _torch_save(state: dict) -> bytes:
  buf = io.BytesIO()
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, buf)
  return buf.getvalue()


def _pack(out_path, files: dict[str, bytes]):
  with tarfile.open(out_path, 'w:') as tar:
    for name, data in sorted(files.items()):
      info = tarfile.TarInfo('./' + name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def write_legacy(out_path, arch: str, hf, tp: int = 1, pp: int = 1, naive_glu: bool = False,
                 split_glu: bool = False):
  """L1 (tp = pp = 1) or L2 (mp_rank_XX / tp_rank_XX_pp_rank_YYY) .nemo tar.

  split_glu: a non-fast GLU (`swiglu`): gate in dense_h_to_4h, up in dense_h_to_4h_2.
  """
  cfg, state = canonical_state(arch, hf)
  gated = cfg['activation'].endswith('glu')
  if split_glu:
    assert gated
    cfg['activation'] = cfg['activation'].removeprefix('fast-')
    for (layer, name) in [k for k in state if k[1] == 'fc1.weight']:
      state[(layer, 'fc1.weight')], state[(layer, 'fc1_2.weight')] = np.split(
          state[(layer, name)], 2)
    gated = False  # each half is a plain column-parallel tensor
  cfg.update(mcore_gpt=False, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
  files = {'model_config.yaml': yaml.safe_dump(cfg).encode()}
  per_stage = ref.L // pp
  for p in range(pp):
    for r in range(tp):
      shard = {}
      for (layer, name), a in state.items():
        if layer is None:  # embeddings live on the first stage, final norm and head on the last
          if p != (0 if name in ('embedding', 'position_embedding') else pp - 1):
            continue
          key = _legacy_key(None, name)
        else:
          if layer // per_stage != p:
            continue
          key = _legacy_key(layer - p * per_stage, name)
        shard[key] = _shard(name, a, r, tp, gated, naive_glu)
      shard['model.language_model.rotary_pos_emb.inv_freq'] = np.ones(4, np.float32)
      if tp == 1 and pp == 1:
        rank_dir = ''
      elif pp == 1:
        rank_dir = f'mp_rank_{r:02d}/'
      else:
        rank_dir = f'tp_rank_{r:02d}_pp_rank_{p:03d}/'
      files[rank_dir + 'model_weights.ckpt'] = _torch_save(shard)
  _pack(out_path, files)


def write_zarr(out_dir, arch: str, hf, per_layer_keys: bool = False):
  """An extracted Megatron-Core .nemo directory with a zarr `model_weights/` (stacked keys)."""
  import tensorstore as ts
  cfg, state = canonical_state(arch, hf)
  cfg.update(mcore_gpt=True, dist_ckpt_format='zarr')
  os.makedirs(os.path.join(out_dir, 'model_weights'), exist_ok=True)
  with open(os.path.join(out_dir, 'model_config.yaml'), 'w') as f:
    yaml.safe_dump(cfg, f)
  with open(os.path.join(out_dir, 'model_weights', 'metadata.json'), 'w') as f:
    json.dump({'sharded_backend': 'zarr', 'sharded_backend_version': 1,
               'common_backend': 'torch', 'common_backend_version': 1}, f)

  def write(key, a):
    spec = {'driver': 'zarr', 'kvstore': {'driver': 'file',
                                          'path': os.path.join(out_dir, 'model_weights', key)},
            'metadata': {'dtype': '<f4', 'shape': list(a.shape), 'chunks': list(a.shape),
                         'compressor': None}, 'create': True}
    ts.open(spec).result().write(a.astype(np.float32)).result()

  layer_names = sorted({n for (l, n) in state if l is not None})
  for (layer, name), a in state.items():
    if layer is None:
      write(_MCORE[name], a)
    elif per_layer_keys:
      write(f'model.decoder.layers.{layer}.{_MCORE_LAYER[name]}', a)
  if not per_layer_keys:
    for name in layer_names:
      write(f'model.decoder.layers.{_MCORE_LAYER[name]}',
            np.stack([state[(i, name)] for i in range(ref.L)]))
  os.makedirs(os.path.join(out_dir, 'model_weights',
                           'model.decoder.layers.self_attention.linear_qkv._extra_state'),
              exist_ok=True)


def _blocks(shape: tuple, axis: int | None, n: int) -> list[tuple[slice, ...]]:
  """Regions of `shape` cut into n equal blocks along `axis` (one region when axis is None)."""
  if axis is None or n == 1:
    return [tuple(slice(0, s) for s in shape)]
  step = shape[axis] // n
  return [tuple(slice(i * step, (i + 1) * step) if d == axis else slice(0, s)
                for d, s in enumerate(shape)) for i in range(n)]


def write_torch_dist(out_dir, arch: str, hf, per_layer_keys: bool = False, tp: int = 1):
  """An extracted Megatron-Core .nemo directory with a torch_dist `model_weights/`.

  Written with torch.distributed.checkpoint itself. Chunks are cut as a TP=`tp` Megatron-Core
  save cuts them: per layer, column-parallel tensors in tp row blocks (GLU fc1 in 2·tp: rank r
  holds gate block r and up block r), row-parallel in tp column blocks, the embedding in tp
  vocabulary blocks.
  """
  from torch.distributed import checkpoint as dcp
  from torch.distributed.checkpoint import metadata as md
  from torch.distributed.checkpoint import planner as pl

  cfg, state = canonical_state(arch, hf)
  cfg.update(mcore_gpt=True, dist_ckpt_format='torch_dist')
  gated = cfg['activation'].endswith('glu')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'model_config.yaml'), 'w') as f:
    yaml.safe_dump(cfg, f)

  class Chunked:  # a global tensor stored as the given blocks
    def __init__(self, array, regions):
      self.array, self.regions = array, regions

    def __create_write_items__(self, fqn, obj):
      return [pl.WriteItem(
          index=md.MetadataIndex(fqn, torch.Size([r.start for r in region])),
          type=pl.WriteItemType.SHARD,
          tensor_data=pl.TensorWriteData(
              chunk=md.ChunkStorageMetadata(offsets=torch.Size([r.start for r in region]),
                                            sizes=torch.Size([r.stop - r.start for r in region])),
              properties=md.TensorProperties(dtype=torch.float32),
              size=torch.Size(self.array.shape))) for region in self.regions]

  class Planner(dcp.DefaultSavePlanner):
    def resolve_data(self, item):
      obj = self.state_dict[item.index.fqn]
      if not isinstance(obj, Chunked):
        return super().resolve_data(item)
      for region in obj.regions:
        if tuple(r.start for r in region) == tuple(item.index.offset):
          return torch.from_numpy(np.ascontiguousarray(obj.array[region]))
      raise KeyError(item.index)

  def tp_axis(name):
    if name in ('embedding', 'output.weight', 'qkv.weight', 'qkv.bias', 'fc1.weight',
                'fc1.bias'):
      return 0, (2 * tp if gated and name.startswith('fc1') else tp)
    if name in ('proj.weight', 'fc2.weight'):
      return 1, tp
    return None, 1

  sd = {}
  layer_names = sorted({n for (l, n) in state if l is not None})
  for (layer, name), a in state.items():
    axis, n = tp_axis(name)
    if layer is None:
      sd[_MCORE[name]] = Chunked(a, _blocks(a.shape, axis, n))
    elif per_layer_keys:
      sd[f'model.decoder.layers.{layer}.{_MCORE_LAYER[name]}'] = Chunked(
          a, _blocks(a.shape, axis, n))
  if not per_layer_keys:
    for name in layer_names:
      a = np.stack([state[(i, name)] for i in range(ref.L)])
      axis, n = tp_axis(name)
      regions = [(slice(i, i + 1),) + region
                 for i in range(ref.L) for region in _blocks(a.shape[1:], axis, n)]
      sd[f'model.decoder.layers.{_MCORE_LAYER[name]}'] = Chunked(a, regions)
      sd[f'model.decoder.layers.{_MCORE_LAYER[name]}._extra_state/shard_0_{ref.L}'] = io.BytesIO(
          b'TE extra state')
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(os.path.join(out_dir, 'model_weights'),
                                                     thread_count=2),
             planner=Planner(), no_dist=True)
  with open(os.path.join(out_dir, 'model_weights', 'metadata.json'), 'w') as f:
    json.dump({'sharded_backend': 'torch_dist', 'sharded_backend_version': 1,
               'common_backend': 'torch', 'common_backend_version': 1}, f)
  torch.save({}, os.path.join(out_dir, 'model_weights', 'common.pt'))
