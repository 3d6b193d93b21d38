"""SIGKILL during a NeMo-Aligner chunk import (jkd.data.nemo_jsonl.import_chunks) at 10 seeded
random fault points: after the restarts the store is byte-identical to an uninterrupted import's
(extras included: their gzip header carries no time)."""

import sys

from tests import test_logit_store as tls
from tests.faults import harness


def _argv(template, store):
  code = ('import sys; from jkd.data import nemo_jsonl; from tests import test_logit_store as t; '
          'nemo_jsonl.import_chunks(sys.argv[1], sys.argv[2], "train", t.make_meta(), '
          'n_chunks=4, n_examples_per_chunk=6, pad_id=tls.EOS, examples_per_block=2)')
  return [sys.executable, '-c', code.replace('tls.EOS', str(tls.EOS)), template, str(store)]


def test_store_after_ten_kills_during_import_is_byte_identical(tmp_path):
  template, _ = tls.write_nemo_chunks(tmp_path, n_chunks=4, per_chunk=6)
  environ = harness.env(tmp_path)
  points = harness.trace(_argv(template, tmp_path / 'whole'), environ, tmp_path / 'trace.whole')
  kills = harness.kill_chain(_argv(template, tmp_path / 'cut'), environ, tmp_path,
                             n_points=len(points), kills=10, seed=3)
  assert len(kills) == 10
  whole, cut = harness.tree_bytes(tmp_path / 'whole'), harness.tree_bytes(tmp_path / 'cut')
  assert any(p.endswith('extras.json.gz') for p in whole)
  assert sorted(whole) == sorted(cut)
  assert [p for p in whole if whole[p] != cut[p]] == []
