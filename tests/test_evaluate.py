"""jkd.evaluate against float64 numpy transcriptions, known calibration cases and model.forward."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import evaluate, model

B, T, V, K, NB = 2, 7, 16, 4, 10
CFG = model.ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                        vocab_size=64, max_position_embeddings=128, init_method_std=0.5)


def random_inputs(seed):
  rng = np.random.default_rng(seed)
  z = (rng.normal(size=(B, T, V)) * 3).astype(np.float32)
  zt = rng.normal(size=(B, T, V)) * 3
  ids = np.argsort(-zt, -1)[..., :K].astype(np.int32)
  t = np.take_along_axis(zt, ids, -1)
  t = (t - t[..., :1]).astype(np.float32)  # stored teacher logits: descending, max 0
  labels = rng.integers(0, V, (B, T)).astype(np.int32)
  labels[0, :3] = z[0, :3].argmax(-1)  # some correct predictions for the ECE accuracy
  mask = rng.integers(0, 2, (B, T)).astype(np.int32)
  mask[0, 0] = 1
  return z, labels, mask, ids, t


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_reference(z, labels, mask, ids, t, n_bins):
  """Means and the ECE straight from the definitions, in float64."""
  z, t, m = z.astype(np.float64), t.astype(np.float64), mask.astype(bool)
  logp = log_softmax(z)
  ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0][m].mean()
  pred = z.argmax(-1)
  agreement = (pred == ids[..., 0])[m].mean()
  lp, lq = log_softmax(t), log_softmax(np.take_along_axis(z, ids, -1))
  kl = (np.exp(lp) * (lp - lq)).sum(-1)[m].mean()
  conf, acc = np.exp(logp.max(-1))[m], (pred == labels)[m]
  ece = 0.0
  for b in range(n_bins):
    inb = (conf > b / n_bins) & (conf <= (b + 1) / n_bins)
    if inb.any():
      ece += inb.sum() / len(conf) * abs(acc[inb].mean() - conf[inb].mean())
  return {'ce': ce, 'agreement': agreement, 'kl_topk': kl, 'ece': ece}


def metrics(z, labels, mask, ids, t, n_bins=NB):
  return evaluate.summarize(jax.device_get(evaluate.token_metrics(
      jnp.asarray(z), jnp.asarray(labels), jnp.asarray(mask), jnp.asarray(ids), jnp.asarray(t),
      n_bins=n_bins)))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_metrics_match_numpy_reference(seed):
  """Each metric equals its float64 definition on random logits with a random mask."""
  inputs = random_inputs(seed)
  got, want = metrics(*inputs), numpy_reference(*inputs, NB)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert got['perplexity'] == pytest.approx(math.exp(got['ce']), rel=1e-12)


@pytest.mark.parametrize('bad', [np.inf, np.nan])
def test_a_bad_logit_at_a_masked_position_changes_no_metric(bad):
  """Masked positions are left out of every metric, ECE's sums too, whatever their logits."""
  z, labels, mask, ids, t = random_inputs(4)
  b, p = np.argwhere(mask == 0)[0]
  z_bad = z.copy()
  z_bad[b, p, 3] = bad
  assert metrics(z_bad, labels, mask, ids, t) == metrics(z, labels, mask, ids, t)


def test_ece_pairs_are_histograms():
  """Per-bin counts add up to the mask count; masked tokens fall in no bin."""
  z, labels, mask, ids, t = random_inputs(3)
  pairs = jax.device_get(evaluate.token_metrics(z, labels, mask, ids, t, n_bins=NB))
  assert pairs['ece_count'][0].shape == (NB,)
  assert pairs['ece_count'][0].sum() == mask.sum() == pairs['ce'][1]


def calibration_case(conf_top, correct, n):
  """n tokens over V=4 whose top-1 (id 0) has probability conf_top; `correct` of them right."""
  a = math.log(3 * conf_top / (1 - conf_top))  # exp(a) / (exp(a) + 3) = conf_top
  z = np.zeros((1, n, 4), np.float32)
  z[..., 0] = a
  labels = np.ones((1, n), np.int32)
  labels[0, :correct] = 0
  return z, labels


def ece_of(z, labels, mask=None):
  mask = np.ones(labels.shape, np.int32) if mask is None else mask
  ids = np.zeros(labels.shape + (1,), np.int32)
  return metrics(z, labels, mask, ids, np.zeros_like(ids, np.float32))['ece']


def test_ece_perfectly_calibrated_is_zero():
  """Confidence 0.75 and 75 of 100 right: no calibration error."""
  assert ece_of(*calibration_case(0.75, 75, 100)) == pytest.approx(0.0, abs=1e-6)


def test_ece_overconfident_known_value():
  """Half at conf 0.75 all right (gap .25), half at conf 0.5 all wrong (gap .5): ECE .375.

  Masked extra tokens (confident and wrong) must not count."""
  z1, l1 = calibration_case(0.75, 50, 50)
  z2, l2 = calibration_case(0.5, 0, 50)
  z3, l3 = calibration_case(0.95, 0, 20)
  z, labels = np.concatenate([z1, z2, z3], 1), np.concatenate([l1, l2, l3], 1)
  mask = np.ones(labels.shape, np.int32)
  mask[0, 100:] = 0
  assert ece_of(z, labels, mask) == pytest.approx(0.375, abs=1e-6)
  assert ece_of(*calibration_case(0.75, 25, 100)) == pytest.approx(0.5, abs=1e-6)


def test_student_equal_to_teacher_agrees_fully():
  """Teacher top-K taken from the student itself: agreement 1, KL 0."""
  z, labels, mask, _, _ = random_inputs(4)
  ids = np.argsort(-z, -1)[..., :K].astype(np.int32)
  t = np.take_along_axis(z, ids, -1)
  got = metrics(z, labels, mask, ids, t - t[..., :1])
  assert got['agreement'] == 1.0
  assert got['kl_topk'] == pytest.approx(0.0, abs=1e-6)


def test_a_diverged_model_summarizes_to_infinite_perplexity():
  """CE past ~709 nats: exp overflows; the summary says inf rather than raising."""
  z, labels, mask, ids, t = random_inputs(7)
  z = np.zeros_like(z)
  z[..., 1] = 1000.0
  labels = np.zeros_like(labels)  # every label far below the winning logit: CE = 1000
  got = metrics(z, labels, mask, ids, t)
  assert got['ce'] == pytest.approx(1000.0) and got['perplexity'] == math.inf


def test_empty_mask_summarizes_to_nan():
  z, labels, mask, ids, t = random_inputs(5)
  got = metrics(z, labels, np.zeros_like(mask), ids, t)
  assert all(math.isnan(v) for v in got.values())


def test_invalid_arguments_raise():
  z, labels, mask, ids, t = random_inputs(6)
  with pytest.raises(ValueError, match='n_bins'):
    evaluate.token_metrics(z, labels, mask, ids, t, n_bins=0)
  with pytest.raises(ValueError, match='labels_BxT'):
    evaluate.token_metrics(z, labels[:, :-1], mask, ids, t)
  with pytest.raises(ValueError, match='teacher_logits_BxTxK'):
    evaluate.token_metrics(z, labels, mask, ids, t[..., :-1])
  with pytest.raises(ValueError, match='no batches'):
    evaluate.evaluate(CFG, None, [])


@pytest.fixture(scope='module')
def params():
  return model.init(CFG, jax.random.key(0))


def loader_batch(seed, b, l=16, k=3):
  """A padded loader-style batch: one or two packed examples per row, padding at the end."""
  rng = np.random.default_rng(seed)
  v = CFG.vocab_size
  seg = np.zeros((b, l), np.int32)
  pos = np.zeros((b, l), np.int32)
  for r in range(b):
    n1, n2 = int(rng.integers(3, 8)), int(rng.integers(0, 7))
    seg[r, :n1], seg[r, n1:n1 + n2] = 1, 2
    pos[r, :n1], pos[r, n1:n1 + n2] = np.arange(n1), np.arange(n2)
  ids = np.stack([rng.permutation(v)[:k] for _ in range(b * l)]).reshape(b, l, k)
  logits = -np.sort(rng.exponential(size=(b, l, k)), -1)
  return {'tokens': rng.integers(0, v, (b, l)).astype(np.int32),
          'labels': rng.integers(0, v, (b, l)).astype(np.int32),
          'loss_mask': ((seg > 0) & (rng.random((b, l)) < 0.8)).astype(np.uint8),
          'topk_ids': ids.astype(np.int32), 'topk_logits': logits.astype(np.float32),
          'lse': np.zeros((b, l), np.float32), 'segment_ids': seg, 'positions': pos}


def test_evaluate_over_batches_equals_concatenated_batch(params):
  """Pairs aggregate exactly: two batches == their concatenation; and match a direct forward."""
  b1, b2 = loader_batch(0, 2), loader_batch(1, 3)
  both = {k: np.concatenate([b1[k], b2[k]]) for k in b1}
  split, joint = evaluate.evaluate(CFG, params, [b1, b2]), evaluate.evaluate(CFG, params, [both])
  for name in joint:
    assert split[name] == pytest.approx(joint[name], rel=1e-5, abs=1e-6), name
  logits = model.forward(CFG, params, both['tokens'], segment_ids_BxT=both['segment_ids'],
                         positions_BxT=both['positions'])
  want = numpy_reference(np.asarray(logits), both['labels'], both['loss_mask'],
                         both['topk_ids'], both['topk_logits'], 15)
  for name, value in want.items():
    np.testing.assert_allclose(joint[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match='segment_ids'):
    evaluate.make_eval_fn(CFG)(params, {k: v for k, v in b1.items() if k != 'segment_ids'})


def argmax_loop(params, prompt, n):
  tokens = list(prompt)
  for _ in range(n):
    logits = model.forward(CFG, params, jnp.asarray([tokens], jnp.int32))
    tokens.append(int(jnp.argmax(logits[0, -1])))
  return tokens[len(prompt):]


def test_eval_holds_the_logits_of_a_chunk_of_tokens_not_of_the_batch(monkeypatch):
  """[B, T, V] logits, twice (log-softmax), were 62 GiB for the tutorial's student at
  eval.batch_size=8 and 4096 tokens: the logits are made CHUNK_ELEMENTS at a time, the metrics
  the same (chunks of 17 tokens, the last one short)."""
  import dataclasses
  big = dataclasses.replace(CFG, vocab_size=8192, padded_vocab_size=8192)
  params = model.init(big, jax.random.key(0))
  batch = loader_batch(0, 4, l=60)
  whole = evaluate.make_eval_fn(big)(params, batch)
  monkeypatch.setattr(evaluate, 'CHUNK_ELEMENTS', 17 * big.vocab_size)
  assert 4 * 60 % 17
  fn = evaluate.make_eval_fn(big)
  temp = jax.jit(fn).lower(params, batch).compile().memory_analysis().temp_size_in_bytes
  assert temp < 4 * 60 * 8192 * 4 / 4, temp  # a quarter of one [B, T, V] fp32 array
  chunked = fn(params, batch)
  for name in whole:
    for a, b in zip(whole[name], chunked[name]):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5,
                                 err_msg=name)


def test_generate_greedy_equals_argmax_loop_and_stops_at_eos(params):
  prompt = [3, 17, 42, 5]
  want = argmax_loop(params, prompt, 8)
  assert evaluate.generate(CFG, params, prompt, max_new_tokens=8) == want
  # eos = the 4th generated token (its first occurrence): output stops right before it.
  cut = want.index(want[3])
  assert evaluate.generate(CFG, params, prompt, max_new_tokens=8, eos_id=want[3]) == want[:cut]
  assert evaluate.generate(CFG, params, prompt, max_new_tokens=0) == []


def test_generate_sampling_is_seeded_and_valid(params):
  prompt = [1, 2, 3]
  a = evaluate.generate(CFG, params, prompt, max_new_tokens=6, temperature=1.0, seed=7)
  assert a == evaluate.generate(CFG, params, prompt, max_new_tokens=6, temperature=1.0, seed=7)
  assert len(a) == 6 and all(0 <= i < CFG.vocab_size for i in a)
  with pytest.raises(ValueError, match='max_position_embeddings'):
    evaluate.generate(CFG, params, prompt, max_new_tokens=CFG.max_position_embeddings)
  with pytest.raises(ValueError, match='temperature'):
    evaluate.generate(CFG, params, prompt, max_new_tokens=1, temperature=-1.0)


# mode=eval: a model directory on a logit-store split.
def _eval_setup(tmp_path, params, n=10):
  """CFG's params as a model directory and a store whose validation split holds `n` records
  (lengths 5..14, vocabulary 64, K 4); the records, for a per-example reference."""
  from tests import test_logit_store as tls
  from jkd.data import logit_store
  model.save(str(tmp_path / 'model'), CFG, params)
  rng = np.random.default_rng(0)
  recs = [tls.make_record(rng, i, 5 + i, k=4, v=CFG.vocab_size) for i in range(n)]
  meta = tls.make_meta(k=4, vocab_size=CFG.vocab_size)
  tls.write_store(str(tmp_path / 'store'), recs, meta, split='validation')
  logit_store.mark_finished(str(tmp_path / 'store'), 'validation', range(n))
  return recs


def _eval_config(tmp_path, **keys):
  from configs import eval as eval_config
  c = eval_config.get_config()
  c.eval.model, c.eval.store = str(tmp_path / 'model'), str(tmp_path / 'store')
  c.eval.output, c.eval.batch_size, c.data.max_seq_length = str(tmp_path / 'eval.json'), 3, 64
  for key, value in keys.items():
    c.eval[key] = value
  return c


def test_eval_mode_equals_a_per_example_numpy_reference(tmp_path, params, devices8):
  """Every record of the split (batches of 3, the last partial), or the first max_batches:
  the numpy definitions over the concatenated tokens of the same records; written as JSON."""
  import json
  from jkd import config as jkd_config
  recs = _eval_setup(tmp_path, params)
  for max_batches, used in ((-1, recs), (2, recs[:6])):
    c = _eval_config(tmp_path, max_batches=max_batches)
    jkd_config.validate(c)
    got = evaluate.run(c)
    logits = np.concatenate([np.asarray(model.forward(CFG, params, r.tokens[None]))[0]
                             for r in used])[None]
    cat = lambda f: np.concatenate([getattr(r, f) for r in used])[None]  # noqa: E731
    want = numpy_reference(logits, cat('labels'), cat('loss_mask'), cat('topk_ids'),
                           cat('topk_logits'), 15)
    for name, value in want.items():
      np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    saved = json.loads((tmp_path / 'eval.json').read_text())
    assert saved['metrics'] == got and saved['split'] == 'validation'
    # what the numbers are over: two runs that differ in these differ in their metrics
    assert (saved['max_batches'], saved['examples'], saved['max_seq_length'],
            saved['batch_size']) == (max_batches, len(used), 64, 3)


def test_eval_mode_refuses_a_split_without_loss_tokens_and_writes_strict_json(
    tmp_path, params, devices8, monkeypatch):
  """No loss token: every metric NaN, exit 0 and bare NaN in eval.json (not JSON); now refused.
  A diverged model's infinite perplexity is written as null."""
  import json
  from jkd import config as jkd_config
  from tests import test_logit_store as tls
  from jkd.data import logit_store
  model.save(str(tmp_path / 'model'), CFG, params)
  rng = np.random.default_rng(0)
  recs = [tls.make_record(rng, i, 8, k=4, v=CFG.vocab_size) for i in range(3)]
  for r in recs:
    r.loss_mask[:] = 0
  tls.write_store(str(tmp_path / 'store'), recs, tls.make_meta(k=4, vocab_size=CFG.vocab_size),
                  split='validation')
  logit_store.mark_finished(str(tmp_path / 'store'), 'validation', range(3))
  c = _eval_config(tmp_path)
  jkd_config.validate(c)
  with pytest.raises(ValueError, match=r'the batches of .*store/validation hold no loss token'):
    evaluate.run(c)
  assert not (tmp_path / 'eval.json').exists()
  monkeypatch.setattr(evaluate, 'evaluate_store', lambda *a, **k: {'ce': 800.0,
                                                                   'perplexity': math.inf})
  evaluate.run(c)
  assert json.loads((tmp_path / 'eval.json').read_text())['metrics'] == {
      'ce': 800.0, 'perplexity': None}


def test_eval_mode_checks_a_learned_position_table_up_front(tmp_path, params, devices8):
  """Found only while tracing the first batch, naming a key the user cannot set."""
  import dataclasses
  from jkd import config as jkd_config
  _eval_setup(tmp_path, params, n=2)
  learned = dataclasses.replace(CFG, position_embedding_type='learned_absolute',
                                max_position_embeddings=16)
  model.save(str(tmp_path / 'learned'), learned, model.init(learned, jax.random.key(0)))
  with pytest.raises(ValueError, match=r'data\.max_seq_length=64: exceeds '
                     r'max_position_embeddings=16 of .*learned/model_config\.json'):
    jkd_config.validate(_eval_config(tmp_path, model=str(tmp_path / 'learned')))


@pytest.mark.parametrize('keys,message', [
    ({'model': ''}, 'eval.model is empty'),
    ({'batch_size': 0}, 'eval.batch_size=0'),
    ({'max_batches': 0}, 'eval.max_batches=0'),
    ({'split': 'train'}, r'store/train: no such split .*eval\.split'),
    ({'output': 'TMP/nowhere/eval.json'}, r'nowhere: no such directory'),
    ({'output': 'TMP/store/eval.json'}, r'eval\.output=.*lies inside eval\.store'),
])
def test_eval_mode_refuses_bad_settings_naming_the_key(tmp_path, params, devices8, keys,
                                                        message):
  from jkd import config as jkd_config
  _eval_setup(tmp_path, params, n=2)
  keys = {k: v.replace('TMP', str(tmp_path)) if isinstance(v, str) else v
          for k, v in keys.items()}
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    jkd_config.validate(_eval_config(tmp_path, **keys))


def test_eval_mode_refuses_another_vocabulary_and_an_unfinished_split(tmp_path, params,
                                                                       devices8):
  import dataclasses
  from jkd import config as jkd_config
  _eval_setup(tmp_path, params, n=2)
  model.save(str(tmp_path / 'other'), dataclasses.replace(CFG, vocab_size=60,
                                                           padded_vocab_size=64), params)
  with pytest.raises(ValueError, match=r"vocab_size 64 differs from the model's 60"):
    jkd_config.validate(_eval_config(tmp_path, model=str(tmp_path / 'other')))
  os.remove(tmp_path / 'store' / 'validation' / 'finished.json')
  with pytest.raises(ValueError, match='did not finish'):
    jkd_config.validate(_eval_config(tmp_path))
