"""Grain pipeline over the logit store (jkd.data.loader).

Protects: seeded shuffle determinism, sharding that covers every example exactly once, padding
(multiple of 8, NeMo's pad values, right truncation), packing (segment ids, restarting
positions, contents), load-time top_k, exact resume from the iterator state, and 2 workers
(which can be told to outlive a SIGTERM to the process group).
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jkd.data import loader
from tests.test_logit_store import K, make_meta, make_record, write_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 23
PAD = 1
MAX_LEN = 48


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  """23 examples of 3..60 tokens (some longer than MAX_LEN); tokens[0] = example index."""
  rng = np.random.default_rng(0)
  recs = [make_record(rng, i, int(rng.integers(3, 61))) for i in range(N)]
  root = str(tmp_path_factory.mktemp('store'))
  write_store(root, recs, make_meta(), block_size=5)
  return root, {r.index: r for r in recs}


def _loader(store, **kw):
  args = dict(batch_size=4, seed=0, max_seq_length=MAX_LEN, pad_id=PAD, shard_index=0,
              shard_count=1, num_epochs=1)
  return loader.make_loader(store[0], 'train', **{**args, **kw})


def _ids(batches):
  """Example indices in batch order (unpacked: row r holds one example, tokens[r, 0] = index)."""
  return [int(i) for b in batches for i in b['tokens'][:, 0]]


def test_source_is_store_in_index_order(store):
  src = loader.KDDataSource(store[0], 'train')
  assert len(src) == N and 'KDDataSource' in repr(src)
  ex = src[4]
  assert ex['index'] == 4
  np.testing.assert_array_equal(ex['topk_ids'], store[1][4].topk_ids)


def test_shuffle_is_deterministic_by_seed(store):
  a, b = _ids(_loader(store, seed=3)), _ids(_loader(store, seed=3))
  c = _ids(_loader(store, seed=4))
  assert a == b and a != c and sorted(a) == sorted(c) == list(range(N))
  assert _ids(_loader(store, shuffle=False)) == list(range(N))


def test_each_epoch_is_reshuffled(store):
  ids = _ids(_loader(store, num_epochs=2, batch_size=1))
  assert sorted(ids[:N]) == sorted(ids[N:]) == list(range(N)) and ids[:N] != ids[N:]


@pytest.mark.parametrize('batch_size', [1, 4])
def test_an_endless_stream_repeats_the_shuffled_epochs(store, batch_size):
  """num_epochs=None: epoch after epoch with no partial batch at their seams (batch_size=1
  without drop_remainder overflowed Grain's length, 2**63, when the iterator was made)."""
  it = _loader(store, num_epochs=None, batch_size=batch_size)
  ids = _ids(next(it) for _ in range(-(-3 * N // batch_size)))
  assert _ids(_loader(store, num_epochs=3, batch_size=1))[:len(ids)] == ids[:3 * N]


@pytest.mark.parametrize('count', [1, 3, 5])
def test_shards_cover_every_example_once(store, count):
  ids = [_ids(_loader(store, shard_index=i, shard_count=count)) for i in range(count)]
  assert sorted(sum(ids, [])) == list(range(N))
  assert max(map(len, ids)) - min(map(len, ids)) <= 4  # a last partial global batch of 4s


@pytest.mark.parametrize('count', [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(store, count):
  """Shard i's j-th batch is rows i*B.. of the one-process run's j-th batch of count*B rows
  (what N processes feeding the devices of one global array need to equal one process), over
  two epochs; with drop_remainder every shard has as many batches."""
  kw = dict(num_epochs=2, seed=5, drop_remainder=True)
  whole = [_ids([b]) for b in _loader(store, batch_size=2 * count, **kw)]
  parts = [[_ids([b]) for b in _loader(store, batch_size=2, shard_index=i, shard_count=count,
                                       **kw)] for i in range(count)]
  assert {len(p) for p in parts} == {len(whole)} and len(whole) == 2 * N // (2 * count)
  assert [sum((p[j] for p in parts), []) for j in range(len(whole))] == whole


def test_default_shard_is_the_jax_process(store, monkeypatch):
  """With one process the default reads everything; as process 1 of 2 (jax's answers faked)
  it reads what shard 1 of 2 reads, which a hard-coded (0, 1) would not."""
  import jax
  assert sorted(_ids(_loader(store, shard_index=None, shard_count=None))) == list(range(N))
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  assert _ids(_loader(store, shard_index=None, shard_count=None)) == _ids(
      _loader(store, shard_index=1, shard_count=2)) != _ids(_loader(store))


def test_batches_pad_like_nemo(store):
  batches = list(_loader(store, batch_size=3))
  assert [len(b['tokens']) for b in batches] == [3] * 7 + [2]
  for b in batches:
    l = b['tokens'].shape[1]
    assert l % 8 == 0 and l <= MAX_LEN
    assert b['topk_ids'].shape == b['topk_logits'].shape == (len(b['tokens']), l, K)
    for row in range(len(b['tokens'])):
      rec = store[1][int(b['tokens'][row, 0])]
      s = min(len(rec.tokens), MAX_LEN)  # longer examples are cut on the right
      for f in ('tokens', 'labels', 'loss_mask', 'topk_ids', 'topk_logits', 'lse'):
        np.testing.assert_array_equal(b[f][row, :s], getattr(rec, f)[:s])
      assert (b['tokens'][row, s:] == PAD).all() and (b['labels'][row, s:] == PAD).all()
      assert (b['topk_ids'][row, s:] == PAD).all() and (b['topk_logits'][row, s:] == 0).all()
      assert (b['loss_mask'][row, s:] == 0).all() and (b['lse'][row, s:] == 0).all()
      assert b['segment_ids'][row].tolist() == [1] * s + [0] * (l - s)
      assert b['positions'][row, :s].tolist() == list(range(s))
    longest = max(min(len(store[1][int(i)].tokens), MAX_LEN) for i in b['tokens'][:, 0])
    assert l == min(MAX_LEN, -(-longest // 8) * 8)
  assert {b['tokens'].shape[1] for b in _loader(store, pad_to_max=True)} == {MAX_LEN}


def test_packing(store):
  seen = []
  for b in _loader(store, pack=True, batch_size=3):
    l = b['tokens'].shape[1]
    assert l % 8 == 0 and l <= MAX_LEN
    for row in range(len(b['tokens'])):
      seg = b['segment_ids'][row]
      n = int(seg.max())
      assert n >= 1
      assert (np.diff(seg[seg > 0]) >= 0).all() and set(seg[seg > 0]) == set(range(1, n + 1))
      if (seg == 0).any():  # padding only at the end of a row
        assert not seg[np.argmax(seg == 0):].any()
      for sid in range(1, n + 1):
        cols = np.flatnonzero(seg == sid)
        assert b['positions'][row, cols].tolist() == list(range(len(cols)))  # restart per example
        rec = store[1][int(b['tokens'][row, cols[0]])]
        assert len(cols) == min(len(rec.tokens), MAX_LEN)
        for f in ('tokens', 'labels', 'loss_mask', 'topk_ids', 'topk_logits', 'lse'):
          np.testing.assert_array_equal(b[f][row, cols], getattr(rec, f)[:len(cols)])
        seen.append(rec.index)
      pad = seg == 0
      assert (b['tokens'][row, pad] == PAD).all() and (b['loss_mask'][row, pad] == 0).all()
      assert (b['topk_logits'][row, pad] == 0).all() and (b['topk_ids'][row, pad] == PAD).all()
  assert sorted(seen) == list(range(N))
  assert len(seen) > len(list(_loader(store, pack=True, batch_size=3))) * 3  # rows hold > 1


@pytest.mark.parametrize('shuffle', [False, True])
def test_top_k_truncation(store, shuffle):
  """top_k=3 keeps each position's first 3 of the stored K (the largest, as NeMo's order
  puts them), ids with their own logits, in every row."""
  for b in _loader(store, top_k=3, shuffle=shuffle):
    assert b['topk_ids'].shape[2] == b['topk_logits'].shape[2] == 3
    for row in range(b['tokens'].shape[0]):
      rec = store[1][int(b['tokens'][row, 0])]
      s = min(len(rec.tokens), MAX_LEN)
      np.testing.assert_array_equal(b['topk_ids'][row, :s], rec.topk_ids[:s, :3])
      np.testing.assert_array_equal(b['topk_logits'][row, :s], rec.topk_logits[:s, :3])
  with pytest.raises(ValueError, match=r'top_k=9 not in \[1, stored K=8\]'):
    _loader(store, top_k=9)
  with pytest.raises(ValueError, match='max_seq_length=50 must be a positive multiple of 8'):
    _loader(store, max_seq_length=50)


@pytest.mark.parametrize('pack', [False, True])
def test_state_restore_continues_identically(store, pack):
  it = _loader(store, pack=pack, num_epochs=None, batch_size=3)
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(6)]  # crosses an epoch boundary
  it2 = _loader(store, pack=pack, num_epochs=None, batch_size=3)
  it2.set_state(state)
  for a, b in zip(want, (next(it2) for _ in range(6))):
    assert a.keys() == b.keys()
    for f in a:
      np.testing.assert_array_equal(a[f], b[f])


@pytest.mark.parametrize('pack', [False, True])
def test_two_workers(store, pack):
  """Spawned workers (grain absl-flags workaround in make_loader) give the in-process batches,
  packed ones too (the packer runs in the main process), and resume from their state."""
  want = list(_loader(store, batch_size=4, pack=pack))
  it = _loader(store, batch_size=4, pack=pack, worker_count=2)
  got = [next(it) for _ in range(3)]
  state = it.get_state()
  got += list(it)
  assert len(got) == len(want)
  for a, b in zip(want, got):
    assert a.keys() == b.keys()
    for f in a:
      np.testing.assert_array_equal(a[f], b[f])
  it2 = _loader(store, batch_size=4, pack=pack, worker_count=2)
  it2.set_state(state)
  rest = list(it2)
  assert len(rest) == len(got) - 3
  for a, b in zip(got[3:], rest):
    for f in a:
      np.testing.assert_array_equal(a[f], b[f])


_GROUP_SIGNALS = '''
import multiprocessing, os, signal, sys
from jkd.data import loader
for sig in signal.SIGTERM, signal.SIGINT:  # this process handles them, as the training loop
  signal.signal(sig, lambda *_: None)
it = loader.make_loader(sys.argv[1], 'train', batch_size=4, seed=0, max_seq_length=48, pad_id=1,
                        shard_index=0, shard_count=1, num_epochs=None, worker_count=2,
                        workers_ignore_signals=sys.argv[2] == '1')
for _ in range(8):  # both workers have started and delivered
  next(it)
os.killpg(0, signal.SIGINT)  # the whole group, as Ctrl-C in a terminal sends it
os.killpg(0, signal.SIGTERM)  # and as Slurm and a VM's shutdown send this one
for _ in range(40):
  next(it)
print('40 more batches', *[p.pid for p in multiprocessing.active_children()], flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(): the workers must notice they are orphans
'''


@pytest.mark.parametrize('ignore', [True, False])
def test_workers_ignoring_signals_outlive_signals_to_the_process_group(store, ignore):
  """What lets the training loop keep reading after Ctrl-C or SIGTERM reaches every process of
  the job (the step it stops at may be several batches on: the sync step of several
  processes); such workers still end once their parent is killed (SIGKILL), which Grain's do
  not watch for."""
  proc = subprocess.run([sys.executable, '-c', _GROUP_SIGNALS, store[0], str(int(ignore))],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        start_new_session=True)
  if ignore:
    assert proc.returncode == -signal.SIGKILL and '40 more batches' in proc.stdout, (
        proc.stderr[-3000:])
    workers = [int(p) for p in proc.stdout.split('40 more batches')[1].split()]
    assert len(workers) == 2, proc.stdout
    deadline = time.monotonic() + 20  # the parent killed, its workers end within ~1 s
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not any(_alive(p) for p in workers), workers
  else:  # the workers die of it, and the reader finds out
    assert proc.returncode != 0 and 'terminated unexpectedly' in proc.stderr, proc.stderr[-3000:]


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'  # a zombie has ended
  except FileNotFoundError:
    return False
