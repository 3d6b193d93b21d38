"""jkd params -> `.nemo` in the Megatron-Core layout with a `torch_dist` distributed checkpoint.

What is written (../shared/docs/nemo_checkpoint_format.md §1, §2b, §7.2):
  model_config.yaml       mcore_gpt: true, dist_ckpt_format: torch_dist and the architecture
                          fields of §4, with NeMo's names and values
  model_weights/          metadata.json, common.pt ({}), .metadata, __0_0.distcp: MCore's keys
                          (`model.` prefix, TE names), layers stacked on a leading axis and
                          stored one chunk per layer as a TP=1 MCore save stores them, plus the
                          `_extra_state` entries MCore's loader asks for (TE modules', per
                          layer, and the output layer's)
  <uuid>_<name>           tokenizer files, referenced from the config as `nemo:<uuid>_<name>`

The inverse transforms mirror from_nemo's table: canonical torch [out, in] tensors from jkd
kernels. Chunks are produced lazily, one layer at a time, while torch's own DCP writer
(`pip install 'jkd[convert]'`) writes them; reading the result back needs no torch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import uuid
from typing import Callable

import numpy as np
import yaml
from tqdm import tqdm

from jkd import model
from third_party.convert import assemble, from_nemo


def _fused_qkv(leaf: str) -> Callable:
  """q [.., N, H], k / v [.., G, H] -> MCore's group-major fused rows [G (N/G + 2) H, ...]."""
  def fn(c: model.ModelConfig, p: dict) -> np.ndarray:
    g, hpg = c.num_groups, c.num_attention_heads // c.num_groups

    def grouped(x, per_group):  # kernel [D, heads, H] -> [G, per, H, D]; bias -> [G, per, H]
      x = np.moveaxis(x, 0, -1) if x.ndim == 3 else x
      return x.reshape(g, per_group, *x.shape[1:])
    attn = p['attn']
    fused = np.concatenate([grouped(attn['q'][leaf], hpg), grouped(attn['k'][leaf], 1),
                            grouped(attn['v'][leaf], 1)], axis=1)
    return fused.reshape(-1, *fused.shape[3:])
  return fn


def _fc1_weight(c: model.ModelConfig, w: np.ndarray) -> np.ndarray:
  """Gated [D, 2, F] -> [gate; up] rows [2F, D]; plain [D, F] -> [F, D]."""
  return w.transpose(1, 2, 0).reshape(2 * c.ffn_hidden_size, -1) if w.ndim == 3 else w.T


# canonical name -> (per-layer?, fn(cfg, params or one layer's params) -> torch-layout array)
_INVERSE: dict[str, tuple[bool, Callable]] = {
    'qkv.weight': (True, _fused_qkv('kernel')),
    'qkv.bias': (True, _fused_qkv('bias')),
    'proj.weight': (True, lambda c, p: p['attn']['o']['kernel'].reshape(-1, c.hidden_size).T),
    'proj.bias': (True, lambda c, p: p['attn']['o']['bias']),
    'fc1.weight': (True, lambda c, p: _fc1_weight(c, p['mlp']['fc1']['kernel'])),
    'fc1.bias': (True, lambda c, p: p['mlp']['fc1']['bias'].reshape(-1)),
    'fc2.weight': (True, lambda c, p: p['mlp']['fc2']['kernel'].T),
    'fc2.bias': (True, lambda c, p: p['mlp']['fc2']['bias']),
    'input_norm.weight': (True, lambda c, p: p['attn_norm']['scale']),
    'input_norm.bias': (True, lambda c, p: p['attn_norm']['bias']),
    'mlp_norm.weight': (True, lambda c, p: p['mlp_norm']['scale']),
    'mlp_norm.bias': (True, lambda c, p: p['mlp_norm']['bias']),
    'embedding': (False, lambda c, p: p['embed']),
    'position_embedding': (False, lambda c, p: p['pos_embed']),
    'final_norm.weight': (False, lambda c, p: p['final_norm']['scale']),
    'final_norm.bias': (False, lambda c, p: p['final_norm']['bias']),
    'output.weight': (False, lambda c, p: p['lm_head'].T),
}
# MCore distributed-checkpoint keys: the first (TE) name from_nemo accepts for each tensor.
_KEYS: dict[str, str] = {}
for _table, _prefix in ((from_nemo._MCORE_LAYER, 'model.decoder.layers.'),
                        (from_nemo._MCORE_GLOBAL, 'model.')):
  for _key, _canon in _table.items():
    _KEYS.setdefault(_canon, _prefix + _key)
# The `_extra_state` entries a Megatron-Core GPT's sharded_state_dict asks for: one per layer of
# each Transformer Engine module (MCore's TE spec), and the output layer's (ColumnParallelLinear
# keeps one for TE compatibility; the module exists with a tied head too, without its weight).
_TE_MODULES = ('self_attention.linear_qkv', 'self_attention.core_attention',
               'self_attention.linear_proj', 'mlp.linear_fc1', 'mlp.linear_fc2')
_GLOBAL_EXTRA_STATES = ('model.output_layer._extra_state/shard_0_1',)


def _present(cfg: model.ModelConfig, params: dict) -> list[str]:
  """Canonical names of the tensors this model has."""
  names, first = [], _layer(params['layers'], 0)
  for name, (per_layer, fn) in _INVERSE.items():
    try:
      fn(cfg, first if per_layer else params)
    except KeyError:
      continue  # no biases, rmsnorm without bias, tied head, rope without a table
    names.append(name)
  return names


def _vocab_fields(cfg: model.ModelConfig) -> dict:
  """The padded vocabulary as NeMo reads it: `override_vocab_size` is the embedding's rows
  whatever the tensor-parallel size it is loaded with (NeMo pads V to a multiple of
  make_vocab_size_divisible_by x TP otherwise: 200 -> 208 at TP=2 with 8, not our 200); the
  make_vocab_size_divisible_by that pads V to P at TP=1 is kept for tools that read only it."""
  v, p = cfg.vocab_size, cfg.padded_vocab
  m = next((m for m in (128, 64, 32, 16, 8, 4, 2, 1) if -(-v // m) * m == p), 128)
  return {'make_vocab_size_divisible_by': m, 'override_vocab_size': p}


def nemo_config(cfg: model.ModelConfig, precision: str, tokenizer: dict | None) -> dict:
  """The model section NeMo writes for a Megatron-Core GPT with these settings."""
  out = {
      'target': 'nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel',
      'mcore_gpt': True, 'transformer_engine': True, 'dist_ckpt_format': 'torch_dist',
      'precision': precision, 'megatron_amp_O2': False,
      'tensor_model_parallel_size': 1, 'pipeline_model_parallel_size': 1,
      'num_layers': cfg.num_layers, 'hidden_size': cfg.hidden_size,
      'ffn_hidden_size': cfg.ffn_hidden_size, 'num_attention_heads': cfg.num_attention_heads,
      'num_query_groups': cfg.num_query_groups, 'kv_channels': cfg.kv_channels,
      'encoder_seq_length': cfg.max_position_embeddings,
      'max_position_embeddings': cfg.max_position_embeddings,
      'position_embedding_type': cfg.position_embedding_type,
      'rotary_percentage': cfg.rotary_percentage, 'rotary_base': cfg.rotary_base,
      'activation': cfg.activation, 'normalization': cfg.normalization,
      # The tanh GELU is what NeMo's fused bias-GELU kernels compute (they need a bias unless
      # gated); every other activation is exact with the fusion off.
      'bias_activation_fusion': cfg.gelu_tanh and (cfg.bias or cfg.gated),
      'openai_gelu': cfg.gelu_tanh and not (cfg.bias or cfg.gated),
      'layernorm_zero_centered_gamma': cfg.normalization == 'layernorm1p',
      'layernorm_epsilon': cfg.layernorm_epsilon, 'bias': cfg.bias,
      'share_embeddings_and_output_weights': cfg.share_embeddings_and_output_weights,
      'init_method_std': cfg.init_method_std, 'apply_query_key_layer_scaling': False,
      'hidden_dropout': 0.0, 'attention_dropout': 0.0, 'ffn_dropout': 0.0,
      'transformer_block_type': 'pre_ln', 'normalize_attention_scores': True,
      **_vocab_fields(cfg),
  }
  if tokenizer is not None:
    out['tokenizer'] = tokenizer
  return out


def _write_torch_dist(directory: str, cfg: model.ModelConfig, params: dict, dtype) -> None:
  """model_weights/ through torch.distributed.checkpoint, one chunk per layer."""
  try:
    import torch
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint import metadata as dcp_md
    from torch.distributed.checkpoint import planner as dcp_planner
  except ImportError:
    raise ImportError('writing .nemo needs torch (CPU is enough): pip install "jkd[convert]"'
                      ) from None
  torch_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  layers = params.get('layers', {})

  def to_torch(a: np.ndarray):
    return torch.from_numpy(np.asarray(a, np.float32).copy(order='C')).to(torch_dtype)

  class Stacked:
    """A [L, ...] tensor whose per-layer chunks are computed when the writer asks."""

    def __init__(self, fn):
      self.fn = fn
      self.shape = (cfg.num_layers,) + np.shape(fn(cfg, _layer(layers, 0)))

    def chunk(self, layer: int):
      return to_torch(self.fn(cfg, _layer(layers, layer))[None])

    def __create_write_items__(self, fqn, obj):
      props = dcp_md.TensorProperties(dtype=torch_dtype)
      return [dcp_planner.WriteItem(
          index=dcp_md.MetadataIndex(fqn, torch.Size((i,) + (0,) * (len(self.shape) - 1))),
          type=dcp_planner.WriteItemType.SHARD,
          tensor_data=dcp_planner.TensorWriteData(
              chunk=dcp_md.ChunkStorageMetadata(
                  offsets=torch.Size((i,) + (0,) * (len(self.shape) - 1)),
                  sizes=torch.Size((1,) + self.shape[1:])),
              properties=props, size=torch.Size(self.shape)))
              for i in range(cfg.num_layers)]

  class Planner(dcp.DefaultSavePlanner):

    def resolve_data(self, write_item):
      obj = self.state_dict[write_item.index.fqn]
      if isinstance(obj, Stacked):
        bar.update(1)
        return obj.chunk(write_item.index.offset[0])
      if isinstance(obj, torch.Tensor):
        bar.update(1)
      return super().resolve_data(write_item)

  state = {}
  for name in _present(cfg, params):
    per_layer, fn = _INVERSE[name]
    state[_KEYS[name]] = Stacked(fn) if per_layer else to_torch(fn(cfg, params))
  extra_states = [f'model.decoder.layers.{module}._extra_state/shard_{i}_{cfg.num_layers}'
                  for module in _TE_MODULES for i in range(cfg.num_layers)]
  for key in extra_states + list(_GLOBAL_EXTRA_STATES):  # None: no fp8 metadata
    blob = io.BytesIO()
    torch.save(None, blob)
    state[key] = blob
  os.makedirs(directory)
  import warnings
  n_tensors = sum(cfg.num_layers if isinstance(v, Stacked) else 1 for v in state.values()
                  if isinstance(v, (Stacked, torch.Tensor)))
  with warnings.catch_warnings(), \
       tqdm(total=n_tensors, unit='tensor', desc=f'export {directory}',
            disable=assemble.nbytes(params) < assemble.PROGRESS_FROM) as bar:
    # "assuming the intent is to save in a single process"
    warnings.simplefilter('ignore', UserWarning)
    try:
      dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, thread_count=1),
               planner=Planner(), no_dist=True)
    except dcp.CheckpointException as e:  # a BaseException wrapping the writer's own error
      error = next(iter(e.failures.values()))[0]
      if isinstance(error, OSError):  # a full disk, say
        raise OSError(error.errno, error.strerror or str(error), directory) from None
      raise ValueError(f'{directory}: writing the weights failed: {type(error).__name__}: '
                       f'{error}') from None
  torch.save({}, os.path.join(directory, 'common.pt'))
  with open(os.path.join(directory, 'metadata.json'), 'w') as f:
    json.dump({'sharded_backend': 'torch_dist', 'sharded_backend_version': 1,
               'common_backend': 'torch', 'common_backend_version': 1}, f)


def _layer(layers: dict, i: int) -> dict:
  return {k: _layer(v, i) if isinstance(v, dict) else np.asarray(v[i]) for k, v in layers.items()}


def tokenizer_artifacts(tok) -> tuple[dict[str, bytes], dict]:
  """(files, model_config.yaml `tokenizer:` section) for a jkd.tokenizer.Tokenizer."""
  name = next(iter(tok.files))
  section = {'library': tok.library, 'type': None, 'model': f'nemo:{name}', 'vocab_file': None,
             'merge_file': None, 'delimiter': None}
  if tok.library == 'sentencepiece':
    section['sentencepiece_legacy'] = False
  for key, value in (('bos_token', tok.bos_id), ('eos_token', tok.eos_id),
                     ('pad_token', tok.pad_id)):
    if tok.library == 'huggingface' and value is not None:
      section[key] = tok.id_to_token(value)
  return dict(tok.files), section


def export_nemo(cfg: model.ModelConfig, params: model.Params, out_path: str, *,
                dtype: str = 'bfloat16', tokenizer_files: dict[str, bytes] | None = None,
                tokenizer_section: dict | None = None) -> str:
  """Writes `out_path` (.nemo tar, or a directory if it does not end in .nemo).

  `tokenizer_section` is the model_config.yaml `tokenizer:` mapping with `nemo:<file>` where a
  file of `tokenizer_files` is meant; each file is stored as `<uuid hex>_<file>` and the
  references are rewritten to match, as NeMo's artifact registration does.
  """
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f'export dtype={dtype!r}: expected float32 or bfloat16')
  model.check_params(cfg, params, 'export')
  params = _to_numpy(params)
  out_path = os.path.abspath(out_path)
  if os.path.exists(out_path):
    raise FileExistsError(f'{out_path}: already exists; remove it or choose another path')
  work = out_path + '.partial'  # the files before they become a tar (or the directory)
  shutil.rmtree(work, ignore_errors=True)  # left by a killed export
  os.makedirs(work)
  try:
    section = dict(tokenizer_section or {})
    for name, data in (tokenizer_files or {}).items():
      stored = f'{uuid.uuid4().hex}_{name}'
      with open(os.path.join(work, stored), 'wb') as f:
        f.write(data)
      section = {k: (f'nemo:{stored}' if v == f'nemo:{name}' else v) for k, v in section.items()}
    raw = nemo_config(cfg, {'bfloat16': 'bf16', 'float32': 32}[dtype], section or None)
    with open(os.path.join(work, 'model_config.yaml'), 'w') as f:
      yaml.safe_dump(raw, f, sort_keys=False)
    _write_torch_dist(os.path.join(work, 'model_weights'), cfg, params, dtype)
    if out_path.endswith('.nemo'):
      tmp = out_path + '.tmp'
      try:
        with tarfile.open(tmp, 'w:') as tar:  # NeMo: tar.add(dir, arcname='.'), uncompressed
          tar.add(work, arcname='.')
      except OSError as e:  # a full disk, say: no half tar left behind, and the file named
        if os.path.exists(tmp):
          os.remove(tmp)
        raise OSError(e.errno, e.strerror or str(e), tmp) from None
      os.replace(tmp, out_path)
    else:
      os.replace(work, out_path)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return out_path


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
