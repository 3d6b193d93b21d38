"""Grain input pipeline over the logit store: shard, shuffle, truncate, pad or pack, batch.

Legend: B batch rows, L padded row length (a multiple of 8, <= max_seq_length), K top-K width.

Batches are dicts of numpy arrays: tokens, labels, loss_mask, segment_ids, positions [B, L]
(int32; loss_mask uint8), topk_ids [B, L, K] int32, topk_logits [B, L, K] float32, lse [B, L]
float32. Padding is what NeMo's collate pads with (spec §4): `pad_id` for tokens, labels and
top-K ids, 0 for the mask, logits and lse; segment_ids are 1.. per example in a row and 0 on
padding; positions restart at 0 for every example. Without packing a row holds one example
(segment 1). L = min(max_seq_length, ceil(longest row / 8) * 8) per batch, as NeMo pads; a
jitted step sees at most max_seq_length / 8 shapes (pass `pad_to_max=True` for one shape).
Examples longer than max_seq_length are cut on the right: exact for a causal teacher, whose
targets at kept positions depend only on the kept prefix.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import grain
import numpy as np

from jkd.data import logit_store

PAD_MULTIPLE = 8
FIELDS = ('tokens', 'labels', 'loss_mask', 'topk_ids', 'topk_logits', 'lse')


class KDDataSource(grain.sources.RandomAccessDataSource):
  """The i-th example of a store split (in example-index order) as a dict of numpy arrays."""

  def __init__(self, root: str, split: str, *, pad_id: int = 0, validate: bool = True):
    self.root, self.split = root, split
    self._reader = logit_store.Reader(root, split, pad_id=pad_id, validate=validate)
    self.meta = self._reader.meta

  def __len__(self) -> int:
    return len(self._reader)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    rec = self._reader[i]
    return {'index': np.int64(rec.index), **{f: getattr(rec, f) for f in FIELDS}}

  fields = FIELDS

  def __repr__(self) -> str:  # Grain checkpoints name their source by repr
    return f'KDDataSource({self.root!r}, {self.split!r}, n={len(self)})'


class ExamplesSource(grain.sources.RandomAccessDataSource):
  """Tokenized examples without teacher records (online distillation: the step computes them).

  `examples`: dicts with tokens, labels, loss_mask (jkd.data.chat.read_jsonl's output)."""

  fields = ('tokens', 'labels', 'loss_mask')

  def __init__(self, examples, name: str):
    self._examples, self._name = examples, name

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    e = self._examples[i]
    return {f: np.asarray(e[f], _DTYPES[f]) for f in self.fields}

  def __repr__(self) -> str:
    return f'ExamplesSource({self._name!r}, n={len(self)})'


class _ProcessRows(grain.MapDataset):
  """Shard `index` of `count`: its `rows` elements of every `rows * count` of the stream.

  With `rows` = the per-process batch size, global batch j (elements j*G ... j*G + G - 1 of the
  shuffled stream, G = rows * count) is the same examples for any process count, and process p
  holds its rows p*rows ... (p+1)*rows - 1: the rows of its devices in a batch-sharded global
  array. `full_only` drops a last partial global batch, so every process sees as many batches.
  """

  def __init__(self, parent, rows: int, index: int, count: int, full_only: bool):
    super().__init__(parent)
    self._rows, self._index, self._count = rows, index, count
    full, rest = divmod(len(parent), rows * count)
    self._len = full * rows + (0 if full_only else min(max(rest - index * rows, 0), rows))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.slice(i)
    group, r = divmod(i, self._rows)
    return self._parent[(group * self._count + self._index) * self._rows + r]

  def __str__(self) -> str:
    return f'_ProcessRows(rows={self._rows}, index={self._index}, count={self._count})'


@dataclasses.dataclass(frozen=True)
class _Truncate(grain.transforms.Map):
  """Right-truncation to max_seq_length and NeMo's load-time `top_k` (first K' of K)."""
  max_seq_length: int
  top_k: int | None
  fields: tuple[str, ...] = FIELDS

  def map(self, ex):
    out = {f: ex[f][:self.max_seq_length] for f in self.fields}
    if self.top_k is not None and 'topk_ids' in self.fields:
      out['topk_ids'] = out['topk_ids'][:, :self.top_k]
      out['topk_logits'] = out['topk_logits'][:, :self.top_k]
    return out


def _pad_values(pad_id):
  return {'tokens': pad_id, 'labels': pad_id, 'loss_mask': 0, 'topk_ids': pad_id,
          'topk_logits': 0.0, 'lse': 0.0}


def _row_length(longest, max_seq_length, pad_to_max):
  return max_seq_length if pad_to_max else min(
      max_seq_length, max(PAD_MULTIPLE, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE))


_DTYPES = {'tokens': np.int32, 'labels': np.int32, 'loss_mask': np.uint8, 'topk_ids': np.int32,
           'topk_logits': np.float32, 'lse': np.float32, 'segment_ids': np.int32,
           'positions': np.int32}


@dataclasses.dataclass(frozen=True)
class _PadBatch:
  """One example per row, padded to L."""
  max_seq_length: int
  pad_id: int
  pad_to_max: bool
  fields: tuple[str, ...] = FIELDS

  def __call__(self, examples):
    b = len(examples)
    l = _row_length(max(len(e['tokens']) for e in examples), self.max_seq_length, self.pad_to_max)
    pads = _pad_values(self.pad_id)
    out = {f: np.full((b, l) + examples[0][f].shape[1:], pads[f], _DTYPES[f])
           for f in self.fields}
    out['segment_ids'] = np.zeros((b, l), np.int32)
    out['positions'] = np.zeros((b, l), np.int32)
    for row, e in enumerate(examples):
      s = len(e['tokens'])
      for f in self.fields:
        out[f][row, :s] = e[f]
      out['segment_ids'][row, :s] = 1
      out['positions'][row, :s] = np.arange(s)
    return out


@dataclasses.dataclass(frozen=True)
class _PackedBatch:
  """Rows from Grain's first-fit packer (padded to max_seq_length), cut to L."""
  max_seq_length: int
  pad_to_max: bool
  fields: tuple[str, ...] = FIELDS

  def __call__(self, rows):
    seg = np.stack([r['tokens_segment_ids'] for r in rows])
    used = np.flatnonzero(seg.any(axis=0))
    l = _row_length(int(used[-1]) + 1 if len(used) else 0, self.max_seq_length, self.pad_to_max)
    out = {f: np.stack([r[f][:l] for r in rows]).astype(_DTYPES[f]) for f in self.fields}
    out['segment_ids'] = seg[:, :l].astype(np.int32)
    out['positions'] = np.stack([r['tokens_positions'][:l] for r in rows]).astype(np.int32)
    return out


def _ignore_signals(worker_index: int, worker_count: int) -> None:
  """A worker's init (workers_ignore_signals): SIGTERM and SIGINT ignored, and the worker ends
  itself once its parent is gone, as it would no longer end of a signal to the group after a
  SIGKILL of the parent (Grain's workers do not watch the parent)."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)
  threading.Thread(target=watch, name='jkd-parent-watch', daemon=True).start()


def make_loader(root: str, split: str, *, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, top_k: int | None = None, pack: bool = False,
                max_seq_length: int, pad_id: int, worker_count: int = 0,
                shard_index: int | None = None, shard_count: int | None = None,
                drop_remainder: bool = False, pad_to_max: bool = False, read_threads: int = 4,
                validate: bool = True, source=None,
                workers_ignore_signals: bool = False) -> grain.DatasetIterator:
  """A checkpointable iterator of KD batches (see the module docstring for their layout).

  Shards by JAX process by default: the stream (shuffled per epoch with `seed`: a different
  order each epoch, the same for the same seed) is cut into global batches of
  `batch_size * shard_count` examples and shard i reads its `batch_size` consecutive rows of
  each, so a global batch holds the same examples whatever the number of processes (every
  example lands in exactly one shard). `num_epochs=None` repeats forever. `pack=True` packs
  several examples per row first-fit, `batch_size` rows per batch. `worker_count` > 0 reads in
  that many spawned processes (packing stays in this one, so the rows are the same for any
  worker count). The iterator's `get_state()` / `set_state()` resume exactly (same
  worker_count). `workers_ignore_signals`: the workers ignore a SIGTERM or SIGINT sent to the
  whole process group (Slurm, a VM's shutdown, Ctrl-C in a terminal), leaving it to the
  training loop (jkd.distributed.Preemption), which must then `close()` the iterator: that
  stops them (they also end themselves once the parent is gone).
  `source` replaces the store split (e.g. an `ExamplesSource` for online distillation; its
  batches carry only its fields plus segment_ids and positions).
  """
  if max_seq_length < PAD_MULTIPLE or max_seq_length % PAD_MULTIPLE:
    raise ValueError(f'make_loader: max_seq_length={max_seq_length} must be a positive multiple '
                     f'of {PAD_MULTIPLE}')
  if batch_size < 1:
    raise ValueError(f'make_loader: batch_size={batch_size} must be >= 1')
  if shard_index is None or shard_count is None:
    import jax  # the default shard is this host's; workers never import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'make_loader: shard_index={shard_index} not in '
                     f'[0, shard_count={shard_count})')
  if source is None:
    source = KDDataSource(root, split, pad_id=pad_id, validate=validate)
  fields = source.fields
  if top_k is not None and 'topk_ids' in fields and not 1 <= top_k <= source.meta.k:
    raise ValueError(f'make_loader: top_k={top_k} not in [1, stored K={source.meta.k}]')
  if len(source) < shard_count:
    raise ValueError(f'make_loader: {len(source)} examples in {root}/{split} for '
                     f'{shard_count} shards')

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed % 2**32)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if shard_count > 1:
    ds = _ProcessRows(ds, batch_size, shard_index, shard_count, full_only=drop_remainder)
  ds = ds.map(_Truncate(max_seq_length, top_k, fields))
  if not pack:  # an endless stream has no last partial batch (and Grain would size it 2**63)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder or num_epochs is None,
                  batch_fn=_PadBatch(max_seq_length, pad_id, pad_to_max, fields))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=2 * read_threads))
  else:  # workers read examples; the packer below sees them as one stream
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=2 * batch_size))
  if worker_count > 0:
    from absl import flags  # grain 0.2.18 reads absl flags in workers (docs/environment.md)
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                        worker_init_fn=_ignore_signals if workers_ignore_signals else None)
  if pack:  # in this process, so the rows do not depend on worker_count
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={f: max_seq_length for f in fields}, num_packing_bins=batch_size,
        shuffle_bins=False, padding_struct={f: v for f, v in _pad_values(pad_id).items()
                                            if f in fields})
    it = it.batch(batch_size, drop_remainder=drop_remainder,
                  batch_fn=_PackedBatch(max_seq_length, pad_to_max, fields))
  return iter(it)
