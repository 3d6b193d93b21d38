"""The bad-input corpus: inputs every entry point must refuse with one line naming the file.

    python tests/bad_inputs/make_corpus.py OUT_DIR

writes OUT_DIR/<kind>/ for each kind of KINDS (README.md lists them): the kind's input files
and case.json, which holds
  argv     the command after `python`, run in the case directory with the repository on
           PYTHONPATH; '{repo}' stands for the repository root
  exit     the exit code expected
  stderr   a regex the one stderr line must match in full
  names    what that line must name: the file at fault (for a config, the key)
  outputs  what the command would write, as [path, marker] pairs: after the failure the path
           (relative to the case directory) must be absent or lack the marker that makes it
           look complete: a file inside it, '' (the path itself must be absent) or
           'examples<=N' (a logit store whose train split holds at most N examples)
  limits   optional: {'fsize': bytes} (RLIMIT_FSIZE: files stop growing there, as on a full
           disk) or {'read_only': [paths]} (read-only for the command, root included)
The fixtures cases share (make_teacher's tiny teacher and data, a logit store of that teacher)
are built once, in OUT_DIR/_shared.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script: `tests` and `jkd` import from the checkout

import numpy as np  # noqa: E402

KINDS = {}  # kind -> builder(case_dir, shared) -> case dict
SHARED = '../_shared'  # the shared fixtures, seen from a case directory
K, V = 4, 300  # NeMo chunk records: top-K width and vocabulary


def kind(fn):
  KINDS[fn.__name__] = fn
  return fn


def jkd(config: str, **keys) -> list[str]:
  """argv of `python -m jkd.main` with configs/<config> and --config.<key>=<value> overrides
  (keys spelled with '__' for '.')."""
  return ['-m', 'jkd.main', '--config', f'{{repo}}/configs/{config}'] + [
      f'--config.{k.replace("__", ".")}={v}' for k, v in keys.items()]


# mode=extract on the shared teacher and data, small and in float32 (tests/test_extract.py's)
EXTRACT = dict(extract__teacher=f'{SHARED}/teacher', extract__output='store',
               data__train_file=f'{SHARED}/train.jsonl', data__format='plain',
               data__max_seq_length=256, extract__top_k=8, extract__batch_size=8,
               extract__vocab_tile=64, extract__min_bucket=16, extract__dtype='float32',
               extract__values_dtype='float32')
# mode=train of a random student on the shared store (tests/test_train_loop.py's)
TRAIN = dict(mode='train', train__store=f'{SHARED}/store', workdir='run', model__vocab_size=V,
             model__padded_vocab_size=320, data__max_seq_length=64,
             train__global_batch_size=8, train__warmup_steps=1, train__constant_steps=0,
             train__max_steps=2, train__val_check_interval=2, train__save_interval=2)
MODEL_DIR = 'model_config.json'  # what marks a jkd model directory complete


def case(argv, stderr, names, outputs=(), exit=2, **extra) -> dict:
  return dict(argv=argv, exit=exit, stderr=stderr, names=names,
              outputs=[list(o) for o in outputs], **extra)


class Shared:
  """Fixtures built on first use: make_teacher's teacher and data, a store of that teacher."""

  def __init__(self, root: Path):
    self.root = root

  @functools.cached_property
  def teacher(self) -> Path:
    from tests import test_extract
    test_extract.make_teacher(self.root)  # root/teacher (V=300, P=320) and root/train.jsonl
    return self.root / 'teacher'

  @functools.cached_property
  def store(self) -> Path:
    """The store mode=extract would write with EXTRACT's settings (same meta), with made-up
    top-K values: what a real extraction would hold is beside the point here."""
    from jkd import extract, tokenizer
    from jkd.data import chat, logit_store
    tok = tokenizer.load(str(self.teacher))
    examples = chat.read_jsonl(str(self.root / 'train.jsonl'), tok, fmt='plain',
                               max_seq_length=256)
    meta = logit_store.StoreMeta(k=8, vocab_size=V, values_dtype='float32',
                                 teacher_fingerprint=extract.fingerprint(str(self.teacher)),
                                 tokenizer_fingerprint=tok.fingerprint)
    rng = np.random.default_rng(0)
    writer = logit_store.Writer(str(self.root / 'store'), 'train', meta, process_index=0)
    for first in range(0, len(examples), 16):
      records = []
      for e in examples[first:first + 16]:
        s = len(e['tokens'])
        gaps = rng.exponential(1.0, (s, 8)).astype(np.float32)
        gaps[:, 0] = 0
        records.append(logit_store.Record(
            e['index'], e['tokens'], e['labels'], e['loss_mask'].astype(np.uint8),
            np.stack([rng.choice(V, 8, replace=False) for _ in range(s)]),
            -np.cumsum(gaps, axis=1), rng.random(s).astype(np.float32) + 0.5))
      writer.write_block(records)
    logit_store.mark_finished(str(self.root / 'store'), 'train', [e['index'] for e in examples])
    return self.root / 'store'

  def n_stored(self) -> int:
    from jkd.data import logit_store
    return len(logit_store.Reader(str(self.store), 'train', validate=False))


# --- .nemo archives (mode=convert) -----------------------------------------------------------

NEMO_CONFIG = {'num_layers': 2, 'hidden_size': 64, 'ffn_hidden_size': 128,
               'num_attention_heads': 4, 'max_position_embeddings': 64,
               'encoder_seq_length': 64, 'activation': 'gelu', 'normalization': 'layernorm',
               'position_embedding_type': 'learned_absolute', 'bias': True,
               'share_embeddings_and_output_weights': True}


def _tar(path: Path, members: dict[str, bytes | tarfile.TarInfo]) -> None:
  """A .nemo tar as NeMo writes it ('./' names); a TarInfo value is added as is."""
  with tarfile.open(path, 'w:') as tar:
    for name, data in members.items():
      if isinstance(data, tarfile.TarInfo):
        tar.addfile(data)
        continue
      info = tarfile.TarInfo(name if name.startswith(('/', '..')) else './' + name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _nemo_config() -> bytes:
  import yaml
  return yaml.safe_dump(NEMO_CONFIG).encode()


class _Call:
  """Pickles as GLOBAL fn + REDUCE(args) (protocol 2): unpickling would call fn(*args)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _torch_zip(obj) -> bytes:
  """A torch.save-style zip whose data.pkl is `obj` pickled with GLOBAL opcodes."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('archive/data.pkl', pickle.dumps(obj, protocol=2))
    z.writestr('archive/version', '3\n')
  return buf.getvalue()


def _legacy_weights() -> bytes:
  """A model_weights.ckpt holding only plain data (valid as a pickle, no tensors)."""
  return _torch_zip({'model.language_model.embedding.word_embeddings.weight': [0.0] * 8})


def _convert(source: str) -> list[str]:
  return jkd('convert.py', convert__source=source, convert__output='out')


CONVERT_OUT = [('out', MODEL_DIR)]
PWNED = ('PWNED', '')  # what the payloads would create: the case directory must not hold it


@kind
def nemo_truncated(d: Path, shared) -> dict:
  """A .nemo cut off in the middle of its weights member (a copy that did not finish)."""
  _tar(d / 'model.nemo', {'model_config.yaml': _nemo_config(),
                          'model_weights.ckpt': _legacy_weights() + bytes(8192)})
  data = (d / 'model.nemo').read_bytes()
  (d / 'model.nemo').write_bytes(data[:len(data) // 3])
  return case(_convert('model.nemo'),
              r'jkd: error: model\.nemo: truncated or corrupt tar \(.*\)', 'model.nemo',
              CONVERT_OUT)


@kind
def nemo_truncated_at_member(d: Path, shared) -> dict:
  """A .nemo cut where its second member's header begins: what is left reads as a whole tar
  of one member (tarfile stops there quietly), but the archive has no end."""
  _tar(d / 'model.nemo', {'model_config.yaml': _nemo_config(),
                          'model_weights.ckpt': _legacy_weights()})
  with tarfile.open(d / 'model.nemo') as tar:
    cut = tar.getmembers()[1].offset
  (d / 'model.nemo').write_bytes((d / 'model.nemo').read_bytes()[:cut])
  return case(_convert('model.nemo'),
              r"jkd: error: model\.nemo: truncated or corrupt tar \(no end-of-archive marker "
              r"after the last readable member, 'model_config\.yaml'\)", 'model.nemo',
              CONVERT_OUT)


@kind
def nemo_garbage(d: Path, shared) -> dict:
  """Random bytes named .nemo."""
  (d / 'model.nemo').write_bytes(np.random.default_rng(0).bytes(5000))
  return case(_convert('model.nemo'), r'jkd: error: model\.nemo: not a \.nemo tar archive .*',
              'model.nemo', CONVERT_OUT)


@kind
def nemo_pickle_os_system(d: Path, shared) -> dict:
  """A legacy model_weights.ckpt whose pickle calls os.system('touch PWNED')."""
  _tar(d / 'model.nemo', {'model_config.yaml': _nemo_config(),
                          'model_weights.ckpt': _torch_zip(_Call(os.system, 'touch PWNED'))})
  return case(_convert('model.nemo'),
              r'jkd: error: model\.nemo: model_weights\.ckpt: refusing to unpickle '
              r'(posix|os)\.system \(.*\)', 'model.nemo', CONVERT_OUT + [PWNED])


@kind
def nemo_pickle_eval_dist(d: Path, shared) -> dict:
  """A Megatron-Core torch_dist .nemo whose model_weights/.metadata pickle calls
  builtins.eval on code that would create PWNED."""
  code = "__import__('os').system('touch PWNED')"
  _tar(d / 'model.nemo', {
      'model_config.yaml': _nemo_config(),
      'model_weights/metadata.json': json.dumps({'sharded_backend': 'torch_dist'}).encode(),
      'model_weights/.metadata': pickle.dumps(_Call(eval, code), protocol=2,
                                              fix_imports=False)})
  return case(_convert('model.nemo'),
              r'jkd: error: model\.nemo: model_weights/\.metadata: refusing to unpickle '
              r'builtins\.eval \(.*\)', 'model.nemo', CONVERT_OUT + [PWNED])


@kind
def nemo_member_dotdot(d: Path, shared) -> dict:
  """A tar member named ../escaped.txt (extraction would write outside its directory)."""
  _tar(d / 'model.nemo', {'model_config.yaml': _nemo_config(), '../escaped.txt': b'x'})
  return case(_convert('model.nemo'),
              r"jkd: error: model\.nemo: unsafe member path '\.\./escaped\.txt' .*",
              'model.nemo', CONVERT_OUT + [('../escaped.txt', '')])


@kind
def nemo_member_absolute(d: Path, shared) -> dict:
  """A tar member with an absolute path."""
  target = str(d.resolve() / 'absolute.txt')
  _tar(d / 'model.nemo', {'model_config.yaml': _nemo_config(), target: b'x'})
  return case(_convert('model.nemo'),
              r"jkd: error: model\.nemo: unsafe member path '/.*absolute\.txt' .*", 'model.nemo',
              CONVERT_OUT + [('absolute.txt', '')])


@kind
def nemo_member_symlink(d: Path, shared) -> dict:
  """model_config.yaml as a symlink to /etc/passwd."""
  link = tarfile.TarInfo('./model_config.yaml')
  link.type, link.linkname = tarfile.SYMTYPE, '/etc/passwd'
  _tar(d / 'model.nemo', {'model_config.yaml': link})
  return case(_convert('model.nemo'),
              r"jkd: error: model\.nemo: member '\./model_config\.yaml' links outside the "
              r"archive \('/etc/passwd'\)", 'model.nemo', CONVERT_OUT)


@kind
def nemo_metadata_not_json(d: Path, shared) -> dict:
  """A Megatron-Core .nemo whose model_weights/metadata.json is not JSON."""
  _tar(d / 'model.nemo', {'model_config.yaml': _nemo_config(),
                          'model_weights/metadata.json': b'{"sharded_backend": torch_dist'})
  return case(_convert('model.nemo'),
              r'jkd: error: model\.nemo: model_weights/metadata\.json: invalid JSON \(.*\)',
              'model.nemo', CONVERT_OUT)


# --- configs ---------------------------------------------------------------------------------

@kind
def config_missing_keys(d: Path, shared) -> dict:
  """A config written before `distill` and `train.lr` existed."""
  (d / 'config.py').write_text(
      'from configs import base\n\n\n'
      'def get_config(arg=None):\n'
      '  c = base.get_config()\n'
      "  c.mode = 'train'\n"
      "  del c['distill']\n"
      "  del c.train['lr']\n"
      '  return c\n')
  return case(['-m', 'jkd.main', '--config', 'config.py', f'--config.train.store={SHARED}/store',
               '--config.workdir=run'],
              r'jkd: error: config: missing distill, train\.lr \(configs/base\.py declares every '
              r'key and its type\)', 'train.lr', [('run', '')])


@kind
def config_wrong_types(d: Path, shared) -> dict:
  """A config rebuilt from a plain dict with a string, an int and a number of the wrong kind."""
  (d / 'config.py').write_text(
      'from ml_collections import ConfigDict\n\n'
      'from configs import base\n\n\n'
      'def get_config(arg=None):\n'
      '  d = base.get_config().to_dict()\n'
      "  d['mode'] = 'train'\n"
      "  d['mesh']['shape'] = 8\n"
      "  d['model']['num_layers'] = '2'\n"
      "  d['train']['lr'] = '3e-4'\n"
      '  return ConfigDict(d)\n')
  return case(['-m', 'jkd.main', '--config', 'config.py', f'--config.train.store={SHARED}/store',
               '--config.workdir=run'],
              r"jkd: error: config: wrong type mesh\.shape=8 \(int, base has tuple\), "
              r"model\.num_layers='2' \(str, base has int\), train\.lr='3e-4' \(str, base has "
              r"float\) \(configs/base\.py declares every key and its type\)", 'train.lr',
              [('run', '')])


@kind
def config_syntax_error(d: Path, shared) -> dict:
  """A config file that is not Python."""
  (d / 'config.py').write_text('def get_config(arg=None):\n  return {mode: }\n')
  return case(['-m', 'jkd.main', '--config', 'config.py'],
              r'jkd: error: --config: .* \(config\.py, line 2\)', 'config.py')


@kind
def config_override_wrong_type(d: Path, shared) -> dict:
  """A command-line override of a float key with a word."""
  return case(jkd('base.py', train__lr='fast'),
              r"jkd: error: flag --config\.train\.lr=fast: could not convert string to float: "
              r"'fast'", 'train.lr')


# --- vocabularies and sequence lengths -------------------------------------------------------

@kind
def vocab_tokenizer_exceeds_model(d: Path, shared) -> dict:
  """A teacher directory whose tokenizer has more tokens than its model_config.json's
  vocab_size (ids the model has no logit for)."""
  shutil.copytree(shared.teacher, d / 'teacher')
  cfg = json.loads((d / 'teacher' / MODEL_DIR).read_text())
  (d / 'teacher' / MODEL_DIR).write_text(json.dumps({**cfg, 'vocab_size': 200}))
  return case(jkd('extract.py', **{**EXTRACT, 'extract__teacher': 'teacher'}),
              r'jkd: error: .*teacher/tokenizer: the tokenizer has 300 tokens, more than the '
              r'vocab_size 200 of .*teacher/model_config\.json', 'teacher/tokenizer',
              [('store', '')])


@kind
def vocab_student_differs_from_store(d: Path, shared) -> dict:
  """A random student with V=512 on a store of a V=300 teacher (no cross_tokenizer)."""
  shared.store  # built on first use: the case reads it from _shared
  return case(jkd('base.py', **{**TRAIN, 'model__vocab_size': 512,
                                'model__padded_vocab_size': 512}),
              r"jkd: error: \.\./_shared/store/train/manifest\.json: the teacher's vocab_size "
              r"300 differs from the student's 512 \(config\.model\): the student reads the "
              r"teacher's token ids, so both need one tokenizer \(distill\.cross_tokenizer, .*\)",
              '_shared/store/train/manifest.json', [('run', '')])


@kind
def seq_beyond_learned_positions(d: Path, shared) -> dict:
  """data.max_seq_length=256 for a teacher with 32 learned positions: NeMo truncates chat
  data to max_seq_length, but a position the table lacks has no meaning."""
  import jax

  from jkd import model, tokenizer
  cfg = dataclasses.replace(model.load_config(str(shared.teacher)),
                            position_embedding_type='learned_absolute', max_position_embeddings=32)
  model.save(str(d / 'teacher'), cfg, model.init(cfg, jax.random.key(0)))
  tokenizer.save(tokenizer.load(str(shared.teacher)), str(d / 'teacher'))
  return case(jkd('extract.py', **{**EXTRACT, 'extract__teacher': 'teacher'}),
              r'jkd: error: data\.max_seq_length=256: exceeds max_position_embeddings=32 of '
              r'teacher/model_config\.json \(.*\)', 'teacher/model_config.json',
              [('store', '')])


# --- chat data (mode=extract) ----------------------------------------------------------------

def _extract_data(d: Path, name: str, data: bytes, fmt: str = 'plain') -> list[str]:
  (d / name).write_bytes(data)
  return jkd('extract.py', **{**EXTRACT, 'data__train_file': name, 'data__format': fmt})


@kind
def data_empty_conversations(d: Path, shared) -> dict:
  """A chat record with no turns (before a good one)."""
  good = {'system': '', 'conversations': [{'from': 'User', 'value': 'hi'},
                                          {'from': 'Assistant', 'value': 'hello'}]}
  lines = [{'system': '', 'conversations': []}, good]
  argv = _extract_data(d, 'chat.jsonl', ''.join(json.dumps(r) + '\n' for r in lines).encode(),
                       fmt='chat')
  return case(argv, r"jkd: error: chat\.jsonl:1: chat record: 'conversations' must be a "
              r"non-empty list", 'chat.jsonl:1', [('store', '')])


@kind
def data_invalid_utf8(d: Path, shared) -> dict:
  """A data file whose second record holds bytes that are not UTF-8."""
  data = b'{"input": "fine", "output": "ok"}\n{"input": "caf\xe9 \xff", "output": "no"}\n'
  return case(_extract_data(d, 'data.jsonl', data),
              r"jkd: error: data\.jsonl:2: 'utf-8' codec can't decode byte .*", 'data.jsonl:2',
              [('store', '')])


@kind
def data_lone_surrogate(d: Path, shared) -> dict:
  """A record holding "\\ud83d" (valid JSON: half of an emoji a tool cut in two)."""
  data = b'{"input": "fine", "output": "ok"}\n{"input": "smile \\ud83d", "output": "no"}\n'
  return case(_extract_data(d, 'data.jsonl', data),
              r"jkd: error: data\.jsonl:2: a lone surrogate \\ud83d after "
              r"'\{\"input\": \"smile ': not Unicode text \(half of a character cut in two\?\)",
              'data.jsonl:2', [('store', '')])


@kind
def data_empty_file(d: Path, shared) -> dict:
  """A data file with blank lines only."""
  return case(_extract_data(d, 'data.jsonl', b'\n\n'),
              r'jkd: error: data\.jsonl: no records \(an empty data file\)', 'data.jsonl',
              [('store', '')])


# --- NeMo-Aligner KD chunks (python -m jkd.data.nemo_jsonl import) ---------------------------

def _chunk_records(n: int) -> list[dict]:
  """n valid NeMo KD records (spec §1.5), index 0..n-1, S=6 tokens."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    tokens = rng.integers(4, V, 7).tolist()
    gaps = np.sort(rng.exponential(1.0, (6, K)), axis=1)
    gaps[:, 0] = 0
    out.append({'tokens': tokens[:-1], 'labels': tokens[1:], 'loss_mask': [0, 0, 1, 1, 1, 1],
                'topk_logits': (-np.cumsum(gaps, axis=1)).tolist(),
                'topk_token_ids': [rng.choice(V, K, replace=False).tolist() for _ in range(6)],
                'log_sum_exp_logits': (rng.random(6) + 0.5).tolist(), 'index': i})
  return out


def _chunks(d: Path, change=None, n_chunks: int = 2, per_chunk: int = 3,
            write=range(2)) -> list[str]:
  """Chunk files c_<c>.jsonl (those in `write`) after `change(records)`; the import argv."""
  recs = _chunk_records(n_chunks * per_chunk)
  if change:
    change(recs)
  for c in write:
    with open(d / f'c_{c}.jsonl', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in recs[c * per_chunk:(c + 1) * per_chunk])
  return ['-m', 'jkd.data.nemo_jsonl', 'import', 'c_CHUNK_ID.jsonl', 'store', '--n-chunks',
          str(n_chunks), '--n-examples-per-chunk', str(per_chunk), '--k', str(K), '--vocab-size',
          str(V), '--values-dtype', 'float32']


STORE_OUT = [('store', 'examples<=0')]  # one block: a failure commits nothing


@kind
def chunk_logits_not_descending(d: Path, shared) -> dict:
  """A top-K row in ascending order (without --sort)."""
  argv = _chunks(d, lambda r: r[4]['topk_logits'][2].reverse())
  return case(argv, r'jkd: error: c_1\.jsonl:2 \(example 4\) position 2: topk_logits not '
              r'descending at k=1 .*', 'c_1.jsonl:2', STORE_OUT)


@kind
def chunk_logits_nan(d: Path, shared) -> dict:
  """A NaN top-K logit (json.dumps writes NaN, as NeMo's writer would)."""
  argv = _chunks(d, lambda r: r[1]['topk_logits'][3].__setitem__(1, float('nan')))
  return case(argv, r'jkd: error: c_0\.jsonl:2 \(example 1\) position 3: topk_logits is nan '
              r'\(not finite\)', 'c_0.jsonl:2', STORE_OUT)


@kind
def chunk_lse_inf(d: Path, shared) -> dict:
  """An infinite log_sum_exp_logits."""
  argv = _chunks(d, lambda r: r[5]['log_sum_exp_logits'].__setitem__(0, float('inf')))
  return case(argv, r'jkd: error: c_1\.jsonl:3 \(example 5\) position 0: lse is inf '
              r'\(not finite\)', 'c_1.jsonl:3', STORE_OUT)


@kind
def chunk_id_out_of_vocab(d: Path, shared) -> dict:
  """A top-K token id equal to the vocabulary size."""
  argv = _chunks(d, lambda r: r[2]['topk_token_ids'][1].__setitem__(0, V))
  return case(argv, rf'jkd: error: c_0\.jsonl:3 \(example 2\) position 1: top-K id {V} '
              rf'outside the vocabulary \[0, {V}\)', 'c_0.jsonl:3', STORE_OUT)


@kind
def chunk_files_missing(d: Path, shared) -> dict:
  """Chunk 1 of 3 was never written."""
  argv = _chunks(d, n_chunks=3, write=(0, 2))
  return case(argv, r'jkd: error: c_1\.jsonl: no such file \(1 of 3 NeMo chunk files missing: '
              r'c_1\.jsonl\)', 'c_1.jsonl', [('store', '')])


@kind
def chunk_short(d: Path, shared) -> dict:
  """A chunk with fewer records than --n-examples-per-chunk (NeMo's ChunkedJsonl would
  miscount)."""
  argv = _chunks(d, lambda r: r.pop(), per_chunk=3)
  return case(argv, r'jkd: error: c_1\.jsonl: 2 records, but n_examples_per_chunk=3',
              'c_1.jsonl', [('store', '')])


# --- logit stores ----------------------------------------------------------------------------

@kind
def store_of_another_teacher(d: Path, shared) -> dict:
  """Extraction resumed into a store that teacher A started, with teacher B (the same
  architecture and tokenizer, other weights)."""
  import jax

  from jkd import model, tokenizer
  shutil.copytree(shared.store, d / 'store')
  cfg = model.load_config(str(shared.teacher))
  model.save(str(d / 'teacher_b'), cfg, model.init(cfg, jax.random.key(1)))
  tokenizer.save(tokenizer.load(str(shared.teacher)), str(d / 'teacher_b'))
  return case(jkd('extract.py', **{**EXTRACT, 'extract__teacher': 'teacher_b'}),
              r"jkd: error: store/train: existing store has teacher_fingerprint='[0-9a-f]+', "
              r"writer asked teacher_fingerprint='[0-9a-f]+' \(another teacher made it\); "
              r'write to another store \(extract\.output\) or use the settings it was made with',
              'store/train',
              [('store', f'examples<={shared.n_stored()}')])


@kind
def store_block_missing(d: Path, shared) -> dict:
  """A store whose manifest lists a block that is gone from blocks/."""
  shutil.copytree(shared.store, d / 'store')
  blocks = d / 'store' / 'train' / 'blocks'
  shutil.rmtree(blocks / sorted(os.listdir(blocks))[0])
  return case(jkd('base.py', **{**TRAIN, 'train__store': 'store'}),
              r'jkd: error: store/train: block p00000-b000000 is listed in the manifest but '
              r'missing from blocks/', 'store/train', [('run/checkpoints', '')])


@kind
def store_unfinished(d: Path, shared) -> dict:
  """A store whose extraction was killed: its committed blocks read fine, but no finished job
  covers them (no finished.json), so it must not pass for a smaller complete store."""
  shutil.copytree(shared.store, d / 'store')
  os.remove(d / 'store' / 'train' / 'finished.json')
  return case(jkd('base.py', **{**TRAIN, 'train__store': 'store'}),
              r'jkd: error: store/train: 48 of 48 examples \(indices 0\.\.47\) are from an '
              r'extraction or import that did not finish; rerun it with the same settings to '
              r'complete the split', 'store/train', [('run/checkpoints', '')])


@kind
def store_chunk_never_ran(d: Path, shared) -> dict:
  """A store whose chunk jobs finished, but one chunk's job never ran: the data had 64
  examples, the finished jobs cover 0..47."""
  shutil.copytree(shared.store, d / 'store')
  finished = d / 'store' / 'train' / 'finished.json'
  finished.write_text(json.dumps({**json.loads(finished.read_text()), 'total': 64}))
  return case(jkd('base.py', **{**TRAIN, 'train__store': 'store'}),
              r"jkd: error: store/train: 16 of the data's 64 examples \(indices 48\.\.63\) were "
              r'never extracted \(their job did not run\); extract them .*', 'store/train',
              [('run/checkpoints', '')])


@kind
def model_config_wrong_type(d: Path, shared) -> dict:
  """A model directory whose model_config.json says "bias": "false" (a string, which was
  taken as true)."""
  (d / 'model').mkdir()
  shutil.copytree(shared.teacher / 'params', d / 'model' / 'params')
  config = json.loads((shared.teacher / MODEL_DIR).read_text())
  (d / 'model' / MODEL_DIR).write_text(json.dumps({**config, 'bias': 'false'}))
  return case(jkd('export.py', export__source='model', export__hf='hf'),
              r"jkd: error: model/model_config\.json: model\.bias='false': must be true or "
              r'false', 'model/model_config.json', [('hf', '')])


# --- outputs ---------------------------------------------------------------------------------

@kind
def output_read_only(d: Path, shared) -> dict:
  """The run directory's parent is read-only."""
  (d / 'locked').mkdir()
  shared.store  # built on first use: the case reads it from _shared
  return case(jkd('base.py', **{**TRAIN, 'workdir': 'locked/run'}),
              r'jkd: error: locked/run: Permission denied', 'locked/run', [('locked/run', '')],
              limits={'read_only': ['locked']})


@kind
def disk_full(d: Path, shared) -> dict:
  """An HF export over a killed one, on a disk that fills: no file can grow past 16 KiB (the
  model has no tokenizer, so the weights are the first file to reach it). Neither the killed
  export's shard nor the cut one survives, and no config.json marks the directory complete.
  (An earlier complete export, config.json and all, is refused before anything is written.)"""
  (d / 'model').mkdir()
  shutil.copytree(shared.teacher / 'params', d / 'model' / 'params')
  shutil.copy(shared.teacher / MODEL_DIR, d / 'model')
  (d / 'hf').mkdir()
  (d / 'hf' / 'model-00001.safetensors.partial').write_bytes(b'cut')  # the killed export's
  return case(jkd('export.py', export__source='model', export__hf='hf', export__dtype='float32'),
              r'jkd: error: .*hf/model-00001\.safetensors\.partial: .*File too large.*',
              'hf/model-00001.safetensors.partial',
              [('hf', 'config.json'), ('hf', 'model-00001.safetensors.partial')],
              limits={'fsize': 16 << 10})


def build(out: Path, kinds=None) -> dict[str, dict]:
  """Writes the corpus (the kinds named, default all) into `out`; returns {kind: case}."""
  shared = Shared(out / '_shared')
  shared.root.mkdir(parents=True, exist_ok=True)
  cases = {}
  for name in kinds or KINDS:
    d = out / name
    d.mkdir(parents=True)
    cases[name] = KINDS[name](d, shared)
    (d / 'case.json').write_text(json.dumps(cases[name], indent=1) + '\n')
  return cases


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit(__doc__.split('\n\n')[1])
  print(f'{len(build(Path(sys.argv[1])))} cases in {sys.argv[1]}')
