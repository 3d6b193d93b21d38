"""The .nemo exporter: round trips, torch's own DCP reader as the oracle, tokenizer artifacts."""

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
import torch
import yaml

from jkd import model
from jkd import tokenizer as jt
from tests import hf_reference as ref
from tests import nemo_fixtures as fx
from tests.test_tokenizer import CORPUS
from third_party.convert import assemble, from_nemo, to_hf, to_nemo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.random.default_rng(0).integers(0, 200, (2, ref.T), dtype=np.int32)


def _hf(arch):
  kwargs = {'padded_vocab': ref.V} if arch == 'llama' else {}
  return ref.ARCHITECTURES[arch](**kwargs)[2]


def _same(a, b) -> bool:
  leaves = jax.tree.leaves(jax.tree.map(
      lambda x, y: x.dtype == y.dtype and np.array_equal(x, y), a, b))
  return jax.tree.structure(a) == jax.tree.structure(b) and all(leaves)


@pytest.mark.parametrize('arch', sorted(ref.ARCHITECTURES))
def test_nemo_to_jkd_to_nemo_to_jkd_is_identical(tmp_path, arch):
  """Legacy TP2 .nemo -> jkd -> Megatron-Core torch_dist .nemo -> jkd: same config, same bits."""
  fx.write_legacy(tmp_path / 'a.nemo', arch, _hf(arch), tp=2)
  cfg, params = from_nemo.load_nemo(str(tmp_path / 'a.nemo'))
  to_nemo.export_nemo(cfg, params, str(tmp_path / 'b.nemo'), dtype='float32')
  cfg2, params2 = from_nemo.load_nemo(str(tmp_path / 'b.nemo'))
  assert cfg2 == cfg
  assert _same(params, params2)


@pytest.mark.parametrize('v, p, m', [(200, 200, 8), (256000, 256000, 128), (200, 203, 128)])
def test_the_padded_vocabulary_is_read_back_at_any_tensor_parallel_size(v, p, m):
  """NeMo pads V to a multiple of make_vocab_size_divisible_by x TP unless override_vocab_size
  is set: loaded at TP=2, V=200 with 8 became 208 rows, not the checkpoint's 200."""
  cfg = model.ModelConfig(num_layers=1, hidden_size=8, ffn_hidden_size=16,
                          num_attention_heads=2, vocab_size=v, padded_vocab_size=p)
  fields = to_nemo._vocab_fields(cfg)
  assert fields == {'make_vocab_size_divisible_by': m, 'override_vocab_size': p}


def test_the_gelu_form_round_trips_through_the_nemo_flags(tmp_path):
  """The tanh GELU exports as bias_activation_fusion (openai_gelu without a bias), the exact
  one with both off, and each imports back as itself."""
  cfg, params, _ = ref.gpt3(gelu_tanh=True)
  to_nemo.export_nemo(cfg, params, str(tmp_path / 'b.nemo'), dtype='float32')
  cfg2, params2 = from_nemo.load_nemo(str(tmp_path / 'b.nemo'))
  assert cfg2 == dataclasses.replace(cfg, padded_vocab_size=cfg.padded_vocab) and cfg2.gelu_tanh
  assert _same(params, params2)
  for tanh, bias, flags in ((True, True, (True, False)), (True, False, (False, True)),
                            (False, True, (False, False))):
    c = dataclasses.replace(cfg, gelu_tanh=tanh, bias=bias)
    raw = to_nemo.nemo_config(c, 'bf16', None)
    assert (raw['bias_activation_fusion'], raw['openai_gelu']) == flags
    assert from_nemo.model_config(raw, vocab_size=None, padded_vocab=c.padded_vocab,
                                  where='m').gelu_tanh == tanh


@pytest.mark.parametrize('arch', sorted(ref.ARCHITECTURES))
def test_torch_dcp_reads_the_export_as_megatron_core_tensors(tmp_path, arch):
  """torch's own DCP loader (no jkd code) reads MCore keys and stacked shapes equal to the
  canonical tensors built from the HF model (nemo_fixtures), and one chunk per layer."""
  from torch.distributed.checkpoint import FileSystemReader, load
  from torch.distributed.checkpoint.metadata import TensorStorageMetadata
  hf = _hf(arch)
  fx.write_legacy(tmp_path / 'a.nemo', arch, hf)
  cfg, params = from_nemo.load_nemo(str(tmp_path / 'a.nemo'))
  out = to_nemo.export_nemo(cfg, params, str(tmp_path / 'b'), dtype='float32')
  _, state = fx.canonical_state(arch, hf)
  expected = {fx._MCORE[n]: a for (layer, n), a in state.items() if layer is None}
  for name in {n for (layer, n) in state if layer is not None}:
    expected[f'model.decoder.layers.{fx._MCORE_LAYER[name]}'] = np.stack(
        [state[(i, name)] for i in range(ref.L)])
  if cfg.share_embeddings_and_output_weights:
    expected.pop(fx._MCORE['output.weight'], None)
  reader = FileSystemReader(os.path.join(out, 'model_weights'))
  md = reader.read_metadata()
  tensors = {k: m for k, m in md.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
  assert set(tensors) == set(expected)
  sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in tensors.items()}
  load(sd, storage_reader=reader, no_dist=True)
  for key, want in expected.items():
    np.testing.assert_array_equal(sd[key].numpy(), want, err_msg=key)
    if key.startswith('model.decoder.layers.'):
      assert len(tensors[key].chunks) == ref.L, key
  # The extra states a Megatron-Core GPT asks for (format doc §2b): five TE modules' per layer,
  # and the output layer's (tied or not), as torch.save(None) blobs.
  extra = sorted(k for k in md.state_dict_metadata if '._extra_state/' in k)
  assert extra == sorted(
      [f'model.decoder.layers.{m}._extra_state/shard_{i}_{ref.L}' for i in range(ref.L)
       for m in ('self_attention.linear_qkv', 'self_attention.core_attention',
                 'self_attention.linear_proj', 'mlp.linear_fc1', 'mlp.linear_fc2')]
      + ['model.output_layer._extra_state/shard_0_1'])
  blobs = {k: io.BytesIO() for k in extra}
  load(blobs, storage_reader=reader, no_dist=True)
  for blob in blobs.values():
    blob.seek(0)
    assert torch.load(blob, weights_only=True) is None
  raw = yaml.safe_load(open(os.path.join(out, 'model_config.yaml')))
  assert raw['mcore_gpt'] is True and raw['dist_ckpt_format'] == 'torch_dist'
  assert open(os.path.join(out, 'model_weights', 'metadata.json')).read().count('torch_dist')


def test_bf16_export_round_trips_to_bf16_params(tmp_path):
  fx.write_legacy(tmp_path / 'a.nemo', 'gpt2b', _hf('gpt2b'))
  cfg, params = from_nemo.load_nemo(str(tmp_path / 'a.nemo'))
  to_nemo.export_nemo(cfg, params, str(tmp_path / 'b.nemo'), dtype='bfloat16')
  _, params2 = from_nemo.load_nemo(str(tmp_path / 'b.nemo'))
  assert _same(jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params), params2)


def _sentencepiece(vocab_size: int) -> bytes:
  """A SentencePiece model small enough for the fixtures' 256 embedding rows."""
  import io
  import sentencepiece as spm
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out,
                                 vocab_size=vocab_size, model_type='bpe', pad_id=3,
                                 minloglevel=2)
  return out.getvalue()


def _with_tokenizer(tmp_path, arch) -> tuple[str, jt.Tokenizer, object]:
  """A zarr .nemo directory plus a SentencePiece artifact with a double uuid prefix."""
  hf = _hf(arch)
  path = tmp_path / 'src'
  fx.write_zarr(path, arch, hf)
  proto = _sentencepiece(200)
  member = '586f3f51a9cf43bc9369bd53fa08868c_2053796188904e679f7e2754a2a1f280_tok.model'
  (path / member).write_bytes(proto)
  raw = yaml.safe_load((path / 'model_config.yaml').read_text())
  raw['tokenizer'] = {'library': 'sentencepiece', 'type': None, 'model': f'nemo:{member}'}
  (path / 'model_config.yaml').write_text(yaml.safe_dump({'model': raw}))
  return str(path), jt.Tokenizer('sentencepiece', {'tokenizer.model': proto}, bos_id=1,
                                 eos_id=2, pad_id=3), hf


def _cli(*args):
  proc = subprocess.run([sys.executable, '-m', 'jkd.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_cli_convert_then_export_carries_weights_and_tokenizer(tmp_path):
  """convert (.nemo + tokenizer) -> model dir -> export .nemo and HF; every hop keeps the
  logits (HF reference) and the tokenizer (same ids, `nemo:` artifact with a fresh uuid)."""
  src, tok, hf = _with_tokenizer(tmp_path, 'gpt2b')
  _cli('--config', 'configs/convert.py', f'--config.convert.source={src}',
       f'--config.convert.output={tmp_path}/m')
  cfg, params = model.load(str(tmp_path / 'm'))
  assert cfg.vocab_size == 200 and cfg.padded_vocab == ref.V
  assert jt.load(str(tmp_path / 'm')).encode('Hello wörld 7') == tok.encode('Hello wörld 7')
  _cli('--config', 'configs/export.py', f'--config.export.source={tmp_path}/m',
       f'--config.export.nemo={tmp_path}/out.nemo', f'--config.export.hf={tmp_path}/hf',
       '--config.export.dtype=float32')
  with tarfile.open(tmp_path / 'out.nemo') as tar:
    names = tar.getnames()
  artifact = [n for n in names if re.fullmatch(r'\./[0-9a-f]{32}_tokenizer\.model', n)]
  assert len(artifact) == 1 and './model_config.yaml' in names
  cfg2, params2 = from_nemo.load_nemo(str(tmp_path / 'out.nemo'))
  assert cfg2 == cfg and _same(params, params2)
  want = ref.hf_logits(hf, TOKENS)[..., :200]
  ours = np.asarray(jax.jit(lambda p, t: model.forward(cfg2, p, t))(params2, TOKENS))
  assert np.abs(ours - want).max() <= 1e-4
  from transformers import AutoModelForCausalLM
  exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'), dtype=torch.float32)
  assert np.abs(ref.hf_logits(exported, TOKENS) - want).max() <= 1e-4
  assert os.path.isfile(tmp_path / 'hf' / 'tokenizer.model')


def test_missing_tokenizer_file_is_one_line_error(tmp_path):
  src, _, _ = _with_tokenizer(tmp_path, 'llama')
  for f in os.listdir(src):
    if f.endswith('tok.model'):
      os.remove(os.path.join(src, f))
  proc = subprocess.run(
      [sys.executable, '-m', 'jkd.main', '--config', 'configs/convert.py',
       f'--config.convert.source={src}', f'--config.convert.output={tmp_path}/m'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert re.fullmatch(r'jkd: error: .*src.*tokenizer\.model.*tok\.model.*\n', proc.stderr)


def test_export_without_torch_names_the_extra(tmp_path, monkeypatch):
  fx.write_legacy(tmp_path / 'a.nemo', 'llama', _hf('llama'))
  cfg, params = from_nemo.load_nemo(str(tmp_path / 'a.nemo'))
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match=r"jkd\[convert\]"):
    to_nemo.export_nemo(cfg, params, str(tmp_path / 'b.nemo'))
  assert not os.path.exists(tmp_path / 'b.nemo')


def test_export_refuses_to_overwrite(tmp_path):
  fx.write_legacy(tmp_path / 'a.nemo', 'llama', _hf('llama'))
  cfg, params = from_nemo.load_nemo(str(tmp_path / 'a.nemo'))
  with pytest.raises(FileExistsError, match='a.nemo: already exists'):
    to_nemo.export_nemo(cfg, params, str(tmp_path / 'a.nemo'))


def test_export_after_a_killed_one_leaves_no_temporary_files(tmp_path):
  """A killed export leaves `X.nemo.partial/` and `X.nemo.tmp`; the next one replaces both."""
  fx.write_legacy(tmp_path / 'a.nemo', 'llama', _hf('llama'))
  cfg, params = from_nemo.load_nemo(str(tmp_path / 'a.nemo'))
  (tmp_path / 'b.nemo.partial').mkdir()
  (tmp_path / 'b.nemo.partial' / 'stale').write_text('x')
  (tmp_path / 'b.nemo.tmp').write_text('half a tar')
  to_nemo.export_nemo(cfg, params, str(tmp_path / 'b.nemo'), dtype='float32')
  assert sorted(os.listdir(tmp_path)) == ['a.nemo', 'b.nemo']
  _, got = from_nemo.load_nemo(str(tmp_path / 'b.nemo'))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, params)))


@pytest.mark.parametrize('where', ['weights', 'tar'])
def test_export_on_a_full_disk_names_the_path_and_leaves_nothing(tmp_path, monkeypatch, where):
  """ENOSPC while torch writes the weights (its CheckpointException is a BaseException, so
  it escaped as two tracebacks) or while the tar is written (the half tar stayed): one OSError
  naming the path, and nothing left beside the output."""
  import errno
  import tarfile
  from torch.distributed.checkpoint import filesystem
  fx.write_legacy(tmp_path / 'a.nemo', 'llama', _hf('llama'))
  cfg, params = from_nemo.load_nemo(str(tmp_path / 'a.nemo'))

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')
  if where == 'weights':
    monkeypatch.setattr(filesystem, '_write_item', full)
    path = 'b.nemo.partial/model_weights'
  else:
    monkeypatch.setattr(tarfile.TarFile, 'addfile', full)
    path = 'b.nemo.tmp'
  with pytest.raises(OSError, match=f'No space left on device: .*{path}') as e:
    to_nemo.export_nemo(cfg, params, str(tmp_path / 'b.nemo'))
  assert e.value.errno == errno.ENOSPC
  assert sorted(os.listdir(tmp_path)) == ['a.nemo']


def test_hf_export_of_a_sentencepiece_tokenizer_and_stale_tokenizers(tmp_path, capsys):
  """A SentencePiece tokenizer exports with a tokenizer_config.json (Llama class, the model's
  special tokens, no added BOS) and a warning when transformers' conversion of it encodes a
  probe text otherwise; a rerun from a source without tokenizer leaves no earlier one behind,
  neither in the model directory nor in the HF export."""
  from transformers import AutoTokenizer

  from jkd import convert, export
  src, tok, _ = _with_tokenizer(tmp_path, 'gpt2b')
  convert.convert(src, str(tmp_path / 'm'))
  export.export(str(tmp_path / 'm'), hf=str(tmp_path / 'hf'), dtype='float32')
  hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
  # transformers rebuilds this model's BPE merges from its scores and merges otherwise: the
  # export says so, naming the first probe text that differs.
  assert tok.encode('Hello world') != hf_tok('Hello world', add_special_tokens=False)['input_ids']
  assert "transformers encodes 'Hello world' as" in capsys.readouterr().out

  (tmp_path / 'src' / 'model_config.yaml').write_text(yaml.safe_dump({'model': {
      k: v for k, v in yaml.safe_load((tmp_path / 'src' / 'model_config.yaml').read_text())[
          'model'].items() if k != 'tokenizer'}}))
  convert.convert(src, str(tmp_path / 'm'))
  assert not (tmp_path / 'm' / 'tokenizer').exists()
  # mode=export refuses a directory holding a model; a training run's rerun replaces its own
  with pytest.raises(FileExistsError, match=r'hf: holds a Hugging Face model .*config\.json'):
    export.export(str(tmp_path / 'm'), hf=str(tmp_path / 'hf'), dtype='float32')
  cfg, params = model.load(str(tmp_path / 'm'))
  export.export_params(cfg, params, None, hf=str(tmp_path / 'hf'), dtype='float32')
  assert sorted(os.listdir(tmp_path / 'hf')) == ['config.json', 'model.safetensors']


def _byte_level_tokenizer(vocab_size):
  """A tokenizers (tokenizer.json) tokenizer without `<unk>`: a byte-level BPE trained on CORPUS,
  `<|endoftext|>` its BOS and EOS (GPT-2's, and SmolLM2's kind)."""
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=['<|endoftext|>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  vocab = json.dumps(bpe.get_vocab()).encode()
  merges = '\n'.join(' '.join(m) for m in json.loads(bpe.to_str())['model']['merges']).encode()
  return jt._gpt2_files(vocab, merges, 'test')


@pytest.mark.parametrize('arch', ['llama', 'gpt2b'])
def test_hf_export_of_a_tokenizer_json_reads_as_itself(tmp_path, capsys, arch):
  """A tokenizer.json tokenizer exports with a tokenizer_config.json naming transformers' generic
  fast class and the special tokens, so transformers reads tokenizer.json as it is for any
  architecture: the same ids on every probe text, no warning. (Left to pick a class by
  model_type, a Llama export got a Llama tokenizer that cannot encode without `<unk>`.)"""
  from transformers import AutoTokenizer

  from jkd import export
  tok = _byte_level_tokenizer(300)
  assert tok.library == 'huggingface' and tok.vocab_size == 300
  cfg = dataclasses.replace(ref.ARCHITECTURES[arch]()[0], vocab_size=300, padded_vocab_size=320)
  model.save(str(tmp_path / 'm'), cfg, model.init(cfg, jax.random.key(0)))
  jt.save(tok, str(tmp_path / 'm'))
  export.export(str(tmp_path / 'm'), hf=str(tmp_path / 'hf'), dtype='float32')
  assert 'warning' not in capsys.readouterr().out
  config = json.loads((tmp_path / 'hf' / 'tokenizer_config.json').read_text())
  assert config == {'tokenizer_class': 'PreTrainedTokenizerFast',
                    'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>'}
  hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
  for text in export._PROBES:
    assert hf_tok(text, add_special_tokens=False)['input_ids'] == tok.encode(text), text


def test_hf_tokenizer_check_warns_instead_of_failing_the_export(tmp_path, capsys, monkeypatch):
  """The check of the exported tokenizer only warns: transformers raising while it encodes (as
  its Llama class did without `<unk>`) leaves the export done."""
  import transformers

  from jkd import export

  class Raising:
    def __call__(self, text, **kwargs):
      raise Exception('Unk token `<unk>` not found in the vocabulary')  # noqa: TRY002
  monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained', lambda path: Raising())
  export._check_hf_tokenizer(_byte_level_tokenizer(300), str(tmp_path))
  out = capsys.readouterr().out
  assert 'warning' in out and 'transformers cannot encode with the tokenizer' in out, out
  assert 'Unk token' in out


def test_exports_count_their_tensors_in_a_progress_bar(tmp_path, monkeypatch, capsys):
  """Shown from assemble.PROGRESS_FROM bytes of params on (0 here); each bar reaches its total,
  one step a written tensor (a layer's chunk of a stacked .nemo tensor)."""
  monkeypatch.setattr(assemble, 'PROGRESS_FROM', 0)
  fx.write_legacy(tmp_path / 'a.nemo', 'llama', _hf('llama'))
  cfg, params = from_nemo.load_nemo(str(tmp_path / 'a.nemo'))
  to_nemo.export_nemo(cfg, params, str(tmp_path / 'b.nemo'))
  to_hf.export_hf(cfg, params, str(tmp_path / 'hf'))
  err = capsys.readouterr().err
  ends = re.findall(r'export (\S+): 100%\|[^|]*\| (\d+)/(\d+) \[', err)
  assert [(os.path.basename(w), n == total) for w, n, total in ends] == [
      ('model_weights', True), ('hf', True)], err[-2000:]
