"""Teacher top-K extraction: the sharded vocabulary sweep against lax.top_k of the unsharded
teacher, batching, and the store it writes (kills and resume: tests/faults/)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from jkd import extract, model, sharding
from jkd import tokenizer as jt

RULES = base.LOGICAL_AXIS_RULES
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 16


def _teacher(vocab=500, padded=512):
  c = base.get_config()
  cfg = dataclasses.replace(model.ModelConfig.from_dict(c.model.to_dict()), vocab_size=vocab,
                            padded_vocab_size=padded, init_method_std=0.2)
  return cfg, model.init(cfg, jax.random.key(0))


def _reference(cfg, params, tokens_BxT, k=K):
  """lax.top_k of the unsharded teacher's max-shifted logits, and their logsumexp."""
  logits = np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, tokens_BxT),
                      np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  vals, ids = jax.lax.top_k(jnp.asarray(shifted, jnp.float32), k)
  return np.asarray(ids), np.asarray(vals), np.log(np.exp(shifted).sum(-1)), shifted


def _mesh(shape):
  return sharding.make_mesh(('data', 'fsdp', 'tensor'), shape,
                            jax.devices()[:int(np.prod(shape))])


# The vocabulary over 'fsdp' and 'tensor', which the batch also uses ('fsdp'): each vocabulary
# shard's statistics must still be merged with those of the same rows.
SHARED_AXIS_RULES = tuple((name, ('fsdp', 'tensor') if name == 'vocab' else target)
                          for name, target in RULES)


@pytest.mark.parametrize('shape,rules', [((1, 1, 1), RULES), ((2, 2, 2), RULES),
                                         ((1, 1, 8), RULES), ((8, 1, 1), RULES),
                                         ((2, 2, 2), SHARED_AXIS_RULES),
                                         ((1, 4, 2), SHARED_AXIS_RULES)])
def test_sharded_sweep_equals_lax_topk_of_unsharded_teacher(devices8, shape, rules):
  """fp32 noise of sharded reductions only (logits are O(10) here). Vocab split over 'tensor'
  (tiles of 96 do not divide the 512/TP columns; 12 padded columns beyond V=500), or over a
  batch axis too: values, ids, logsumexp equal the unsharded full-logit reference."""
  cfg, params = _teacher()
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 24), np.int32)
  ids, vals, lse = jax.device_get(
      extract.topk_fn(cfg, _mesh(shape), rules, k=K, vocab_tile=96)(params, tokens))
  ref_ids, ref_vals, ref_lse, shifted = _reference(cfg, params, tokens)
  np.testing.assert_allclose(vals, ref_vals, atol=1e-4)
  np.testing.assert_allclose(lse, ref_lse, atol=1e-4)
  assert (vals[..., 0] == 0).all() and (np.diff(vals, axis=-1) <= 0).all()
  assert ids.max() < cfg.vocab_size
  # Ids: the teacher's own logit at each returned id is the returned value (ties may reorder).
  np.testing.assert_allclose(np.take_along_axis(shifted, ids, -1), vals, atol=1e-4)
  assert (ids == ref_ids).mean() > 0.99


def test_k_larger_than_vocab_is_rejected(devices8):
  cfg, _ = _teacher()
  with pytest.raises(ValueError, match=r'extract\.top_k=501'):
    extract.topk_fn(cfg, _mesh((1, 1, 1)), RULES, k=501, vocab_tile=64)


def test_batches_are_length_buckets_with_bounded_padding():
  lengths = {i: n for i, n in enumerate([5, 64, 65, 300, 129, 7, 64, 512])}
  plan = extract.plan_batches(lengths, batch_size=2, min_bucket=64, max_len=512)
  assert plan == [(64, [0, 1]), (64, [5, 6]), (128, [2]), (256, [4]), (512, [3, 7])]
  assert sorted(i for _, idx in plan for i in idx) == sorted(lengths)


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  return make_teacher(tmp_path_factory.mktemp('teacher'))


def make_teacher(root):
  """A smoke teacher model directory with a SentencePiece tokenizer, and plain-format data."""
  import io

  import sentencepiece as spm
  from tests.test_tokenizer import CORPUS
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out,
                                 vocab_size=300, model_type='bpe', pad_id=3, minloglevel=2)
  tok = jt.Tokenizer('sentencepiece', {'tokenizer.model': out.getvalue()}, bos_id=1, eos_id=2,
                     pad_id=3)
  cfg, params = _teacher(vocab=tok.vocab_size, padded=320)
  model.save(str(root / 'teacher'), cfg, params)
  jt.save(tok, str(root / 'teacher'))
  rng = np.random.default_rng(0)
  with open(root / 'train.jsonl', 'w') as f:
    for i in range(48):  # distinct examples of varied length (several buckets)
      words = [CORPUS[j] for j in rng.integers(0, len(CORPUS), 1 + i % 5)]
      f.write(json.dumps({'input': f'{i}: ' + ' '.join(words), 'output': CORPUS[i]}) + '\n')
  return root


def _extract_cli(root, store, *extra):
  return [sys.executable, '-m', 'jkd.main', '--config', 'configs/extract.py',
          f'--config.extract.teacher={root}/teacher', f'--config.extract.output={store}',
          f'--config.data.train_file={root}/train.jsonl', '--config.data.format=plain',
          '--config.data.max_seq_length=256', '--config.extract.top_k=8',
          '--config.extract.batch_size=8', '--config.extract.vocab_tile=64',
          '--config.extract.min_bucket=16', '--config.extract.dtype=float32',
          '--config.extract.values_dtype=float32', *extra]


def _records(store, split='train'):
  from jkd.data import logit_store
  reader = logit_store.Reader(str(store), split=split)
  return {r.index: r for r in (reader[i] for i in range(len(reader)))}


def test_store_holds_each_example_equal_to_the_unsharded_teacher(teacher_dir, tmp_path):
  """CLI on the (2, 2, 2) mesh: every example's record holds that example (tokens, labels,
  mask of the data's example of its index) and equals lax.top_k of the unsharded teacher on it
  (so neither padding nor batching nor data-parallel placement leaks between examples)."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  proc = subprocess.run(_extract_cli(teacher_dir, tmp_path / 'store',
                                     '--config.mesh.shape=(2,2,2)'),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = _records(tmp_path / 'store')
  assert sorted(records) == list(range(48))
  cfg, params, _, examples, _ = in_process(teacher_dir, tmp_path / 'unused')
  # The reference: the unsharded teacher on the data's own examples, right-padded into one
  # batch (a causal model's logits at a position see no later one).
  longest = max(len(e['tokens']) for e in examples)
  tokens = np.zeros((len(examples), longest), np.int32)
  for e in examples:
    tokens[e['index'], :len(e['tokens'])] = e['tokens']
  ids, vals, lse, shifted = _reference(cfg, params, tokens, k=8)
  for e in examples:
    rec, i, n = records[e['index']], e['index'], len(e['tokens'])
    for field in ('tokens', 'labels', 'loss_mask'):  # the record of this very example
      np.testing.assert_array_equal(getattr(rec, field), e[field], err_msg=f'{i} {field}')
    np.testing.assert_allclose(rec.topk_logits, vals[i, :n], atol=1e-4, err_msg=str(i))
    np.testing.assert_allclose(rec.lse, lse[i, :n], atol=1e-4, err_msg=str(i))
    # Ids: the teacher's own logit at each stored id is the stored value (ties may reorder).
    np.testing.assert_allclose(np.take_along_axis(shifted[i, :n], rec.topk_ids, -1),
                               rec.topk_logits, atol=1e-4, err_msg=str(i))
    assert (rec.topk_ids == ids[i, :n]).mean() > 0.99


def in_process(teacher_dir, output, **settings):
  """(cfg, params, tok, train examples, Settings) of make_teacher's model and data, for calling
  extract_split directly; `settings` override the small float32 defaults."""
  from jkd.data import chat
  cfg, params = model.load(str(teacher_dir / 'teacher'))
  tok = jt.load(str(teacher_dir / 'teacher'))
  examples = chat.read_jsonl(str(teacher_dir / 'train.jsonl'), tok, fmt='plain',
                             max_seq_length=256)
  s = extract.Settings(**{**dict(
      teacher=str(teacher_dir / 'teacher'), output=str(output), top_k=8, batch_size=8,
      vocab_tile=64, min_bucket=16, max_seq_length=256, start_idx=0, end_idx=-1,
      values_dtype='float32', masked_only=False, codec='zstd', dtype='float32'), **settings})
  return cfg, params, tok, examples, s


def test_the_split_stays_held_until_its_job_is_recorded(teacher_dir, tmp_path, monkeypatch):
  """finished.json is read, extended and rewritten: another chunk job let into the split before
  that (the writer lock was released first) could write over it with its own record."""
  from jkd import files
  from jkd.data import logit_store
  cfg, params, tok, examples, s = in_process(teacher_dir, tmp_path / 's', end_idx=7)
  lock = os.path.join(s.output, 'train', '.writer.p00000.lock')
  held, mark = [], logit_store.mark_finished
  monkeypatch.setattr(logit_store, 'mark_finished',
                      lambda *a, **k: held.append(lock in files._HELD) or mark(*a, **k))
  extract.extract_split(examples, 'train', s, _mesh((1, 1, 1)), RULES, cfg, params, tok)
  assert held == [True] and lock not in files._HELD


def test_start_and_inclusive_end_select_examples_as_nemo(teacher_dir, tmp_path):
  """start_idx..end_idx (inclusive, NeMo's start_from_idx / end_at_idx); a second range run
  adds to the same store; a rerun of a done range writes nothing."""
  mesh = _mesh((1, 1, 1))
  cfg, params, tok, examples, s = in_process(teacher_dir, tmp_path / 's', batch_size=4,
                                             start_idx=10, end_idx=20)
  assert extract.extract_split(examples, 'train', s, mesh, RULES, cfg, params, tok) == 11
  assert sorted(_records(tmp_path / 's')) == list(range(10, 21))
  s = dataclasses.replace(s, start_idx=18, end_idx=-1)
  assert extract.extract_split(examples, 'train', s, mesh, RULES, cfg, params, tok) == 48 - 21
  assert extract.extract_split(examples, 'train', s, mesh, RULES, cfg, params, tok) == 0
  assert sorted(_records(tmp_path / 's')) == list(range(10, 48))


def test_resume_refuses_other_inputs_or_teacher_dtype(teacher_dir, tmp_path):
  """A resumed extraction adds to a split only from the inputs and teacher precision that made
  its blocks: another data file, format or length limit (tokens, labels or loss mask differ),
  an example the data no longer has, or another extract.dtype would mix records silently."""
  from jkd.data import chat
  mesh = _mesh((1, 1, 1))
  cfg, params, tok, examples, s = in_process(teacher_dir, tmp_path / 's', batch_size=4,
                                             start_idx=0, end_idx=11)
  assert extract.extract_split(examples, 'train', s, mesh, RULES, cfg, params, tok) == 12
  rest = dataclasses.replace(s, start_idx=12, end_idx=-1)

  def resume(examples, settings=rest):
    return extract.extract_split(examples, 'train', settings, mesh, RULES, cfg, params, tok,
                                 source='data.train_file=X')

  with open(tmp_path / 's' / 'train' / 'manifest.p00000.json') as f:
    block_of = {i: b['name'] for b in json.load(f)['blocks']
                for a, z in b['indices'] for i in range(a, z)}

  def changed(index, **fields):
    return [{**e, **fields} if e['index'] == index else e for e in examples]

  tokens = examples[5]['tokens']
  with pytest.raises(ValueError, match=rf'block {block_of[5]} \(examples \d+\.\.\d+\) was made '
                     r'from other tokens, labels or loss masks than data.train_file=X gives now'):
    resume(changed(5, tokens=[*tokens[:-1], tokens[-1] ^ 1]))
  with pytest.raises(ValueError, match=rf'block {block_of[0]} .* was made from other'):
    resume(changed(0, loss_mask=[1] * len(examples[0]['loss_mask'])))
  with pytest.raises(ValueError, match=rf'block {block_of[11]} .* was made from other'):
    resume(changed(11, labels=[*examples[11]['labels'][1:], 0]))
  cut = chat.read_jsonl(str(teacher_dir / 'train.jsonl'), tok, fmt='plain', max_seq_length=16)
  assert any(len(a['tokens']) != len(b['tokens']) for a, b in zip(cut[:12], examples))
  with pytest.raises(ValueError, match='was made from other tokens'):
    resume(cut)
  with pytest.raises(ValueError, match='holds example 8, which data.train_file=X does not give'):
    resume([e for e in examples if e['index'] != 8])
  with pytest.raises(ValueError, match="existing store has teacher_dtype='float32', writer "
                     "asked teacher_dtype='bfloat16'"):
    resume(examples, dataclasses.replace(rest, dtype='bfloat16'))
  assert sorted(_records(tmp_path / 's')) == list(range(12))  # the refusals wrote nothing
  assert resume(examples) == 48 - 12  # the same inputs resume


def _run_config(root, store, **extract_keys):
  """configs/extract.py on make_teacher's model and data (mode=extract's run(), in process)."""
  c = base.get_config()
  c.mode = 'extract'
  c.extract.teacher, c.extract.output = str(root / 'teacher'), str(store)
  c.data.train_file, c.data.format, c.data.max_seq_length = str(root / 'train.jsonl'), 'plain', 256
  c.extract.top_k, c.extract.batch_size, c.extract.vocab_tile, c.extract.min_bucket = 8, 8, 64, 16
  c.extract.dtype = c.extract.values_dtype = 'float32'
  for key, value in extract_keys.items():
    c.extract[key] = value
  return c


@pytest.mark.parametrize('keys, message', [
    (dict(start_idx=100), r'^extract\.start_idx=100: selects no example of data\.train_file=\S+'
                          r'train\.jsonl, which holds 48 examples \(indices 0\.\.47\); set '
                          r'extract\.start_idx to at most 47$'),
    (dict(start_idx=48, end_idx=60), r'^extract\.start_idx=48, extract\.end_idx=60: selects no '
                                     r'example of .*48 examples'),
    (dict(examples_per_chunk=10, chunk_index=5),
     r'^extract\.chunk_index=5 with extract\.examples_per_chunk=10 \(indices 50\.\.59\): '
     r'selects no example of .*48 examples .*its last chunk is extract\.chunk_index=4$'),
])
def test_range_past_the_data_fails_before_the_teacher_loads(teacher_dir, tmp_path, monkeypatch,
                                                            keys, message):
  """A start_idx/end_idx or chunk past the train split's end was a finished empty split (rc 0,
  `0 new examples`) that training then refused without naming the store: now one line naming
  the keys and the file's example count, before the teacher's weights load or the store opens."""
  monkeypatch.setattr(extract.model, 'load', lambda *a, **k: pytest.fail('teacher loaded'))
  with pytest.raises(ValueError, match=message) as e:
    extract.run(_run_config(teacher_dir, tmp_path / 'store', **keys))
  assert '\n' not in str(e.value) and not (tmp_path / 'store').exists()


def test_range_past_the_validation_split_leaves_it_alone(teacher_dir, tmp_path, devices8):
  """The range applies to both splits: a train chunk past the shorter validation split's end
  extracts its train examples and leaves validation alone (an empty finished validation split
  would fail training); a validation file given alone must have examples in range."""
  with open(teacher_dir / 'train.jsonl') as f:
    (tmp_path / 'val.jsonl').write_text(''.join(f.readlines()[:4]))
  c = _run_config(teacher_dir, tmp_path / 'store', start_idx=40)
  c.data.validation_file = str(tmp_path / 'val.jsonl')
  assert extract.run(c) == {'train': 8}
  assert sorted(_records(tmp_path / 'store')) == list(range(40, 48))
  assert not (tmp_path / 'store' / 'validation').exists()
  c.data.train_file = ''
  with pytest.raises(ValueError, match=r'^extract\.start_idx=40: selects no example of '
                     r'data\.validation_file=\S+val\.jsonl, which holds 4 examples'):
    extract.run(c)
  c.extract.start_idx = 2  # a range that covers it: validation 2..3
  assert extract.run(c) == {'validation': 2}
  assert sorted(_records(tmp_path / 'store', 'validation')) == [2, 3]


def test_chunks_that_never_ran_keep_the_split_untrainable(teacher_dir, tmp_path, monkeypatch):
  """A chunk job records its data's example count: with chunk 1 of 0..15, 16..31, 32..47 never
  run the split is refused, naming its indices (it trained as a 32-example split); data of
  another size is refused before the teacher loads."""
  from jkd.data import logit_store
  c = _run_config(teacher_dir, tmp_path / 'store', examples_per_chunk=16, chunk_index=0)
  assert extract.run(c) == {'train': 16}
  c.extract.chunk_index = 2
  assert extract.run(c) == {'train': 16}
  with pytest.raises(ValueError, match=r"16 of the data's 48 examples \(indices 16\.\.31\) were "
                     'never extracted'):
    logit_store.check_finished(str(tmp_path / 'store'), 'train')
  with open(teacher_dir / 'train.jsonl') as f:
    (tmp_path / 'more.jsonl').write_text(f.read() * 2)
  c.data.train_file, c.extract.chunk_index = str(tmp_path / 'more.jsonl'), 1
  monkeypatch.setattr(extract.model, 'load', lambda *a, **k: pytest.fail('teacher loaded'))
  with pytest.raises(ValueError, match=r'train: extracted from data of 48 examples; '
                     r'data\.train_file=\S+more\.jsonl holds 96'):
    extract.run(c)
  monkeypatch.undo()
  c.data.train_file = str(teacher_dir / 'train.jsonl')
  assert extract.run(c) == {'train': 16}
  assert logit_store.check_finished(str(tmp_path / 'store'), 'train') == 48


def test_chunk_index_selects_nemo_style_chunks():
  """extract.examples_per_chunk / chunk_index: chunk i is indices [i*n, (i+1)*n - 1]."""
  c = base.get_config()
  c.data.max_seq_length = 64
  c.extract.examples_per_chunk, c.extract.chunk_index = 10, 3
  s = extract.settings(c)
  assert (s.start_idx, s.end_idx) == (30, 39)
  c.extract.examples_per_chunk = 0
  assert (extract.settings(c).start_idx, extract.settings(c).end_idx) == (0, -1)
