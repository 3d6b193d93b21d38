"""jkd.losses against independent float64 numpy references, finite differences and invariants.

`nemo_reference` transcribes spec §3.2 (forward, with NeMo's global max shift and naive exps)
and §3.3 (the custom backward) line by line; `extension_reference` writes the beyond-parity
options (tail bucket, full-vocabulary student, JSD(beta), temperature) from their definitions.
Neither calls jkd. Run with -s to see the relative errors per case.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import losses

B, T, V, K = 2, 5, 32, 6


def make_batch(seed, *, k=K, v=V, mask='random', teacher_spread=3.0, student_spread=3.0):
  """Teacher record as NeMo stores it (max-shifted top-K, descending, ids, lse) + student."""
  rng = np.random.default_rng(seed)
  zt = (rng.normal(size=(B, T, v)) * teacher_spread).astype(np.float32)
  zt = zt - zt.max(-1, keepdims=True)
  ids = np.argsort(-zt, axis=-1, kind='stable')[..., :k].astype(np.int32)
  lse = np.log(np.exp(zt.astype(np.float64)).sum(-1)).astype(np.float32)
  if mask == 'ones':
    m = np.ones((B, T), np.int32)
  else:
    m = rng.integers(0, 2, size=(B, T)).astype(np.int32)
    m[0, 0] = 1
  return dict(z=(rng.normal(size=(B, T, v)) * student_spread).astype(np.float32), ids=ids,
              t=np.take_along_axis(zt, ids, -1), labels=rng.integers(0, v, (B, T)).astype(np.int32),
              mask=m, lse=lse, zt=zt)


def run_jkd(batch, **kw):
  """(loss, metric means, d loss / d student logits) from jkd."""
  def f(z):
    return losses.topk_kd_loss(z, batch['ids'], batch['t'], batch['labels'], batch['mask'],
                               teacher_lse_BxT=batch['lse'], **kw)
  (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(batch['z']))
  means = {n: float(s) / max(float(c), 1.0) for n, (s, c) in metrics.items()}
  return float(loss), means, np.asarray(g)


def nemo_reference(batch, *, kd_loss='fwd_kl', kd_loss_weight=1.0, sft_loss_weight=0.0,
                   logits_scale=1.0, target_logits_scale=1.0, cross_tokenizer=False,
                   dtype=np.float64):
  """Spec §3.2 forward and §3.3 backward; returns token means and d loss / d logits."""
  x = logits_scale * batch['z'].astype(dtype)
  x = x - x.max(-1, keepdims=True)                                    # 1. global max shift
  ids = batch['ids']
  if cross_tokenizer:                                                 # student's own top-K
    ids = np.argsort(-x, axis=-1, kind='stable')[..., :ids.shape[-1]]
  xk = np.take_along_axis(x, ids, -1)                                 # 2. x_k
  t = target_logits_scale * batch['t'].astype(dtype)
  p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)                    # 3. teacher over K
  lse_t = np.log(np.exp(t).sum(-1, keepdims=True))
  lse_x = np.log(np.exp(xk).sum(-1, keepdims=True))                   # 4. student over K
  q = np.exp(xk) / np.exp(xk).sum(-1, keepdims=True)
  if kd_loss == 'bwd_kl':                                             # 5. KD
    kd = (q * (xk - lse_x - t + lse_t)).sum(-1)
  else:
    kd = -(p * xk).sum(-1) + lse_x[..., 0] + (p * (t - lse_t)).sum(-1)
  labels = batch['labels'][..., None]
  softmax_v = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  if sft_loss_weight > 0:                                             # 6. SFT
    sft = np.log(np.exp(x).sum(-1)) - np.take_along_axis(x, labels, -1)[..., 0]
  else:
    sft = np.zeros_like(kd)
  loss = kd_loss_weight * kd + sft_loss_weight * sft                  # 7.
  m = np.clip(batch['mask'], 0, 1).astype(dtype)
  denom = max(m.sum(), 1.0)
  # §3.3: gradient with respect to x at the K ids, plus SFT over V, times grad_output = m/sum(m).
  if kd_loss == 'bwd_kl':
    d = np.log(q) - np.log(p)
    dkd = q * (d - (q * d).sum(-1, keepdims=True))
  else:
    dkd = q - p
  g = np.zeros_like(x)
  np.put_along_axis(g, ids, kd_loss_weight * dkd, -1)
  if sft_loss_weight > 0:
    onehot = np.zeros_like(x)
    np.put_along_axis(onehot, labels, 1.0, -1)
    g += sft_loss_weight * (softmax_v - onehot)
  g *= (m / denom)[..., None]
  return dict(loss=(loss * m).sum() / denom, kd_loss=(kd * m).sum() / denom,
              sft_loss=(sft * m).sum() / denom, grad=logits_scale * g,
              per_token=loss * m / denom)


def fd_gradient(per_token_fn, z, h=1e-6):
  """float64 central differences of sum(per_token_fn(z)) over every logit.

  Each token's term depends only on its own logits, so one vocabulary column is perturbed in
  all tokens at once.
  """
  z = z.astype(np.float64)
  fd = np.zeros_like(z)
  for v in range(z.shape[-1]):
    zp, zm = z.copy(), z.copy()
    zp[..., v] += h
    zm[..., v] -= h
    fd[..., v] = (per_token_fn(zp) - per_token_fn(zm)) / (2 * h)
  return fd


def rel_err(a, b):
  """max |a - b| / max |b| (norm-wise relative error)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


PARITY_CASES = {
    'fwd_kl': dict(kd_loss='fwd_kl'),
    'fwd_kl+sft,scales,mask': dict(kd_loss='fwd_kl', sft_loss_weight=0.4, logits_scale=1.3,
                                   target_logits_scale=0.7),
    'bwd_kl': dict(kd_loss='bwd_kl'),
    'bwd_kl+sft,scales,mask': dict(kd_loss='bwd_kl', kd_loss_weight=0.5, sft_loss_weight=0.5,
                                   logits_scale=0.8, target_logits_scale=1.5),
    'sft_only,scale,mask': dict(kd_loss_weight=0.0, sft_loss_weight=1.0, logits_scale=2.0),
    'cross_tokenizer fwd+sft,mask': dict(kd_loss_weight=0.5, sft_loss_weight=0.5,
                                         cross_tokenizer=True),
    'cross_tokenizer bwd+sft,scales,mask': dict(kd_loss='bwd_kl', sft_loss_weight=0.1,
                                                logits_scale=1.2, target_logits_scale=0.9,
                                                cross_tokenizer=True),
}


@pytest.mark.parametrize('name', PARITY_CASES)
def test_parity_with_nemo_transcription(name):
  """Protects NeMo parity: forward values and gradients of every mode vs spec §3.2/§3.3."""
  kw = PARITY_CASES[name]
  batch = make_batch(1, mask='random' if 'mask' in name else 'ones')
  loss, means, g = run_jkd(batch, **kw)
  ref = nemo_reference(batch, **kw)
  errs = {n: abs(means[n] - ref[n]) / max(abs(ref[n]), 1e-30) for n in ('kd_loss', 'sft_loss')}
  errs['loss'] = abs(loss - ref['loss']) / abs(ref['loss'])
  errs['grad'] = rel_err(g, ref['grad'])
  print(f'\n[parity {name}] ' + ' '.join(f'{n} {e:.2e}' for n, e in errs.items()))
  np.testing.assert_allclose(loss, ref['loss'], rtol=1e-5)
  np.testing.assert_allclose(means['loss'], ref['loss'], rtol=1e-5)
  for n in ('kd_loss', 'sft_loss'):
    np.testing.assert_allclose(means[n], ref[n], rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(g, ref['grad'], rtol=1e-5, atol=1e-5 * np.abs(ref['grad']).max())


@pytest.mark.parametrize('name', PARITY_CASES)
def test_spec_gradient_matches_finite_differences(name):
  """Protects the §3.3 transcription itself (float64 central differences over every logit)."""
  kw = PARITY_CASES[name]
  batch = make_batch(2, mask='random')
  analytic = nemo_reference(batch, **kw)['grad']
  fd = fd_gradient(lambda z: nemo_reference({**batch, 'z': z}, **kw)['per_token'], batch['z'])
  print(f'\n[fd64 {name}] grad rel err {rel_err(analytic, fd):.2e}')
  np.testing.assert_allclose(analytic, fd, atol=1e-7)


def directional_fd_check(batch, rtol=2e-3, **kw):
  """jax.grad vs fp32 central differences along random directions."""
  f = lambda z: losses.topk_kd_loss(z, batch['ids'], batch['t'], batch['labels'], batch['mask'],
                                    teacher_lse_BxT=batch['lse'], **kw)[0]
  z = batch['z']
  if kw.get('cross_tokenizer'):  # rank pairing has kinks: keep the student's top-K order fixed
    k = batch['ids'].shape[-1]
    top_BxTxK = np.argsort(-z, axis=-1)[..., :k]
    gaps_K = 2.0 + 0.5 * np.arange(k)[::-1]
    np.put_along_axis(z, top_BxTxK, np.take_along_axis(z, top_BxTxK, -1) + gaps_K, -1)
  z = jnp.asarray(z)
  g = jax.grad(f)(z)
  rng = np.random.default_rng(0)
  for _ in range(3):
    d = jnp.asarray(rng.normal(size=z.shape).astype(np.float32))
    h = 1e-2
    fd = (float(f(z + h * d)) - float(f(z - h * d))) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, d)), fd, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize('name', PARITY_CASES)
def test_jax_gradient_matches_finite_differences(name):
  """Protects autodiff of the jkd loss directly (no reference in between)."""
  directional_fd_check(make_batch(3, mask='random'), **PARITY_CASES[name])


# ---- beyond parity: tail bucket, full-vocabulary student, JSD(beta), temperature ----------


def extension_reference(batch, *, kd_loss='fwd_kl', tail=False, student_norm=None, beta=0.5,
                        temperature=1.0, logits_scale=1.0, target_logits_scale=1.0,
                        cross_tokenizer=False, **_):
  """Mean KD (no SFT) from the definitions, float64; the teacher tail from the stored lse."""
  x = logits_scale * batch['z'].astype(np.float64) / temperature
  ids = batch['ids']
  if cross_tokenizer:
    ids = np.argsort(-x, axis=-1, kind='stable')[..., :ids.shape[-1]]
  xk = np.take_along_axis(x, ids, -1)
  t = target_logits_scale * batch['t'].astype(np.float64) / temperature
  log_softmax = lambda a: a - np.log(np.exp(a).sum(-1, keepdims=True))
  if tail:
    pk = np.exp(t - batch['lse'].astype(np.float64)[..., None])
    qk = np.exp(xk - np.log(np.exp(x).sum(-1, keepdims=True)))
    p = np.concatenate([pk, 1 - pk.sum(-1, keepdims=True)], -1)
    q = np.concatenate([qk, 1 - qk.sum(-1, keepdims=True)], -1)
  else:
    p = np.exp(log_softmax(t))
    if student_norm == 'full':  # full-vocabulary student probabilities at the K ids
      q = np.exp(xk) / np.exp(x).sum(-1, keepdims=True)
    else:
      q = np.exp(log_softmax(xk))
  kl = lambda a, b: (a * (np.log(a) - np.log(b))).sum(-1)
  if kd_loss == 'fwd_kl':
    kd = kl(p, q)
  elif kd_loss == 'bwd_kl':
    kd = kl(q, p)
  else:
    mix = beta * p + (1 - beta) * q
    kd = beta * kl(p, mix) + (1 - beta) * kl(q, mix)
  m = np.clip(batch['mask'], 0, 1)
  return temperature**2 * kd * m / max(m.sum(), 1)  # per-token terms of the mean


EXTENSION_CASES = {
    'full fwd': dict(student_norm='full'),
    'full fwd T=2,scales': dict(student_norm='full', temperature=2.0, logits_scale=1.3,
                                target_logits_scale=0.8),
    'tail fwd': dict(tail=True),
    'tail bwd': dict(kd_loss='bwd_kl', tail=True),
    'tail jsd b=.3': dict(kd_loss='jsd', beta=0.3, tail=True, logits_scale=0.7),
    'jsd b=.5': dict(kd_loss='jsd'),
    'jsd b=.9 T=2': dict(kd_loss='jsd', beta=0.9, temperature=2.0),
    'fwd T=.5': dict(temperature=0.5),
    'bwd T=3,scales': dict(kd_loss='bwd_kl', temperature=3.0, logits_scale=1.1,
                           target_logits_scale=1.4),
    'cross jsd T=2': dict(kd_loss='jsd', temperature=2.0, cross_tokenizer=True),
    'cross tail fwd': dict(tail=True, cross_tokenizer=True),
}


@pytest.mark.parametrize('name', EXTENSION_CASES)
def test_extensions_match_definitions(name):
  """Protects the options beyond parity: value vs float64 definition, gradient vs FD of it."""
  kw = EXTENSION_CASES[name]
  batch = make_batch(4, mask='random')
  loss, means, g = run_jkd(batch, **kw)
  ref = extension_reference(batch, **kw)
  ref = ref.sum()
  fd = fd_gradient(lambda z: extension_reference({**batch, 'z': z}, **kw), batch['z'])
  print(f'\n[extension {name}] loss {abs(loss - ref) / abs(ref):.2e} grad {rel_err(g, fd):.2e}')
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(means['kd_loss'], ref, rtol=1e-5)
  np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-5 * np.abs(fd).max())


# ---- properties ------------------------------------------------------------------------------

ALL_MODES = {
    'fwd_kl': dict(),
    'bwd_kl': dict(kd_loss='bwd_kl'),
    'jsd': dict(kd_loss='jsd', beta=0.3),
    'fwd_kl T=2,scales': dict(temperature=2.0, logits_scale=1.3, target_logits_scale=0.8),
    'full fwd': dict(student_norm='full'),
    'full fwd T=2': dict(student_norm='full', temperature=2.0),
    'tail fwd': dict(tail=True),
    'tail bwd': dict(kd_loss='bwd_kl', tail=True),
    'tail jsd': dict(kd_loss='jsd', tail=True),
}


def per_token_kd(batch, **kw):
  """[B, T] KD per token, read through the public loss with one-hot masks."""
  masks_NxBxT = jnp.eye(B * T, dtype=jnp.int32).reshape(B * T, B, T)
  kd_N = jax.vmap(lambda m: losses.topk_kd_loss(
      jnp.asarray(batch['z']), batch['ids'], batch['t'], batch['labels'], m,
      teacher_lse_BxT=batch['lse'], **kw)[1]['kd_loss'][0])(masks_NxBxT)
  return np.asarray(kd_N).reshape(B, T)


@pytest.mark.parametrize('name', ALL_MODES)
def test_kd_is_nonnegative(name):
  """Protects KD >= 0 per token, including wide logit ranges."""
  for seed, spread in ((5, 1.0), (6, 10.0)):
    batch = make_batch(seed, teacher_spread=spread, student_spread=spread)
    kd = per_token_kd(batch, **ALL_MODES[name])
    assert np.all(np.isfinite(kd)) and kd.min() >= -1e-6, kd.min()


@pytest.mark.parametrize('name', ALL_MODES)
def test_kd_is_zero_when_student_matches_teacher(name):
  """Protects the zero of the divergence: student == teacher on what the mode compares."""
  kw = ALL_MODES[name]
  batch = make_batch(7)
  s, tau = kw.get('logits_scale', 1.0), kw.get('target_logits_scale', 1.0)
  shift_BxTx1 = np.random.default_rng(7).normal(size=(B, T, 1)).astype(np.float32) * 5
  if kw.get('tail'):
    z = batch['zt'] + shift_BxTx1  # K + 1 buckets: the whole distribution must match
  else:  # renormalised teacher: only the K logits matter, the rest stays random ...
    z = batch['z'].copy() - (200.0 if kw.get('student_norm') == 'full' else 0.0)
    np.put_along_axis(z, batch['ids'], (tau * batch['t'] + shift_BxTx1) / s, -1)
    # ... except for a full-vocabulary student, which must put (almost) no mass outside K
  kd = per_token_kd({**batch, 'z': z}, **kw)
  np.testing.assert_allclose(kd, 0.0, atol=2e-6)


@pytest.mark.parametrize('name', ALL_MODES)
def test_invariant_to_permuting_k(name):
  """Protects order-independence of the K entries (same tokenizer)."""
  kw = ALL_MODES[name]
  batch = make_batch(8, mask='random')
  perm = np.random.default_rng(8).permutation(K)
  permuted = {**batch, 'ids': batch['ids'][..., perm], 't': batch['t'][..., perm]}
  loss, _, g = run_jkd(batch, sft_loss_weight=0.3, **kw)
  loss_p, _, g_p = run_jkd(permuted, sft_loss_weight=0.3, **kw)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
  np.testing.assert_allclose(g_p, g, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('name', list(ALL_MODES) + ['cross_tokenizer'])
def test_masked_positions_contribute_nothing(name):
  """Protects the mask: garbage (huge logits, wild ids, repeated ids) at masked positions."""
  kw = ALL_MODES.get(name, dict(cross_tokenizer=True))
  batch = make_batch(9, mask='random')
  rng = np.random.default_rng(9)
  off_BxT = batch['mask'] == 0
  garbage = {k: v.copy() for k, v in batch.items()}
  garbage['z'][off_BxT] = rng.normal(size=garbage['z'][off_BxT].shape) * 1e4
  garbage['t'][off_BxT] = -1e4 * rng.random(size=garbage['t'][off_BxT].shape)
  garbage['ids'][off_BxT] = 3  # NeMo pads ids with eos repeated K times
  garbage['labels'][off_BxT] = 7
  garbage['lse'][off_BxT] = -50.0
  loss, means, g = run_jkd(batch, sft_loss_weight=0.5, **kw)
  loss_g, means_g, g_g = run_jkd(garbage, sft_loss_weight=0.5, **kw)
  assert np.all(np.isfinite(g_g))
  np.testing.assert_allclose(loss_g, loss, rtol=1e-6)
  np.testing.assert_allclose(means_g['kd_loss'], means['kd_loss'], rtol=1e-6)
  np.testing.assert_array_equal(g_g[off_BxT], 0.0)
  np.testing.assert_allclose(g_g, g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('name', ALL_MODES)
def test_empty_mask_gives_zero_not_nan(name):
  """Protects NeMo's max(sum(m), 1): an all-masked micro-batch is loss 0, gradient 0."""
  batch = make_batch(10)
  batch['mask'][:] = 0
  loss, means, g = run_jkd(batch, sft_loss_weight=0.5, **ALL_MODES[name])
  assert loss == 0.0 and means['kd_loss'] == 0.0 and np.all(g == 0.0)


def full_vocab_divergences(zt, z, beta):
  """float64 fwd KL, reverse KL and JSD(beta) between full-vocabulary softmaxes."""
  log_softmax = lambda a: a - np.log(np.exp(a).sum(-1, keepdims=True))
  logp, logq = log_softmax(zt.astype(np.float64)), log_softmax(z.astype(np.float64))
  p, q = np.exp(logp), np.exp(logq)
  logm = np.log(beta * p + (1 - beta) * q)
  return {'fwd_kl': (p * (logp - logq)).sum(-1), 'bwd_kl': (q * (logq - logp)).sum(-1),
          'jsd': beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)}


@pytest.mark.parametrize('kd_loss', losses.KD_LOSSES)
def test_tail_equals_full_vocabulary_divergence_when_k_is_v(kd_loss):
  """Protects the tail bucket: with K = V it must be exactly the full-vocabulary divergence."""
  batch = make_batch(11, k=V)
  kd = per_token_kd(batch, kd_loss=kd_loss, beta=0.3, tail=True)
  ref = full_vocab_divergences(batch['zt'], batch['z'], 0.3)[kd_loss]
  print(f'\n[tail K=V {kd_loss}] rel err {rel_err(kd, ref):.2e}')
  np.testing.assert_allclose(kd, ref, rtol=1e-5, atol=1e-6)
  _, _, g = run_jkd(batch, kd_loss=kd_loss, beta=0.3, tail=True)  # empty student tail
  assert np.all(np.isfinite(g))


# ---- numerics NeMo gets wrong (spec §3.4) ----------------------------------------------------


@pytest.mark.parametrize('kd_loss', ['fwd_kl', 'bwd_kl'])
def test_finite_when_teacher_ids_sit_far_below_the_student_max(kd_loss):
  """Protects against NeMo's global-max shift: exp(x_k - max) underflows to 0 in fp32 -> NaN."""
  batch = make_batch(12)
  batch['z'][0, 0, np.setdiff1d(np.arange(V), batch['ids'][0, 0])[0]] = 200.0
  with np.errstate(all='ignore'):
    nemo32 = nemo_reference(batch, kd_loss=kd_loss, dtype=np.float32)
  assert not np.isfinite(nemo32['loss'])  # what NeMo computes in fp32
  loss, _, g = run_jkd(batch, kd_loss=kd_loss)
  ref = nemo_reference(batch, kd_loss=kd_loss)  # float64 has the range
  np.testing.assert_allclose(loss, ref['loss'], rtol=1e-5)
  np.testing.assert_allclose(g, ref['grad'], rtol=1e-5, atol=1e-5 * np.abs(ref['grad']).max())


@pytest.mark.parametrize('name', ['bwd_kl', 'jsd', 'tail bwd', 'tail jsd'])
def test_finite_when_teacher_probabilities_underflow(name):
  """Protects against NeMo's log(p) in the bwd_kl backward: p = 0 in fp32 gave inf/NaN."""
  batch = make_batch(13)
  batch['t'][..., -2:] = -200.0  # exp(-200) = 0 in fp32
  loss, _, g = run_jkd(batch, **ALL_MODES[name])
  assert np.isfinite(loss) and np.all(np.isfinite(g))
  if name == 'bwd_kl':
    ref = nemo_reference(batch, kd_loss='bwd_kl')
    np.testing.assert_allclose(loss, ref['loss'], rtol=1e-5)
    np.testing.assert_allclose(g, ref['grad'], rtol=1e-5, atol=1e-5 * np.abs(ref['grad']).max())


@pytest.mark.parametrize('name', ['fwd_kl', 'jsd', 'temperature', 'bwd_kl'])
@pytest.mark.filterwarnings('ignore:overflow encountered in divide:RuntimeWarning')  # -3e38 / 0.5
def test_a_minus_inf_teacher_logit_is_probability_zero(name):
  """-inf (a masked vocabulary entry; -3e38 overflows to it at temperature 0.5) has p = 0:
  forward KL and JSD equal the result with the entry at -200 (p = 0 in fp32 too), gradients
  included; reverse KL is +inf, its value where the teacher has no mass."""
  opts = {'temperature': dict(temperature=0.5)}.get(name, dict(kd_loss=name))
  batch = make_batch(14)
  batch['t'][..., -1] = -200.0
  want = run_jkd(batch, **opts)
  batch['t'][..., -1] = -3e38 if name == 'temperature' else -np.inf
  got = run_jkd(batch, **opts)
  if name == 'bwd_kl':
    assert got[0] == np.inf
    return
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('kd_loss', losses.KD_LOSSES)
def test_a_masked_token_with_a_minus_inf_teacher_logit_changes_nothing(kd_loss):
  """A -inf (or NaN) teacher logit at a masked-out token is left out of the loss and of its
  gradient: the same loss and gradient as with a finite one there (reverse KL's product rule
  gave 0 * inf = NaN)."""
  batch = make_batch(15)
  b, p = np.argwhere(batch['mask'] == 0)[0]
  want = run_jkd(batch, kd_loss=kd_loss, sft_loss_weight=0.4)
  for bad in (-np.inf, np.nan):
    batch['t'][b, p, -1] = bad
    got = run_jkd(batch, kd_loss=kd_loss, sft_loss_weight=0.4)
    assert got[0] == want[0] and np.array_equal(got[2], want[2]), bad


@pytest.mark.parametrize('field', ['ids', 'labels'])
def test_ids_outside_the_vocabulary_are_clamped_into_it(field):
  """-1 reads as id 0 and V as V - 1 (documented: such ids appear at masked positions only), not
  wrapped around to V - 1 as numpy-style negative indexing would."""
  batch = make_batch(16, mask='ones')
  at = (0, 0, 1) if field == 'ids' else (0, 0)
  for bad, same in ((-1, 0), (V, V - 1)):
    changed, clamped = ({**batch, field: batch[field].copy()} for _ in range(2))
    changed[field][at], clamped[field][at] = bad, same
    np.testing.assert_array_equal(run_jkd(changed, sft_loss_weight=0.4)[2],
                                  run_jkd(clamped, sft_loss_weight=0.4)[2])


@pytest.mark.parametrize('kd_loss', losses.KD_LOSSES)
def test_tail_finite_when_teacher_has_no_tail(kd_loss):
  """Protects the tail bucket when the stored lse leaves the teacher no tail mass (p_tail = 0),
  against float64 definitions: forward KL drops the bucket; reverse KL charges the student's
  tail q_tail * log(q_tail / eps) (eps = 2**-20, the fp32 resolution of the stored lse), not
  q_tail * inf; JSD needs no floor (its mixture holds (1 - beta) q_tail)."""
  batch = make_batch(17, mask='ones')
  t64 = batch['t'].astype(np.float64)
  batch['lse'] = np.log(np.exp(t64).sum(-1)).astype(np.float32)  # all teacher mass on K
  loss, _, g = run_jkd(batch, kd_loss=kd_loss, tail=True)
  assert np.isfinite(loss) and np.all(np.isfinite(g)), loss
  x = batch['z'].astype(np.float64)
  lse_x = np.log(np.exp(x).sum(-1, keepdims=True))
  logq = np.take_along_axis(x, batch['ids'], -1) - lse_x
  q = np.exp(logq)
  outside = np.ones(x.shape, bool)
  np.put_along_axis(outside, batch['ids'], False, -1)
  q_tail = (np.exp(x - lse_x) * outside).sum(-1)  # no 1 - sum cancellation
  logp = t64 - batch['lse'].astype(np.float64)[..., None]
  p = np.exp(logp)
  if kd_loss == 'fwd_kl':
    want = (p * (logp - logq)).sum(-1)
  elif kd_loss == 'bwd_kl':
    want = (q * (logq - logp)).sum(-1) + q_tail * (np.log(q_tail) - np.log(2.0**-20))
  else:  # beta = 0.5
    m, m_tail = 0.5 * p + 0.5 * q, 0.5 * q_tail
    want = 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (
        (q * np.log(q / m)).sum(-1) + q_tail * np.log(q_tail / m_tail))
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)


# ---- interfaces ------------------------------------------------------------------------------


def test_from_stats_contract_matches_full_logits():
  """Protects the statistics contract the fused kernel relies on (tail, SFT, T != 1)."""
  batch = make_batch(14, mask='random')
  x = 1.3 * batch['z'].astype(np.float64)
  in_k = np.zeros(x.shape, bool)
  np.put_along_axis(in_k, batch['ids'], True, -1)
  lse = lambda a: np.log(np.exp(a).sum(-1))
  stats = dict(student_lse_BxT=lse(x),
               label_logit_BxT=np.take_along_axis(x, batch['labels'][..., None], -1)[..., 0],
               student_tail_lse_BxT=lse(np.where(in_k, -np.inf, x)))
  stats = {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}
  topk = jnp.asarray(np.take_along_axis(x, batch['ids'], -1), jnp.float32)
  for kw in (dict(tail=True, kd_loss='bwd_kl'), dict(student_norm='full', temperature=2.0)):
    extra = {} if kw.get('tail') else {'student_lse_kd_BxT': jnp.asarray(lse(x / 2.0), jnp.float32)}
    loss, metrics = losses.topk_kd_from_stats(topk, batch['t'], batch['mask'],
                                              teacher_lse_BxT=batch['lse'], sft_loss_weight=0.4,
                                              **stats, **extra, **kw)
    ref, ref_metrics = losses.topk_kd_loss(batch['z'], batch['ids'], batch['t'], batch['labels'],
                                           batch['mask'], teacher_lse_BxT=batch['lse'],
                                           sft_loss_weight=0.4, logits_scale=1.3, **kw)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    for n in ('loss', 'kd_loss', 'sft_loss'):
      np.testing.assert_allclose(metrics[n], ref_metrics[n], rtol=1e-6)


def test_teacher_is_a_constant():
  """Protects 'only the student is differentiated': no gradient reaches teacher inputs."""
  batch = make_batch(18, mask='random')
  for kw in (dict(kd_loss='jsd'), dict(kd_loss='bwd_kl', tail=True)):
    g_t, g_lse = jax.grad(lambda t, lse: losses.topk_kd_loss(
        batch['z'], batch['ids'], t, batch['labels'], batch['mask'], teacher_lse_BxT=lse,
        **kw)[0], argnums=(0, 1))(jnp.asarray(batch['t']), jnp.asarray(batch['lse']))
    assert np.all(np.asarray(g_t) == 0) and np.all(np.asarray(g_lse) == 0)


def test_fp32_inside_and_jit():
  """Protects the fp32 contract for bf16 logits, metric pairs, and jit with static options."""
  batch = make_batch(15, mask='random')
  z16 = jnp.asarray(batch['z'], jnp.bfloat16)
  f = functools.partial(losses.topk_kd_loss, kd_loss='bwd_kl', sft_loss_weight=0.2)
  args = (batch['ids'], batch['t'], batch['labels'], batch['mask'])
  loss, metrics = f(z16, *args)
  loss_jit, _ = jax.jit(f)(z16, *args)
  assert loss.dtype == jnp.float32 and jax.grad(lambda z: f(z, *args)[0])(z16).dtype == jnp.bfloat16
  assert all(s.dtype == c.dtype == jnp.float32 for s, c in metrics.values())
  assert float(metrics['loss'][1]) == batch['mask'].sum()
  np.testing.assert_allclose(loss_jit, loss, rtol=1e-6)
  ref = nemo_reference({**batch, 'z': np.asarray(z16.astype(jnp.float32))}, kd_loss='bwd_kl',
                       sft_loss_weight=0.2)
  np.testing.assert_allclose(loss, ref['loss'], rtol=1e-5)


BAD_OPTIONS = [
    (dict(kd_loss='kl'), 'kd_loss'),
    (dict(kd_loss_weight=0.0, sft_loss_weight=0.0), 'kd_loss_weight=0'),
    (dict(sft_loss_weight=-1.0), 'sft_loss_weight'),
    (dict(logits_scale=0.0), 'logits_scale'),
    (dict(target_logits_scale=-1.0), 'target_logits_scale'),
    (dict(kd_loss='jsd', beta=1.0), 'beta'),
    (dict(beta=0.0), 'beta'),
    (dict(temperature=0.0), 'temperature'),
    (dict(student_norm='vocab'), 'student_norm'),
    (dict(student_norm='full', kd_loss='bwd_kl'), 'student_norm'),
    (dict(tail=True, teacher_lse_BxT=None), 'tail'),
    (dict(tail=True, student_norm='topk'), 'student_norm'),
    (dict(tail=True, temperature=2.0), 'tail'),
    (dict(tail=True, target_logits_scale=0.5), 'tail'),
    (dict(labels_BxT=np.zeros((B, T + 1), np.int32)), 'labels_BxT'),
    (dict(teacher_logits_BxTxK=np.zeros((B, T, K + 1), np.float32)), 'teacher_logits_BxTxK'),
    (dict(teacher_lse_BxT=np.zeros((B,), np.float32)), 'teacher_lse_BxT'),
    (dict(loss_mask_BxT=np.ones((T, B), np.int32)), 'loss_mask_BxT'),
    (dict(student_logits_BxTxV=np.zeros((B, V), np.float32)), 'student_logits_BxTxV'),
]


@pytest.mark.parametrize('bad,needle', BAD_OPTIONS, ids=[n for _, n in BAD_OPTIONS])
def test_invalid_options_raise(bad, needle):
  """Protects loud failure: one-line ValueError naming the option (NeMo falls back silently)."""
  batch = make_batch(16)
  kw = dict(student_logits_BxTxV=batch['z'], teacher_ids_BxTxK=batch['ids'],
            teacher_logits_BxTxK=batch['t'], labels_BxT=batch['labels'],
            loss_mask_BxT=batch['mask'], teacher_lse_BxT=batch['lse'])
  kw.update(bad)
  with pytest.raises(ValueError, match=needle) as info:
    losses.topk_kd_loss(**kw)
  assert '\n' not in str(info.value)
