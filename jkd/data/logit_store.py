"""The logit store: the teacher's top-K logits per token on disk (TensorStore zarr3).

The only module that knows the layout (schema: docs/logit_store.md). A split is a directory of
blocks; a block is a set of examples concatenated along tokens, written to a temp directory and
renamed into place, then listed in its process's manifest file (replaced atomically), so a crash
never leaves a block that reads as complete. Every write, import and read checks ids within the
vocabulary, descending finite values and counts against the manifest, and raises one clear line.

Legend: S tokens of an example, R its stored top-K rows (S, or its loss-mask positions when
`masked_only`), T / N tokens / rows of a block, K top-K width, V vocabulary size.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import uuid

import ml_dtypes
import numpy as np
import tensorstore as ts

from jkd import faults, files

FORMAT = 'jkd-logit-store'
SCHEMA_VERSION = 1
VALUES_DTYPES = ('bfloat16', 'float32')
CODECS = ('zstd', 'none')
TOKENS_PER_CHUNK = 4096  # per-token arrays: one small chunk covers most examples
ROWS_PER_CHUNK = 64  # top-K arrays: a random example over-reads < 2 * 64 rows
CACHE_BYTES = 64 << 20  # decoded-chunk cache per Reader (per Grain worker)
# Blocks a Reader keeps open, the least recently used closed first: a store has a block per
# extraction batch, and an open one holds its arrays' TensorStore handles (measured: 90 MiB for
# 4000 blocks, growing with the store), while reopening one costs some 2 ms (an example's read
# took 1.1 ms with its block open, 3.0 ms with 1024 of 4000 open, in random order).
OPEN_BLOCKS = 8192
_ARRAYS = ('tokens', 'labels', 'loss_mask', 'lse', 'topk_ids', 'topk_logits')
_BLOCK_RE = re.compile(r'^p(\d{5,})-b(\d{6,})$')  # the widths grow past 99999 / 999999


def _block_key(name: str) -> tuple[int, int]:
  """(process index, sequence number) of a block name: its order, past 6 digits too."""
  m = _BLOCK_RE.match(name)
  if m is None:
    raise ValueError(f'logit store: {name!r} is not a block name (p<process>-b<sequence>)')
  return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class StoreMeta:
  """What a split stores; fixed when the split is created, checked on every reopen."""
  k: int
  vocab_size: int
  values_dtype: str = 'bfloat16'
  teacher_fingerprint: str = ''
  tokenizer_fingerprint: str = ''
  masked_only: bool = False
  codec: str = 'zstd'
  teacher_dtype: str = ''  # the teacher forward's compute dtype; '' not recorded (an import)

  def __post_init__(self):
    if self.k < 1 or self.vocab_size < 1:
      raise ValueError(f'StoreMeta: k={self.k} and vocab_size={self.vocab_size} must be >= 1')
    if self.values_dtype not in VALUES_DTYPES:
      raise ValueError(f'StoreMeta: values_dtype={self.values_dtype!r}, expected one of {VALUES_DTYPES}')
    if self.codec not in CODECS:
      raise ValueError(f'StoreMeta: codec={self.codec!r}, expected one of {CODECS}')

  @property
  def ids_dtype(self) -> str:
    """Smallest lossless id type; int32's zero high byte costs nothing after the byte shuffle."""
    return 'uint16' if self.vocab_size <= 1 << 16 else 'int32'


@dataclasses.dataclass(eq=False)
class Record:
  """One example: inputs, targets, mask and the teacher's top-K per position (NeMo's fields)."""
  index: int
  tokens: np.ndarray  # int32[S]
  labels: np.ndarray  # int32[S]
  loss_mask: np.ndarray  # uint8[S]
  topk_ids: np.ndarray  # int32[S, K]
  topk_logits: np.ndarray  # float32[S, K], descending, first 0.0 (max-shifted)
  lse: np.ndarray  # float32[S], logsumexp of the max-shifted full-vocabulary logits


def check_record(rec: Record, meta: StoreMeta, *, sort: bool = False, where: str = '') -> Record:
  """Validated copy of `rec` in stored dtypes; `sort=True` sorts rows that are not descending."""
  where = where or f'example {rec.index}'
  if int(rec.index) < 0:
    raise ValueError(f'{where}: example indices must be >= 0')
  tokens = np.asarray(rec.tokens)
  s = tokens.shape[0] if tokens.ndim == 1 else -1
  shapes = {'tokens': (s,), 'labels': (s,), 'loss_mask': (s,), 'topk_ids': (s, meta.k),
            'topk_logits': (s, meta.k), 'lse': (s,)}
  arrays = {name: np.asarray(getattr(rec, name)) for name in shapes}
  for name in ('topk_ids', 'topk_logits'):  # an empty example's rows as JSON has them: []
    if s == 0 and arrays[name].shape == (0,):
      arrays[name] = arrays[name].reshape(0, meta.k)
  for name, shape in shapes.items():
    if arrays[name].shape != shape:
      raise ValueError(f'{where}: {name} has shape {list(arrays[name].shape)}, expected '
                       f'{list(shape)} (S=len(tokens), K={meta.k})')
  mask = arrays['loss_mask']
  if not np.isin(mask, (0, 1)).all():
    raise ValueError(f'{where} position {int(np.flatnonzero(~np.isin(mask, (0, 1)))[0])}: '
                     'loss_mask is not 0 or 1')
  rows_R = np.flatnonzero(mask) if meta.masked_only else np.arange(s)
  ids_RxK = arrays['topk_ids'][rows_R]
  vals_RxK = arrays['topk_logits'][rows_R].astype(np.float32)
  _check_ids(arrays['tokens'], meta, where, 'token', np.arange(s))
  _check_ids(arrays['labels'][mask == 1], meta, where, 'label', np.flatnonzero(mask))
  order = _check_values(ids_RxK, vals_RxK, arrays['lse'][rows_R], meta, where, rows_R, sort)
  if order is not None:
    full_ids, full_vals = arrays['topk_ids'].copy(), arrays['topk_logits'].astype(np.float32)
    full_ids[rows_R] = np.take_along_axis(ids_RxK, order, 1)
    full_vals[rows_R] = np.take_along_axis(vals_RxK, order, 1)
    arrays['topk_ids'], arrays['topk_logits'] = full_ids, full_vals
  return Record(int(rec.index), arrays['tokens'].astype(np.int32), arrays['labels'].astype(np.int32),
                mask.astype(np.uint8), arrays['topk_ids'].astype(np.int32),
                arrays['topk_logits'].astype(np.float32), arrays['lse'].astype(np.float32))


def _check_ids(ids, meta, where, what, positions):
  if ids.dtype.kind == 'f':  # from JSON, say: 4.0 is an id, 4.5 (or NaN, Infinity) no id at all
    bad = ~np.isfinite(ids) | (ids != np.round(ids))
    if bad.any():
      r = np.argwhere(bad)[0]
      raise ValueError(f'{where} position {int(positions[r[0]])}: {what} id {ids[tuple(r)]} '
                       'is not an integer')
  bad = (ids < 0) | (ids >= meta.vocab_size)
  if bad.any():
    r = np.argwhere(bad)[0]
    raise ValueError(f'{where} position {int(positions[r[0]])}: {what} id {int(ids[tuple(r)])} '
                     f'outside the vocabulary [0, {meta.vocab_size})')


def _check_values(ids_RxK, vals_RxK, lse_R, meta, where, positions, sort):
  """Raises on bad ids or values; returns the row sort order when `sort` must fix the order."""
  _check_ids(ids_RxK, meta, where, 'top-K', positions)
  stored_vals = vals_RxK.astype(_VALUE_DTYPES[meta.values_dtype])  # as written: may overflow
  for name, x, stored in (('topk_logits', vals_RxK, stored_vals),
                          ('lse', lse_R, lse_R.astype(np.float32))):
    if not np.isfinite(stored).all():
      r = tuple(np.argwhere(~np.isfinite(stored))[0])
      why = ('not finite' if not np.isfinite(x[r]) else
             f"overflows the store's {stored.dtype} to {float(stored[r])}")
      raise ValueError(f'{where} position {int(positions[r[0]])}: {name} is {float(x[r]):.7g} '
                       f'({why})')
  bad = vals_RxK[:, 1:] > vals_RxK[:, :-1]
  if not bad.any():
    return None
  if sort:
    return np.argsort(-vals_RxK, axis=1, kind='stable')
  r, k = np.argwhere(bad)[0]
  raise ValueError(f'{where} position {int(positions[r])}: topk_logits not descending at k={k + 1} '
                   f'({vals_RxK[r, k + 1]} > {vals_RxK[r, k]}); pass sort=True to sort the rows')


_VALUE_DTYPES = {'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}


def _encode_values(vals_NxK, values_dtype):
  """Bit patterns delta-coded along K (mod 2**bits): lossless, small for descending rows."""
  bits = vals_NxK.astype(_VALUE_DTYPES[values_dtype])
  bits = bits.view(np.uint16 if values_dtype == 'bfloat16' else np.uint32)
  return np.diff(bits, axis=1, prepend=np.zeros((bits.shape[0], 1), bits.dtype))


def _decode_values(delta_NxK, values_dtype):
  bits = np.cumsum(delta_NxK, axis=1, dtype=delta_NxK.dtype)  # wraps like the encoder
  return (bits.view(ml_dtypes.bfloat16) if values_dtype == 'bfloat16' else bits.view(np.float32)
          ).astype(np.float32)


def _array_dtypes(meta):
  return {'tokens': 'int32', 'labels': 'int32', 'loss_mask': 'uint8', 'lse': 'float32',
          'topk_ids': meta.ids_dtype,
          'topk_logits': 'uint16' if meta.values_dtype == 'bfloat16' else 'uint32'}


def _zarr_spec(path, shape, dtype, codec):
  """One shard file per array per block; inner chunks sized for single-example reads."""
  rows = ROWS_PER_CHUNK if len(shape) == 2 else TOKENS_PER_CHUNK
  inner = [rows] + list(shape[1:])
  outer = [max(1, -(-shape[0] // rows)) * rows] + list(shape[1:])
  size = np.dtype(dtype).itemsize
  inner_codecs = [{'name': 'bytes', 'configuration': {'endian': 'little'}}]
  if codec == 'zstd':
    inner_codecs.append({'name': 'blosc', 'configuration': {
        'cname': 'zstd', 'clevel': 1, 'shuffle': 'shuffle' if size > 1 else 'noshuffle',
        'typesize': size, 'blocksize': 0}})
  return {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': path}, 'metadata': {
      'shape': list(shape), 'data_type': dtype,
      'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': outer}},
      'codecs': [{'name': 'sharding_indexed', 'configuration': {
          'chunk_shape': inner, 'codecs': inner_codecs,
          'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}},
                           {'name': 'crc32c'}]}}]}}


def _write_json(path, obj):
  """Replace `path` atomically (temp file, fsync, rename)."""
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
    f.flush()
    os.fsync(f.fileno())
  faults.point('store.json_written')
  os.replace(tmp, path)


def _read_json(path, what):
  try:
    with open(path) as f:
      obj = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'{what}: {path} is missing') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{what}: {path} is not valid JSON ({e})') from None
  if not isinstance(obj, dict):  # every file of the store holds one object
    raise ValueError(f'{what}: {path} holds a JSON {type(obj).__name__}, not an object')
  return obj


def _runs(indices):
  """[5, 6, 7, 1, 2] -> [[5, 8], [1, 3]]: order-preserving half-open runs."""
  runs = []
  for i in indices:
    if runs and runs[-1][1] == i:
      runs[-1][1] += 1
    else:
      runs.append([i, i + 1])
  return runs


def _unruns(runs):
  return np.concatenate([np.arange(a, b) for a, b in runs]) if runs else np.zeros(0, np.int64)


def _meta_json(meta):
  return {'format': FORMAT, 'schema_version': SCHEMA_VERSION, **dataclasses.asdict(meta),
          'ids_dtype': meta.ids_dtype, 'values_encoding': 'delta_bits',
          'rows_per_chunk': ROWS_PER_CHUNK, 'tokens_per_chunk': TOKENS_PER_CHUNK}


_ADDED_LATER = {'teacher_dtype': ''}  # fields a store written before them reads as unrecorded


def inputs_digest(examples) -> str:
  """sha256 of [(index, tokens, labels, loss_mask)] in stored dtypes: what a block was made
  from, so that a resumed job can tell whether its data still gives the same examples."""
  digest = hashlib.sha256()
  for index, tokens, labels, loss_mask in examples:
    arrays = (np.asarray(tokens, '<i4'), np.asarray(labels, '<i4'), np.asarray(loss_mask, 'u1'))
    digest.update(np.array([index, len(arrays[0])], '<i8').tobytes())
    for a in arrays:
      digest.update(a.tobytes())
  return digest.hexdigest()


def read_meta(split_dir: str) -> StoreMeta:
  """The split's StoreMeta from manifest.json, after checking format and schema version."""
  m = _read_json(os.path.join(split_dir, 'manifest.json'), 'logit store')
  if m.get('format') != FORMAT or m.get('schema_version') != SCHEMA_VERSION:
    raise ValueError(f'{split_dir}/manifest.json: format {m.get("format")!r} schema '
                     f'{m.get("schema_version")!r}, this jkd reads {FORMAT!r} schema {SCHEMA_VERSION}')
  try:
    fields = {**_ADDED_LATER, **m}
    return StoreMeta(**{f.name: fields[f.name] for f in dataclasses.fields(StoreMeta)})
  except KeyError as e:
    raise ValueError(f'{split_dir}/manifest.json: field {e} missing') from None


def _process_manifests(split_dir):
  """{manifest path: its blocks} for every manifest.pNNNNN.json of the split."""
  out = {}
  for path in sorted(glob.glob(os.path.join(split_dir, 'manifest.p[0-9]*.json'))):
    m = _read_json(path, 'logit store')
    if m.get('schema_version') != SCHEMA_VERSION or not isinstance(m.get('blocks'), list):
      raise ValueError(f'{path}: not a schema {SCHEMA_VERSION} process manifest')
    out[path] = m['blocks']
  return out


FINISHED_FILE = 'finished.json'


def _finished(split_dir: str) -> tuple[np.ndarray, int | None]:
  """(the example indices finished jobs recorded in the split, none before the first; the
  number of examples of the data they were extracted from, None where no job recorded it)."""
  path = os.path.join(split_dir, FINISHED_FILE)
  if not os.path.exists(path):
    return np.zeros(0, np.int64), None
  m = _read_json(path, 'logit store')
  total = m.get('total')
  if total is not None and (type(total) is not int or total < 0):
    raise ValueError(f'logit store: {path}: total {total!r} is not a count of examples')
  return _unruns(m['indices']), total


def mark_finished(root: str, split: str, indices, total: int | None = None) -> None:
  """Records that a job (an extraction or import of `indices`) finished: every example it was
  asked for is committed. Blocks commit one by one, so without this a killed job's store would
  read as a smaller, complete one; training checks it (`check_finished`). `total`: how many
  examples the job's data holds (indices 0..total-1), so that a range no job ran (a chunk job
  that never started) is missed too; None keeps what an earlier job recorded."""
  split_dir = os.path.join(root, split)
  before, before_total = _finished(split_dir)
  _check_total(split_dir, before_total, total, 'this job\'s data')  # extract.run checked first
  done = set(indices) | set(before.tolist())
  record = {'schema_version': SCHEMA_VERSION, 'indices': _runs(sorted(done))}
  total = before_total if total is None else total
  if total is not None:
    record['total'] = total
  _write_json(os.path.join(split_dir, FINISHED_FILE), record)


def check_total(root: str, split: str, total: int, source: str) -> None:
  """Refuses to extend a split with a job on data of another size than its finished jobs',
  before anything runs (`source` names the data)."""
  split_dir = os.path.join(root, split)
  _check_total(split_dir, _finished(split_dir)[1] if os.path.isdir(split_dir) else None, total,
               source)


def _check_total(split_dir: str, recorded: int | None, total: int | None, source: str) -> None:
  if None not in (recorded, total) and recorded != total:
    raise ValueError(f'{split_dir}: extracted from data of {recorded} examples; {source} holds '
                     f'{total}: extract it into another store, or use the data it came from')


def _ranges(indices) -> str:
  """[0, 1, 2, 7] -> '0..2, 7' (the first three runs, then how many more)."""
  runs = [f'{a}..{b - 1}' if b - a > 1 else f'{a}' for a, b in _runs(indices)]
  return ', '.join(runs[:3]) + (f' and {len(runs) - 3} more ranges' if len(runs) > 3 else '')


def check_finished(root: str, split: str) -> int:
  """The number of examples of the split, after checking that finished jobs wrote them all,
  and all of the data they recorded they came from."""
  split_dir = os.path.join(root, split)
  indices = Reader(root, split, validate=False).indices
  finished, total = _finished(split_dir)
  stray = indices[~np.isin(indices, finished)]
  if len(stray):
    raise ValueError(f'{split_dir}: {len(stray)} of {len(indices)} examples (indices '
                     f'{_ranges(stray)}) are from an extraction or import that did not '
                     'finish; rerun it with the same settings to complete the split')
  if total is not None:
    missing = np.setdiff1d(np.arange(total), finished)
    if len(missing):
      raise ValueError(f'{split_dir}: {len(missing)} of the data\'s {total} examples (indices '
                       f'{_ranges(missing)}) were never extracted (their job did not run); '
                       'extract them (extract.start_idx/end_idx, or the extract.chunk_index '
                       'that covers them) to complete the split')
  return len(indices)


def _lock_writer(split_dir: str, process_index: int) -> str:
  """Makes this process the split's one writer as `process_index` (a second job would remove
  this one's unfinished blocks as its own crash's leftovers); returns the lock file's path for
  `files.unlock`."""
  path = os.path.join(split_dir, f'.writer.p{process_index:05d}.lock')
  return files.lock(path, f'{split_dir}: another job is writing this split as process '
                    f'{process_index} (it holds {path}); extraction or import jobs on one store '
                    'run one after another')


class Writer:
  """Appends atomic blocks to one split; reopening resumes (see `committed`). One writer per
  split and process index at a time: a lock file, held from opening until `close` (or the
  writer's garbage collection, or the process's end)."""

  def __init__(self, root: str, split: str, meta: StoreMeta, *, sort: bool = False,
               process_index: int | None = None):
    if process_index is None:
      import jax  # only for the default; writers given an index never import it
      process_index = jax.process_index()
    self.dir, self.meta, self.sort, self.process_index = os.path.join(root, split), meta, sort, process_index
    os.makedirs(os.path.join(self.dir, 'blocks'), exist_ok=True)
    self._lock = _lock_writer(self.dir, process_index)
    self._create_or_check_meta()
    self._manifest = os.path.join(self.dir, f'manifest.p{process_index:05d}.json')
    manifests = _process_manifests(self.dir)
    self._blocks = manifests.get(self._manifest, [])
    self._opened = [b for blocks in manifests.values() for b in blocks]  # every process's
    self._committed, self._view = set(), None
    for b in self._opened:
      self._committed.update(_unruns(b['indices']).tolist())
    self._remove_uncommitted()
    seqs = [_block_key(b['name'])[1] for b in self._blocks]
    self._next = max(seqs, default=-1) + 1

  def _create_or_check_meta(self):
    path = os.path.join(self.dir, 'manifest.json')
    tmp = f'{path}.tmp-p{self.process_index:05d}-{uuid.uuid4().hex}'
    with open(tmp, 'w') as f:
      json.dump(_meta_json(self.meta), f, indent=1)
    try:
      os.link(tmp, path)  # create-if-absent, atomic: concurrent writers agree on one meta
    except FileExistsError:
      old = read_meta(self.dir)
      for field in dataclasses.fields(StoreMeta):
        a, b = getattr(old, field.name), getattr(self.meta, field.name)
        if a != b:
          why = {'teacher_fingerprint': ' (another teacher made it)',
                 'tokenizer_fingerprint': ' (another tokenizer made it)'}.get(field.name, '')
          raise ValueError(f'{self.dir}: existing store has {field.name}={a!r}, writer asked '
                           f'{field.name}={b!r}{why}; write to another store (extract.output) '
                           'or use the settings it was made with') from None
    finally:
      os.remove(tmp)

  def _remove_uncommitted(self):
    """What a crash of this process left half-written is garbage: blocks its manifest does not
    name, and its temporary files (a manifest not yet renamed into place)."""
    names = {b['name'] for b in self._blocks}
    prefix = f'p{self.process_index:05d}-'
    for entry in os.listdir(os.path.join(self.dir, 'blocks')):
      if entry.startswith(f'.tmp-{prefix}') or (entry.startswith(prefix) and entry not in names):
        shutil.rmtree(os.path.join(self.dir, 'blocks', entry))
    for tmp in (glob.glob(f'{self._manifest}.tmp-*') +
                glob.glob(os.path.join(self.dir, f'manifest.json.tmp-{prefix}*'))):
      os.remove(tmp)

  def check_inputs(self, examples, source: str) -> None:
    """Refuses to add to a split whose committed blocks were made from other inputs than
    `examples` ({index: (tokens, labels, loss_mask)}, what `source` gives now): a resumed job
    with another data file, format, template or length limit would mix the two. Blocks written
    before the digest existed are not checked."""
    for b in self._opened:
      if 'inputs_sha256' not in b:
        continue
      indices = _unruns(b['indices']).tolist()
      missing = [i for i in indices if i not in examples]
      if missing:
        raise ValueError(f'{self.dir}: block {b["name"]} holds example {missing[0]}, which '
                         f'{source} does not give; this split was made from other data')
      if inputs_digest((i, *examples[i]) for i in indices) != b['inputs_sha256']:
        raise ValueError(
            f'{self.dir}: block {b["name"]} (examples {indices[0]}..{indices[-1]}) was made '
            f'from other tokens, labels or loss masks than {source} gives now (another data '
            'file, data format, chat template or data.max_seq_length?); extract into a new '
            'store, or rerun with the settings that made it')

  def close(self) -> None:
    """Releases the split to other jobs (also when the writer is garbage-collected); nothing
    is buffered (every block commits in write_block)."""
    if self._lock is not None:
      files.unlock(self._lock)
      self._lock = None

  def __del__(self, _finalizing=sys.is_finalizing):
    # (bound here: at interpreter exit this module's globals may already be None; the
    # process's end releases the lock then anyway)
    if getattr(self, '_lock', None) is not None and not _finalizing():
      self.close()

  @property
  def committed(self) -> frozenset[int]:
    """Example indices already stored (this and every other process, as of opening)."""
    if self._view is None:  # rebuilt once per block, so `i in w.committed` in a loop is O(1)
      self._view = frozenset(self._committed)
    return self._view

  def write_block(self, records: list[Record], extras: list | None = None) -> None:
    """Writes `records` as one block: all visible to readers, or none of them."""
    if not records:
      return
    if extras is not None and len(extras) != len(records):
      raise ValueError(f'write_block: {len(extras)} extras for {len(records)} records')
    recs = [check_record(r, self.meta, sort=self.sort) for r in records]
    indices = [r.index for r in recs]
    seen = set()
    for i in indices:
      if i in self._committed or i in seen:
        raise ValueError(f'example {i}: already {"stored" if i in self._committed else "in this block"}')
      seen.add(i)
    rows = [np.flatnonzero(r.loss_mask) if self.meta.masked_only else slice(None) for r in recs]
    data = {name: np.concatenate([getattr(r, name) for r in recs]) for name in _ARRAYS[:3]}
    data['lse'] = np.concatenate([r.lse[w] for r, w in zip(recs, rows)])
    data['topk_ids'] = np.concatenate([r.topk_ids[w] for r, w in zip(recs, rows)])
    data['topk_logits'] = _encode_values(
        np.concatenate([r.topk_logits[w] for r, w in zip(recs, rows)]), self.meta.values_dtype)
    name = f'p{self.process_index:05d}-b{self._next:06d}'
    tmp = os.path.join(self.dir, 'blocks', f'.tmp-{name}-{uuid.uuid4().hex[:8]}')
    dtypes = _array_dtypes(self.meta)
    stores = [ts.open(_zarr_spec(os.path.join(tmp, a), data[a].shape, dtypes[a], self.meta.codec),
                      create=True) for a in _ARRAYS]
    writes = [s.result().write(data[a].astype(dtypes[a])) for s, a in zip(stores, _ARRAYS)]
    for w in writes:
      w.result()
    faults.point('store.block_arrays')
    block = {'indices': indices, 'num_tokens': [len(r.tokens) for r in recs],
             'num_rows': [len(r.lse[w]) for r, w in zip(recs, rows)]}
    _write_json(os.path.join(tmp, 'block.json'), block)
    if extras is not None:
      with open(os.path.join(tmp, 'extras.json.gz'), 'wb') as raw:  # mtime 0: same bytes
        with gzip.GzipFile(fileobj=raw, mode='wb', mtime=0) as f:
          f.write(json.dumps(extras).encode())
    os.rename(tmp, os.path.join(self.dir, 'blocks', name))
    faults.point('store.block_renamed')
    self._next += 1
    blocks = self._blocks + [{'name': name, 'indices': _runs(indices), 'num_examples': len(recs),
                              'num_tokens': int(sum(block['num_tokens'])),
                              'num_rows': int(sum(block['num_rows'])),
                              'inputs_sha256': inputs_digest(
                                  (r.index, r.tokens, r.labels, r.loss_mask) for r in recs)}]
    _write_json(self._manifest, {'schema_version': SCHEMA_VERSION,
                                 'process_index': self.process_index, 'blocks': blocks})
    self._blocks = blocks  # committed: the manifest names it
    self._committed.update(indices)
    self._view = None
    faults.point('store.block_committed')

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class Reader:
  """Random access to a split's examples in index order; opens arrays lazily (picklable)."""

  def __init__(self, root: str, split: str, *, pad_id: int = 0, validate: bool = True):
    self.dir, self.pad_id, self.validate = os.path.join(root, split), pad_id, validate
    if not os.path.isdir(self.dir):
      raise FileNotFoundError(f'logit store: no split directory {self.dir}')
    self.meta = read_meta(self.dir)
    self._entries = sorted((b for bs in _process_manifests(self.dir).values() for b in bs),
                           key=lambda b: _block_key(b['name']))
    owner, block_of, pos_of, idx = {}, [], [], []
    for n, b in enumerate(self._entries):
      if not os.path.isdir(os.path.join(self.dir, 'blocks', b['name'])):
        raise FileNotFoundError(f'{self.dir}: block {b["name"]} is listed in the manifest but '
                                f'missing from blocks/')
      ind = _unruns(b['indices'])
      if len(ind) != b['num_examples']:
        raise ValueError(f'{self.dir}: block {b["name"]} lists {len(ind)} indices for '
                         f'num_examples={b["num_examples"]}')
      for i in ind.tolist():
        if i in owner:
          raise ValueError(f'{self.dir}: example {i} is stored twice, in blocks {owner[i]} and {b["name"]}')
        owner[i] = b['name']
      idx.append(ind)
      block_of.append(np.full(len(ind), n, np.int32))
      pos_of.append(np.arange(len(ind), dtype=np.int32))
    idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    order = np.argsort(idx, kind='stable')
    self.indices = idx[order]
    self._block_of = np.concatenate(block_of)[order] if block_of else np.zeros(0, np.int32)
    self._pos_of = np.concatenate(pos_of)[order] if pos_of else np.zeros(0, np.int32)
    self._open, self._context = collections.OrderedDict(), None

  def __getstate__(self):  # tensorstore handles are reopened in each process (Grain workers)
    return {**self.__dict__, '_open': collections.OrderedDict(), '_context': None}

  def __len__(self) -> int:
    return len(self.indices)

  def _block(self, n):
    if n in self._open:
      self._open.move_to_end(n)
      return self._open[n]
    if len(self._open) >= OPEN_BLOCKS:
      self._open.popitem(last=False)
    entry = self._entries[n]
    bdir = os.path.join(self.dir, 'blocks', entry['name'])
    where = f'{self.dir}: block {entry["name"]}'
    b = _read_json(os.path.join(bdir, 'block.json'), where)
    counts = (len(b['indices']), sum(b['num_tokens']), sum(b['num_rows']))
    expected = (entry['num_examples'], entry['num_tokens'], entry['num_rows'])
    if counts != expected:
      raise ValueError(f'{where}: block.json counts (examples, tokens, rows) {counts}, the '
                       f'manifest {expected}')
    if b['indices'] != _unruns(entry['indices']).tolist():
      raise ValueError(f'{where}: block.json and the manifest list different example indices')
    t, n_rows, k = entry['num_tokens'], entry['num_rows'], self.meta.k
    shapes = {'tokens': (t,), 'labels': (t,), 'loss_mask': (t,), 'lse': (n_rows,),
              'topk_ids': (n_rows, k), 'topk_logits': (n_rows, k)}
    if self._context is None:  # caches shard indexes and small per-token chunks
      self._context = ts.Context({'cache_pool': {'total_bytes_limit': CACHE_BYTES}})
    arrays = {}
    for a in _ARRAYS:
      try:
        arrays[a] = ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path':
                             os.path.join(bdir, a)}}, open=True, context=self._context).result()
      except ValueError as e:
        raise FileNotFoundError(f'{where}: array {a} cannot be opened ({e})') from None
      if tuple(arrays[a].shape) != shapes[a]:
        raise ValueError(f'{where}: array {a} has shape {list(arrays[a].shape)}, the manifest '
                         f'counts give {list(shapes[a])}')
    arrays['tok_off'] = np.concatenate([[0], np.cumsum(b['num_tokens'])])
    arrays['row_off'] = np.concatenate([[0], np.cumsum(b['num_rows'])])
    arrays['dir'] = bdir
    self._open[n] = arrays
    return arrays

  def __getitem__(self, i: int) -> Record:
    if not -len(self) <= i < len(self):
      raise IndexError(f'logit store {self.dir}: example {i} out of range [0, {len(self)})')
    b = self._block(int(self._block_of[i]))
    j = int(self._pos_of[i])
    t0, t1, r0, r1 = b['tok_off'][j], b['tok_off'][j + 1], b['row_off'][j], b['row_off'][j + 1]
    futures = {a: b[a][t0:t1].read() for a in _ARRAYS[:3]}
    futures.update({a: b[a][r0:r1].read() for a in _ARRAYS[3:]})
    got = {a: f.result() for a, f in futures.items()}
    index, mask = int(self.indices[i]), got['loss_mask']
    vals_RxK = _decode_values(got['topk_logits'], self.meta.values_dtype)
    rows_R = np.flatnonzero(mask) if self.meta.masked_only else np.arange(t1 - t0)
    if len(rows_R) != r1 - r0:
      raise ValueError(f'example {index}: {r1 - r0} stored rows for {len(rows_R)} positions')
    if self.validate:
      where = f'{self.dir} example {index}'
      _check_ids(got['tokens'], self.meta, where, 'token', np.arange(t1 - t0))
      _check_values(got['topk_ids'], vals_RxK, got['lse'], self.meta, where, rows_R, False)
    ids_SxK, lse_S = got['topk_ids'].astype(np.int32), got['lse']
    if self.meta.masked_only:  # pad ids, zero logits and lse where nothing is stored
      ids_SxK = np.full((t1 - t0, self.meta.k), self.pad_id, np.int32)
      ids_SxK[rows_R] = got['topk_ids']
      full = np.zeros((t1 - t0, self.meta.k), np.float32)
      full[rows_R], vals_RxK = vals_RxK, full
      lse_S = np.zeros(t1 - t0, np.float32)
      lse_S[rows_R] = got['lse']
    return Record(index, got['tokens'], got['labels'], mask, ids_SxK, vals_RxK, lse_S)

  def extras(self, i: int):
    """The per-example JSON given to write_block (None when the block has none)."""
    b = self._block(int(self._block_of[i]))
    if 'extras' not in b:
      path = os.path.join(b['dir'], 'extras.json.gz')
      b['extras'] = json.load(gzip.open(path, 'rt')) if os.path.exists(path) else None
    return None if b['extras'] is None else b['extras'][int(self._pos_of[i])]

