"""SIGKILL during extraction, at 10 seeded random fault points (a block half-written, written
but not renamed, renamed but not in the manifest, a manifest not yet replaced, between batches):
after the restarts the logit store is byte-identical to an uninterrupted run's. SIGTERM stops
it after a committed batch, and the rerun completes the same store."""

import collections
import re

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

  # SIGTERM as the 3rd train batch starts: that batch is committed, then the run stops.
  proc = harness.sigterm_at(argv(tmp_path / 'term'), environ, 'extract.batch', 3)
  assert proc.returncode == distributed.STOPPED_EXIT, proc.stderr[-3000:]
  done = re.search(r'SIGTERM: stopped extracting train after (\d+) new examples', proc.stderr)
  assert done and 0 < int(done[1]) < 48, proc.stderr[-3000:]
  assert '[extract] train' not in proc.stdout  # the split is not finished
  proc = harness._run(argv(tmp_path / 'term'), environ)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'[extract] train: {48 - int(done[1])} new examples' in proc.stdout, proc.stdout
  term = harness.tree_bytes(tmp_path / 'term')
  assert sorted(term) == sorted(whole)
  assert [p for p in whole if whole[p] != term[p]] == []
