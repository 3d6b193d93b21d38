"""GGUF importer: a synthetic llama.cpp-layout file vs HF, and the real SmolLM2-135M-Instruct."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jkd import assets, model
from tests import hf_reference as ref
from third_party.convert import from_gguf, gguf_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _llama_cpp_permute(w, n_heads):
  """What llama.cpp's converter does to HF q/k rows (rotate-half -> interleaved pairs)."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def write_llama_gguf(path, hf, *, freq_base=True, ffn_length=None, dtypes=None):
  """Writes an HF LlamaForCausalLM as llama.cpp does (F32 tensors, permuted q/k); without
  llama.rope.freq_base when `freq_base` is False, as older conversions are. `ffn_length`
  overrides llama.feed_forward_length; `dtypes` {GGUF tensor name: numpy dtype} stores those
  tensors in another type (float64 -> F64, int32 -> I32)."""
  import gguf
  c = hf.config
  sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(ffn_length or c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  if freq_base:
    w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  if c.head_dim != c.hidden_size // c.num_attention_heads:  # as llama.cpp writes it
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  add = lambda name, t: w.add_tensor(name, t.astype((dtypes or {}).get(name, t.dtype)))
  add('token_embd.weight', sd['model.embed_tokens.weight'])
  add('output_norm.weight', sd['model.norm.weight'])
  if not c.tie_word_embeddings:
    add('output.weight', sd['lm_head.weight'])
  names = {'input_layernorm.weight': 'attn_norm.weight', 'self_attn.q_proj.weight': 'attn_q.weight',
           'self_attn.k_proj.weight': 'attn_k.weight', 'self_attn.v_proj.weight': 'attn_v.weight',
           'self_attn.o_proj.weight': 'attn_output.weight', 'mlp.gate_proj.weight': 'ffn_gate.weight',
           'mlp.up_proj.weight': 'ffn_up.weight', 'mlp.down_proj.weight': 'ffn_down.weight',
           'post_attention_layernorm.weight': 'ffn_norm.weight'}
  for i in range(c.num_hidden_layers):
    for hf_name, g_name in names.items():
      t = sd[f'model.layers.{i}.{hf_name}']
      if g_name == 'attn_q.weight':
        t = _llama_cpp_permute(t, c.num_attention_heads)
      if g_name == 'attn_k.weight':
        t = _llama_cpp_permute(t, c.num_key_value_heads)
      add(f'blk.{i}.{g_name}', np.ascontiguousarray(t))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope='module')
def tiny_gguf(tmp_path_factory):
  _, _, hf = ref.llama(padded_vocab=ref.V)
  path = tmp_path_factory.mktemp('gguf') / 'tiny-llama.gguf'
  write_llama_gguf(path, hf)
  return path, hf


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, tokens))


def test_synthetic_gguf_matches_hf(tiny_gguf):
  """Un-permuting llama.cpp's q/k rows is what makes RoPE right (GQA: 4 heads, 2 groups)."""
  path, hf = tiny_gguf
  cfg, params = from_gguf.load_gguf(str(path))
  assert (cfg.num_query_groups, cfg.share_embeddings_and_output_weights) == (ref.G, False)
  tokens = np.random.default_rng(0).integers(0, ref.V, (2, ref.T), dtype=np.int32)
  assert np.abs(_logits(cfg, params, tokens) - ref.hf_logits(hf, tokens)).max() <= 1e-4


def _hf_llama(rope_theta, **config):
  """A random HF Llama of the reference shapes (GQA) with this RoPE base."""
  from transformers import LlamaConfig, LlamaForCausalLM
  return ref._randomise(LlamaForCausalLM(LlamaConfig(
      vocab_size=ref.V, hidden_size=ref.D, intermediate_size=ref.F, num_hidden_layers=ref.L,
      num_attention_heads=ref.N, num_key_value_heads=ref.G, rms_norm_eps=1e-5,
      max_position_embeddings=64, rope_parameters={'rope_type': 'default', 'rope_theta': rope_theta},
      **config)), seed=3)


def test_a_head_dim_apart_from_hidden_over_heads_rotates_whole_heads(tmp_path):
  """key_length != D / N without rope.dimension_count: RoPE covers the key length, as in
  llama.cpp (it used to take D / N, a partial rotation)."""
  hf = _hf_llama(5e3, head_dim=8)
  write_llama_gguf(tmp_path / 'm.gguf', hf)
  cfg, params = from_gguf.load_gguf(str(tmp_path / 'm.gguf'))
  assert (cfg.head_dim, cfg.rotary_percentage) == (8, 1.0)
  tokens = np.random.default_rng(0).integers(0, ref.V, (2, ref.T), dtype=np.int32)
  assert np.abs(_logits(cfg, params, tokens) - ref.hf_logits(hf, tokens)).max() <= 1e-4


def test_rope_freq_base_is_optional_as_in_llama_cpp(tmp_path):
  """A GGUF without llama.rope.freq_base rotates with llama.cpp's default base, 10000."""
  hf = _hf_llama(1e4)
  write_llama_gguf(tmp_path / 'm.gguf', hf, freq_base=False)
  cfg, params = from_gguf.load_gguf(str(tmp_path / 'm.gguf'))
  assert cfg.rotary_base == 10000.0
  tokens = np.random.default_rng(0).integers(0, ref.V, (2, ref.T), dtype=np.int32)
  assert np.abs(_logits(cfg, params, tokens) - ref.hf_logits(hf, tokens)).max() <= 1e-4


def test_convert_cli_writes_a_loadable_model_dir(tiny_gguf, tmp_path):
  path, hf = tiny_gguf
  out = tmp_path / 'model'
  proc = subprocess.run(
      [sys.executable, '-m', 'jkd.main', '--config', 'configs/convert.py',
       f'--config.convert.source={path}', f'--config.convert.output={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg, params = model.load(str(out))
  tokens = np.random.default_rng(1).integers(0, ref.V, (1, ref.T), dtype=np.int32)
  assert np.abs(_logits(cfg, params, tokens) - ref.hf_logits(hf, tokens)).max() <= 1e-4


def test_f64_tensors_are_read_and_unreadable_types_refused_up_front(tiny_gguf, tmp_path):
  """gguf.quants cannot dequantize F64 (read directly) nor Q8_1, Q8_K, I8..I64, Q1_0: those
  are refused by open_gguf, before any tensor is read or output written (docs/checkpoints.md
  lists the same types)."""
  import gguf
  path, hf = tiny_gguf
  write_llama_gguf(tmp_path / 'f64.gguf', hf, dtypes={'output_norm.weight': np.float64})
  _, want = from_gguf.load_gguf(str(path))
  _, got = from_gguf.load_gguf(str(tmp_path / 'f64.gguf'))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  write_llama_gguf(tmp_path / 'i32.gguf', hf, dtypes={'blk.1.ffn_up.weight': np.int32})
  with pytest.raises(ValueError, match=r'i32\.gguf: tensor blk\.1\.ffn_up\.weight: ggml type I32 '
                     'is not supported'):
    from_gguf.open_gguf(str(tmp_path / 'i32.gguf'))
  refused = [q.name for q in gguf.GGMLQuantizationType
             if q.name != 'F64' and not from_gguf._dequantizable(q)]
  assert refused == ['Q8_1', 'Q8_K', 'I8', 'I16', 'I32', 'I64', 'Q1_0']


def test_corrupt_size_metadata_is_an_error_before_allocating(tiny_gguf, tmp_path):
  """A feed_forward_length far above the tensors' (here a 1.2 TiB fc1 kernel) is refused when
  the first tensor's shape is checked against its slot, before any leaf is allocated."""
  import tracemalloc
  _, hf = tiny_gguf
  write_llama_gguf(tmp_path / 'm.gguf', hf, ffn_length=1275068512)
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=rf'tensor blk\.0\.ffn_gate\.weight: shape \({ref.F}, '
                       rf'{ref.D}\) does not fit .* gives \({ref.D}, {ref.F}\) where '
                       rf'layers\.mlp\.fc1\.kernel needs \({ref.D}, 1275068512\)'):
      from_gguf.load_gguf(str(tmp_path / 'm.gguf'))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 256 << 20, peak


@pytest.mark.parametrize('merges, match', [
    (['Ġt'], r"GGUF merge 0 \('Ġt'\) is not two tokens split by a space"),
    (['Ġ zz'], r'GGUF tokenizer: the vocabulary and merges make no BPE tokenizer \(.*`zz` out '
               r'of vocabulary\)')])
def test_bad_gguf_merges_are_a_clear_error(tmp_path, merges, match):
  """The `tokenizers` library's TypeError / plain Exception become a ValueError naming the file."""
  from jkd import tokenizer
  from tests.test_tokenizer import write_gguf_tokenizer
  path = write_gguf_tokenizer(tmp_path / 'tok.gguf', tokens=['Ġ', 't', 'Ġt'], merges=merges)
  with pytest.raises(ValueError, match=f'tok.gguf: {match}'):
    tokenizer.from_gguf(path)


def test_a_special_token_id_outside_the_vocabulary_is_a_clear_error(tmp_path):
  """It converted, and failed only at the export's id lookup, after training."""
  from jkd import tokenizer
  from tests.test_tokenizer import write_gguf_tokenizer
  path = write_gguf_tokenizer(tmp_path / 'tok.gguf', tokens=['Ġ', 't', 'Ġt'], merges=['Ġ t'],
                              bos=3)
  with pytest.raises(ValueError, match=r'tok\.gguf: GGUF tokenizer\.ggml\.bos_token_id=3 is not a '
                     'token id of its 3'):
    tokenizer.from_gguf(path)


def test_truncated_gguf_is_a_clear_error(tiny_gguf, tmp_path):
  path, _ = tiny_gguf
  bad = tmp_path / 'truncated.gguf'
  bad.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ValueError, match='truncated.gguf'):
    from_gguf.load_gguf(str(bad))


def _every_value_type(path, endian):
  """A GGUF file with a key of every value type (and an array of each; unicode strings), one f32
  tensor after them. (gguf's writer refuses empty arrays.)"""
  import gguf
  t = gguf.GGUFValueType
  w = gguf.GGUFWriter(str(path), 'llama', endianess=endian)
  scalars = {t.UINT8: 200, t.INT8: -100, t.UINT16: 60000, t.INT16: -30000, t.UINT32: 4000000000,
             t.INT32: -2000000000, t.FLOAT32: 0.1, t.BOOL: True, t.UINT64: 2 ** 63 + 5,
             t.INT64: -2 ** 62, t.FLOAT64: 0.1}
  for vtype, value in scalars.items():
    w.add_key_value(f'x.{vtype.name.lower()}', value, vtype)
    w.add_key_value(f'x.{vtype.name.lower()}_array', [value, value], t.ARRAY, sub_type=vtype)
  w.add_key_value('x.string', 'Grüße, 世界 ⟨|im_end|⟩', t.STRING)
  w.add_key_value('x.strings', ['', 'a', 'Ġthe', '世界'] * 50, t.ARRAY, sub_type=t.STRING)
  w.add_tensor('w', np.arange(6, dtype=np.float32).reshape(2, 3))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _reader_contents(path):
  import gguf
  fields = gguf.GGUFReader(str(path)).fields
  return {k: f.contents() for k, f in fields.items() if not k.startswith('GGUF.')}


@pytest.mark.parametrize('endian', ['LITTLE', 'BIG'])
def test_metadata_equals_gguf_readers(tmp_path, endian):
  """gguf_metadata.read_metadata gives every key's value as gguf.GGUFReader's contents() does,
  in either byte order."""
  import gguf
  path = tmp_path / 'all.gguf'
  _every_value_type(path, gguf.GGUFEndian[endian])
  meta = gguf_metadata.read_metadata(str(path))
  assert len(meta) == 25 and meta['x.strings'][:4] == ['', 'a', 'Ġthe', '世界']
  assert meta == _reader_contents(path)


def test_bad_metadata_is_a_clear_error(tmp_path):
  import gguf
  path = tmp_path / 'all.gguf'
  _every_value_type(path, gguf.GGUFEndian.LITTLE)
  data = path.read_bytes()
  cases = {'empty': (b'', 'empty'), 'other': (b'PK\x03\x04' + data[4:], 'magic'),
           'v1': (data[:4] + (1).to_bytes(4, 'little') + data[8:], 'version 1'),
           'header': (data[:10], 'unreadable GGUF metadata after 0 keys'),
           'cut': (data[:300], 'unreadable GGUF metadata after')}
  for name, (content, match) in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f'{tmp_path / name}: .*{match}'):
      gguf_metadata.read_metadata(str(tmp_path / name))


def _nested_gguf(path, depth):
  """A GGUF file with one key whose value is [[...[7]...]], arrays `depth` deep."""
  import struct
  body = struct.pack('<Q', 1) + b'x' + struct.pack('<I', 9)  # value type ARRAY
  body += struct.pack('<IQ', 9, 1) * (depth - 1) + struct.pack('<IQ', 4, 1) + struct.pack('<I', 7)
  path.write_bytes(b'GGUF' + struct.pack('<IQQ', 3, 0, 1) + body)
  return str(path)


def test_nesting_past_the_limit_is_a_clear_error(tmp_path):
  """Arrays nested up to MAX_NESTING deep are read; deeper ones (2000: past Python's recursion
  limit) are a ValueError, from read_metadata and from open_gguf (GGUFReader)."""
  limit = gguf_metadata.MAX_NESTING + 1  # arrays: the outer one and MAX_NESTING inside it
  value = gguf_metadata.read_metadata(_nested_gguf(tmp_path / 'ok.gguf', limit))['x']
  assert str(value) == '[' * limit + '7' + ']' * limit
  for depth in (limit + 1, 2000):
    path = _nested_gguf(tmp_path / f'{depth}.gguf', depth)
    with pytest.raises(ValueError, match=rf'{depth}\.gguf: arrays nested more than'):
      gguf_metadata.read_metadata(path)
  with pytest.raises(ValueError, match=r'2000\.gguf: not a readable GGUF file'):
    from_gguf.open_gguf(path)


@pytest.mark.slow
def test_smollm2_metadata_equals_gguf_readers():
  """All 33 keys of the real file, the 49152-token vocabulary and its merges among them."""
  path = assets.smollm2_gguf(verbose=False)
  meta = gguf_metadata.read_metadata(path)
  assert len(meta['tokenizer.ggml.tokens']) == 49152 and len(meta) == 33
  assert meta == _reader_contents(path)


@pytest.fixture(scope='module')
def smollm2():
  """The real teacher of the demo: SmolLM2-135M-Instruct, via jkd and via transformers."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  path = assets.smollm2_gguf()
  folder, name = os.path.split(path)
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
  cfg, params = from_gguf.load_gguf(path)
  return tokenizer, hf, cfg, params


def _chat_prompt(tokenizer):
  messages = [{'role': 'user', 'content': 'Write a short poem about the sea.'}]
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='np')
  return np.asarray(ids['input_ids'] if hasattr(ids, 'keys') else ids, np.int32)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
  tokenizer, hf, cfg, params = smollm2
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_groups,
          cfg.vocab_size) == (30, 576, 9, 3, 49152)
  tokens = _chat_prompt(tokenizer)
  ours, theirs = _logits(cfg, params, tokens), ref.hf_logits(hf, tokens)
  diff = float(np.abs(ours - theirs).max())
  print(f'SmolLM2-135M-Instruct: {tokens.shape[1]} prompt tokens, max |jkd - HF| = {diff:.2e} '
        f'(max |logit| {np.abs(theirs).max():.1f})')
  assert diff <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_transformers(smollm2):
  import torch
  tokenizer, hf, cfg, params = smollm2
  prompt = _chat_prompt(tokenizer)
  n_prompt, n_new = prompt.shape[1], 16
  # HF reference: plain argmax decoding (generate() would add its own logits processors).
  ids = torch.as_tensor(prompt, dtype=torch.long)
  with torch.no_grad():
    for _ in range(n_new):
      ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
  theirs = ids[0, n_prompt:].numpy()
  # One compiled shape: a fixed-length buffer; causality makes the padding irrelevant.
  buf = np.zeros((1, n_prompt + n_new), np.int32)
  buf[0, :n_prompt] = prompt[0]
  step = jax.jit(lambda p, t: model.forward(cfg, p, t))
  for i in range(n_new):
    buf[0, n_prompt + i] = int(np.argmax(np.asarray(step(params, buf))[0, n_prompt + i - 1]))
  ours = buf[0, n_prompt:]
  print(f'greedy: jkd {tokenizer.decode(ours)!r} | HF {tokenizer.decode(theirs)!r}')
  np.testing.assert_array_equal(ours, theirs)
