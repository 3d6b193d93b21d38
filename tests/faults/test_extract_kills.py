"""SIGKILL during extraction, at 10 seeded random fault points (a block half-written, written
but not renamed, renamed but not in the manifest, a manifest not yet replaced, between batches):
after the restarts the logit store is byte-identical to an uninterrupted run's. Ctrl-C and
SIGTERM stop it after a committed batch, and the reruns complete the same store."""

import collections
import re
import signal

from jkd import distributed
from tests import test_extract as te
from tests.faults import harness


def test_store_after_ten_kills_is_byte_identical_to_an_uninterrupted_run(tmp_path):
  root = te.make_teacher(tmp_path / 'teacher')
  environ = harness.env(tmp_path)

  def argv(store):
    return te._extract_cli(root, store, f'--config.data.validation_file={root}/train.jsonl')

  points = harness.trace(argv(tmp_path / 'whole'), environ, tmp_path / 'trace.whole')
  kills = harness.kill_chain(argv(tmp_path / 'cut'), environ, tmp_path, n_points=len(points),
                             kills=10, seed=0)
  assert len(kills) == 10
  where = collections.Counter(k.point for k in kills)
  assert len(where) >= 3, f'the seeded points should spread over the write path: {where}'
  whole, cut = harness.tree_bytes(tmp_path / 'whole'), harness.tree_bytes(tmp_path / 'cut')
  assert sorted(whole) == sorted(cut)  # no leftover temporary file or block
  assert [p for p in whole if whole[p] != cut[p]] == []
  print(f'{len(points)} fault points; killed at', [(k.position, k.point) for k in kills])

  # Ctrl-C (SIGINT to the group) as the 3rd train batch starts, then SIGTERM as the rerun's 2nd
  # does: each time the batch in hand is committed, then the run stops; a third run finishes.
  done = 0
  for sig, name, n, code in (('INT', 'Ctrl-C', 3, -signal.SIGINT),
                             ('TERM', 'SIGTERM', 2, distributed.STOPPED_EXIT)):
    proc = harness.signal_at(argv(tmp_path / 'term'), environ, 'extract.batch', n, sig)
    assert proc.returncode == code, proc.stderr[-3000:]
    new = re.search(rf'{name}: stopped extracting train after (\d+) new examples', proc.stderr)
    assert new and int(new[1]) > 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert '[extract] train' not in proc.stdout  # the split is not finished
    done += int(new[1])
  assert done < 48
  proc = harness._run(argv(tmp_path / 'term'), environ)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'[extract] train: {48 - done} new examples' in proc.stdout, proc.stdout
  term = harness.tree_bytes(tmp_path / 'term')
  assert sorted(term) == sorted(whole)
  assert [p for p in whole if whole[p] != term[p]] == []
