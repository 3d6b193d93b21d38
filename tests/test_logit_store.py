"""Logit store (jkd.data.logit_store) and NeMo-Aligner JSONL interop (jkd.data.nemo_jsonl).

Protects: lossless round trips (ids exact, values exact in fp32 and bf16-rounded in bf16,
masked_only rows), resume from the manifest, crash atomicity, every bad input raising one clear
error on write, import and read, and NeMo chunks -> store -> chunks reproducing the records.
"""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from jkd.data import logit_store as ls
from jkd.data import nemo_jsonl

K = 8
V_SMALL, V_LARGE = 300, 70_000  # uint16 ids / int32 ids


def make_record(rng, index, s, *, k=K, v=V_SMALL):
  """A valid record; tokens[0] = index (an identity the loader tests use)."""
  tokens = rng.integers(2, v, s).astype(np.int32)
  tokens[0] = index
  ids_SxK = np.stack([rng.choice(v, k, replace=False) for _ in range(s)]).astype(np.int32)
  gaps = rng.exponential(1.0, (s, k)).astype(np.float32)
  gaps[:, 0] = 0
  return ls.Record(index, tokens, np.roll(tokens, -1), (rng.random(s) < 0.6).astype(np.uint8),
                   ids_SxK, -np.cumsum(gaps, axis=1), rng.random(s).astype(np.float32) + 0.5)


def make_meta(**kw):
  return ls.StoreMeta(**{'k': K, 'vocab_size': V_SMALL, 'values_dtype': 'float32',
                         'teacher_fingerprint': 'teacher', 'tokenizer_fingerprint': 'tok', **kw})


def write_store(root, records, meta, block_size=3, split='train', process_index=0):
  w = ls.Writer(root, split, meta, process_index=process_index)
  for b in range(0, len(records), block_size):
    w.write_block(records[b:b + block_size])
  w.close()


def assert_same(got, want, meta):
  """`got` from the store equals `want` under the store's dtype and masked_only semantics."""
  assert got.index == want.index
  for f in ('tokens', 'labels', 'loss_mask'):
    np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
  rows = want.loss_mask == 1 if meta.masked_only else np.ones(len(want.tokens), bool)
  vals = want.topk_logits.astype(ml_dtypes.bfloat16).astype(np.float32) \
      if meta.values_dtype == 'bfloat16' else want.topk_logits
  np.testing.assert_array_equal(got.topk_ids[rows], want.topk_ids[rows])
  np.testing.assert_array_equal(got.topk_logits[rows], vals[rows])
  np.testing.assert_array_equal(got.lse[rows], want.lse[rows])
  assert got.topk_logits.dtype == np.float32 and got.topk_ids.dtype == np.int32
  if meta.masked_only:  # documented fill where nothing is stored
    assert (got.topk_ids[~rows] == 0).all() and (got.topk_logits[~rows] == 0).all()
    assert (got.lse[~rows] == 0).all()


@pytest.mark.parametrize('values_dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('masked_only', [False, True])
@pytest.mark.parametrize('vocab', [V_SMALL, V_LARGE])
def test_round_trip(tmp_path, values_dtype, masked_only, vocab):
  rng = np.random.default_rng(0)
  order = [5, 2, 9, 0, 7, 1, 3]  # blocks hold any subset of indices in any order
  recs = [make_record(rng, i, int(rng.integers(1, 90)), v=vocab) for i in order]
  meta = make_meta(vocab_size=vocab, values_dtype=values_dtype, masked_only=masked_only)
  write_store(str(tmp_path), recs, meta)
  r = ls.Reader(str(tmp_path), 'train')
  assert r.meta == meta and len(r) == 7 and r.indices.tolist() == sorted(order)
  by_index = {x.index: x for x in recs}
  for i in range(len(r)):
    assert_same(r[i], by_index[int(r.indices[i])], meta)
  with pytest.raises(IndexError):
    r[7]


def test_empty_example_and_empty_mask(tmp_path):
  rng = np.random.default_rng(1)
  a, b = make_record(rng, 0, 1), make_record(rng, 1, 5)
  b.loss_mask[:] = 0  # masked_only stores no rows for b
  meta = make_meta(masked_only=True)
  write_store(str(tmp_path), [a, b], meta)
  r = ls.Reader(str(tmp_path), 'train')
  assert_same(r[0], a, meta)
  assert_same(r[1], b, meta)


def test_ids_dtype_is_smallest_lossless():
  assert make_meta(vocab_size=65536).ids_dtype == 'uint16'
  assert make_meta(vocab_size=65537).ids_dtype == 'int32'


def test_meta_mismatch_names_the_field(tmp_path):
  write_store(str(tmp_path), [make_record(np.random.default_rng(0), 0, 4)], make_meta())
  for change, field in [({'k': 4}, 'k='), ({'values_dtype': 'bfloat16'}, 'values_dtype='),
                        ({'teacher_fingerprint': 'other'}, 'teacher_fingerprint='),
                        ({'masked_only': True}, 'masked_only=')]:
    with pytest.raises(ValueError, match=field):
      ls.Writer(str(tmp_path), 'train', make_meta(**change), process_index=0)
  with pytest.raises(ValueError, match='values_dtype'):
    make_meta(values_dtype='float16')


def test_store_from_before_teacher_dtype_and_digests_still_reads_and_resumes(tmp_path):
  """A manifest without teacher_dtype reads as unrecorded (''), and blocks without
  inputs_sha256 are not checked; new blocks record the digest of what they were made from."""
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, 5) for i in range(4)]
  write_store(str(tmp_path), recs[:2], make_meta(), block_size=1)
  split = tmp_path / 'train'
  manifest = json.loads((split / 'manifest.p00000.json').read_text())
  assert [b['inputs_sha256'] for b in manifest['blocks']] == [
      ls.inputs_digest([(r.index, r.tokens, r.labels, r.loss_mask)]) for r in recs[:2]]
  meta = json.loads((split / 'manifest.json').read_text())
  del meta['teacher_dtype']
  (split / 'manifest.json').write_text(json.dumps(meta))
  del manifest['blocks'][0]['inputs_sha256']
  (split / 'manifest.p00000.json').write_text(json.dumps(manifest))
  assert ls.read_meta(str(split)).teacher_dtype == ''
  w = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)
  other = {r.index: (r.tokens + 1, r.labels, r.loss_mask) for r in recs}
  with pytest.raises(ValueError, match=r'block p00000-b000001 \(examples 1\.\.1\) was made from '
                     'other tokens, labels or loss masks than the test data gives now'):
    w.check_inputs(other, 'the test data')
  w.check_inputs({**other, 1: (recs[1].tokens, recs[1].labels, recs[1].loss_mask)}, 'x')
  with pytest.raises(ValueError, match="teacher_dtype=''"):
    ls.Writer(str(tmp_path), 'train', make_meta(teacher_dtype='float32'), process_index=0)


def test_resume_from_committed(tmp_path):
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, 6) for i in range(6)]
  w = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)
  w.write_block(recs[:3])
  w2 = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)  # a rerun
  assert w2.committed == {0, 1, 2}
  with pytest.raises(ValueError, match='example 1: already stored'):
    w2.write_block([recs[3], recs[1]])
  with pytest.raises(ValueError, match='example 4: already in this block'):
    w2.write_block([recs[4], recs[4]])
  w2.write_block([r for r in recs if r.index not in w2.committed])
  assert w2.committed == set(range(6))
  assert sorted(os.listdir(tmp_path / 'train' / 'blocks')) == ['p00000-b000000', 'p00000-b000001']
  assert len(ls.Reader(str(tmp_path), 'train')) == 6


def _writer_in_another_process(root, *, hold: bool = False):
  """A Writer of root's train split as process 0 in a new process: (it, its first line):
  'open' (holding it while `hold`, else closed at once) or the error it got."""
  import subprocess
  import sys
  code = ('import sys, time\nfrom jkd.data import logit_store as ls\n'
          'from tests.test_logit_store import make_meta\n'
          'try:\n'
          f'  w = ls.Writer({str(root)!r}, "train", make_meta(), process_index=0)\n'
          'except ValueError as e:\n'
          '  print(e, flush=True)\n'
          '  sys.exit()\n'
          f'print("open", flush=True)\ntime.sleep({600 if hold else 0})\n')
  proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return proc, proc.stdout.readline().strip()


def test_a_second_writer_of_a_split_and_process_is_refused(tmp_path):
  """Two jobs writing one split as the same process would remove each other's unfinished
  blocks (each takes the other's for its own crash's): the second is refused while the first
  lives, naming the lock; once it ends (killed here), the split opens again. Another process
  index is not refused, nor is a reopening by the writing process itself, whose end leaves the
  first writer's hold in place until that one closes."""
  holder, line = _writer_in_another_process(tmp_path, hold=True)
  try:
    assert line == 'open'
    lock = tmp_path / 'train' / '.writer.p00000.lock'
    with pytest.raises(ValueError, match=rf'another job is writing this split as process 0 '
                                         rf'\(it holds {lock}\)'):
      ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)
    ls.Writer(str(tmp_path), 'train', make_meta(), process_index=1)
  finally:
    holder.kill()
    holder.wait()
  w = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)
  again = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)  # a rerun in-process
  del again  # its descriptor closed would drop a POSIX lock of the process: it is not closed
  proc, line = _writer_in_another_process(tmp_path)
  proc.wait()
  assert line.endswith(f'another job is writing this split as process 0 (it holds {lock}); '
                       'extraction or import jobs on one store run one after another'), line
  w.write_block([make_record(np.random.default_rng(0), 0, 4)])
  w.close()
  proc, line = _writer_in_another_process(tmp_path)
  proc.wait()
  assert line == 'open'


def test_block_numbers_past_six_digits(tmp_path):
  """Blocks are numbered per process with at least 6 digits; past 999999 a rerun still finds
  the next number and the reader keeps the blocks in numeric order."""
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, 6) for i in range(4)]
  w = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)
  w._next = 999_999
  w.write_block(recs[:2])
  w.write_block(recs[2:3])
  w2 = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)  # a rerun
  assert w2.committed == {0, 1, 2} and w2._next == 1_000_001
  w2.write_block(recs[3:])
  assert [ls._block_key(b['name']) for b in ls.Reader(str(tmp_path), 'train')._entries] == [
      (0, 999_999), (0, 1_000_000), (0, 1_000_001)]


def test_only_finished_jobs_make_a_split_trainable(tmp_path):
  """Committed blocks of a job that never finished (a killed extraction) are refused by
  check_finished, naming how many examples; jobs of separate ranges add up."""
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, 5) for i in range(8)]
  write_store(str(tmp_path), recs[:6], make_meta())
  with pytest.raises(ValueError, match=r'train: 6 of 6 examples \(indices 0\.\.5\) are from an '
                     'extraction or import that did not finish'):
    ls.check_finished(str(tmp_path), 'train')
  ls.mark_finished(str(tmp_path), 'train', range(4))  # job 1 asked for 0..3 only
  with pytest.raises(ValueError, match=r'2 of 6 examples \(indices 4\.\.5\)'):
    ls.check_finished(str(tmp_path), 'train')
  ls.mark_finished(str(tmp_path), 'train', [4, 5])  # job 2: 4..5
  assert ls.check_finished(str(tmp_path), 'train') == 6
  assert json.load(open(tmp_path / 'train' / 'finished.json'))['indices'] == [[0, 6]]


def test_a_range_no_job_ran_keeps_a_split_untrainable(tmp_path):
  """Jobs record how many examples their data holds: a split whose finished jobs cover only
  part of it (a chunk job that never ran) is refused, naming the missing indices, where it
  used to pass as a smaller, complete split. Data of another size is refused up front."""
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, 5) for i in range(10)]
  write_store(str(tmp_path), recs[:4] + recs[8:], make_meta())
  ls.mark_finished(str(tmp_path), 'train', range(4), total=10)  # chunk 0 of 0..3, 4..7, 8..9
  ls.mark_finished(str(tmp_path), 'train', [8, 9], total=10)  # chunk 2; chunk 1 never ran
  with pytest.raises(ValueError, match=r"train: 4 of the data's 10 examples \(indices 4\.\.7\) "
                     'were never extracted'):
    ls.check_finished(str(tmp_path), 'train')
  ls.check_total(str(tmp_path), 'train', 10, 'data.train_file=x')
  with pytest.raises(ValueError, match=r'train: extracted from data of 10 examples; '
                     'data.train_file=x holds 12'):
    ls.check_total(str(tmp_path), 'train', 12, 'data.train_file=x')
  write_store(str(tmp_path), recs[4:8], make_meta())
  ls.mark_finished(str(tmp_path), 'train', range(4, 8))  # an import: no total, the one kept
  assert ls.check_finished(str(tmp_path), 'train') == 10
  assert json.load(open(tmp_path / 'train' / 'finished.json')) == {
      'schema_version': ls.SCHEMA_VERSION, 'indices': [[0, 10]], 'total': 10}
  assert ls._ranges([0, 1, 2, 5, 7, 8, 10, 12]) == '0..2, 5, 7..8 and 2 more ranges'
  with pytest.raises(ValueError, match="extracted from data of 10 examples; this job's data "
                     'holds 12: extract it into another store'):
    ls.mark_finished(str(tmp_path), 'train', [0], total=12)  # a direct call: run() checks first
  finished = tmp_path / 'train' / 'finished.json'
  finished.write_text(json.dumps({**json.loads(finished.read_text()), 'total': '10'}))
  with pytest.raises(ValueError, match=r"finished\.json: total '10' is not a count of examples"):
    ls.check_finished(str(tmp_path), 'train')


def test_store_files_that_are_not_objects_are_refused(tmp_path):
  """A manifest.json (or finished.json) holding valid JSON that is not an object was an
  AttributeError traceback."""
  rng = np.random.default_rng(0)
  write_store(str(tmp_path), [make_record(rng, 0, 5)], make_meta())
  (tmp_path / 'train' / 'manifest.json').write_text('[]')
  with pytest.raises(ValueError, match=r'manifest\.json holds a JSON list, not an object'):
    ls.read_meta(str(tmp_path / 'train'))


def test_process_manifests_merge(tmp_path):
  """Per-process writers never share a file; the reader merges their manifests."""
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, 5) for i in range(8)]
  w0 = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)
  w1 = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=1)
  w0.write_block(recs[0::2][:2])
  w1.write_block(recs[1::2])
  w0.write_block(recs[0::2][2:])
  names = sorted(os.listdir(tmp_path / 'train'))
  assert names == ['.writer.p00000.lock', '.writer.p00001.lock', 'blocks', 'manifest.json',
                   'manifest.p00000.json', 'manifest.p00001.json']
  r = ls.Reader(str(tmp_path), 'train')
  assert r.indices.tolist() == list(range(8))
  for i in range(8):
    assert_same(r[i], recs[i], r.meta)
  assert ls.Writer(str(tmp_path), 'train', make_meta(), process_index=2).committed == set(range(8))


def test_crash_before_rename_leaves_nothing_readable(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, 5) for i in range(4)]
  write_store(str(tmp_path), recs[:2], make_meta())

  def crash(*args):
    raise OSError('simulated crash')
  monkeypatch.setattr(ls.os, 'rename', crash)
  with pytest.raises(OSError, match='simulated'):
    ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0).write_block(recs[2:])
  monkeypatch.undo()
  blocks = tmp_path / 'train' / 'blocks'
  assert any(n.startswith('.tmp-') for n in os.listdir(blocks))  # the half-written block
  assert len(ls.Reader(str(tmp_path), 'train')) == 2
  w = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)  # the next run proceeds
  assert w.committed == {0, 1} and not any(n.startswith('.tmp-') for n in os.listdir(blocks))
  w.write_block(recs[2:])
  assert len(ls.Reader(str(tmp_path), 'train')) == 4


def test_crash_before_manifest_update(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, 5) for i in range(4)]
  write_store(str(tmp_path), recs[:2], make_meta())
  real = ls._write_json

  def crash_on_manifest(path, obj):
    if os.path.basename(path).startswith('manifest.p'):
      raise OSError('simulated crash')
    real(path, obj)
  monkeypatch.setattr(ls, '_write_json', crash_on_manifest)
  with pytest.raises(OSError, match='simulated'):
    ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0).write_block(recs[2:])
  monkeypatch.undo()
  assert 'p00000-b000001' in os.listdir(tmp_path / 'train' / 'blocks')  # renamed, not committed
  assert len(ls.Reader(str(tmp_path), 'train')) == 2
  w = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)
  assert w.committed == {0, 1}
  w.write_block(recs[2:])
  r = ls.Reader(str(tmp_path), 'train')
  assert len(r) == 4
  assert_same(r[3], recs[3], r.meta)


# Bad inputs on write: each raises one clear line naming example and position.
def _bad(rng, field, value, pos=(2, 3)):
  rec = make_record(rng, 7, 6)
  rec.loss_mask[:] = 1
  getattr(rec, field)[pos if getattr(rec, field).ndim == 2 else pos[0]] = value
  return rec


@pytest.mark.parametrize('field,value,match', [
    ('topk_ids', V_SMALL, r'example 7 position 2: top-K id 300 outside the vocabulary \[0, 300\)'),
    ('topk_ids', -1, r'example 7 position 2: top-K id -1 outside'),
    ('tokens', 1000, r'example 7 position 2: token id 1000 outside'),
    ('topk_logits', np.nan, r'example 7 position 2: topk_logits is nan \(not finite\)'),
    ('topk_logits', -np.inf, r'example 7 position 2: topk_logits is -inf'),
    ('lse', np.inf, r'example 7 position 2: lse is inf'),
    ('topk_logits', 5.0, r'example 7 position 2: topk_logits not descending at k=3.*sort=True'),
])
def test_write_rejects(tmp_path, field, value, match):
  w = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)
  with pytest.raises(ValueError, match=match):
    w.write_block([_bad(np.random.default_rng(0), field, value)])
  assert w.committed == set() and len(ls.Reader(str(tmp_path), 'train')) == 0


def test_write_rejects_values_the_store_dtype_cannot_hold(tmp_path):
  """-3.4e38 (near -FLT_MAX, a mask fill) is finite in fp32 but -inf in bf16: refused when
  written, not first when training reads it; a float32 store holds it."""
  rec = _bad(np.random.default_rng(0), 'topk_logits', -3.4e38, pos=(2, K - 1))
  w = ls.Writer(str(tmp_path / 'bf16'), 'train', make_meta(values_dtype='bfloat16'),
                process_index=0)
  with pytest.raises(ValueError, match=r"example 7 position 2: topk_logits is -3.4e\+38 "
                                       r"\(overflows the store's bfloat16 to -inf\)"):
    w.write_block([rec])
  write_store(str(tmp_path / 'fp32'), [rec], make_meta())
  assert ls.Reader(str(tmp_path / 'fp32'), 'train')[0].topk_logits[2, K - 1] == np.float32(-3.4e38)


def test_write_rejects_shapes_and_mask(tmp_path):
  rng = np.random.default_rng(0)
  w = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0)
  rec = make_record(rng, 3, 5)
  rec.topk_ids = rec.topk_ids[:, :4]
  with pytest.raises(ValueError, match=r'example 3: topk_ids has shape \[5, 4\], expected \[5, 8\]'):
    w.write_block([rec])
  rec = make_record(rng, 3, 5)
  rec.loss_mask[1] = 2
  with pytest.raises(ValueError, match='example 3 position 1: loss_mask is not 0 or 1'):
    w.write_block([rec])


def test_sort_option_sorts_rows_consistently(tmp_path):
  rng = np.random.default_rng(0)
  rec = make_record(rng, 0, 6)
  perm = rng.permuted(np.tile(np.arange(K), (6, 1)), axis=1)
  shuffled = ls.Record(0, rec.tokens, rec.labels, rec.loss_mask,
                       np.take_along_axis(rec.topk_ids, perm, 1),
                       np.take_along_axis(rec.topk_logits, perm, 1), rec.lse)
  w = ls.Writer(str(tmp_path), 'train', make_meta(), process_index=0, sort=True)
  w.write_block([shuffled])
  assert_same(ls.Reader(str(tmp_path), 'train')[0], rec, make_meta())


def test_masked_only_checks_only_stored_rows(tmp_path):
  rec = make_record(np.random.default_rng(0), 0, 6)
  rec.loss_mask[:] = 1
  rec.loss_mask[2] = 0
  rec.topk_logits[2, 4] = np.nan  # never stored, never read by the loss
  write_store(str(tmp_path), [rec], make_meta(masked_only=True))
  assert ls.Reader(str(tmp_path), 'train')[0].topk_logits[2].tolist() == [0.0] * K


# Bad stores on read.
def _store(tmp_path, n=6, **meta):
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, 5) for i in range(n)]
  write_store(str(tmp_path), recs, make_meta(**meta))
  return tmp_path / 'train'


def _poke(split_dir, array, index, value):
  """Overwrites one stored element of block 0 (bypassing the writer's checks)."""
  a = ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': str(
      split_dir / 'blocks' / 'p00000-b000000' / array)}}, open=True).result()
  a[index].write(value).result()


def test_read_rejects_corrupt_values(tmp_path):
  d = _store(tmp_path)
  _poke(d, 'topk_ids', (6, 2), V_SMALL + 5)  # example 1, position 1
  with pytest.raises(ValueError, match=r'example 1 position 1: top-K id 305 outside'):
    ls.Reader(str(tmp_path), 'train')[1]
  d = _store(tmp_path / 'b')
  bits = np.float32(np.nan).view(np.uint32)  # delta-coded: column 0 holds the value's bits
  _poke(d, 'topk_logits', (0, 0), bits)
  with pytest.raises(ValueError, match=r'example 0 position 0: topk_logits is nan'):
    ls.Reader(str(tmp_path / 'b'), 'train')[0]
  d = _store(tmp_path / 'c')
  _poke(d, 'topk_logits', (3, 5), np.uint32(1 << 31))  # sign flip mid-row: not descending
  with pytest.raises(ValueError, match=r'example 0 position 3: topk_logits not descending'):
    ls.Reader(str(tmp_path / 'c'), 'train')[0]


def test_read_rejects_missing_and_mismatched_blocks(tmp_path):
  d = _store(tmp_path)
  shutil.rmtree(d / 'blocks' / 'p00000-b000001')
  with pytest.raises(FileNotFoundError, match='block p00000-b000001 is listed in the manifest but missing'):
    ls.Reader(str(tmp_path), 'train')
  d = _store(tmp_path / 'b')
  m = json.loads((d / 'manifest.p00000.json').read_text())
  m['blocks'][0]['num_tokens'] += 1
  (d / 'manifest.p00000.json').write_text(json.dumps(m))
  r = ls.Reader(str(tmp_path / 'b'), 'train')
  with pytest.raises(ValueError, match=r'block p00000-b000000: block.json counts \(examples, tokens, rows\) \(3, 15, 15\), the manifest \(3, 16, 15\)'):
    r[0]
  assert r[4].index == 4  # other blocks still read
  d = _store(tmp_path / 'c')
  shutil.rmtree(d / 'blocks' / 'p00000-b000000' / 'lse')
  with pytest.raises(FileNotFoundError, match='block p00000-b000000: array lse cannot be opened'):
    ls.Reader(str(tmp_path / 'c'), 'train')[0]


def test_read_rejects_bad_manifests(tmp_path):
  with pytest.raises(FileNotFoundError, match='no split directory'):
    ls.Reader(str(tmp_path), 'train')
  d = _store(tmp_path)
  m = json.loads((d / 'manifest.json').read_text())
  (d / 'manifest.json').write_text(json.dumps({**m, 'schema_version': 99}))
  with pytest.raises(ValueError, match='schema 99, this jkd reads'):
    ls.Reader(str(tmp_path), 'train')
  d = _store(tmp_path / 'b')
  shutil.copy(d / 'manifest.p00000.json', d / 'manifest.p00003.json')  # same blocks twice
  with pytest.raises(ValueError, match='example 0 is stored twice'):
    ls.Reader(str(tmp_path / 'b'), 'train')
  os.remove(d / 'manifest.json')
  with pytest.raises(FileNotFoundError, match='manifest.json is missing'):
    ls.Reader(str(tmp_path / 'b'), 'train')


# NeMo-Aligner interop.
EOS = 1
SYSTEM = ('A chat between a curious user and an artificial intelligence assistant. The assistant '
          'gives helpful, detailed, and polite answers to the user\'s questions.')


def nemo_batch_records(rng, first, n, *, k=K, v=V_SMALL, max_seq=48):
  """NeMo teacher-pass records of one global batch (spec §1.2-§1.5): eos-padded to the batch's
  L = min(max_seq_length, ceil8(longest)), teacher top-K at every position (padding included),
  fp32 values of bf16 logits minus their max, keys in the order NeMo writes them."""
  lens = rng.integers(4, 40, n)
  width = min(max_seq, -(-int(lens.max()) // 8) * 8)
  out = []
  for j, s in enumerate(lens):
    s = min(int(s), width)
    input_ids = rng.integers(2, v, s + 1).tolist()  # eos (1) and 0 never appear inside
    ctx = int(rng.integers(1, s))
    pad = width - s
    z = np.sort(rng.normal(0, 4, (width, k)).astype(ml_dtypes.bfloat16).astype(np.float32), 1)[:, ::-1]
    ids = np.stack([rng.choice(v, k, replace=False) for _ in range(width)])
    out.append({
        'tokens': input_ids[:-1] + [EOS] * pad, 'labels': input_ids[1:] + [EOS] * pad,
        'loss_mask': [0] * (ctx - 1) + [1] * (s - ctx + 1) + [0] * pad,
        'contexts': input_ids[:ctx] + [EOS] * (width - ctx), 'context_lengths': ctx,
        'answers': input_ids[ctx:] + [EOS] * (width - len(input_ids[ctx:])),
        'metadata': {'system': SYSTEM, 'mask': 'User', 'type': 'VALUE_TO_TEXT'},
        'topk_logits': (z - z[:, :1]).tolist(), 'topk_token_ids': ids.tolist(),
        'log_sum_exp_logits': (rng.random(width) + 0.2).astype(np.float32).tolist(),
        'index': first + j})
  return out


def write_nemo_chunks(tmp_path, n_chunks=2, per_chunk=6, gbs=4, seed=0):
  rng = np.random.default_rng(seed)
  recs = []
  while len(recs) < n_chunks * per_chunk:
    recs += nemo_batch_records(rng, len(recs), min(gbs, n_chunks * per_chunk - len(recs)))
  template = str(tmp_path / 'train_with_logits_CHUNK_ID.jsonl')
  for c, path in enumerate(nemo_jsonl.chunk_paths(template, n_chunks)):
    with open(path, 'w') as f:
      for rec in recs[c * per_chunk:(c + 1) * per_chunk]:
        f.write(json.dumps(rec) + '\n')
  return template, recs


def _lines(template, n_chunks):
  return [open(p).read() for p in nemo_jsonl.chunk_paths(template, n_chunks)]


def test_nemo_round_trip_is_byte_identical(tmp_path):
  template, _ = write_nemo_chunks(tmp_path)
  n = nemo_jsonl.import_chunks(template, str(tmp_path / 'store'), 'train', make_meta(),
                               n_chunks=2, n_examples_per_chunk=6, examples_per_block=4)
  assert n == 12
  out = str(tmp_path / 'out_CHUNK_ID.jsonl')
  assert nemo_jsonl.export_chunks(str(tmp_path / 'store'), 'train', out, n_examples_per_chunk=6) == 2
  assert _lines(out, 2) == _lines(template, 2)


def test_nemo_round_trip_by_position_keeps_the_records_index(tmp_path):
  """Keyed by position (the records' own indices repeat), export still writes each record's
  own index: the lines come back byte-identical."""
  _, recs = write_nemo_chunks(tmp_path)
  template = str(tmp_path / 'rep_CHUNK_ID.jsonl')
  for c, path in enumerate(nemo_jsonl.chunk_paths(template, 2)):
    with open(path, 'w') as f:
      f.writelines(json.dumps({**r, 'index': 0}) + '\n' for r in recs[c * 6:(c + 1) * 6])
  nemo_jsonl.import_chunks(template, str(tmp_path / 'store'), 'train', make_meta(), n_chunks=2,
                           n_examples_per_chunk=6, index='position')
  assert ls.Reader(str(tmp_path / 'store'), 'train')[7].index == 7
  out = str(tmp_path / 'out_CHUNK_ID.jsonl')
  nemo_jsonl.export_chunks(str(tmp_path / 'store'), 'train', out, n_examples_per_chunk=6)
  assert _lines(out, 2) == _lines(template, 2)


def test_nemo_round_trip_without_padding(tmp_path):
  """pad_id strips the batch padding (stored tokens = real tokens); export restores the layout
  with NeMo collate's pad values; bf16 values are the records' values rounded to bf16."""
  template, recs = write_nemo_chunks(tmp_path)
  meta = make_meta(values_dtype='bfloat16')
  nemo_jsonl.import_chunks(template, str(tmp_path / 'store'), 'train', meta, n_chunks=2,
                           n_examples_per_chunk=6, pad_id=EOS)
  r = ls.Reader(str(tmp_path / 'store'), 'train')
  for i, rec in enumerate(recs):
    assert len(r[i].tokens) == len(rec['tokens']) - rec['tokens'].count(EOS)
  out = str(tmp_path / 'out_CHUNK_ID.jsonl')
  nemo_jsonl.export_chunks(str(tmp_path / 'store'), 'train', out, n_examples_per_chunk=4)
  got = [json.loads(line) for text in _lines(out, 3) for line in text.splitlines()]
  for g, want in zip(got, recs, strict=True):
    assert list(g) == list(want)  # NeMo's key order
    s = len(want['tokens']) - want['tokens'].count(EOS)
    for key in ('tokens', 'labels', 'loss_mask', 'contexts', 'context_lengths', 'answers',
                'metadata', 'index'):
      assert g[key] == want[key], key
    vals = np.asarray(want['topk_logits'], np.float32)
    np.testing.assert_array_equal(np.asarray(g['topk_logits'])[:s],
                                  vals[:s].astype(ml_dtypes.bfloat16).astype(np.float32))
    assert g['topk_token_ids'][:s] == want['topk_token_ids'][:s]
    assert g['log_sum_exp_logits'][:s] == want['log_sum_exp_logits'][:s]
    assert g['topk_logits'][s:] == [[0.0] * K] * (len(vals) - s)  # collate pads
    assert g['topk_token_ids'][s:] == [[EOS] * K] * (len(vals) - s)


@pytest.mark.parametrize('args, line', [
    (['--n-chunks', '0'], '--n-chunks 0: must be >= 1'),
    (['--n-chunks', '-1'], '--n-chunks -1: must be >= 1'),
    (['--n-examples-per-chunk', '0'], '--n-examples-per-chunk 0: must be >= 1'),
    (['--k', '0'], '--k 0: must be >= 1'),
    (['--vocab-size', '0'], '--vocab-size 0: must be >= 1'),
    (['--k', '301'], '--k 301: exceeds --vocab-size 300'),
])
def test_nemo_import_cli_refuses_bad_counts_naming_the_flag(tmp_path, capsys, args, line):
  """`--n-chunks 0` imported nothing with exit 0 (and marked an empty split finished); `--k 0`
  failed in StoreMeta's words: each count is checked first, one line naming the flag, exit 2."""
  template, _ = write_nemo_chunks(tmp_path)
  store = tmp_path / 'store'
  given = dict(zip(args[::2], args[1::2]))
  argv = ['import', template, str(store)]
  for flag, value in {'--n-chunks': '2', '--n-examples-per-chunk': '6', '--k': str(K),
                      '--vocab-size': str(V_SMALL), **given}.items():
    argv += [flag, value]
  assert nemo_jsonl.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'jkd: error: {line}') and len(err.strip().splitlines()) == 1, err
  assert not store.exists()


def test_nemo_zero_chunks_are_refused_by_import_and_export(tmp_path, capsys):
  """The library call refuses zero chunks too; export's optional chunk size likewise."""
  template, _ = write_nemo_chunks(tmp_path)
  with pytest.raises(ValueError, match=r'import_chunks: n_chunks=0, must be >= 1'):
    nemo_jsonl.import_chunks(template, str(tmp_path / 'store'), 'train', make_meta(),
                             n_chunks=0, n_examples_per_chunk=6)
  assert not (tmp_path / 'store').exists()
  assert nemo_jsonl.main(['export', str(tmp_path / 'store'), str(tmp_path / 'o_CHUNK_ID.jsonl'),
                          '--n-examples-per-chunk', '0']) == 2
  assert capsys.readouterr().err == 'jkd: error: --n-examples-per-chunk 0: must be >= 1\n'


def test_nemo_import_checks(tmp_path):
  template, recs = write_nemo_chunks(tmp_path)
  store = str(tmp_path / 'store')
  with pytest.raises(ValueError, match='no CHUNK_ID placeholder'):
    nemo_jsonl.import_chunks(str(tmp_path / 'x.jsonl'), store, 'train', make_meta(), n_chunks=1,
                             n_examples_per_chunk=6)
  with pytest.raises(FileNotFoundError, match=r'1 of 3 NeMo chunk files missing: .*_2\.jsonl'):
    nemo_jsonl.import_chunks(template, store, 'train', make_meta(), n_chunks=3, n_examples_per_chunk=6)
  with pytest.raises(ValueError, match=r'_0\.jsonl: 6 records, but n_examples_per_chunk=5'):
    nemo_jsonl.import_chunks(template, store, 'train', make_meta(), n_chunks=2, n_examples_per_chunk=5)
  with pytest.raises(ValueError, match=r'_1\.jsonl:2 \(example 7\) position 0: top-K id 300 outside'):
    _import_with(tmp_path, recs, 7, lambda r: r['topk_token_ids'][0].__setitem__(3, V_SMALL))
  with pytest.raises(ValueError, match=r'_0\.jsonl:3 \(example 2\) position 1: topk_logits not descending'):
    _import_with(tmp_path, recs, 2, lambda r: r['topk_logits'][1].reverse())
  with pytest.raises(ValueError, match=r'_0\.jsonl:4 \(example 3\) position 2: lse is nan'):
    _import_with(tmp_path, recs, 3, lambda r: r['log_sum_exp_logits'].__setitem__(2, float('nan')))
  with pytest.raises(ValueError, match=r'_1\.jsonl:1: index 5 repeats .*_0\.jsonl:6'):
    _import_with(tmp_path, recs, 6, lambda r: r.__setitem__('index', 5))
  with pytest.raises(ValueError, match=r'_0\.jsonl:1: NeMo KD record lacks log_sum_exp_logits'):
    _import_with(tmp_path, recs, 0, lambda r: r.pop('log_sum_exp_logits'), name='first')
  assert not os.path.exists(tmp_path / 'first' / 'store')  # refused before any block: no split


@pytest.mark.parametrize('change,match', [
    (lambda r: None, r'_0\.jsonl:1: expected a JSON object, got NoneType'),
    (lambda r: [r], r'_0\.jsonl:1: expected a JSON object, got list'),
    (lambda r: dict(r, index=None), r"_0\.jsonl:1: no 'index' field"),
    (lambda r: dict(r, index='x'), r"_0\.jsonl:1: 'index' must be a non-negative integer, got 'x'"),
    (lambda r: dict(r, index=1.7), r"_0\.jsonl:1: 'index' must be a non-negative integer, got 1\.7"),
    (lambda r: dict(r, index=-1), r"_0\.jsonl:1: 'index' must be a non-negative integer, got -1"),
    (lambda r: dict(r, tokens=['a'] * len(r['tokens'])),
     r"_0\.jsonl:1: tokens must hold numbers \(got 'U'-kind values, e\.g\. \['a'\]\)"),
    (lambda r: dict(r, loss_mask=[None] * len(r['loss_mask'])),
     r"_0\.jsonl:1: loss_mask must hold numbers"),
    (lambda r: dict(r, tokens=3), r'_0\.jsonl:1: tokens must be a list of numbers, one per '
     r'position \(got a single number\)'),
    (lambda r: dict(r, log_sum_exp_logits=2.5), r'_0\.jsonl:1: log_sum_exp_logits must be a list'),
    (lambda r: dict(r, topk_token_ids=r['topk_token_ids'][0]),
     r'_0\.jsonl:1: topk_token_ids must be a list of rows of K numbers, one per position \(got 1 '),
    # Fractional ids are no ids: refused, not truncated to integers.
    (lambda r: dict(r, topk_token_ids=[[i + 0.5 for i in row] for row in r['topk_token_ids']]),
     r'_0\.jsonl:1 \(example 0\) position 0: top-K id \d+\.5 is not an integer'),
    (lambda r: dict(r, tokens=[t + 0.25 for t in r['tokens']]),
     r'_0\.jsonl:1 \(example 0\) position 0: token id \d+\.25 is not an integer'),
    (lambda r: dict(r, topk_token_ids=[[float('inf')] + row[1:] for row in r['topk_token_ids']]),
     r'_0\.jsonl:1 \(example 0\) position 0: top-K id inf is not an integer'),
])
def test_nemo_import_rejects_malformed_records_naming_the_line(tmp_path, change, match):
  _, recs = write_nemo_chunks(tmp_path)
  recs = json.loads(json.dumps(recs))
  recs[0] = change(recs[0])
  with pytest.raises(ValueError, match=match):
    _import_with(tmp_path, recs, 1, lambda r: None, name='bad')
  assert not os.path.exists(tmp_path / 'bad' / 'store')


def test_a_reader_keeps_the_most_recently_used_blocks_open(tmp_path, monkeypatch):
  """At most OPEN_BLOCKS blocks' handles stay open (the least recently used closed first),
  and a reopened block reads as before."""
  rng = np.random.default_rng(2)
  meta = make_meta()
  recs = [make_record(rng, i, 4) for i in range(12)]
  write_store(str(tmp_path), recs, meta, block_size=2)  # 6 blocks
  monkeypatch.setattr(ls, 'OPEN_BLOCKS', 2)
  r = ls.Reader(str(tmp_path), 'train')
  for i in (0, 2, 0, 4, 6, 0, 11, 1):
    assert_same(r[i], recs[i], meta)
    assert len(r._open) <= 2
  assert list(r._open) == [5, 0]  # 0 was used last; 11 (block 5) before it


def test_an_empty_example_round_trips_through_nemo_jsonl(tmp_path):
  """A one-token conversation has no positions: exported as NeMo writes an empty record
  (top-K rows `[]`, without K), it imports back as the same empty example."""
  meta = make_meta()
  empty = ls.Record(0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.uint8),
                    np.zeros((0, K), np.int32), np.zeros((0, K), np.float32),
                    np.zeros(0, np.float32))
  write_store(str(tmp_path / 'a'), [empty], meta)
  ls.mark_finished(str(tmp_path / 'a'), 'train', [0])
  out = str(tmp_path / 'e_CHUNK_ID.jsonl')
  nemo_jsonl.export_chunks(str(tmp_path / 'a'), 'train', out, n_examples_per_chunk=1)
  assert json.loads(_lines(out, 1)[0])['topk_logits'] == []
  nemo_jsonl.import_chunks(out, str(tmp_path / 'b'), 'train', meta, n_chunks=1,
                           n_examples_per_chunk=1)
  back = ls.Reader(str(tmp_path / 'b'), 'train')[0]
  assert back.topk_ids.shape == (0, K) and back.tokens.shape == (0,)


def test_nemo_import_names_a_chunk_that_is_not_utf8(tmp_path):
  template, _ = write_nemo_chunks(tmp_path)
  path = nemo_jsonl.chunk_paths(template, 2)[1]
  with open(path, 'ab') as f:
    f.write(b'{"caf\xe9": 1}\n')
  with pytest.raises(ValueError, match=r'_1\.jsonl: not UTF-8 text'):
    nemo_jsonl.import_chunks(template, str(tmp_path / 'store'), 'train', make_meta(), n_chunks=2,
                             n_examples_per_chunk=6)


def _import_with(tmp_path, recs, i, change, name=None, **kw):
  """Imports `recs` (two chunks of 6) after `change(recs[i])`, into a fresh directory."""
  bad = json.loads(json.dumps(recs))
  change(bad[i])
  d = tmp_path / (name or f'bad{len(os.listdir(tmp_path))}')
  d.mkdir(exist_ok=True)
  template = str(d / 'c_CHUNK_ID.jsonl')
  for c, path in enumerate(nemo_jsonl.chunk_paths(template, 2)):
    with open(path, 'w') as f:
      f.writelines(json.dumps(x) + '\n' for x in bad[c * 6:(c + 1) * 6])
  return nemo_jsonl.import_chunks(template, str(d / 'store'), 'train', make_meta(), n_chunks=2,
                                  n_examples_per_chunk=6, **kw)


def test_nemo_import_sort_option_and_resume(tmp_path):
  _, recs = write_nemo_chunks(tmp_path)
  flip = lambda r: r['topk_logits'][1].reverse() or r['topk_token_ids'][1].reverse()  # noqa: E731
  with pytest.raises(ValueError, match='not descending'):
    _import_with(tmp_path, recs, 2, flip, name='unsorted')
  assert _import_with(tmp_path, recs, 2, flip, name='sorted', sort=True) == 12
  assert _import_with(tmp_path, recs, 2, flip, name='sorted', sort=True) == 0  # a rerun resumes
  got = ls.Reader(str(tmp_path / 'sorted' / 'store'), 'train')[2]
  want = sorted(zip(recs[2]['topk_logits'][1], recs[2]['topk_token_ids'][1]), reverse=True)
  np.testing.assert_array_equal(got.topk_logits[1], np.float32([v for v, _ in want]))
  assert sorted(zip(got.topk_logits[1].tolist(), got.topk_ids[1].tolist()), reverse=True) == want


def test_nemo_import_names_physical_lines(tmp_path):
  """Blank lines are skipped but counted: an error names the line an editor shows, while
  index='position' keys records by their order."""
  _, recs = write_nemo_chunks(tmp_path)
  bad = json.loads(json.dumps(recs))
  bad[2]['topk_logits'][1].reverse()
  template = str(tmp_path / 'c_CHUNK_ID.jsonl')
  for c, path in enumerate(nemo_jsonl.chunk_paths(template, 2)):
    lines = [json.dumps(x) + '\n' for x in bad[c * 6:(c + 1) * 6]]
    with open(path, 'w') as f:
      f.writelines(lines[:1] + ['\n'] + lines[1:])
  with pytest.raises(ValueError, match=r'_0\.jsonl:4 \(example 2\) position 1: topk_logits not'):
    nemo_jsonl.import_chunks(template, str(tmp_path / 'store'), 'train', make_meta(), n_chunks=2,
                             n_examples_per_chunk=6, index='position')


def test_nemo_export_needs_a_finished_split(tmp_path):
  """A split whose extraction or import did not finish is not exported as chunks."""
  rng = np.random.default_rng(0)
  write_store(str(tmp_path / 'store'), [make_record(rng, i, 5) for i in range(4)], make_meta())
  with pytest.raises(ValueError, match='did not finish'):
    nemo_jsonl.export_chunks(str(tmp_path / 'store'), 'train', str(tmp_path / 'o_CHUNK_ID'))
  assert sorted(os.listdir(tmp_path)) == ['store']


def test_nemo_export_needs_equal_chunks(tmp_path):
  template, _ = write_nemo_chunks(tmp_path)
  nemo_jsonl.import_chunks(template, str(tmp_path / 'store'), 'train', make_meta(), n_chunks=2,
                           n_examples_per_chunk=6)
  with pytest.raises(ValueError, match=r'n_examples_per_chunk=5: the 12 examples of .*/train '
                     r'do not fill chunks of that many'):
    nemo_jsonl.export_chunks(str(tmp_path / 'store'), 'train', str(tmp_path / 'o_CHUNK_ID'),
                             n_examples_per_chunk=5)
  with pytest.raises(FileNotFoundError, match=r'/absent: no such directory \(for the chunks '):
    nemo_jsonl.export_chunks(str(tmp_path / 'store'), 'train',  # the error named a temp file
                             str(tmp_path / 'absent' / 'o_CHUNK_ID'))


def test_a_writer_left_open_at_exit_says_nothing(tmp_path):
  """A script that ends with a Writer still open (the documented API, no close): the lock goes
  with the process, and no 'Exception ignored in __del__' traceback is printed (the module's
  globals are gone by then)."""
  import subprocess
  import sys
  code = ('import sys; from jkd.data import logit_store; w = logit_store.Writer(sys.argv[1], '
          "'train', logit_store.StoreMeta(k=4, vocab_size=300)); print('ok')")
  proc = subprocess.run([sys.executable, '-c', code, str(tmp_path / 's')], capture_output=True,
                        text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0 and proc.stdout == 'ok\n' and proc.stderr == '', proc.stderr
