"""Reference top-K knowledge-distillation losses (pure jnp, fp32 inside).

Letter legend for tensor names:
  B batch, T sequence length, V vocabulary, K teacher top-K entries, C buckets (K, or K+1 with
  the tail).

The default reproduces NeMo-Aligner's `_TopKLogitsCrossEntropy` (spec §3.2/§3.3): per token,
`kd_loss_weight * KD + sft_loss_weight * SFT`, where KD is KL(p_K || q_K) (`fwd_kl`) or
KL(q_K || p_K) (`bwd_kl`) between teacher and student distributions both renormalised over the
teacher's K ids, on `logits_scale * student` and `target_logits_scale * teacher` logits, and SFT
is full-vocabulary cross-entropy on the scaled student logits (zero when `sft_loss_weight == 0`,
as in NeMo). The loss is NeMo's micro-batch reduction `sum(l * m) / max(sum(m), 1)` with
`m = clip(loss_mask, 0, 1)`; metrics are (sum, count) pairs to divide after aggregation.

Options beyond parity (never on by default): `tail=True` adds the residual mass as a (K+1)-th
bucket (teacher's from its stored full-vocabulary logsumexp, student's from its own full
vocabulary); `student_norm='full'` uses student log-probs over the full vocabulary at the K ids
(teacher still renormalised over K; forward KL only, since the student's K masses no longer sum
to one); `kd_loss='jsd'` is the generalised JSD(beta) of GKD,
`beta * KL(p || m) + (1 - beta) * KL(q || m)` with `m = beta * p + (1 - beta) * q`;
`temperature` divides both sides' KD logits and multiplies KD by temperature**2.

The per-token math lives in `topk_kd_per_token`, a function of per-token statistics (student
logits at the K ids, its full-vocabulary logsumexp, its label logit, ...). `topk_kd_loss`
gathers those from full logits; the fused kernel computes them in vocabulary tiles and calls
`topk_kd_from_stats` too. Options are static Python values.

NeMo numerics vs jkd (spec §3.4):
- NeMo shifts the student by its global max, then takes exp of the K gathered logits: if all K
  ids sit > ~88 below the max, the sum underflows to 0 and the loss is NaN. jkd uses
  log-softmax over the K logits (shifted by their own max).
- NeMo's bwd_kl backward takes log(p) of teacher probabilities: an underflowed p gives inf/NaN
  gradients. jkd works with log-probs from log-softmax, so log p stays finite and p = 0 terms
  are exactly 0; gradients are autodiff of that form.
- A teacher logit of -inf (a masked vocabulary entry, or an overflow under temperature) has
  p = 0: forward KL and JSD count its term as 0 log 0 = 0; reverse KL is +inf there, as its
  definition says, and the train loop stops on the non-finite loss.
- NeMo's teacher logsumexp over K has no shift (safe only because stored logits have max 0);
  jkd shifts. NeMo's `squeeze()` of the stored logsumexp breaks S=1; jkd never squeezes.
- NeMo treats any kd_loss other than "bwd_kl" as forward KL; jkd raises ValueError.
- NeMo's backward assigns (does not accumulate) at duplicate ids; autodiff accumulates. Ids
  repeat only at padding, where the mask is 0, so gradients agree.
- (No NeMo counterpart.) Tail buckets: a teacher tail 1 - exp(logsumexp_K(t) - lse) below the
  fp32 resolution of the stored lse (_TAIL_EPS) counts as 0; for reverse KL its log is floored
  at log(_TAIL_EPS) so the student's tail costs q log(q / eps), not infinity. The student tail
  is a logsumexp over the ids outside the K (no 1 - sum cancellation, exact gradients even for
  tiny tails); an empty one (K = V) is -1e30 in log.
- Ids and labels outside [0, V) are clamped (they may only appear at masked positions).
- Memory: this reference materialises the scaled fp32 [B, T, V] logits (NeMo keeps several
  such copies); the fused kernel needs none.

Teacher inputs are constants (stop_gradient). `loss` is one micro-batch's token mean; NeMo's
logged numbers are means of micro-batch means, which equal the (sum, count) pairs aggregated
over micro-batches only when every micro-batch has the same mask count.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

KD_LOSSES = ('fwd_kl', 'bwd_kl', 'jsd')
STUDENT_NORMS = ('topk', 'full')
_NEG = -1e30  # finite stand-in for log 0: keeps forward and backward free of inf - inf
_TAIL_EPS = 2.0**-20  # ~ulp of a teacher logsumexp in [8, 16): smaller tails are noise
# (fp32 logits; from bfloat16-rounded ones, the store's default, tails below ~1e-4 are noise)

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def resolve_options(*, kd_loss, kd_loss_weight, sft_loss_weight, target_logits_scale, tail,
                    student_norm, beta, temperature, has_teacher_lse):
  """Validates the loss options (one-line ValueError) and returns the effective student_norm."""
  if kd_loss not in KD_LOSSES:
    raise ValueError(f'kd_loss={kd_loss!r}: expected one of {KD_LOSSES}')
  for name, w in (('kd_loss_weight', kd_loss_weight), ('sft_loss_weight', sft_loss_weight)):
    if not w >= 0:
      raise ValueError(f'{name}={w}: must be >= 0')
  if kd_loss_weight == 0 and sft_loss_weight == 0:
    raise ValueError('kd_loss_weight=0 and sft_loss_weight=0: at least one must be non-zero')
  if not target_logits_scale > 0:
    raise ValueError(f'target_logits_scale={target_logits_scale}: must be > 0')
  if not 0 < beta < 1:
    raise ValueError(f'beta={beta}: must lie in (0, 1)')
  if not temperature > 0:
    raise ValueError(f'temperature={temperature}: must be > 0')
  if student_norm not in (None,) + STUDENT_NORMS:
    raise ValueError(f'student_norm={student_norm!r}: expected None or one of {STUDENT_NORMS}')
  if tail:
    if student_norm == 'topk':
      raise ValueError("student_norm='topk': tail=True normalises over the full vocabulary")
    if not has_teacher_lse:
      raise ValueError('tail=True: needs teacher_lse_BxT (the stored full-vocabulary logsumexp)')
    if target_logits_scale != 1 or temperature != 1:
      raise ValueError(f'tail=True: needs target_logits_scale=1 and temperature=1 (got '
                       f'{target_logits_scale}, {temperature}); the stored logsumexp is at scale 1')
    return 'full'
  student_norm = student_norm or 'topk'
  if student_norm == 'full' and kd_loss != 'fwd_kl':
    raise ValueError(f"student_norm='full': defined for kd_loss='fwd_kl' only (got {kd_loss!r}); "
                     'use tail=True for a normalised full-vocabulary student')
  return student_norm


def _kl(p_BxTxC, logp_BxTxC, logq_BxTxC):
  """sum_c p (log p - log q); p is passed apart from log p so a floored log p keeps p = 0,
  and a term with p = 0 is 0 (0 log 0), also where log p is -inf (a -inf teacher logit)."""
  logp_BxTxC = jnp.where(p_BxTxC > 0, logp_BxTxC, 0.0)
  return jnp.sum(p_BxTxC * (logp_BxTxC - logq_BxTxC), axis=-1)


def _require(name, value, why):
  if value is None:
    raise ValueError(f'{name}=None: needed for {why}')
  return value.astype(jnp.float32)


def topk_kd_per_token(student_topk_BxTxK, teacher_logits_BxTxK, *, student_lse_BxT=None,
                      label_logit_BxT=None, student_lse_kd_BxT=None, student_tail_lse_BxT=None,
                      teacher_lse_BxT=None, kd_loss='fwd_kl', kd_loss_weight=1.0,
                      sft_loss_weight=0.0, target_logits_scale=1.0, tail=False,
                      student_norm=None, beta=0.5, temperature=1.0):
  """Per-token (kd_BxT, sft_BxT), unweighted, from per-token student statistics.

  The student statistics are of the scaled logits x = logits_scale * student_logits:
    student_topk_BxTxK    x at the teacher ids (cross_tokenizer: the student's own top-K, desc.)
    student_lse_BxT       logsumexp_V(x): SFT, and the full/tail normalisation at temperature 1
    label_logit_BxT       x at the label: SFT
    student_lse_kd_BxT    logsumexp_V(x / temperature): student_norm='full' at temperature != 1
    student_tail_lse_BxT  logsumexp of x over the ids outside the K (-1e30 if none): tail
  Teacher inputs are the stored max-shifted logits (before target_logits_scale) and, for the
  tail, the stored logsumexp; both are constants.
  """
  norm = resolve_options(kd_loss=kd_loss, kd_loss_weight=kd_loss_weight,
                         sft_loss_weight=sft_loss_weight,
                         target_logits_scale=target_logits_scale, tail=tail,
                         student_norm=student_norm, beta=beta, temperature=temperature,
                         has_teacher_lse=teacher_lse_BxT is not None)
  x_BxTxK = student_topk_BxTxK.astype(jnp.float32) / temperature  # KD sees x / temperature
  t_BxTxK = jax.lax.stop_gradient(teacher_logits_BxTxK.astype(jnp.float32))
  t_BxTxK = t_BxTxK * target_logits_scale / temperature

  if tail:
    lse_t_BxT = jax.lax.stop_gradient(teacher_lse_BxT.astype(jnp.float32))
    logp_BxTxK = t_BxTxK - lse_t_BxT[..., None]
    # Teacher tail 1 - sum_K p from the stored logsumexp; noise-level tails count as 0.
    a_BxT = jax.nn.logsumexp(logp_BxTxK, axis=-1)
    p_tail_BxT = -jnp.expm1(jnp.minimum(a_BxT, 0.0))
    p_tail_BxT = jnp.where(p_tail_BxT < _TAIL_EPS, 0.0, p_tail_BxT)
    # log 0 only matters for reverse KL (q log q/p): floor it at the resolution there.
    log_floor = math.log(_TAIL_EPS) if kd_loss == 'bwd_kl' else _NEG
    logp_tail_BxT = jnp.where(p_tail_BxT > 0, jnp.log(jnp.maximum(p_tail_BxT, _TAIL_EPS)),
                              log_floor)
    p_BxTxC = jnp.concatenate([jnp.exp(logp_BxTxK), p_tail_BxT[..., None]], axis=-1)
    logp_BxTxC = jnp.concatenate([logp_BxTxK, logp_tail_BxT[..., None]], axis=-1)
    lse_BxT = _require('student_lse_BxT', student_lse_BxT, 'tail=True')
    tail_lse_BxT = _require('student_tail_lse_BxT', student_tail_lse_BxT, 'tail=True')
    logq_BxTxC = jnp.concatenate([x_BxTxK, tail_lse_BxT[..., None]], axis=-1) - lse_BxT[..., None]
  else:
    logp_BxTxC = jax.nn.log_softmax(t_BxTxK, axis=-1)
    p_BxTxC = jnp.exp(logp_BxTxC)
    if norm == 'full':
      if temperature == 1:
        lse_BxT = _require('student_lse_BxT', student_lse_BxT, "student_norm='full'")
      else:
        lse_BxT = _require('student_lse_kd_BxT', student_lse_kd_BxT,
                           "student_norm='full' at temperature != 1")
      logq_BxTxC = x_BxTxK - lse_BxT[..., None]
    else:
      logq_BxTxC = jax.nn.log_softmax(x_BxTxK, axis=-1)
  q_BxTxC = jnp.exp(logq_BxTxC)

  if kd_loss == 'fwd_kl':
    kd_BxT = _kl(p_BxTxC, logp_BxTxC, logq_BxTxC)
  elif kd_loss == 'bwd_kl':
    kd_BxT = _kl(q_BxTxC, logq_BxTxC, logp_BxTxC)
  else:
    logm_BxTxC = jnp.logaddexp(math.log(beta) + logp_BxTxC, math.log1p(-beta) + logq_BxTxC)
    kd_BxT = (beta * _kl(p_BxTxC, logp_BxTxC, logm_BxTxC)
              + (1 - beta) * _kl(q_BxTxC, logq_BxTxC, logm_BxTxC))
  kd_BxT = kd_BxT * temperature**2

  if sft_loss_weight > 0:
    sft_BxT = (_require('student_lse_BxT', student_lse_BxT, 'SFT')
               - _require('label_logit_BxT', label_logit_BxT, 'SFT'))
  else:
    sft_BxT = jnp.zeros_like(kd_BxT)  # NeMo skips SFT (reports 0) when its weight is 0
  return kd_BxT, sft_BxT


def reduce_token_losses(kd_BxT, sft_BxT, loss_mask_BxT, *, kd_loss_weight=1.0,
                        sft_loss_weight=0.0) -> tuple[jax.Array, Metrics]:
  """NeMo's micro-batch reduction: sum(l * m) / max(sum(m), 1), m = clip(mask, 0, 1)."""
  m_BxT = jnp.clip(loss_mask_BxT.astype(jnp.float32), 0.0, 1.0)
  count = jnp.sum(m_BxT)
  loss_BxT = kd_loss_weight * kd_BxT + sft_loss_weight * sft_BxT

  def pair(v_BxT):  # where(): an inf at a masked position cannot become 0 * inf = NaN
    return jnp.sum(jnp.where(m_BxT > 0, v_BxT * m_BxT, 0.0)), count

  metrics = {'loss': pair(loss_BxT), 'kd_loss': pair(kd_BxT), 'sft_loss': pair(sft_BxT)}
  return metrics['loss'][0] / jnp.maximum(count, 1.0), metrics


def topk_kd_from_stats(student_topk_BxTxK, teacher_logits_BxTxK, loss_mask_BxT, *,
                       kd_loss_weight=1.0, sft_loss_weight=0.0, **kwargs):
  """(loss, metrics) from per-token statistics; kwargs as in `topk_kd_per_token`."""
  # A masked-out token's non-finite teacher logit (-inf) becomes -1e30: the token is left out
  # of the loss, and left as it is, its gradient would be 0 * inf = NaN (reverse KL).
  teacher_logits_BxTxK = jnp.where(
      jnp.isfinite(teacher_logits_BxTxK) | (loss_mask_BxT[..., None] > 0), teacher_logits_BxTxK,
      _NEG)
  kd_BxT, sft_BxT = topk_kd_per_token(student_topk_BxTxK, teacher_logits_BxTxK,
                                      kd_loss_weight=kd_loss_weight,
                                      sft_loss_weight=sft_loss_weight, **kwargs)
  return reduce_token_losses(kd_BxT, sft_BxT, loss_mask_BxT, kd_loss_weight=kd_loss_weight,
                             sft_loss_weight=sft_loss_weight)


def _check_shape(name, array, shape):
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f'{name}: shape {tuple(array.shape)}, expected {tuple(shape)}')


def topk_kd_loss(student_logits_BxTxV, teacher_ids_BxTxK, teacher_logits_BxTxK, labels_BxT,
                 loss_mask_BxT, *, teacher_lse_BxT=None, kd_loss='fwd_kl', kd_loss_weight=1.0,
                 sft_loss_weight=0.0, logits_scale=1.0, target_logits_scale=1.0,
                 cross_tokenizer=False, tail=False, student_norm=None, beta=0.5,
                 temperature=1.0) -> tuple[jax.Array, Metrics]:
  """Top-K KD (+ SFT) loss of one micro-batch from full student logits.

  Returns (loss, metrics): loss = masked token mean of kd_loss_weight * KD + sft_loss_weight *
  SFT (NeMo's reduction; 0 when the mask is empty); metrics maps 'loss', 'kd_loss' (unweighted)
  and 'sft_loss' (unweighted) to fp32 (sum over masked tokens, mask count) pairs.
  `cross_tokenizer` pairs the student's own top-K with the teacher's K by rank, as NeMo does
  (the teacher's K must be in descending order, as stored).
  """
  if student_logits_BxTxV.ndim != 3:
    raise ValueError(f'student_logits_BxTxV: shape {student_logits_BxTxV.shape}, '
                     'expected [B, T, V]')
  B, T, V = student_logits_BxTxV.shape
  if teacher_ids_BxTxK.ndim != 3:
    raise ValueError(f'teacher_ids_BxTxK: shape {teacher_ids_BxTxK.shape}, expected [B, T, K]')
  K = teacher_ids_BxTxK.shape[-1]
  _check_shape('teacher_ids_BxTxK', teacher_ids_BxTxK, (B, T, K))
  _check_shape('teacher_logits_BxTxK', teacher_logits_BxTxK, (B, T, K))
  _check_shape('labels_BxT', labels_BxT, (B, T))
  _check_shape('loss_mask_BxT', loss_mask_BxT, (B, T))
  if teacher_lse_BxT is not None:
    _check_shape('teacher_lse_BxT', teacher_lse_BxT, (B, T))
  if not 0 < K <= V:
    raise ValueError(f'teacher_ids_BxTxK: K={K} must lie in [1, V={V}]')
  if not logits_scale > 0:
    raise ValueError(f'logits_scale={logits_scale}: must be > 0')
  options = dict(kd_loss=kd_loss, kd_loss_weight=kd_loss_weight, sft_loss_weight=sft_loss_weight,
                 target_logits_scale=target_logits_scale, tail=tail, student_norm=student_norm,
                 beta=beta, temperature=temperature)
  norm = resolve_options(**options, has_teacher_lse=teacher_lse_BxT is not None)

  x_BxTxV = student_logits_BxTxV.astype(jnp.float32) * logits_scale
  if cross_tokenizer:
    student_topk_BxTxK, ids_BxTxK = jax.lax.top_k(x_BxTxV, K)
  else:
    ids_BxTxK = jnp.clip(teacher_ids_BxTxK.astype(jnp.int32), 0, V - 1)  # -1 would wrap to V-1
    student_topk_BxTxK = jnp.take_along_axis(x_BxTxV, ids_BxTxK, axis=-1)

  stats = {}
  if sft_loss_weight > 0 or (norm == 'full' and temperature == 1):
    stats['student_lse_BxT'] = jax.nn.logsumexp(x_BxTxV, axis=-1)
  if sft_loss_weight > 0:
    labels_BxTx1 = jnp.clip(labels_BxT.astype(jnp.int32), 0, V - 1)[..., None]
    stats['label_logit_BxT'] = jnp.take_along_axis(x_BxTxV, labels_BxTx1, -1)[..., 0]
  if norm == 'full' and temperature != 1:
    stats['student_lse_kd_BxT'] = jax.nn.logsumexp(x_BxTxV / temperature, axis=-1)
  if tail:
    in_k_BxTxV = jnp.put_along_axis(jnp.zeros((B, T, V), bool), ids_BxTxK, True, axis=-1,
                                    inplace=False)
    stats['student_tail_lse_BxT'] = jax.nn.logsumexp(jnp.where(in_k_BxTxV, _NEG, x_BxTxV), -1)
  return topk_kd_from_stats(student_topk_BxTxK, teacher_logits_BxTxK, loss_mask_BxT,
                            teacher_lse_BxT=teacher_lse_BxT, **stats, **options)
