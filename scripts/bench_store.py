"""Logit store vs NeMo-Aligner JSONL on the same records: bytes per token and random reads.

    .venv/bin/python scripts/bench_store.py [--examples 1000] [--chunks 4] [--workdir DIR]

Targets (issue 5): the store takes <= 1/8 of the JSONL's bytes per token, and random access
through Grain is >= 100x NeMo's ChunkedJsonl access pattern (re-open the chunk, scan to the line,
parse it; spec §4).

The records are synthetic but shaped like a real teacher pass (K=100, V=256000 as Nemotron /
GPT-2B-001): OASST-like chat lengths (system prompt, 1-3 user/assistant turns, lognormal turn
lengths, loss mask on assistant turns); top-K rows are fp32 differences of bf16 logits (as NeMo
writes them: bf16 model logits held in fp32, minus the row max), with a confident first gap and
a dense tail; ids are half Zipf-distributed (frequent low ids), half uniform, distinct per row.
The JSONL is written as NeMo's teacher pass does (spec §1.4-§1.5): global batches of 16 padded
with eos to a multiple of 8, the teacher's top-K at every position including padding, keys in
NeMo's order with contexts, answers and metadata. The store is imported from that JSONL
(`jkd.data.nemo_jsonl.import_chunks`, padding stripped); variants are written from the same
records. Bytes/token divide the bytes on disk by the real (unpadded) tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jkd.data import loader, logit_store, nemo_jsonl  # noqa: E402

K, V, EOS, GBS, MAX_LEN = 100, 256_000, 2, 16, 4096
SYSTEM = ('A chat between a curious user and an artificial intelligence assistant. The assistant '
          'gives helpful, detailed, and polite answers to the user\'s questions.')


def ids(rng, n):
  """Half heavy-tailed low ids (frequent BPE tokens), half uniform over the vocabulary."""
  z = rng.zipf(1.1, n) - 1
  z = np.where(z >= V, rng.integers(0, V, n), z)
  return np.where(rng.random(n) < 0.5, z, rng.integers(0, V, n))


def teacher_rows(rng, s):
  """(ids [s, K] distinct per row, values [s, K] descending from 0.0, lse [s]) like NeMo's."""
  cand = np.sort(ids(rng, s * 2 * K).reshape(s, 2 * K), axis=1)
  dup = np.zeros_like(cand, bool)
  dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
  order = np.argsort(dup, axis=1, kind='stable')  # unique ids first
  top = np.take_along_axis(cand, order, 1)[:, :K]
  top = np.where(np.take_along_axis(dup, order, 1)[:, :K], rng.integers(0, V, (s, K)), top)
  top = np.take_along_axis(top, np.argsort(rng.random((s, K)), axis=1), 1).astype(np.int32)
  gaps = rng.exponential(1.0, (s, K - 1)) * (0.45 / np.sqrt(np.arange(1, K)))
  gaps[:, 0] *= np.exp(rng.normal(np.log(2.0), 0.8, s)) / 0.45  # confident first choice
  z = rng.normal(15, 3, (s, 1)) - np.concatenate([np.zeros((s, 1)), np.cumsum(gaps, 1)], 1)
  z = -np.sort(-z.astype(ml_dtypes.bfloat16).astype(np.float32), axis=1)  # bf16 logits
  vals = z - z[:, :1]
  lse = np.log1p(np.exp(vals[:, 1:]).sum(1)) + rng.exponential(0.3, s)
  return top, vals.astype(np.float32), lse.astype(np.float32)


def chat_example(rng, index):
  """An OASST-shaped example: (Record without padding, context length)."""
  parts = [(int(rng.integers(30, 50)), 0)]  # system header
  for _ in range(int(rng.integers(1, 4))):
    parts += [(int(rng.lognormal(np.log(40), 0.9)) + 4, 0), (int(rng.lognormal(np.log(160), 0.9)) + 4, 1)]
  mask = np.concatenate([np.full(n, m, np.uint8) for n, m in parts])[:MAX_LEN]
  input_ids = ids(rng, len(mask) + 1)
  input_ids = np.where(input_ids == EOS, EOS + 1, input_ids).astype(np.int32)
  top, vals, lse = teacher_rows(rng, len(mask))
  rec = logit_store.Record(index, input_ids[:-1], input_ids[1:], mask, top, vals, lse)
  ones = np.flatnonzero(mask)  # NeMo's contexts end where the last answer span starts
  zeros = np.flatnonzero(mask[:ones[-1]] == 0) if len(ones) else ()
  return rec, (int(zeros[-1]) + 2 if len(zeros) else 1)


def nemo_line(rec, ctx, width, rng):
  """The JSONL line NeMo's teacher pass writes for `rec` in a batch padded to `width`."""
  pad = width - len(rec.tokens)
  p_ids, p_vals, p_lse = teacher_rows(rng, pad)  # the teacher also runs on the eos padding
  full = np.concatenate([rec.tokens, rec.labels[-1:]])
  eos = [EOS] * pad
  return json.dumps({
      'tokens': rec.tokens.tolist() + eos, 'labels': rec.labels.tolist() + eos,
      'loss_mask': rec.loss_mask.tolist() + [0] * pad,
      'contexts': full[:ctx].tolist() + [EOS] * (width - ctx), 'context_lengths': ctx,
      'answers': full[ctx:].tolist() + [EOS] * max(0, width - len(full) + ctx),
      'metadata': {'system': SYSTEM, 'mask': 'User', 'type': 'VALUE_TO_TEXT'},
      'topk_logits': np.concatenate([rec.topk_logits, p_vals]).tolist(),
      'topk_token_ids': np.concatenate([rec.topk_ids, p_ids]).tolist(),
      'log_sum_exp_logits': np.concatenate([rec.lse, p_lse]).tolist(), 'index': rec.index})


def write_nemo(template, n_chunks, per_chunk, rng):
  """NeMo chunk files; returns the records (unpadded) and the padded positions written."""
  records, padded = [], 0
  paths = nemo_jsonl.chunk_paths(template, n_chunks)
  files = [open(p, 'w') for p in paths]
  for first in range(0, n_chunks * per_chunk, GBS):
    batch = [chat_example(rng, i) for i in range(first, min(first + GBS, n_chunks * per_chunk))]
    width = min(MAX_LEN, -(-max(len(r.tokens) for r, _ in batch) // 8) * 8)
    for rec, ctx in batch:
      files[rec.index // per_chunk].write(nemo_line(rec, ctx, width, rng) + '\n')
      records.append(rec)
      padded += width
  for f in files:
    f.close()
  return records, padded


class ChunkedJsonl:
  """NeMo-Aligner's reader (spec §4): every access re-opens the chunk and scans to the line;
  KnowledgeDistillationDataset then makes int64 / float32 tensors (numpy here)."""

  def __init__(self, template, n_chunks, per_chunk):
    self.paths, self.per_chunk = nemo_jsonl.chunk_paths(template, n_chunks), per_chunk

  def __getitem__(self, i):
    chunk, line_no = divmod(i, self.per_chunk)
    with open(self.paths[chunk]) as f:
      for j, line in enumerate(f):
        if j == line_no:
          d = json.loads(line)
          break
    out = {k: np.asarray(d[k], np.int64) for k in ('tokens', 'labels', 'loss_mask', 'topk_token_ids')}
    out.update({k: np.asarray(d[k], np.float32) for k in ('topk_logits', 'log_sum_exp_logits')})
    return out


def _drain(workers):
  """Batches a Grain loader of `workers` holds read ahead: one from each worker and their
  prefetch buffers' (2 x 4 read threads each)."""
  return max(1, workers) * (1 + 2 * 4)


def du(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--examples', type=int, default=1000,
                  help=f'examples in all, a multiple of --chunks, more than '
                       f'{8 * 2 * _drain(2) + 8} (default: %(default)s)')
  ap.add_argument('--chunks', type=int, default=4, help="NeMo n_chunks (the tutorial uses 1)")
  ap.add_argument('--nemo-reads', type=int, default=24, help='random ChunkedJsonl accesses to time')
  ap.add_argument('--workdir', default=None, help='kept if given; a temp dir otherwise')
  args = ap.parse_args()
  if args.examples // 8 <= 2 * _drain(2):
    ap.error(f'--examples={args.examples}: the Grain rows time batches of 8 in steady state, '
             f'after {_drain(2)} and before the last {_drain(2)}: give more than '
             f'{8 * 2 * _drain(2) + 8}')
  work = args.workdir or tempfile.mkdtemp(prefix='jkd-bench-store-')
  os.makedirs(work, exist_ok=True)
  per_chunk = args.examples // args.chunks
  rng = np.random.default_rng(0)
  template = os.path.join(work, 'train_with_logits_CHUNK_ID.jsonl')

  t = time.perf_counter()
  records, padded = write_nemo(template, args.chunks, per_chunk, rng)
  tokens = sum(len(r.tokens) for r in records)
  masked = sum(int(r.loss_mask.sum()) for r in records)
  print(f'records: {len(records)} chat examples, K={K}, V={V}; {tokens:,} tokens '
        f'({tokens / len(records):.0f}/example, {masked / tokens:.0%} under the loss mask); '
        f'NeMo pads them to {padded:,} positions (GBS={GBS}, multiple of 8); '
        f'JSONL written in {time.perf_counter() - t:.0f} s')

  meta = logit_store.StoreMeta(k=K, vocab_size=V, values_dtype='bfloat16',
                               teacher_fingerprint='synthetic', tokenizer_fingerprint='synthetic')
  t = time.perf_counter()
  nemo_jsonl.import_chunks(template, os.path.join(work, 'store'), 'train', meta, n_chunks=args.chunks,
                           n_examples_per_chunk=per_chunk, pad_id=EOS)
  import_s = time.perf_counter() - t
  variants = [('bf16 (masked_only)', dict(masked_only=True)), ('fp32', dict(values_dtype='float32')),
              ('bf16, codec none', dict(codec='none'))]
  for name, change in variants:
    w = logit_store.Writer(os.path.join(work, name.replace(' ', '_')), 'train',
                           dataclasses.replace(meta, **change), process_index=0)
    for b in range(0, len(records), 256):
      w.write_block(records[b:b + 256])

  jsonl = sum(os.path.getsize(p) for p in nemo_jsonl.chunk_paths(template, args.chunks))
  rows = [('NeMo-Aligner JSONL', jsonl), ('jkd store bf16 (imported from the JSONL)', du(os.path.join(work, 'store')))]
  rows += [(f'jkd store {n}', du(os.path.join(work, n.replace(' ', '_')))) for n, _ in variants]
  print('\nstorage (same records; bytes / real token)          bytes   B/token   JSONL / store')
  for name, size in rows:
    print(f'  {name:44s} {size / 1e6:9.1f} MB {size / tokens:8.1f} {jsonl / size:10.1f}x')
  blocks = os.path.join(work, 'store', 'train', 'blocks')
  parts = {a: sum(du(os.path.join(blocks, b, a)) for b in os.listdir(blocks))
           for a in ('topk_ids', 'topk_logits', 'lse', 'tokens', 'labels', 'loss_mask')}
  print('  bf16 store by array, B/token: ' + ', '.join(f'{a} {n / tokens:.1f}' for a, n in parts.items()))
  print('  bf16 rounds the top-K logits (the store default, lossy); fp32 holds the JSONL\'s '
        'values exactly (the like-for-like size)')
  print(f'  NeMo JSONL per padded position: {jsonl / padded:.0f} B ({padded / tokens:.2f} positions per '
        f'real token); without its padding the store would still be '
        f'{jsonl / padded / (rows[1][1] / tokens):.1f}x smaller; import took {import_s:.0f} s')

  order = np.random.default_rng(1).permutation(len(records))
  nemo = ChunkedJsonl(template, args.chunks, per_chunk)
  t = time.perf_counter()
  for i in order[:args.nemo_reads]:
    nemo[int(i)]
  nemo_rate = args.nemo_reads / (time.perf_counter() - t)
  reader = logit_store.Reader(os.path.join(work, 'store'), 'train')
  t = time.perf_counter()
  for i in order:
    reader[int(i)]
  reader_rate = len(order) / (time.perf_counter() - t)
  rates = [('NeMo ChunkedJsonl (re-open, scan to line, parse)', nemo_rate),
           ('jkd Reader[i], one thread, checks on', reader_rate)]
  for workers in (0, 2):
    it = loader.make_loader(os.path.join(work, 'store'), 'train', batch_size=8, seed=0,
                            num_epochs=1, max_seq_length=MAX_LEN, pad_id=EOS, worker_count=workers,
                            shard_index=0, shard_count=1)
    # Steady state only: start-up is not reading (the first batches, and those the prefetch
    # buffers filled meanwhile), and the last ones were read before they were asked for. With
    # the buffers full at both ends of the clock, the batches taken equal those read.
    for _ in range(_drain(workers)):
      next(it)
    t, n = time.perf_counter(), 0
    for _ in range(len(records) // 8 - 2 * _drain(workers)):
      n += len(next(it)['tokens'])
    rates.append((f'jkd Grain make_loader, shuffled, batch 8, {workers} workers',
                  n / (time.perf_counter() - t)))
    it.close()
  print(f'\nrandom access (shuffled order, K={K})                       examples/s   vs NeMo')
  for name, rate in rates:
    print(f'  {name:58s} {rate:9.1f} {rate / nemo_rate:9.0f}x')

  best_grain = max(r for n, r in rates if 'Grain' in n)
  ratio = jsonl / rows[1][1]
  print(f'\ntargets: store bytes <= 1/8 of JSONL: {"PASS" if ratio >= 8 else "FAIL"} (1/{ratio:.1f}); '
        f'Grain >= 100x ChunkedJsonl: {"PASS" if best_grain >= 100 * nemo_rate else "FAIL"} '
        f'({best_grain / nemo_rate:.0f}x)')
  if not args.workdir:
    shutil.rmtree(work)


if __name__ == '__main__':
  main()
