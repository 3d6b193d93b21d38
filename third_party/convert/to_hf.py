"""jkd ModelConfig + params -> a Hugging Face model directory (model.safetensors + config.json).

The HF class follows from the config (../shared/docs/nemo_checkpoint_format.md §5):
  rmsnorm + swiglu + full RoPE                       -> LlamaForCausalLM (GQA, any head dim)
  layernorm(1p) + squared-relu + RoPE                -> NemotronForCausalLM (relu2)
  layernorm(1p) + swiglu + RoPE, no linear bias      -> StableLmForCausalLM (GPT-2B-001)
  layernorm(1p) + gelu + learned positions + bias    -> GPT2LMHeadModel (classic NeMo GPT-3)
Anything else has no HF equivalent and raises a one-line ValueError naming the setting.

Each architecture is a table {HF tensor name: (jkd param paths, transform)}; names with '{}'
are per layer and their transform gets that layer's slice of the stacked jkd arrays.
Only numpy, ml_dtypes and safetensors are needed; transformers is not imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file
from tqdm import tqdm

from jkd import files, model
from third_party.convert import assemble

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}
WEIGHTS_FILE, CONFIG_FILE = 'model.safetensors', 'config.json'
INDEX_FILE = 'model.safetensors.index.json'  # the shards' weight map, when there are several
_WEIGHT_FILE = re.compile(r'model(-\d{5}-of-\d{5}|-\d{5})?\.safetensors(\.partial)?')
MAX_SHARD_BYTES = 2 << 30  # per safetensors file: the export holds one such shard at a time
# What an export's tokenizer may have written: removed before each export.
TOKENIZER_FILES = ('tokenizer.model', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json')
_SWIGLU = ('swiglu', 'fast-swiglu')
# HF name -> (one jkd path, or a tuple of paths for a packed tensor; transform(*arrays)).
Table = dict[str, tuple[tuple, Callable[..., np.ndarray]]]


def architecture(cfg: model.ModelConfig) -> str:
  """'llama' | 'nemotron' | 'stablelm' | 'gpt2'; ValueError naming the setting HF lacks."""
  def fail(key, why):
    raise ValueError(f'model.{key}={getattr(cfg, key)!r}: no Hugging Face export ({why})')

  # (normalization, activation) picks the class; the checks below are what that class fixes.
  if cfg.normalization == 'rmsnorm' and cfg.activation in _SWIGLU:
    arch = 'llama'
  elif cfg.normalization == 'rmsnorm':
    fail('activation', 'with rmsnorm only swiglu maps, to LlamaForCausalLM')
  elif cfg.activation == 'squared-relu':
    arch = 'nemotron'
  elif cfg.activation in _SWIGLU:
    arch = 'stablelm'
  elif cfg.activation == 'gelu':
    arch = 'gpt2'
  else:
    fail('activation', f'no HF class pairs {cfg.normalization} with it')
  position = 'learned_absolute' if arch == 'gpt2' else 'rope'
  if cfg.position_embedding_type != position:
    fail('position_embedding_type', f'the matching HF class ({arch}) needs {position}')
  if arch == 'llama' and cfg.rotary_percentage != 1.0:
    fail('rotary_percentage', 'LlamaForCausalLM rotates the whole head')
  if arch == 'stablelm' and cfg.bias:  # StableLm has only optional QKV biases
    fail('bias', 'StableLmForCausalLM has no o_proj / MLP biases')
  if arch == 'gpt2' and not cfg.bias:
    fail('bias', 'GPT2LMHeadModel always has linear biases')
  if arch == 'gpt2' and cfg.num_groups != cfg.num_attention_heads:
    fail('num_query_groups', 'GPT2LMHeadModel has no grouped-query attention')
  # StableLm and GPT-2 derive the head dim from hidden_size; Llama and Nemotron store it.
  if arch in ('stablelm', 'gpt2') and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
    fail('kv_channels', f'{arch} needs head_dim = hidden_size / num_attention_heads')
  return arch


# --- Per-tensor transforms (one layer's slice in, torch layout out) ---------------------

def _linear(w_IxO):
  """jkd kernel [in, *out] -> torch Linear weight [out, in]."""
  return w_IxO.reshape(w_IxO.shape[0], -1).T


def _o_linear(w_NxHxD):
  """jkd o kernel [N, H, D] (two input axes) -> torch Linear weight [D, N*H]."""
  return w_NxHxD.reshape(-1, w_NxHxD.shape[-1]).T


def _flat(b):
  return b.reshape(-1)


def _gamma(cfg, hf_zero_centred: bool):
  """Norm scale: jkd's layernorm1p stores w for a 1 + w gamma; Nemotron's HF norm also adds 1
  itself, StableLm / GPT-2 / Llama hold the full gamma. The +-1 runs in fp32 before casting."""
  offset = float(cfg.normalization == 'layernorm1p') - float(hf_zero_centred)
  return lambda w: w + np.float32(offset) if offset else w


# --- Tables --------------------------------------------------------------------------------

def _decoder_table(cfg, arch: str) -> Table:
  """Llama / Nemotron / StableLm: the same HF module names, different norms and MLPs."""
  p, attn, mlp = 'model.layers.{}.', ('layers', 'attn'), ('layers', 'mlp')
  gamma = _gamma(cfg, hf_zero_centred=arch == 'nemotron')
  t: Table = {
      'model.embed_tokens.weight': (('embed',), lambda w: w[:cfg.vocab_size]),
      'model.norm.weight': (('final_norm', 'scale'), gamma),
      p + 'self_attn.o_proj.weight': ((*attn, 'o', 'kernel'), _o_linear),
      p + 'mlp.down_proj.weight': ((*mlp, 'fc2', 'kernel'), _linear),
  }
  for proj in 'qkv':
    t[p + f'self_attn.{proj}_proj.weight'] = ((*attn, proj, 'kernel'), _linear)
  if cfg.gated:  # jkd fc1 [D, 2, F]: slot 0 is the activated gate, slot 1 the linear up
    t[p + 'mlp.gate_proj.weight'] = ((*mlp, 'fc1', 'kernel'), lambda w: w[:, 0].T)
    t[p + 'mlp.up_proj.weight'] = ((*mlp, 'fc1', 'kernel'), lambda w: w[:, 1].T)
  else:
    t[p + 'mlp.up_proj.weight'] = ((*mlp, 'fc1', 'kernel'), _linear)
  for norm, hf_norm in (('attn_norm', 'input_layernorm'), ('mlp_norm', 'post_attention_layernorm')):
    t[p + f'{hf_norm}.weight'] = (('layers', norm, 'scale'), gamma)
    if cfg.normalization != 'rmsnorm':
      t[p + f'{hf_norm}.bias'] = (('layers', norm, 'bias'), lambda b: b)
  if cfg.normalization != 'rmsnorm':
    t['model.norm.bias'] = (('final_norm', 'bias'), lambda b: b)
  if cfg.bias:  # Llama / Nemotron attention_bias + mlp_bias (StableLm was refused above)
    for proj in 'qkvo':
      t[p + f'self_attn.{proj}_proj.bias'] = ((*attn, proj, 'bias'), _flat)
    t[p + 'mlp.down_proj.bias'] = ((*mlp, 'fc2', 'bias'), _flat)
    if cfg.gated:
      t[p + 'mlp.gate_proj.bias'] = ((*mlp, 'fc1', 'bias'), lambda b: b[0])
      t[p + 'mlp.up_proj.bias'] = ((*mlp, 'fc1', 'bias'), lambda b: b[1])
    else:
      t[p + 'mlp.up_proj.bias'] = ((*mlp, 'fc1', 'bias'), _flat)
  if not cfg.share_embeddings_and_output_weights:
    t['lm_head.weight'] = (('lm_head',), lambda w: w[:, :cfg.vocab_size].T)
  return t


def _gpt2_table(cfg) -> Table:
  """GPT-2's Conv1D weights are [in, out] (no transpose); c_attn packs [Q | K | V] on out."""
  p, attn, mlp = 'transformer.h.{}.', ('layers', 'attn'), ('layers', 'mlp')
  gamma = _gamma(cfg, hf_zero_centred=False)
  qkv = lambda leaf: tuple((*attn, x, leaf) for x in 'qkv')
  t: Table = {
      'transformer.wte.weight': (('embed',), lambda w: w[:cfg.vocab_size]),
      'transformer.wpe.weight': (('pos_embed',), lambda w: w),
      'transformer.ln_f.weight': (('final_norm', 'scale'), gamma),
      'transformer.ln_f.bias': (('final_norm', 'bias'), lambda b: b),
      p + 'attn.c_attn.weight': (qkv('kernel'), lambda *ws: np.concatenate(
          [w.reshape(w.shape[0], -1) for w in ws], 1)),
      p + 'attn.c_attn.bias': (qkv('bias'), lambda *bs: np.concatenate([_flat(b) for b in bs])),
      p + 'attn.c_proj.weight': ((*attn, 'o', 'kernel'), lambda w: w.reshape(-1, w.shape[-1])),
      p + 'attn.c_proj.bias': ((*attn, 'o', 'bias'), lambda b: b),
      p + 'mlp.c_fc.weight': ((*mlp, 'fc1', 'kernel'), lambda w: w),
      p + 'mlp.c_fc.bias': ((*mlp, 'fc1', 'bias'), lambda b: b),
      p + 'mlp.c_proj.weight': ((*mlp, 'fc2', 'kernel'), lambda w: w),
      p + 'mlp.c_proj.bias': ((*mlp, 'fc2', 'bias'), lambda b: b),
  }
  for norm, hf_norm in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
    t[p + f'{hf_norm}.weight'] = (('layers', norm, 'scale'), gamma)
    t[p + f'{hf_norm}.bias'] = (('layers', norm, 'bias'), lambda b: b)
  if not cfg.share_embeddings_and_output_weights:
    t['lm_head.weight'] = (('lm_head',), lambda w: w[:, :cfg.vocab_size].T)
  return t


def table(cfg: model.ModelConfig) -> Table:
  arch = architecture(cfg)
  return _gpt2_table(cfg) if arch == 'gpt2' else _decoder_table(cfg, arch)


# --- config.json ---------------------------------------------------------------------------

def hf_config(cfg: model.ModelConfig, dtype: str = 'float32', bos_token_id=None,
              eos_token_id=None) -> dict:
  """The config.json dict for the class `architecture(cfg)` picks."""
  arch = architecture(cfg)
  # Written as both `dtype` (transformers 5) and `torch_dtype` (4.x); 5.x drops the latter.
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=
                cfg.share_embeddings_and_output_weights, initializer_range=cfg.init_method_std,
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, dtype=dtype,
                torch_dtype=dtype, use_cache=True)
  if arch == 'gpt2':
    # Dropout off: jkd trains without it, so HF fine-tuning starts from the same model.
    return dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', n_embd=cfg.hidden_size,
                n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
                n_inner=cfg.ffn_hidden_size, n_positions=cfg.max_position_embeddings,
                activation_function='gelu_new' if cfg.gelu_tanh else 'gelu',  # tanh | erf
                layer_norm_epsilon=cfg.layernorm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, **common)
  rope = {'rope_type': 'default', 'rope_theta': float(cfg.rotary_base)}
  if arch != 'llama':
    rope['partial_rotary_factor'] = float(cfg.rotary_percentage)
  # transformers 5 reads `rope_parameters`; 4.x reads the top-level copies. Both are written:
  # without a top-level factor StableLmConfig keeps its default 0.25 there, which 4.x uses.
  sizes = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
               num_key_value_heads=cfg.num_groups,
               max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope,
               **{k: v for k, v in rope.items() if k != 'rope_type'}, attention_dropout=0.0)
  if arch == 'llama':
    return dict(architectures=['LlamaForCausalLM'], model_type='llama', head_dim=cfg.head_dim,
                hidden_act='silu', rms_norm_eps=cfg.layernorm_epsilon, attention_bias=cfg.bias,
                mlp_bias=cfg.bias, pretraining_tp=1, **sizes, **common)
  if arch == 'nemotron':
    return dict(architectures=['NemotronForCausalLM'], model_type='nemotron',
                head_dim=cfg.head_dim, hidden_act='relu2', norm_eps=cfg.layernorm_epsilon,
                attention_bias=cfg.bias, mlp_bias=cfg.bias, **sizes, **common)
  return dict(architectures=['StableLmForCausalLM'], model_type='stablelm', hidden_act='silu',
              layer_norm_eps=cfg.layernorm_epsilon, use_qkv_bias=False, qk_layernorm=False,
              use_parallel_residual=False, hidden_dropout=0.0, **sizes, **common)


# --- Export --------------------------------------------------------------------------------

def _leaf(params, path: tuple[str, ...]) -> np.ndarray:
  node = params
  for key in path:
    node = node[key]
  return np.asarray(node)  # as stored: cast to fp32 one layer's slice at a time


def export_hf(cfg: model.ModelConfig, params: model.Params, out_dir: str, *,
              dtype: str = 'float32', tokenizer_dir: str | None = None,
              bos_token_id: int | None = None, eos_token_id: int | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
  """Writes `out_dir/model.safetensors` (or shards) + `config.json` (+ tokenizer files);
  returns out_dir.

  `params` are jkd params (numpy or jax arrays, any float dtype; each tensor is converted in
  fp32), `dtype` the stored weight type.
  Only the first V = cfg.vocab_size embedding / head rows are written: jkd's logits (and so
  its softmax) cover V only, and the padded rows are ids no tokenizer produces. With V rows
  HF's vocab_size matches the tokenizer and HF sampling cannot emit a padded id.
  Tensors are converted one at a time and written in shards of at most `max_shard_bytes` (a
  tensor larger than that gets a shard of its own): more than one shard gives transformers'
  `model-0000i-of-0000n.safetensors` files and `model.safetensors.index.json`. Memory beyond
  `params` is one shard. An export that fails removes the files it wrote (and the directories
  it made) before it raises; an earlier export's are already gone then.
  """
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}: expected one of {tuple(DTYPES)}')
  architecture(cfg)  # fail on an unsupported config before the params are even looked at
  model.check_params(cfg, params)
  out_dir = os.path.abspath(out_dir)
  new_dirs = files.missing_dirs(out_dir)
  created: list[str] = []  # every file this export writes, removed again if it fails
  try:
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, CONFIG_FILE)
    if os.path.exists(config_path):  # an earlier export's: incomplete until the new one lands
      os.remove(config_path)
    for name in os.listdir(out_dir):  # an earlier export's weights and tokenizer
      if name in TOKENIZER_FILES or name == INDEX_FILE or _WEIGHT_FILE.fullmatch(name):
        os.remove(os.path.join(out_dir, name))
    if tokenizer_dir is not None:
      _copy_tokenizer(tokenizer_dir, out_dir, created)
    _write_weights(cfg, params, out_dir, DTYPES[dtype], max_shard_bytes, created)
    _write_json(config_path, hf_config(cfg, dtype, bos_token_id, eos_token_id),
                created)  # last: marks the directory complete
  except BaseException:  # a full disk, Ctrl-C, ...: no partial shard or stray file stays
    for path in reversed(created):
      with contextlib.suppress(OSError):
        os.remove(path)
    for path in new_dirs:  # deepest first; kept if something else was put there meanwhile
      with contextlib.suppress(OSError):
        os.rmdir(path)
    raise
  return out_dir


def _write_weights(cfg: model.ModelConfig, params: model.Params, out_dir: str, np_dtype,
                   max_shard_bytes: int, created: list[str]) -> None:
  """The safetensors shard(s) (+ index), each written as `.partial` and renamed at the end."""
  shards = []  # (temporary file name, tensor names, bytes)
  pending: dict[str, np.ndarray] = {}

  def flush(nbytes):
    path = os.path.join(out_dir, f'model-{len(shards) + 1:05d}.safetensors.partial')
    created.append(path)
    try:  # transformers refuses safetensors files without a 'format' metadata entry
      save_file(pending, path, metadata={'format': 'pt'})
    except (OSError, SafetensorError) as e:  # a full disk, ...: neither names the file
      raise OSError(f'{path}: {getattr(e, "strerror", None) or e}') from None
    os.chmod(path, 0o666 & ~_umask())  # safetensors writes 0600; its siblings get the umask's
    shards.append((path, list(pending), nbytes))
    pending.clear()

  nbytes = 0  # of the pending shard
  n_tensors = sum(cfg.num_layers if '{}' in name else 1 for name in table(cfg))
  for name, tensor in tqdm(_tensors(cfg, params, np_dtype), total=n_tensors, unit='tensor',
                           desc=f'export {out_dir}',
                           disable=assemble.nbytes(params) < assemble.PROGRESS_FROM):
    if pending and nbytes + tensor.nbytes > max_shard_bytes:
      flush(nbytes)
      nbytes = 0
    pending[name] = tensor
    nbytes += tensor.nbytes
  flush(nbytes)
  if len(shards) == 1:
    created.append(os.path.join(out_dir, WEIGHTS_FILE))
    os.replace(shards[0][0], created[-1])
    return
  weight_map = {}
  for i, (path, names, _) in enumerate(shards, 1):
    final = f'model-{i:05d}-of-{len(shards):05d}.safetensors'
    created.append(os.path.join(out_dir, final))
    os.replace(path, created[-1])
    weight_map.update(dict.fromkeys(names, final))
  _write_json(os.path.join(out_dir, INDEX_FILE), {
      'metadata': {'total_size': sum(n for _, _, n in shards)}, 'weight_map': weight_map},
      created)


def _tensors(cfg: model.ModelConfig, params: model.Params, np_dtype):
  """(HF name, tensor in `np_dtype`) for every HF weight, computed one at a time."""
  for name, (paths, transform) in table(cfg).items():
    paths = (paths,) if isinstance(paths[0], str) else paths
    sources = [_leaf(params, path) for path in paths]
    for i in range(cfg.num_layers) if '{}' in name else [None]:
      w = transform(*[np.asarray(s if i is None else s[i], np.float32) for s in sources])
      yield name.format(i), np.ascontiguousarray(w.astype(np_dtype, copy=False))


def _umask() -> int:
  """The process umask, read without changing it where Linux shows it (os.umask sets it, and
  another thread could create a file in between)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _write_json(path: str, obj, created: list[str]) -> None:
  created += [path + '.tmp', path]
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


def _copy_tokenizer(tokenizer_dir: str, out_dir: str, created: list[str]) -> None:
  """Copies the tokenizer's top-level files; never its weights or config (ours win)."""
  if not os.path.isdir(tokenizer_dir):
    raise FileNotFoundError(f'{tokenizer_dir}: tokenizer directory does not exist')
  for entry in sorted(os.scandir(tokenizer_dir), key=lambda e: e.name):
    if (not entry.is_file() or entry.name == CONFIG_FILE
        or entry.name.endswith(('.safetensors', '.bin', '.pt'))):
      continue
    created.append(os.path.join(out_dir, entry.name))
    shutil.copy2(entry.path, created[-1])
