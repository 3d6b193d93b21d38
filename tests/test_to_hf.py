"""third_party.convert.to_hf: jkd params -> HF directory, checked by logits parity.

The original HF models of tests/hf_reference.py are the independent oracle: jkd params built
from them are exported back, reloaded with transformers' own AutoModelForCausalLM, and must
give the same logits as both the original HF model and jkd.
"""

import dataclasses
import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from jkd import model
from tests import hf_reference as ref
from third_party.convert import to_hf

# Plain builders plus a tied head over a padded vocabulary (rows beyond V must be dropped).
CASES = {**ref.ARCHITECTURES, 'llama-tied': lambda: ref.llama(tied=True),
         'gpt3-tanh': lambda: ref.gpt3(gelu_tanh=True)}  # NeMo's fused bias-GELU: gelu_new
HF_CLASS = {'llama': 'LlamaForCausalLM', 'llama-tied': 'LlamaForCausalLM',
            'nemotron': 'NemotronForCausalLM', 'gpt2b': 'StableLmForCausalLM',
            'gpt3': 'GPT2LMHeadModel', 'gpt3-tanh': 'GPT2LMHeadModel'}


def _tokens(b=2, t=ref.T, seed=1):
  return np.random.default_rng(seed).integers(0, ref.V, (b, t), dtype=np.int32)


def _jkd(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, x: model.forward(cfg, p, x))(params, tokens))


def _load(out_dir, **kw):
  """from_pretrained, asserting that every tensor in the file found its parameter."""
  hf, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True, **kw)
  for key in ('missing_keys', 'unexpected_keys', 'mismatched_keys', 'error_msgs'):
    assert not info.get(key), f'{key}: {info[key]}'
  return hf.eval()


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize('case', sorted(CASES))
def test_export_matches_hf_and_jkd_fp32(case, tmp_path):
  """Protects every mapping (names, transposes, QKV packing, norm +1, vocab slice) in fp32."""
  cfg, params, hf = CASES[case]()
  out = to_hf.export_hf(cfg, params, str(tmp_path), bos_token_id=1, eos_token_id=2)
  exported = _load(out, dtype=torch.float32)
  assert type(exported).__name__ == HF_CLASS[case]
  assert exported.config.vocab_size == cfg.vocab_size  # padded rows are not exported
  assert (exported.config.bos_token_id, exported.config.eos_token_id) == (1, 2)
  tokens = _tokens()
  got = ref.hf_logits(exported, tokens)
  want_hf, want_jkd = ref.hf_logits(hf, tokens)[..., :cfg.vocab_size], _jkd(cfg, params, tokens)
  assert got.shape == want_hf.shape == want_jkd.shape == (2, ref.T, ref.V)
  d_hf, d_jkd = _max_diff(got, want_hf), _max_diff(got, want_jkd)
  print(f'{case}: max |export - HF| = {d_hf:.2e}, |export - jkd| = {d_jkd:.2e} '
        f'(max |logit| {np.abs(want_hf).max():.2f})')
  assert d_hf <= 1e-4 and d_jkd <= 1e-4


@pytest.mark.parametrize('case', sorted(ref.ARCHITECTURES))
def test_bfloat16_export_loads_as_bf16_and_is_close(case, tmp_path):
  """bf16 files (from jax params) are BF16 on disk, load as bf16 by default and stay close."""
  cfg, params, hf = CASES[case]()
  params = jax.tree.map(jnp.asarray, params)
  out = to_hf.export_hf(cfg, params, str(tmp_path), dtype='bfloat16')
  with safe_open(f'{out}/{to_hf.WEIGHTS_FILE}', 'pt') as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {'BF16'}
  with open(f'{out}/{to_hf.CONFIG_FILE}') as f:
    assert json.load(f)['dtype'] == 'bfloat16'
  exported = _load(out)  # dtype 'auto' -> the config's bf16
  assert next(exported.parameters()).dtype == torch.bfloat16
  tokens = _tokens()
  want = ref.hf_logits(hf, tokens)
  diff = _max_diff(ref.hf_logits(exported, tokens), want)
  print(f'{case} bf16: max |export - HF fp32| = {diff:.2e} (max |logit| {np.abs(want).max():.2f})')
  assert diff <= 0.05 * np.abs(want).max()


def test_negative_control_missing_plus_one_is_detected(tmp_path):
  """The parity check has teeth: GPT-2B-001 exported without folding +1 into gamma is far off."""
  cfg, params, hf = ref.gpt2b()
  wrong = dataclasses.replace(cfg, normalization='layernorm')  # the exporter then adds no +1
  exported = _load(to_hf.export_hf(wrong, params, str(tmp_path)), dtype=torch.float32)
  tokens = _tokens()
  diff = _max_diff(ref.hf_logits(exported, tokens), ref.hf_logits(hf, tokens))
  print(f'gpt2b without +1: max |export - HF| = {diff:.2e}')
  assert diff > 1e-2


def test_negative_control_missing_transpose_is_detected(tmp_path, monkeypatch):
  """Untransposed square projections (q/k/v, same shape either way) load but give wrong logits."""
  cfg, params, hf = ref.nemotron()
  right = to_hf._linear
  monkeypatch.setattr(to_hf, '_linear', lambda w: (
      w.reshape(w.shape[0], -1) if w.shape[0] == np.prod(w.shape[1:]) else right(w)))
  exported = _load(to_hf.export_hf(cfg, params, str(tmp_path)), dtype=torch.float32)
  tokens = _tokens()
  diff = _max_diff(ref.hf_logits(exported, tokens), ref.hf_logits(hf, tokens))
  print(f'nemotron q/k/v untransposed: max |export - HF| = {diff:.2e}')
  assert diff > 1e-2


def _random_params(cfg, seed=0):
  """Every jkd leaf random (biases too); norm scales around jkd's identity (1, or 0 for 1p)."""
  rng = np.random.default_rng(seed)
  one = 0.0 if cfg.normalization == 'layernorm1p' else 1.0

  def draw(path, a):
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    return ((one if is_scale else 0.0) + rng.normal(0, 0.3 if is_scale else 0.05, a.shape)
            ).astype(np.float32)
  abstract = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.parametrize('normalization, activation', [
    ('rmsnorm', 'swiglu'), ('layernorm1p', 'squared-relu')])
def test_linear_biases_gqa_and_head_dim_export_for_llama_and_nemotron(normalization, activation,
                                                                      tmp_path):
  """Paths the HF builders leave out: attention_bias / mlp_bias (gated [2, F] bias split),
  GQA with Nemotron, and a head dim other than hidden / heads; jkd's forward is the oracle."""
  cfg = model.ModelConfig(
      num_layers=2, hidden_size=48, ffn_hidden_size=40, num_attention_heads=4,
      num_query_groups=2, kv_channels=16, vocab_size=ref.V, padded_vocab_size=ref.V + 3,
      normalization=normalization, activation=activation, bias=True,
      position_embedding_type='rope', rotary_base=20000.0,
      rotary_percentage=1.0 if normalization == 'rmsnorm' else 0.5,
      max_position_embeddings=64, share_embeddings_and_output_weights=False)
  params = _random_params(cfg)
  exported = _load(to_hf.export_hf(cfg, params, str(tmp_path)), dtype=torch.float32)
  tokens = _tokens()
  diff = _max_diff(ref.hf_logits(exported, tokens), _jkd(cfg, params, tokens))
  print(f'{normalization}+{activation} with biases: max |export - jkd| = {diff:.2e}')
  assert diff <= 1e-4


@pytest.mark.parametrize('change, key', [
    (dict(activation='gelu'), 'activation'),  # rmsnorm + gelu
    (dict(rotary_percentage=0.5), 'rotary_percentage'),  # Llama rotates whole heads
    (dict(normalization='layernorm', activation='reglu'), 'activation'),
    (dict(normalization='layernorm', activation='gelu'), 'position_embedding_type'),  # + rope
    (dict(normalization='layernorm', activation='gelu', position_embedding_type=
          'learned_absolute', bias=True), 'num_query_groups'),  # GPT-2 has no GQA
    (dict(normalization='layernorm1p', bias=True), 'bias'),  # StableLm: no o/MLP biases
    (dict(normalization='layernorm1p', kv_channels=32), 'kv_channels'),  # StableLm: H = D / N
])
def test_unsupported_config_raises_naming_the_setting(change, key, tmp_path):
  """Configs with no HF class fail in one line naming the key, before writing anything."""
  cfg, params, _ = ref.llama()
  with pytest.raises(ValueError, match=rf'^model\.{key}=.*no Hugging Face export') as e:
    to_hf.export_hf(dataclasses.replace(cfg, **change), params, str(tmp_path / 'out'))
  assert '\n' not in str(e.value) and not (tmp_path / 'out').exists()


def test_tokenizer_files_are_copied_but_not_configs(tmp_path):
  """Tokenizer files land next to the weights; a stray config.json there cannot replace ours."""
  cfg, params, _ = ref.gpt3()
  tok = tmp_path / 'tok'
  tok.mkdir()
  (tok / 'tokenizer.json').write_text('{"tokenizer": true}')
  (tok / 'tokenizer_config.json').write_text('{}')
  (tok / to_hf.CONFIG_FILE).write_text('{"model_type": "bert"}')
  out = to_hf.export_hf(cfg, params, str(tmp_path / 'out'), tokenizer_dir=str(tok))
  assert (tmp_path / 'out' / 'tokenizer.json').read_text() == '{"tokenizer": true}'
  assert (tmp_path / 'out' / 'tokenizer_config.json').exists()
  assert json.loads((tmp_path / 'out' / to_hf.CONFIG_FILE).read_text())['model_type'] == 'gpt2'
  assert out == str(tmp_path / 'out')


def test_sharded_export_loads_and_a_rerun_replaces_it(tmp_path):
  """Past max_shard_bytes the weights go into transformers' numbered shards with an index (the
  export holds one shard at a time); a later single-file export leaves no shard behind."""
  cfg, params, hf = ref.llama()
  out = to_hf.export_hf(cfg, params, str(tmp_path), max_shard_bytes=100_000)
  index = json.loads((tmp_path / to_hf.INDEX_FILE).read_text())
  files = sorted(set(index['weight_map'].values()))
  assert len(files) > 2 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  assert sorted(p.name for p in tmp_path.glob('*.safetensors')) == files
  tokens = _tokens()
  want = ref.hf_logits(hf, tokens)[..., :cfg.vocab_size]
  assert _max_diff(ref.hf_logits(_load(out, dtype=torch.float32), tokens), want) <= 1e-4
  to_hf.export_hf(cfg, params, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'model.safetensors']
  assert _max_diff(ref.hf_logits(_load(out, dtype=torch.float32), tokens), want) <= 1e-4


@pytest.mark.parametrize('existing', [False, True])
def test_a_failed_export_removes_what_it_wrote(tmp_path, monkeypatch, existing):
  """A full disk at the second shard: the first shard, the copied tokenizer and the directories
  the export made are gone; a directory that was there keeps only its own files."""
  import errno
  cfg, params, _ = ref.llama()
  tok = tmp_path / 'tok'
  tok.mkdir()
  (tok / 'tokenizer.json').write_text('{}')
  out = tmp_path / 'new' / 'out'
  if existing:
    out.mkdir(parents=True)
    (out / 'notes.txt').write_text('mine')
  real, calls = to_hf.save_file, []

  def full_disk(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(tensors, path, metadata=metadata)

  monkeypatch.setattr(to_hf, 'save_file', full_disk)
  with pytest.raises(OSError, match=r'model-00002\.safetensors\.partial: No space left'):
    to_hf.export_hf(cfg, params, str(out), tokenizer_dir=str(tok), max_shard_bytes=100_000)
  if existing:
    assert [p.name for p in out.iterdir()] == ['notes.txt']
  else:
    assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('mode, key', [('train', 'train.export_hf'), ('export', 'export.hf')])
@pytest.mark.parametrize('blocked', ['file', 'parent'])
def test_hf_path_that_cannot_be_a_directory_fails_config_validation(tmp_path, mode, key,
                                                                    blocked, devices8):
  """train.export_hf / export.hf naming an existing file (or a path under one) failed with `File
  exists` only after training or loading: jkd.config.validate, which runs before either, now
  refuses it in one line naming the file and the key; an existing directory stays fine (a
  rerun replaces its export)."""
  from jkd import config as jkd_config
  from tests import test_config_validation as tcv
  tcv._inputs(tmp_path)
  (tmp_path / 'taken').write_text('not a directory')
  hf = tmp_path / 'taken' if blocked == 'file' else tmp_path / 'taken' / 'hf'
  c = tcv._config(tmp_path, mode, **{key.replace('.', '__'): str(hf)})
  with pytest.raises(FileExistsError) as e:
    jkd_config.validate(c)
  assert str(e.value).startswith(f'{tmp_path / "taken"}: exists and is not a directory (the '
                                 f'Hugging Face export {hf} of {key}')
  assert str(e.value).endswith('is written as one); remove it or choose another path')
  (tmp_path / 'taken').unlink()
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'hf').mkdir()
  jkd_config.validate(c)


@pytest.mark.parametrize('umask', [0o022, 0o027])
@pytest.mark.parametrize('max_shard_bytes', [to_hf.MAX_SHARD_BYTES, 100_000])
def test_weights_get_the_permissions_of_their_sibling_files(tmp_path, umask, max_shard_bytes):
  """safetensors wrote model.safetensors (and shards) 0600 beside 0644 config and tokenizer
  files: another user serving the export could not read its weights. Every file of the export
  now has the mode an ordinary new file gets under the process umask."""
  cfg, params, _ = ref.llama()
  old = os.umask(umask)
  try:
    to_hf.export_hf(cfg, params, str(tmp_path), max_shard_bytes=max_shard_bytes)
  finally:
    os.umask(old)
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
  assert sum(name.endswith('.safetensors') for name in modes) == (
      1 if max_shard_bytes == to_hf.MAX_SHARD_BYTES else len(modes) - 2)
  assert modes == dict.fromkeys(modes, 0o666 & ~umask), {n: oct(m) for n, m in modes.items()}


def test_umask_is_read_without_changing_it(monkeypatch):
  """From /proc/self/status, or (no /proc) by setting and restoring it: same answer, unchanged."""
  old = os.umask(0o027)
  try:
    assert to_hf._umask() == 0o027

    def no_proc(*args, **kwargs):
      raise OSError('no /proc')
    monkeypatch.setattr(to_hf, 'open', no_proc, raising=False)  # shadows the builtin there
    assert to_hf._umask() == 0o027
    assert os.umask(0o027) == 0o027
  finally:
    os.umask(old)
