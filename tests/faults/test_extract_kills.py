"""SIGKILL during extraction, at 10 seeded random fault points (a block half-written, written
but not renamed, renamed but not in the manifest, a manifest not yet replaced, between batches):
after the restarts the logit store is byte-identical to an uninterrupted run's."""

import collections

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
