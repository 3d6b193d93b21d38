"""mode=extract: the teacher's top-K logits for every token, written to the logit store.

    python -m jkd.main --config configs/extract.py --config.extract.teacher=TEACHER_DIR \
        --config.data.train_file=train.jsonl --config.extract.output=STORE

Per token, as NeMo-Aligner defines the record (spec §1.3): the K largest teacher logits minus
the row max, descending (the first is 0), their ids, and the full-vocabulary logsumexp of the
shifted logits. How jkd gets there, and what it fixes:

- The teacher forward is jitted and sharded over the mesh (params by the logical rules, the
  batch over the batch axes). The LM head runs inside a `shard_map` over the vocabulary axis:
  each shard sweeps its columns in tiles of `vocab_tile`, keeping a running top-K and an online
  logsumexp; shards then merge with `pmax` / `psum` and a top-K over the K·TP candidates. Full
  vocabulary logits exist neither gathered nor per shard.
- Rows keep their identity: a batch is one global array whose row r is example `indices[r]`,
  and results come back as global arrays in the same order, so no data-parallel reordering can
  misalign records (NeMo's bug 1.6.1).
- Examples are grouped by padded length (power-of-two buckets, at least `min_bucket`), so
  padding is bounded and the number of compiled shapes is logarithmic in the sequence length.
- Each batch is one atomic store block; a restarted run skips the indices the store already
  committed (read from its manifest, never from the data), so a crash or kill resumes with no
  duplicate and no gap. SIGTERM (or a first Ctrl-C) stops the run after the batch in hand is
  committed, exit 143 (Ctrl-C: KeyboardInterrupt) (jkd.distributed.Preemption).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from tqdm import tqdm

from jkd import config as jkd_config
from jkd import distributed, faults, model, profiling, sharding, tokenizer

_NEG = -1e30  # finite "minus infinity": exp(_NEG - _NEG) must not be NaN


def _merge_topk(vals_a, ids_a, vals_b, ids_b, k: int):
  vals = jnp.concatenate([vals_a, vals_b], -1)
  ids = jnp.concatenate([ids_a, ids_b], -1)
  top, pos = jax.lax.top_k(vals, k)
  return top, jnp.take_along_axis(ids, pos, -1)


def _shard_topk(h_NxD, w_DxPs, *, k: int, tile: int, vocab_size: int, vocab_axis):
  """Running top-K and logsumexp over this shard's vocabulary columns, merged over shards."""
  n, ps = h_NxD.shape[0], w_DxPs.shape[1]
  base = (jax.lax.axis_index(vocab_axis) * ps) if vocab_axis else 0
  n_tiles = -(-ps // tile)
  w_DxPt = jnp.pad(w_DxPs, ((0, 0), (0, n_tiles * tile - ps)))

  def body(carry, i):
    vals_NxK, ids_NxK, m_N, s_N = carry
    w_DxT = jax.lax.dynamic_slice_in_dim(w_DxPt, i * tile, tile, axis=1)
    z_NxT = jnp.einsum('nd,dt->nt', h_NxD, w_DxT, preferred_element_type=jnp.float32)
    col_T = i * tile + jnp.arange(tile)
    valid_T = (col_T < ps) & (base + col_T < vocab_size)  # shard padding and padded vocab
    z_NxT = jnp.where(valid_T, z_NxT, _NEG)
    m_new = jnp.maximum(m_N, z_NxT.max(-1))
    s_N = s_N * jnp.exp(m_N - m_new) + jnp.where(valid_T, jnp.exp(z_NxT - m_new[:, None]),
                                                 0.0).sum(-1)
    tv, ti = jax.lax.top_k(z_NxT, min(k, tile))
    vals_NxK, ids_NxK = _merge_topk(vals_NxK, ids_NxK, tv, (base + i * tile + ti).astype(
        jnp.int32), k)
    return (vals_NxK, ids_NxK, m_new, s_N), None

  init = (jnp.full((n, k), _NEG, jnp.float32), jnp.zeros((n, k), jnp.int32),
          jnp.full((n,), _NEG, jnp.float32), jnp.zeros((n,), jnp.float32))
  (vals, ids, m, s), _ = jax.lax.scan(body, init, jnp.arange(n_tiles))
  if vocab_axis:  # merge shards: K·TP candidates per token, never the vocabulary
    m_all = jax.lax.pmax(m, vocab_axis)
    s = jax.lax.psum(s * jnp.exp(m - m_all), vocab_axis)
    m = m_all
    vals_all = jax.lax.all_gather(vals, vocab_axis, axis=1, tiled=True)
    ids_all = jax.lax.all_gather(ids, vocab_axis, axis=1, tiled=True)
    vals, pos = jax.lax.top_k(vals_all, k)
    ids = jnp.take_along_axis(ids_all, pos, -1)
  return ids, vals - m[:, None], jnp.log(s)


def teacher_topk(cfg: model.ModelConfig, mesh, rules, *, k: int, vocab_tile: int):
  """(params, tokens_BxT, segment_ids_BxT=None, positions_BxT=None) -> (ids_BxTxK int32,
  logits_BxTxK fp32 shifted, lse_BxT fp32); traceable, to be jitted inside the mesh and rules
  (here by `topk_fn`, or inside the train step for online distillation)."""
  if not 0 < k <= cfg.vocab_size:
    raise ValueError(f'extract.top_k={k}: must be in [1, vocab_size={cfg.vocab_size}]')
  vocab_axes = sharding.rule_axes(rules, 'vocab')
  vocab_axis = None if not vocab_axes else vocab_axes[0] if len(vocab_axes) == 1 else vocab_axes
  if cfg.padded_vocab % math.prod(mesh.shape[a] for a in vocab_axes):
    raise ValueError(f'padded vocab {cfg.padded_vocab} does not divide over the vocab axis')
  # Rows split over the batch axes that do not split the vocabulary: a device merging its
  # vocabulary shard's statistics with the other shards' must hold the same rows as they do.
  batch = tuple(a for a in sharding.rule_axes(rules, 'act_batch') if a not in vocab_axes)
  batch = batch or None

  def local(h_NxD, w_DxPs):
    return _shard_topk(h_NxD, w_DxPs, k=k, tile=vocab_tile, vocab_size=cfg.vocab_size,
                       vocab_axis=vocab_axis)

  head = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(batch, None),
                                                   PartitionSpec(None, vocab_axis)),
                       out_specs=(PartitionSpec(batch, None), PartitionSpec(batch, None),
                                  PartitionSpec(batch)), check_vma=False)

  def records(params, tokens_BxT, segment_ids_BxT=None, positions_BxT=None):
    b, t = tokens_BxT.shape
    h_BxTxD = model.hidden(cfg, params, tokens_BxT, segment_ids_BxT=segment_ids_BxT,
                           positions_BxT=positions_BxT)
    w_DxP = model.output_weights(cfg, params).astype(cfg.compute_dtype)
    ids, vals, lse = head(h_BxTxD.reshape(b * t, -1).astype(cfg.compute_dtype), w_DxP)
    return ids.reshape(b, t, k), vals.reshape(b, t, k), lse.reshape(b, t)
  return records


def topk_fn(cfg: model.ModelConfig, mesh, rules, *, k: int, vocab_tile: int):
  """jit(params, tokens_BxT) -> (ids_BxTxK int32, logits_BxTxK fp32 shifted, lse_BxT fp32)."""
  records = jax.jit(teacher_topk(cfg, mesh, rules, k=k, vocab_tile=vocab_tile))

  def fn(params, tokens_BxT):
    with sharding.activate(mesh, rules):  # the model's logical constraints resolve here
      return records(params, tokens_BxT)
  return fn


def owned_rows(arrays, n_rows: int) -> list[dict[int, np.ndarray]]:
  """Rows [0, n_rows) of batch-sharded global arrays that this process writes, as
  [{row: numpy row}] per array. Each row goes to the lowest-numbered process holding it (rows
  are replicated over the mesh axes the batch is not split over), so over all processes every
  row is written exactly once, from this process's own shards: nothing crosses hosts."""
  owner = {}
  placement = arrays[0].sharding.devices_indices_map(arrays[0].shape)
  for device, index in sorted(placement.items(), key=lambda d: (d[0].process_index, d[0].id)):
    for r in range(*index[0].indices(arrays[0].shape[0])):
      owner.setdefault(r, device.process_index)
  me = jax.process_index()
  mine = [r for r in range(n_rows) if owner[r] == me]
  out = []
  for array in arrays:
    rows = {}
    for shard in array.addressable_shards:
      start = shard.index[0].indices(array.shape[0])[0]
      needed = [r for r in mine if r not in rows and start <= r < start + shard.data.shape[0]]
      if needed:
        data = np.asarray(shard.data)
        rows.update({r: data[r - start] for r in needed})
    out.append(rows)
  return out


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def bucket_length(n: int, min_bucket: int, max_len: int) -> int:
  """Smallest power-of-two multiple of min_bucket >= n, capped at max_len."""
  size = min_bucket
  while size < n:
    size *= 2
  return min(size, max_len)


def plan_batches(lengths: dict[int, int], batch_size: int, min_bucket: int,
                 max_len: int) -> list[tuple[int, list[int]]]:
  """[(padded length, example indices)], grouped by bucket, indices ascending within."""
  buckets: dict[int, list[int]] = {}
  for index in sorted(lengths):
    buckets.setdefault(bucket_length(lengths[index], min_bucket, max_len), []).append(index)
  return [(length, members[i:i + batch_size]) for length, members in sorted(buckets.items())
          for i in range(0, len(members), batch_size)]


def fingerprint(model_dir: str) -> str:
  """Identifies a teacher: its config and orbax metadata files (unique per write), not data."""
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(model_dir)):
    for name in sorted(files):
      path = os.path.join(root, name)
      if name == model.CONFIG_FILE or (root != model_dir and os.path.getsize(path) < (1 << 20)):
        digest.update(os.path.relpath(path, model_dir).encode())
        with open(path, 'rb') as f:
          digest.update(f.read())
  return digest.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Settings:
  teacher: str
  output: str
  top_k: int
  batch_size: int
  vocab_tile: int
  min_bucket: int
  max_seq_length: int
  start_idx: int
  end_idx: int  # inclusive, -1 = last (NeMo's end_at_idx)
  values_dtype: str
  masked_only: bool
  codec: str
  dtype: str


def extract_split(examples: Sequence[dict], split: str, s: Settings, mesh, rules,
                  cfg: model.ModelConfig, params, tok,
                  profiler: profiling.Profiler | None = None, source: str = 'the data',
                  preemption: distributed.Preemption | None = None) -> int:
  """Extracts the examples of one split that the store lacks; returns how many were written.
  `profiler` steps once per batch, its count running on over splits; `source` names where
  `examples` came from, for the error when the store's blocks were made from other data. With
  `preemption`, a SIGTERM or Ctrl-C ends the split after a committed batch
  (`preemption.stopping`), the split left unfinished for a rerun to complete."""
  from jkd.data import logit_store
  wanted = selected(examples, s)
  if not wanted:  # run() refuses this before loading the teacher; a direct call, here
    raise range_error(None, source, len(examples))
  meta = logit_store.StoreMeta(k=s.top_k, vocab_size=cfg.vocab_size, values_dtype=s.values_dtype,
                               teacher_fingerprint=fingerprint(s.teacher),
                               tokenizer_fingerprint=tok.fingerprint if tok else '',
                               masked_only=s.masked_only, codec=s.codec, teacher_dtype=s.dtype)
  writer = logit_store.Writer(s.output, split=split, meta=meta)
  writer.check_inputs({e['index']: (e['tokens'], e['labels'], e['loss_mask']) for e in examples},
                      source)
  _barrier(f'extract {split}: writers open')  # every process plans from the same committed set
  todo = {e['index']: len(e['tokens']) for e in examples
          if e['index'] in wanted and e['index'] not in writer.committed}
  by_index = {e['index']: e for e in examples}
  fn = topk_fn(cfg, mesh, rules, k=s.top_k, vocab_tile=s.vocab_tile)
  rows = sharding.batch_sharding(mesh, rules)
  n_rows = s.batch_size  # a partial last batch is padded with token-0 rows, never stored
  tokens_done, written, t0 = 0, 0, time.perf_counter()
  bar = tqdm(total=len(todo), desc=f'extract {split}', unit='ex',
             disable=jax.process_index() != 0, file=distributed.progress_file())
  for length, indices in plan_batches(todo, s.batch_size, s.min_bucket, s.max_seq_length):
    if profiler is not None:  # the previous batch is on the host already: nothing to wait for
      profiler.step()
    faults.point('extract.batch')
    tokens_BxT = np.zeros((n_rows, length), np.int32)  # padding rows and columns: token 0
    for r, index in enumerate(indices):
      tokens_BxT[r, :todo[index]] = by_index[index]['tokens']
    out = fn(params, jax.make_array_from_callback(tokens_BxT.shape, rows,
                                                  lambda i: tokens_BxT[i]))
    ids, vals, lse = owned_rows(out, len(indices))
    records = []
    for r in sorted(ids):
      index = indices[r]
      e, n = by_index[index], todo[index]
      records.append(logit_store.Record(
          index=index, tokens=np.asarray(e['tokens'], np.int32),
          labels=np.asarray(e['labels'], np.int32),
          loss_mask=np.asarray(e['loss_mask'], np.uint8), topk_ids=ids[r][:n],
          topk_logits=vals[r][:n], lse=lse[r][:n]))
    writer.write_block(records)  # this process's rows: one block in its own manifest
    tokens_done += sum(todo[i] for i in indices)
    written += len(indices)
    bar.update(len(indices))
    bar.set_postfix(tokens_per_s=f'{tokens_done / (time.perf_counter() - t0):,.0f}')
    if preemption is not None and preemption.reached():
      break
  bar.close()
  if preemption is not None and preemption.stopping:  # every process stops at the same batch
    writer.close()
    return written
  _barrier(f'extract {split}: done')  # the split is complete when any process returns
  if jax.process_index() == 0:
    logit_store.mark_finished(s.output, split, sorted(wanted), total=len(examples))
  writer.close()  # after the record: a job let in before it could write over it with its own
  return written


def selected(examples: Sequence[dict], s: Settings) -> set[int]:
  """Indices of `examples` in s.start_idx..s.end_idx (inclusive; -1: to the last example)."""
  last = math.inf if s.end_idx < 0 else s.end_idx
  return {e['index'] for e in examples if s.start_idx <= e['index'] <= last}


def range_error(config, source: str, n: int) -> ValueError:
  """The error for an extract range (start_idx..end_idx or chunk) past the n examples of
  `source`; `config`: the run's config, or None for a direct call (the range as Settings)."""
  e = None if config is None else config.extract
  if e is not None and e.examples_per_chunk > 0:
    first = e.chunk_index * e.examples_per_chunk
    keys = (f'extract.chunk_index={e.chunk_index} with extract.examples_per_chunk='
            f'{e.examples_per_chunk} (indices {first}..{first + e.examples_per_chunk - 1})')
    fix = f'its last chunk is extract.chunk_index={(n - 1) // e.examples_per_chunk}'
  else:
    keys = 'extract.start_idx' if e is None else f'extract.start_idx={e.start_idx}' + (
        f', extract.end_idx={e.end_idx}' if e.end_idx >= 0 else '')
    fix = f'set extract.start_idx to at most {n - 1}'
  return ValueError(f'{keys}: selects no example of {source}, which holds {n} examples (indices '
                    f'0..{n - 1}); {fix}')


def settings(config) -> Settings:
  e = config.extract
  start, end = e.start_idx, e.end_idx
  if e.examples_per_chunk > 0:  # NeMo users run one chunk of the data per job
    start = e.chunk_index * e.examples_per_chunk
    end = start + e.examples_per_chunk - 1
  return Settings(teacher=e.teacher, output=e.output, top_k=e.top_k, batch_size=e.batch_size,
                  vocab_tile=e.vocab_tile, min_bucket=e.min_bucket,
                  max_seq_length=config.data.max_seq_length, start_idx=start, end_idx=end,
                  values_dtype=e.values_dtype, masked_only=e.masked_only, codec=e.codec,
                  dtype=e.dtype)


def run(config) -> dict[str, int]:
  from jkd.data import chat, logit_store
  s = settings(config)
  tok = tokenizer.load(s.teacher)
  # The data first: a range that selects none of the train split fails before the teacher
  # loads. The range applies to both splits, so a chunk of a long train split may lie past the
  # end of the shorter validation one: that job leaves validation alone (the jobs whose range
  # covers it extract it) rather than mark an empty split finished, which training refuses.
  splits = {}
  for split, path in (('train', config.data.train_file),
                      ('validation', config.data.validation_file)):
    if not path:
      continue
    examples = chat.read_jsonl(path, tok, fmt=config.data.format,
                               max_seq_length=s.max_seq_length)
    source = f'data.{split}_file={path}'
    if not selected(examples, s):
      if split == 'train' or not config.data.train_file:
        raise range_error(config, source, len(examples))
      print(f'[extract] {split}: skipped, the extract range (from index {s.start_idx}) selects '
            f'none of its {len(examples)} examples ({source})')
      continue
    logit_store.check_total(s.output, split, len(examples), source)  # before the teacher loads
    splits[split] = (examples, source)
  mesh_cfg = jkd_config.mesh_config(config)
  mesh = sharding.make_mesh(mesh_cfg.axes, mesh_cfg.shape)  # batch_size fits it (jkd.config)
  cfg = dataclasses.replace(model.load_config(s.teacher), dtype=s.dtype)
  params_sharding = sharding.shardings_for(
      lambda: model.init(cfg, jax.random.key(0), boxed=True), mesh, mesh_cfg.rules)
  _, params = model.load(s.teacher, params_sharding, dtype=model.DTYPES[s.dtype])
  written = {}
  with distributed.Preemption() as preemption, \
       profiling.Profiler(profiling.settings(config)) as profiler:
    for split, (examples, source) in splits.items():
      written[split] = extract_split(examples, split, s, mesh, mesh_cfg.rules, cfg, params, tok,
                                     profiler, source=source, preemption=preemption)
      if preemption.stopping:
        break
      print(f'[extract] {split}: {written[split]} new examples -> {s.output}/{split}')
  if preemption.stopping:
    preemption.stop(f'extracting {split} after {written[split]} new examples (committed to '
                    f'{s.output}/{split})')
  return written
