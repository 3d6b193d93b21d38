"""NeMo-Aligner interop: its `*_with_logits_CHUNK_ID.jsonl` KD chunks <-> a jkd logit store.

NeMo's record schema is spec §1.5 (key order as written, every record eos-padded to its batch's
length), its reader ChunkedJsonl is spec §4: chunk c of `n_chunks` replaces the literal
`CHUNK_ID` in the path and must hold exactly `n_examples_per_chunk` lines. Import checks what
ChunkedJsonl does not (every chunk present, exact line counts, ids, order, finiteness) and
raises one clear line; export writes chunks NeMo's trainer reads unchanged. Everything goes
through logit_store's public API; the store layout stays in that module.

    python -m jkd.data.nemo_jsonl import TEMPLATE STORE --split train --n-chunks N \
        --n-examples-per-chunk M --k K --vocab-size V [--pad-id EOS] [--sort] ...
    python -m jkd.data.nemo_jsonl export STORE TEMPLATE --split train [--n-examples-per-chunk M]

(errors: one line naming the file, exit 2, as jkd.main).
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np

from jkd.data.logit_store import (Reader, Record, StoreMeta, Writer, check_finished,
                                  check_record, mark_finished)

NEMO_KD_KEYS = ('tokens', 'labels', 'loss_mask', 'topk_logits', 'topk_token_ids',
                'log_sum_exp_logits', 'index')
CHUNK_ID = 'CHUNK_ID'


def chunk_paths(path_template: str, n_chunks: int) -> list[str]:
  """ChunkedJsonl's file names: chunk c replaces the literal `CHUNK_ID` in the template."""
  if CHUNK_ID not in path_template:
    raise ValueError(f'NeMo chunk template {path_template!r} has no {CHUNK_ID} placeholder')
  return [path_template.replace(CHUNK_ID, str(c)) for c in range(n_chunks)]


def _records(f):
  """(physical line number, line) of the records of an open chunk file: its non-blank lines."""
  return ((n, line) for n, line in enumerate(f, 1) if line.strip())


def _count_records(path):
  try:
    with open(path, encoding='utf-8') as f:
      return sum(1 for _ in _records(f))
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e})') from None


def _from_nemo(obj, index, pad_id, where):
  missing = [k for k in NEMO_KD_KEYS[:-1] if k not in obj]
  if missing:
    raise ValueError(f'{where}: NeMo KD record lacks {", ".join(missing)} (spec §1.5)')
  try:
    a = {k: np.asarray(obj[k]) for k in NEMO_KD_KEYS[:-1]}
  except ValueError:
    raise ValueError(f'{where}: ragged top-K rows (every position needs K entries)') from None
  for k, v in a.items():
    if v.dtype.kind not in 'biuf':
      raise ValueError(f'{where}: {k} must hold numbers (got {v.dtype.kind!r}-kind values, '
                       f'e.g. {v.ravel()[:1].tolist()})')
    rows = k.startswith('topk_')  # a row of K per position; an empty example has no rows: []
    if v.ndim != (2 if rows else 1) and not (rows and v.shape == (0,)):
      raise ValueError(f'{where}: {k} must be a list of '
                       f'{"rows of K numbers" if rows else "numbers"}, one per position (got '
                       f'{"a single number" if v.ndim == 0 else f"{v.ndim} levels of lists"})')
  n = len(a['tokens'])
  if pad_id is not None:  # trailing eos padding of the batch layout: pad token, pad label, mask 0
    padlike = (a['tokens'] == pad_id) & (a['labels'] == pad_id) & (a['loss_mask'] == 0)
    n = int(np.flatnonzero(~padlike)[-1]) + 1 if (~padlike).any() else 0
  rec = Record(index, a['tokens'][:n], a['labels'][:n], a['loss_mask'][:n],
               a['topk_token_ids'][:n], a['topk_logits'][:n], a['log_sum_exp_logits'][:n])
  fields = {k: v for k, v in obj.items() if k not in NEMO_KD_KEYS}
  if 'index' in obj and obj['index'] != index:  # keyed by position: export writes its own back
    fields['index'] = obj['index']
  extra = {'keys': list(obj), 'padded_length': len(a['tokens']), 'pad_id': pad_id,
           'fields': fields}
  return rec, extra


def import_chunks(path_template: str, root: str, split: str, meta: StoreMeta, *,
                      n_chunks: int, n_examples_per_chunk: int, pad_id: int | None = None,
                      sort: bool = False, index: str = 'field', examples_per_block: int = 256,
                      process_index: int = 0) -> int:
  """Imports NeMo-Aligner KD chunks into `root/split`; returns the number of examples imported.

  `index='field'` keys examples by the record's `index`, `'position'` by chunk * n + line (what
  ChunkedJsonl serves). `pad_id` (the eos id) strips the trailing batch padding; export restores
  it with NeMo's collate pad values. Non-KD fields (contexts, answers, metadata, ...) are kept per
  example for export. Reruns resume: examples already stored are skipped.
  """
  if index not in ('field', 'position'):
    raise ValueError(f"import_chunks: index={index!r}, expected 'field' or 'position'")
  for name, value in (('n_chunks', n_chunks), ('n_examples_per_chunk', n_examples_per_chunk)):
    if value < 1:  # zero chunks would import nothing and mark an empty split finished
      raise ValueError(f'import_chunks: {name}={value}, must be >= 1')
  paths = chunk_paths(path_template, n_chunks)
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{missing[0]}: no such file ({len(missing)} of {n_chunks} NeMo '
                            f'chunk files missing: {", ".join(missing)})')
  for p in paths:
    if (n := _count_records(p)) != n_examples_per_chunk:
      raise ValueError(f'{p}: {n} records, but n_examples_per_chunk={n_examples_per_chunk}')
  writer = None  # opened at once on a rerun (resume, meta check), else with the first block,
  #                so an import refused before then leaves no split behind

  def write(recs, extras):
    nonlocal writer
    writer = writer or Writer(root, split, meta, sort=sort, process_index=process_index)
    writer.write_block(recs, extras)

  if os.path.isdir(os.path.join(root, split)):
    writer = Writer(root, split, meta, sort=sort, process_index=process_index)
  done = writer.committed if writer else frozenset()
  seen, recs, extras, count = {}, [], [], 0
  for c, path in enumerate(paths):
    with open(path, encoding='utf-8') as f:  # counted above: UTF-8 throughout
      for position, (line_no, line) in enumerate(_records(f)):
        where = f'{path}:{line_no}'
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{where}: not valid JSON ({e})') from None
        if not isinstance(obj, dict):
          raise ValueError(f'{where}: expected a JSON object, got {type(obj).__name__}')
        if index == 'field':
          i = obj.get('index')
          if i is None:
            raise ValueError(f"{where}: no 'index' field; pass index='position'")
          if type(i) is not int or i < 0:
            raise ValueError(f"{where}: 'index' must be a non-negative integer, got {i!r}; "
                             "pass index='position' to key by line")
        else:
          i = c * n_examples_per_chunk + position
        if i in seen:
          raise ValueError(f"{where}: index {i} repeats {seen[i]}; pass index='position' to key by line")
        seen[i] = where
        if i in done:
          continue
        rec, extra = _from_nemo(obj, i, pad_id, where)
        recs.append(check_record(rec, meta, sort=sort, where=f'{where} (example {i})'))
        extras.append(extra)
        if len(recs) == examples_per_block:
          write(recs, extras)
          count, recs, extras = count + len(recs), [], []
  write(recs, extras)
  mark_finished(root, split, seen)
  return count + len(recs)


def _to_nemo(rec, extra):
  s = len(rec.tokens)
  pad_to = extra['padded_length'] if extra else s
  pad = extra['pad_id'] if extra else None
  grow = pad_to - s  # NeMo collate pad values: eos tokens, labels and ids, 0 mask and logits

  def padded(x, value):
    return np.concatenate([x, np.full((grow,) + x.shape[1:], value, x.dtype)]) if grow else x
  values = {'tokens': padded(rec.tokens, pad).tolist(), 'labels': padded(rec.labels, pad).tolist(),
            'loss_mask': padded(rec.loss_mask, 0).tolist(),
            'topk_logits': padded(rec.topk_logits, 0.0).tolist(),
            'topk_token_ids': padded(rec.topk_ids, pad).tolist(),
            'log_sum_exp_logits': padded(rec.lse, 0.0).tolist(), 'index': rec.index}
  if extra:
    values.update(extra['fields'])
  return {k: values[k] for k in (extra['keys'] if extra else NEMO_KD_KEYS)}


def export_chunks(root: str, split: str, path_template: str, *,
                      n_examples_per_chunk: int | None = None) -> int:
  """Writes the split as NeMo-Aligner chunks in index order; returns n_chunks for the trainer.
  Only a finished split is exported, and the chunk files appear together once all are written."""
  check_finished(root, split)  # an unfinished extraction would export as complete-looking chunks
  r = Reader(root, split)
  n = n_examples_per_chunk or max(len(r), 1)
  if len(r) % n:
    raise ValueError(f'n_examples_per_chunk={n_examples_per_chunk}: the {len(r)} examples of '
                     f'{root}/{split} do not fill chunks of that many (NeMo ChunkedJsonl needs '
                     'equal chunks)')
  paths = chunk_paths(path_template, len(r) // n)
  folder = os.path.dirname(paths[0]) or '.'
  if not os.path.isdir(folder):  # else the error names a temporary file
    raise FileNotFoundError(f'{folder}: no such directory (for the chunks {path_template})')
  tmps = [f'{path}.tmp-{uuid.uuid4().hex[:8]}' for path in paths]
  try:
    for c, tmp in enumerate(tmps):
      with open(tmp, 'w') as f:
        for i in range(c * n, (c + 1) * n):
          f.write(json.dumps(_to_nemo(r[i], r.extras(i))) + '\n')
  except BaseException:
    for tmp in tmps:
      if os.path.exists(tmp):
        os.remove(tmp)
    raise
  for tmp, path in zip(tmps, paths):
    os.replace(tmp, path)
  return len(paths)


def _bad_argument(a) -> str | None:
  """What is wrong with the parsed counts, naming the flag; None if nothing. Zero chunks
  imported nothing and exited 0; a zero K or vocabulary failed in StoreMeta's words."""
  flags = {'--n-chunks': 'n_chunks', '--n-examples-per-chunk': 'n_examples_per_chunk',
           '--k': 'k', '--vocab-size': 'vocab_size'}
  for flag, name in flags.items():
    value = getattr(a, name, None)  # export has only --n-examples-per-chunk, and may omit it
    if value is not None and value < 1:
      return f'{flag} {value}: must be >= 1'
  if a.command == 'import' and a.k > a.vocab_size:
    return f'--k {a.k}: exceeds --vocab-size {a.vocab_size} (a row holds the top K of V logits)'
  return None


def main(argv=None) -> int:
  import argparse
  import sys

  from jkd.main import ERRORS, error_line
  p = argparse.ArgumentParser(prog='python -m jkd.data.nemo_jsonl',
                              description='NeMo-Aligner KD chunks <-> a jkd logit store')
  sub = p.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='NeMo chunks -> store split')
  imp.add_argument('template', help=f'chunk path with the literal {CHUNK_ID}')
  imp.add_argument('store')
  imp.add_argument('--n-chunks', type=int, required=True)
  imp.add_argument('--n-examples-per-chunk', type=int, required=True)
  imp.add_argument('--k', type=int, required=True, help='top-K width of the records')
  imp.add_argument('--vocab-size', type=int, required=True, help="the teacher's vocabulary")
  imp.add_argument('--values-dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  imp.add_argument('--pad-id', type=int, help='eos id: strips the batch padding')
  imp.add_argument('--sort', action='store_true', help='sort rows that are not descending')
  imp.add_argument('--index', default='field', choices=('field', 'position'),
                   help="key examples by the record's index, or by chunk * n + line")
  imp.add_argument('--teacher-fingerprint', default='')
  imp.add_argument('--tokenizer-fingerprint', default='')
  exp = sub.add_parser('export', help='store split -> NeMo chunks')
  exp.add_argument('store')
  exp.add_argument('template')
  exp.add_argument('--n-examples-per-chunk', type=int)
  for q in (imp, exp):
    q.add_argument('--split', default='train', help='the store split (default: train)')
  a = p.parse_args(argv)
  if (bad := _bad_argument(a)) is not None:  # before StoreMeta words it without the flag
    print(error_line(ValueError(bad)), file=sys.stderr)
    return 2
  try:
    if a.command == 'import':
      meta = StoreMeta(k=a.k, vocab_size=a.vocab_size, values_dtype=a.values_dtype,
                       teacher_fingerprint=a.teacher_fingerprint,
                       tokenizer_fingerprint=a.tokenizer_fingerprint)
      n = import_chunks(a.template, a.store, a.split, meta, n_chunks=a.n_chunks,
                        n_examples_per_chunk=a.n_examples_per_chunk, pad_id=a.pad_id,
                        sort=a.sort, index=a.index)
      print(f'[nemo_jsonl] imported {n} examples -> {a.store}/{a.split}')
    else:
      n = export_chunks(a.store, a.split, a.template, n_examples_per_chunk=a.n_examples_per_chunk)
      print(f'[nemo_jsonl] {a.store}/{a.split} -> {n} chunks {a.template}')
  except ERRORS as e:
    print(error_line(e), file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
