"""Tokenizers from .nemo and GGUF vs the libraries' own readers (SentencePiece, transformers)."""

import io
import json
import os
import tarfile

import pytest
import yaml

from jkd import assets
from jkd import tokenizer as jt
from third_party.convert import from_nemo, nemo_archive

UUID1 = 'a919114446344e349e73a0d807d9af98'
UUID2 = '2053796188904e679f7e2754a2a1f280'
UUID3 = '586f3f51a9cf43bc9369bd53fa08868c'
SP_MEMBER = f'{UUID1}_{UUID2}_tok.model'  # re-saved once: two uuid prefixes, as in Nemotron-3
TEXTS = ['Hello, wörld! 123  spaces\n', 'The quick brown fox jumps over the lazy dog.',
         'def f(x):\n\treturn x ** 2  # square', 'emoji 😀🎉 and 中文', '', ' leading', 'trail  ']
CORPUS = [f'{w} number {i} jumps over the lazy dog, said the quick brown fox {i * 7}.'
          for i in range(200) for w in ('The', 'A', 'Hello wörld')] + [
          'def f(x):\n    return x + 1', 'print("hello world")  # comment']


def train_sentencepiece(vocab_size: int) -> bytes:
  """A SentencePiece BPE model (256 byte pieces, pad id 3) trained in memory."""
  import sentencepiece as spm
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=vocab_size, model_type='bpe',
      byte_fallback=True, pad_id=3, character_coverage=1.0, minloglevel=2)
  return out.getvalue()


@pytest.fixture(scope='module')
def sp_proto():
  return train_sentencepiece(500)


@pytest.fixture(scope='module')
def gpt2_files(tmp_path_factory):
  """vocab.json + merges.txt of a tiny byte-level BPE trained with `tokenizers`."""
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=420, special_tokens=['<|endoftext|>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  folder = tmp_path_factory.mktemp('gpt2')
  tok.model.save(str(folder))
  return folder


def write_nemo(path, layout: str, tokenizer_cfg: dict, members: dict[str, bytes]) -> str:
  """A .nemo (directory or uncompressed tar, members './name') holding only the tokenizer."""
  files = {'model_config.yaml': yaml.safe_dump({'model': {'tokenizer': tokenizer_cfg}}).encode(),
           **members}
  if layout == 'dir':
    os.makedirs(path)
    for name, data in files.items():
      with open(os.path.join(path, name), 'wb') as f:
        f.write(data)
    return str(path)
  with tarfile.open(path, 'w:') as tar:
    for name, data in files.items():
      info = tarfile.TarInfo('./' + name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def nemo_tokenizer(path: str) -> jt.Tokenizer:
  """Through the importer's own config reader, as the converter will call it."""
  with nemo_archive.NemoArchive(path) as archive:
    cfg = from_nemo.read_raw_config(archive)['tokenizer']
    return jt.from_nemo(archive, cfg, where=f'{path}: model_config.yaml')


@pytest.mark.parametrize('layout', ['dir', 'tar'])
def test_resolve_exact_member_then_uuid_stripped_basename(tmp_path, layout):
  """nemo: names the member; absolute and re-prefixed references find it by basename."""
  members = {SP_MEMBER: b'x', f'{UUID3}_other.model': b'y'}
  path = write_nemo(tmp_path / 'm.nemo', layout, {}, members)
  with nemo_archive.NemoArchive(path) as archive:
    assert archive.resolve(f'nemo:{SP_MEMBER}', 'tokenizer.model') == SP_MEMBER
    assert archive.resolve(f'nemo:./{SP_MEMBER}', 'tokenizer.model') == SP_MEMBER
    assert archive.resolve('/artifacts/tok.model', 'tokenizer.model') == SP_MEMBER
    assert archive.resolve(f'nemo:{UUID3}_tok.model', 'tokenizer.model') == SP_MEMBER
    assert archive.resolve(f'/artifacts/{UUID2}_tok.model', 'tokenizer.model') == SP_MEMBER
    with pytest.raises(ValueError, match=r"m\.nemo: tokenizer\.model '/x/gone\.model'"):
      archive.resolve('/x/gone.model', 'tokenizer.model')
    with pytest.raises(ValueError, match='none named'):
      archive.resolve('nemo:../tok.model.bak', 'tokenizer.model')


def test_resolve_ambiguous_only_when_copies_differ(tmp_path):
  """GPT-2B-001 ships two uuid copies of one file: same bytes resolve, different bytes fail."""
  copies = lambda a, b: {f'{UUID1}_t.model': a, f'{UUID2}_t.model': b}
  same = write_nemo(tmp_path / 'same', 'dir', {}, copies(b'x', b'x'))
  with nemo_archive.NemoArchive(same) as archive:
    assert archive.resolve('/artifacts/t.model', 'tokenizer.model') == f'{UUID2}_t.model'
  diff = write_nemo(tmp_path / 'diff', 'dir', {}, copies(b'x', b'y'))
  with nemo_archive.NemoArchive(diff) as archive:
    with pytest.raises(ValueError, match="tokenizer.vocab_file '/artifacts/t.model': ambiguous"):
      archive.resolve('/artifacts/t.model', 'tokenizer.vocab_file')


@pytest.mark.parametrize('layout', ['dir', 'tar'])
@pytest.mark.parametrize('ref', [f'nemo:{SP_MEMBER}', '/artifacts/tok.model'])
def test_sentencepiece_from_nemo_matches_processor(tmp_path, sp_proto, layout, ref):
  import sentencepiece as spm
  cfg = {'library': 'sentencepiece', 'type': None, 'model': ref, 'vocab_file': None,
         'merge_file': None, 'delimiter': None, 'sentencepiece_legacy': False}
  tok = nemo_tokenizer(write_nemo(tmp_path / 'm.nemo', layout, cfg, {SP_MEMBER: sp_proto}))
  sp = spm.SentencePieceProcessor(model_proto=sp_proto)
  assert (tok.library, tok.vocab_size) == ('sentencepiece', 500)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), 3)
  for text in TEXTS:
    assert tok.encode(text) == sp.encode(text), text
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
  assert tok.decode(tok.encode('Hello wörld')) == 'Hello wörld'
  assert tok.id_to_token(400) == sp.id_to_piece(400) and tok.token_to_id(sp.id_to_piece(400)) == 400
  assert tok.token_to_id('no-such-piece') is None


@pytest.mark.parametrize('cfg, match', [
    ({'library': 'sentencepiece', 'model': 'nemo:abc_missing.model'},
     r"m\.nemo: tokenizer\.model 'nemo:abc_missing\.model'"),
    ({'library': 'tiktoken', 'model': f'nemo:{SP_MEMBER}'}, "library 'tiktoken' is not supported"),
    ({'library': 'megatron', 'type': 'BertWordPieceCase'}, "'BertWordPieceCase' is not supported"),
    ({'library': 'megatron', 'type': 'GPT2BPETokenizer', 'vocab_file': f'nemo:{SP_MEMBER}'},
     'needs vocab_file and merge_file'),
    ({'library': 'huggingface', 'type': 'meta-llama/Meta-Llama-3-8B'},
     "'meta-llama/Meta-Llama-3-8B' has no tokenizer.json or vocab/merges files in the archive"),
])
def test_from_nemo_errors_name_archive_and_problem(tmp_path, sp_proto, cfg, match):
  path = write_nemo(tmp_path / 'm.nemo', 'tar', cfg, {SP_MEMBER: sp_proto})
  with pytest.raises(ValueError, match=match) as e:
    nemo_tokenizer(path)
  assert 'm.nemo' in str(e.value) and '\n' not in str(e.value)


def _gpt2_nemo(tmp_path, gpt2_files, library):
  vocab, merges = f'{UUID1}_vocab.json', f'{UUID2}_merges.txt'
  cfg = {'library': library, 'type': 'GPT2BPETokenizer' if library == 'megatron' else 'gpt2',
         'vocab_file': f'nemo:{vocab}', 'merge_file': f'nemo:{merges}', 'model': None}
  members = {vocab: (gpt2_files / 'vocab.json').read_bytes(),
             merges: (gpt2_files / 'merges.txt').read_bytes()}
  return nemo_tokenizer(write_nemo(tmp_path / 'g.nemo', 'tar', cfg, members))


@pytest.mark.parametrize('library', ['megatron', 'huggingface'])
def test_gpt2bpe_matches_transformers_gpt2_tokenizer(tmp_path, gpt2_files, library):
  """NeMo's GPT2BPETokenizer is HF's GPT2Tokenizer on the same vocab.json + merges.txt."""
  from transformers import GPT2Tokenizer
  ref = GPT2Tokenizer.from_pretrained(str(gpt2_files))
  tok = _gpt2_nemo(tmp_path, gpt2_files, library)
  assert tok.vocab_size == len(ref) and len(ref) > 300
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, None)
  for text in TEXTS + ['a<|endoftext|>b', "it's we've I'll"]:
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert tok.decode(ids) == ref.decode(ids) == text
  assert tok.encode('<|endoftext|>') == [tok.eos_id]


@pytest.mark.parametrize('vocab, merges, match', [
    (b'{"a": 0, "b": 1}', b'a zz\n', r'make no BPE tokenizer \(.*`zz` out of vocabulary'),
    (b'["a", "b"]', b'a b\n', 'not a JSON object of token ids')])
def test_a_corrupt_gpt2_vocabulary_is_a_clear_error(vocab, merges, match):
  """The tokenizers library raised a plain Exception (a traceback from mode=convert)."""
  with pytest.raises(ValueError, match=f'^x.nemo: .*{match}'):
    jt._gpt2_files(vocab, merges, 'x.nemo')


def test_huggingface_tokenizer_json_member(tmp_path, gpt2_files):
  """A tokenizer.json inside the archive is used as is, special ids from the NeMo config."""
  import tokenizers
  data = _gpt2_nemo(tmp_path, gpt2_files, 'megatron').files['tokenizer.json']
  member = f'{UUID3}_tokenizer.json'
  cfg = {'library': 'huggingface', 'type': 'some/hub-name', 'model': f'nemo:{member}',
         'eos_token': '<|endoftext|>'}
  tok = nemo_tokenizer(write_nemo(tmp_path / 'h.nemo', 'dir', cfg, {member: data}))
  ref = tokenizers.Tokenizer.from_str(data.decode())
  assert tok.files == {'tokenizer.json': data}
  assert (tok.bos_id, tok.eos_id) == (None, ref.token_to_id('<|endoftext|>'))
  assert tok.encode(TEXTS[0]) == ref.encode(TEXTS[0], add_special_tokens=False).ids


def test_a_tokenizer_json_saved_with_truncation_and_padding_encodes_whole_text(tmp_path,
                                                                              gpt2_files):
  """tokenizers applies a file's own truncation and padding blocks to every encode; transformers
  (NeMo's AutoTokenizer) turns them off, and so does jkd: the same ids as without them."""
  data = _gpt2_nemo(tmp_path, gpt2_files, 'megatron').files['tokenizer.json']
  spec = json.loads(data)
  spec['truncation'] = {'direction': 'Right', 'max_length': 3, 'strategy': 'LongestFirst',
                        'stride': 0}
  spec['padding'] = {'strategy': {'Fixed': 64}, 'direction': 'Right', 'pad_to_multiple_of': None,
                     'pad_id': 0, 'pad_type_id': 0, 'pad_token': '<|endoftext|>'}
  plain = jt.Tokenizer('huggingface', {'tokenizer.json': data}, bos_id=None, eos_id=0, pad_id=None)
  saved = jt.Tokenizer('huggingface', {'tokenizer.json': json.dumps(spec).encode()}, bos_id=None,
                       eos_id=0, pad_id=None)
  assert 3 < len(plain.encode(TEXTS[0])) < 64
  assert saved.encode(TEXTS[0]) == plain.encode(TEXTS[0])


def write_gguf_tokenizer(path, *, model='gpt2', pre='gpt2', tokens=(), merges=(), types=None,
                         bos=0):
  import gguf
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(list(tokens))
  w.add_token_types(types or [1] * len(tokens))
  w.add_token_merges(list(merges))
  w.add_bos_token_id(bos)
  w.add_eos_token_id(0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.fixture(scope='module')
def tiny_gguf(tmp_path_factory, gpt2_files):
  """The tiny GPT-2 vocabulary as llama.cpp writes it: token list, control types, merges."""
  vocab = json.loads((gpt2_files / 'vocab.json').read_text())
  tokens = sorted(vocab, key=vocab.get)
  merges = [l for l in (gpt2_files / 'merges.txt').read_text().splitlines()
            if l and not l.startswith('#')]
  path = tmp_path_factory.mktemp('gguf') / 'tiny.gguf'
  types = [3 if t == '<|endoftext|>' else 1 for t in tokens]
  return write_gguf_tokenizer(path, tokens=tokens, merges=merges, types=types)


def test_gguf_gpt2_vocabulary_matches_transformers(tiny_gguf, gpt2_files):
  from transformers import GPT2Tokenizer
  ref = GPT2Tokenizer.from_pretrained(str(gpt2_files))
  tok = jt.from_gguf(tiny_gguf)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (len(ref), 0, 0, None)
  for text in TEXTS + ['x<|endoftext|>y']:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize('kw, match', [({'model': 'llama'}, "tokenizer model 'llama'"),
                                       ({'pre': 'qwen2'}, "pre-tokenizer 'qwen2'")])
def test_gguf_unsupported_tokenizer_is_an_error(tmp_path, kw, match):
  path = write_gguf_tokenizer(tmp_path / 'bad.gguf', tokens=['a', 'b'], **kw)
  with pytest.raises(ValueError, match=f'bad.gguf: .*{match}'):
    jt.from_gguf(path)


@pytest.fixture(scope='module')
def smollm2():
  from transformers import AutoTokenizer
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  path = assets.smollm2_gguf(verbose=False)
  folder, name = os.path.split(path)
  ref = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  ref_ids = load_gguf_checkpoint(path, return_tensors=False)['tokenizer_config']
  return jt.from_gguf(path), ref, ref_ids


SMOLLM2_TEXTS = TEXTS + [
    '<|im_start|>user\nHello, wörld! 123  spaces\n<|im_end|>\n', '👍🏽 naïve café — “quotes”',
    'for (int i = 0; i < n; ++i) { a[i] = 12345; }', '<|endoftext|><file_sep>a<|im_end|>b',
    '\n\n\t  \r\n']
NUMERIC = 'x ½ y² 7'  # ' ½' is one GPT-2 pre-token, two after the \\p{N} split


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2):
  """The real teacher's vocabulary: control tokens whole, byte-level BPE, same special ids."""
  tok, ref, ref_ids = smollm2
  for text in SMOLLM2_TEXTS:
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert tok.decode(ids) == text
  assert tok.vocab_size == 49152
  assert tok.encode('<|im_start|>') == [tok.token_to_id('<|im_start|>')] == [1]
  # transformers 5.2 loads this GGUF as a CodeLlamaTokenizer with eos '<|im_start|>'; its own
  # GGUF metadata reader has the file's ids (eos = pad = '<|im_end|>', as on the model card).
  assert tok.bos_id == ref.bos_token_id == ref_ids['bos_token_id'] == 1
  assert (tok.eos_id, tok.pad_id) == (ref_ids['eos_token_id'], ref_ids['pad_token_id']) == (2, 2)
  assert tok.id_to_token(tok.eos_id) == '<|im_end|>'


@pytest.mark.slow
def test_smollm2_gguf_splits_numbers_like_upstream_tokenizer_json(smollm2):
  """GGUF pre 'smollm' isolates each \\p{N} (llama.cpp; HF's SmolLM2 tokenizer.json has
  Sequence[Digits(individual), ByteLevel]); transformers' GGUF loader drops that step."""
  import tokenizers
  from tokenizers import pre_tokenizers
  tok, ref, _ = smollm2
  upstream = tokenizers.Tokenizer.from_str(ref.backend_tokenizer.to_str())
  upstream.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  want = upstream.encode(NUMERIC, add_special_tokens=False).ids
  assert want != ref.encode(NUMERIC, add_special_tokens=False)  # the check can tell them apart
  assert tok.encode(NUMERIC) == want
  for text in SMOLLM2_TEXTS:
    assert tok.encode(text) == upstream.encode(text, add_special_tokens=False).ids, text


def _backends(sp_proto, gpt2_files, tiny_gguf, tmp_path):
  return {'sentencepiece': jt._sentencepiece(sp_proto),
          'gpt2bpe': _gpt2_nemo(tmp_path, gpt2_files, 'megatron'),
          'gguf': jt.from_gguf(tiny_gguf)}


@pytest.mark.parametrize('backend', ['sentencepiece', 'gpt2bpe', 'gguf'])
def test_save_load_round_trip(tmp_path, sp_proto, gpt2_files, tiny_gguf, backend):
  tok = _backends(sp_proto, gpt2_files, tiny_gguf, tmp_path)[backend]
  jt.save(tok, str(tmp_path / 'model'))
  jt.save(tok, str(tmp_path / 'model'))  # overwriting an existing tokenizer/ works
  back = jt.load(str(tmp_path / 'model'))
  assert sorted(os.listdir(tmp_path / 'model')) == ['tokenizer']
  assert back.files == tok.files and back.meta() == tok.meta()
  assert back.fingerprint == tok.fingerprint
  for text in TEXTS:
    assert back.encode(text) == tok.encode(text)


def test_fingerprint_stable_and_sensitive(sp_proto, gpt2_files, tiny_gguf, tmp_path):
  toks = _backends(sp_proto, gpt2_files, tiny_gguf, tmp_path)
  # One vocabulary reached two ways (megatron vocab/merges, GGUF token list) is one tokenizer.
  assert toks['gpt2bpe'].files == toks['gguf'].files
  assert toks['gpt2bpe'].fingerprint == toks['gguf'].fingerprint
  sp = toks['sentencepiece']
  assert len(sp.fingerprint) == 64 and sp.fingerprint != toks['gguf'].fingerprint
  assert jt._sentencepiece(bytes(sp_proto)).fingerprint == sp.fingerprint
  assert jt._sentencepiece(train_sentencepiece(450)).fingerprint != sp.fingerprint
  other_eos = jt.Tokenizer('sentencepiece', sp.files, bos_id=sp.bos_id, eos_id=5, pad_id=sp.pad_id)
  assert other_eos.fingerprint != sp.fingerprint


def test_load_missing_is_a_clear_error(tmp_path, sp_proto):
  with pytest.raises(FileNotFoundError, match='tokenizer/jkd_tokenizer.json: no tokenizer saved'):
    jt.load(str(tmp_path))
  jt.save(jt._sentencepiece(sp_proto), str(tmp_path))
  os.remove(tmp_path / 'tokenizer' / 'tokenizer.model')
  with pytest.raises(FileNotFoundError, match='tokenizer/tokenizer.model: missing'):
    jt.load(str(tmp_path))
