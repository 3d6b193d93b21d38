"""Tokenizers of teachers and students: read from `.nemo` or GGUF, kept in a model directory.

Two backends cover every source: SentencePiece (a `.model` proto) and Hugging Face
`tokenizers` (a `tokenizer.json`). Megatron's GPT2BPETokenizer (vocab.json + merges.txt) and
GGUF `gpt2` vocabularies are turned into a byte-level BPE `tokenizer.json`, which is what HF's
GPT2Tokenizer builds too. `encode` never adds BOS/EOS, as NeMo's `text_to_ids`; callers add
them. A model directory holds `tokenizer/` with the files and `jkd_tokenizer.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

META_FILE = 'jkd_tokenizer.json'
SP_FILE, HF_FILE = 'tokenizer.model', 'tokenizer.json'
# GGUF `tokenizer.ggml.pre` -> split digits one by one before GPT-2's regex (llama.cpp's
# STARCODER group, which SmolLM belongs to; HF's SmolLM2 tokenizer.json does the same).
_GGUF_PRE_DIGITS = {'gpt2': False, 'smollm': True, 'starcoder': True}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # gguf.TokenType


class Tokenizer:
  """Text <-> ids with one backend; `files` are the bytes that rebuild it exactly."""

  def __init__(self, library: str, files: dict[str, bytes], *, bos_id: int | None,
               eos_id: int | None, pad_id: int | None):
    self.library, self.files = library, dict(files)
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    need = {'sentencepiece': SP_FILE, 'huggingface': HF_FILE}.get(library)
    if need is not None and need not in files:
      raise ValueError(f'{library} tokenizer without its {need}')
    if library == 'sentencepiece':
      self._sp = spm.SentencePieceProcessor(model_proto=files[SP_FILE])
      self.vocab_size = self._sp.vocab_size()
    elif library == 'huggingface':
      self._hf = tokenizers.Tokenizer.from_str(files[HF_FILE].decode('utf-8'))
      # A tokenizer.json saved with truncation or padding would cut or pad every encode;
      # transformers (NeMo's AutoTokenizer) turns both off unless asked, and so does jkd.
      self._hf.no_truncation()
      self._hf.no_padding()
      self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
    else:
      raise ValueError(f'tokenizer library {library!r}: expected sentencepiece or huggingface')

  def encode(self, text: str) -> list[int]:
    if self.library == 'sentencepiece':
      return self._sp.encode(text)
    return self._hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.library == 'sentencepiece':
      return self._sp.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=False)

  def token_to_id(self, piece: str) -> int | None:
    if self.library == 'sentencepiece':
      i = self._sp.piece_to_id(piece)  # unknown pieces map to unk: check the round trip
      return i if self._sp.id_to_piece(i) == piece else None
    return self._hf.token_to_id(piece)

  def id_to_token(self, i: int) -> str:
    if not 0 <= int(i) < self.vocab_size:
      raise ValueError(f'token id {i} outside the vocabulary [0, {self.vocab_size})')
    if self.library == 'sentencepiece':
      return self._sp.id_to_piece(int(i))
    return self._hf.id_to_token(int(i))

  def meta(self) -> dict:
    """What `jkd_tokenizer.json` holds besides the files."""
    return {'library': self.library, 'files': sorted(self.files), 'bos_id': self.bos_id,
            'eos_id': self.eos_id, 'pad_id': self.pad_id, 'vocab_size': self.vocab_size}

  @property
  def fingerprint(self) -> str:
    """sha256 over the files and `meta()`: changes when the files or special ids do."""
    h = hashlib.sha256(json.dumps(self.meta(), sort_keys=True).encode())
    for name in sorted(self.files):
      h.update(f'\n{name}\n{len(self.files[name])}\n'.encode())
      h.update(self.files[name])
    return h.hexdigest()


def _sentencepiece(proto: bytes) -> Tokenizer:
  sp = spm.SentencePieceProcessor(model_proto=proto)
  ids = [i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id())]
  return Tokenizer('sentencepiece', {SP_FILE: proto}, bos_id=ids[0], eos_id=ids[1], pad_id=ids[2])


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], where: str, *,
                    special: Sequence[str] = (), added: Sequence[str] = (),
                    split_digits: bool = False, add_prefix_space: bool = False
                    ) -> tokenizers.Tokenizer:
  """GPT-2's byte-level BPE (the components of HF's GPT2Tokenizer); ValueError naming `where`
  when the vocabulary and merges do not make one."""
  try:
    bpe = models.BPE(vocab, merges, fuse_unk=False)
  except Exception as e:  # tokenizers raises plain Exception (a merge of an unknown token, ...)
    raise ValueError(f'{where}: the vocabulary and merges make no BPE tokenizer ({e}): a '
                     'corrupt tokenizer') from None
  tok = tokenizers.Tokenizer(bpe)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                byte_level]) if split_digits else byte_level)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in special])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in added])
  return tok


def _gpt2_files(vocab_json: bytes, merges_txt: bytes, where: str) -> Tokenizer:
  """Megatron's GPT2BPETokenizer: HF GPT-2 with `<|endoftext|>` as BOS and EOS, no pad."""
  try:
    vocab = json.loads(vocab_json)
    lines = merges_txt.decode('utf-8').splitlines()
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{where}: unreadable vocab/merges file ({e})') from None
  merges = [tuple(l.split()) for l in lines if l.strip() and not l.startswith('#version')]
  if any(len(m) != 2 for m in merges):
    raise ValueError(f'{where}: merges file has a line that is not two tokens')
  if not (isinstance(vocab, dict) and all(isinstance(i, int) for i in vocab.values())):
    raise ValueError(f'{where}: the vocab file is not a JSON object of token ids')
  eot = '<|endoftext|>' if '<|endoftext|>' in vocab else None
  tok = _byte_level_bpe(vocab, merges, where, special=[eot] if eot else [])
  return Tokenizer('huggingface', {HF_FILE: tok.to_str().encode()}, bos_id=vocab.get(eot),
                   eos_id=vocab.get(eot), pad_id=None)


def from_nemo(archive, tokenizer_cfg: dict, where: str) -> Tokenizer:
  """The tokenizer a `.nemo` config section names (`archive`: a NemoArchive)."""
  cfg = tokenizer_cfg or {}
  library = cfg.get('library')

  def read(key: str) -> bytes | None:
    ref = cfg.get(key)
    if not ref:
      return None
    with archive.open(archive.resolve(str(ref), f'tokenizer.{key}')) as f:
      return f.read()

  if library == 'sentencepiece':
    if cfg.get('special_tokens'):  # NeMo's legacy mode appends them; never seen in a .nemo
      raise ValueError(f'{where}: sentencepiece special_tokens are not supported')
    proto = read('model') or read('tokenizer_model')
    if proto is None:
      raise ValueError(f'{where}: sentencepiece tokenizer without tokenizer.model')
    try:
      return _sentencepiece(proto)
    except RuntimeError as e:
      raise ValueError(f'{where}: tokenizer.model is not a SentencePiece model ({e})') from None
  if library == 'megatron':
    if cfg.get('type') != 'GPT2BPETokenizer':
      raise ValueError(f'{where}: megatron tokenizer type {cfg.get("type")!r} is not supported '
                       f'(only GPT2BPETokenizer)')
    vocab, merges = read('vocab_file'), read('merge_file')
    if vocab is None or merges is None:
      raise ValueError(f'{where}: GPT2BPETokenizer needs vocab_file and merge_file')
    return _gpt2_files(vocab, merges, where)
  if library == 'huggingface':
    # NeMo names HF tokenizers by hub id (`type`); offline only files in the archive count.
    for key in ('model', 'tokenizer_model'):
      if str(cfg.get(key) or '').endswith(HF_FILE):
        data = read(key)
        try:
          tok = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
          raise ValueError(f'{where}: tokenizer.{key} is not a tokenizer.json ({e})') from None
        ids = [tok.token_to_id(cfg[k]) if cfg.get(k) else None
               for k in ('bos_token', 'eos_token', 'pad_token')]
        return Tokenizer('huggingface', {HF_FILE: data}, bos_id=ids[0], eos_id=ids[1],
                         pad_id=ids[2])
    if cfg.get('vocab_file') and cfg.get('merge_file'):
      return _gpt2_files(read('vocab_file'), read('merge_file'), where)
    raise ValueError(f'{where}: huggingface tokenizer {cfg.get("type")!r} has no tokenizer.json '
                     f'or vocab/merges files in the archive (hub downloads are not possible)')
  raise ValueError(f'{where}: tokenizer library {library!r} is not supported '
                   f'(sentencepiece, megatron GPT2BPETokenizer, huggingface)')


def from_gguf(path: str) -> Tokenizer | None:
  """The tokenizer in a GGUF file's metadata (llama.cpp `gpt2` BPE vocabularies); None if the
  file carries no tokenizer at all."""
  from third_party.convert import gguf_metadata
  try:
    meta = gguf_metadata.read_metadata(path)
  except OSError as e:
    raise ValueError(f'{path}: not a readable GGUF file ({e})') from None

  def field(key, default=None):
    return meta.get(f'tokenizer.ggml.{key}', default)

  kind, pre = field('model'), field('pre')
  if kind is None and field('tokens') is None:
    return None
  if kind != 'gpt2':
    raise ValueError(f'{path}: GGUF tokenizer model {kind!r} is not supported (only gpt2 BPE)')
  if pre not in _GGUF_PRE_DIGITS:
    raise ValueError(f'{path}: GGUF pre-tokenizer {pre!r} is not supported '
                     f'({", ".join(sorted(_GGUF_PRE_DIGITS))})')
  tokens, merges = field('tokens'), field('merges')
  if not tokens or merges is None:
    raise ValueError(f'{path}: GGUF tokenizer without tokenizer.ggml.tokens or merges')
  if not (isinstance(tokens, list) and isinstance(merges, list)
          and all(isinstance(s, str) for s in tokens + merges)):
    raise ValueError(f'{path}: GGUF tokenizer.ggml.tokens and merges are not arrays of '
                     'strings: a corrupt tokenizer; re-convert the model')
  types = field('token_type') or [0] * len(tokens)
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f'{path}: GGUF vocabulary has duplicate tokens')
  pairs = [tuple(m.split(' ', 1)) for m in merges]
  bad = next((i for i, p in enumerate(pairs) if len(p) != 2), None)
  if bad is not None:
    raise ValueError(f'{path}: GGUF merge {bad} ({merges[bad]!r}) is not two tokens split by a '
                     'space: a corrupt tokenizer; re-convert the model')
  tok = _byte_level_bpe(
      vocab, pairs, f'{path}: GGUF tokenizer',
      special=[t for t, k in zip(tokens, types) if k == _GGUF_CONTROL],
      added=[t for t, k in zip(tokens, types) if k == _GGUF_USER_DEFINED],
      split_digits=_GGUF_PRE_DIGITS[pre], add_prefix_space=bool(field('add_space_prefix', False)))
  ids = {k: field(f'{k}_token_id') for k in ('bos', 'eos', 'padding')}
  for k, i in ids.items():  # an export looks them up by id: failing there, after training
    if i is not None and not (isinstance(i, int) and 0 <= i < len(tokens)):
      raise ValueError(f'{path}: GGUF tokenizer.ggml.{k}_token_id={i!r} is not a token id of its '
                       f'{len(tokens)}: a corrupt tokenizer; re-convert the model')
  return Tokenizer('huggingface', {HF_FILE: tok.to_str().encode()}, bos_id=ids['bos'],
                   eos_id=ids['eos'], pad_id=ids['padding'])


def warn_if_not_the_stores(tok: Tokenizer | None, model_dir: str, store: str,
                           store_fingerprint: str, what: str) -> None:
  """A warning when a model's tokenizer is not the one a logit store was extracted with
  (`store_fingerprint`; '' when the store does not know): the model reads the store's token
  ids. Not an error: another format of one vocabulary (a tokenizer.json and a SentencePiece
  model, say) gives the same ids with other files."""
  if tok is not None and store_fingerprint not in ('', tok.fingerprint):
    print(f'[{what}] warning: the tokenizer of {model_dir} is not the one {store} was '
          'extracted with (other files or special ids): the model reads the store\'s token '
          'ids, so check that both tokenizers give the same ids')


def save(tok: Tokenizer, model_dir: str) -> None:
  """Writes `model_dir/tokenizer/` (files, then the metadata) and swaps it in by rename."""
  final = os.path.join(model_dir, 'tokenizer')
  tmp = final + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name, data in tok.files.items():
    with open(os.path.join(tmp, name), 'wb') as f:
      f.write(data)
  with open(os.path.join(tmp, META_FILE), 'w') as f:
    json.dump(tok.meta(), f, indent=2, sort_keys=True)
  shutil.rmtree(final, ignore_errors=True)
  os.replace(tmp, final)


def load_if_saved(model_dir: str) -> Tokenizer | None:
  """The tokenizer of `model_dir`, or None when it has none (no `tokenizer/` folder)."""
  return load(model_dir) if os.path.isdir(os.path.join(model_dir, 'tokenizer')) else None


def load(model_dir: str) -> Tokenizer:
  """The tokenizer `save` wrote into `model_dir`."""
  folder = os.path.join(model_dir, 'tokenizer')
  meta_path = os.path.join(folder, META_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f'{meta_path}: no tokenizer saved in {model_dir}')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{meta_path}: invalid JSON: {e}') from None
  files = {}
  for name in meta['files']:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: missing (listed in {META_FILE})')
    with open(path, 'rb') as f:
      files[name] = f.read()
  try:
    tok = Tokenizer(meta['library'], files, bos_id=meta['bos_id'], eos_id=meta['eos_id'],
                    pad_id=meta['pad_id'])
  except Exception as e:  # sentencepiece and tokenizers raise RuntimeError / plain Exception
    raise ValueError(f'{folder}: cannot rebuild the tokenizer ({e})') from None
  if tok.vocab_size != meta['vocab_size']:
    raise ValueError(f'{meta_path}: vocab_size {meta["vocab_size"]} but the files give '
                     f'{tok.vocab_size}')
  from jkd import model  # deferred: jax
  config_path = os.path.join(model_dir, model.CONFIG_FILE)
  if os.path.isfile(config_path):  # ids without a logit in the model would be clipped silently
    vocab = model.load_config(model_dir).vocab_size
    if tok.vocab_size > vocab:
      raise ValueError(f'{folder}: the tokenizer has {tok.vocab_size} tokens, more than the '
                       f'vocab_size {vocab} of {config_path}')
  return tok
