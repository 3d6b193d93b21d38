"""Evaluation of a student: token metrics against labels and teacher top-K, and decoding;
`run` is mode=eval (a model directory on a logit-store split).

    python -m jkd.main --config configs/eval.py --config.eval.model=/tmp/run/student \
        --config.eval.store=/tmp/store --config.eval.output=/tmp/run/eval.json

Letter legend: B batch, T sequence length, V vocabulary, K teacher top-K entries, P padded
decoding length, N bins of the calibration histogram.

`token_metrics` returns fp32 (sum, count) pairs (house style: divide only after aggregating
over batches and hosts); the calibration pairs are per-bin arrays so that the expected
calibration error can be computed from aggregated histograms. `summarize` turns aggregated
pairs into numbers:
  ce           masked token mean of -log p_student(label)
  perplexity   exp(ce)
  agreement    fraction of tokens where argmax student == the teacher's top-1 id
  kl_topk      KL(p_teacher_K || q_student_K), both renormalised over the teacher's K ids
               (NeMo's forward KL, via jkd.losses.topk_kd_loss)
  ece          sum_b (count_b / N) |acc_b - conf_b| over equal-width confidence bins
               (lo, hi] of the student's top-1 probability, acc = (argmax == label)
An aggregate with no masked tokens summarises to NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jkd import losses, model, tokenizer

Pairs = dict[str, tuple]
BATCH_KEYS = ('tokens', 'labels', 'loss_mask', 'topk_ids', 'topk_logits', 'segment_ids',
              'positions')


def _check_shape(name, array, shape):
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f'{name}: shape {tuple(array.shape)}, expected {tuple(shape)}')


def token_metrics(student_logits_BxTxV, labels_BxT, loss_mask_BxT, teacher_ids_BxTxK,
                  teacher_logits_BxTxK, *, n_bins: int = 15) -> Pairs:
  """Masked fp32 (sum, count) pairs: ce, teacher_top1_agreement, kl_topk, ece_* [n_bins].

  `ece_conf_sum`, `ece_acc_sum` and `ece_count` are per-bin sums of the student's top-1
  confidence, of its correctness against the label, and of masked tokens; their "count" is
  the total mask count. Labels and ids outside [0, V) are clamped (masked positions only).
  """
  if not isinstance(n_bins, int) or n_bins < 1:
    raise ValueError(f'n_bins={n_bins!r}: must be a positive integer')
  if student_logits_BxTxV.ndim != 3:
    raise ValueError(f'student_logits_BxTxV: shape {student_logits_BxTxV.shape}, '
                     'expected [B, T, V]')
  B, T, V = student_logits_BxTxV.shape
  _check_shape('labels_BxT', labels_BxT, (B, T))
  _check_shape('loss_mask_BxT', loss_mask_BxT, (B, T))
  if teacher_ids_BxTxK.ndim != 3:
    raise ValueError(f'teacher_ids_BxTxK: shape {teacher_ids_BxTxK.shape}, expected [B, T, K]')
  _check_shape('teacher_ids_BxTxK', teacher_ids_BxTxK, (B, T, teacher_ids_BxTxK.shape[-1]))
  _check_shape('teacher_logits_BxTxK', teacher_logits_BxTxK, teacher_ids_BxTxK.shape)

  x_BxTxV = student_logits_BxTxV.astype(jnp.float32)
  m_BxT = jnp.clip(loss_mask_BxT.astype(jnp.float32), 0.0, 1.0)
  count = jnp.sum(m_BxT)

  def masked_sum(v_BxT):  # where(): an inf at a masked position must not become NaN
    return jnp.sum(jnp.where(m_BxT > 0, v_BxT * m_BxT, 0.0))

  logp_BxTxV = jax.nn.log_softmax(x_BxTxV, axis=-1)
  labels_BxTx1 = jnp.clip(labels_BxT.astype(jnp.int32), 0, V - 1)[..., None]
  nll_BxT = -jnp.take_along_axis(logp_BxTxV, labels_BxTx1, axis=-1)[..., 0]

  pred_BxT = jnp.argmax(x_BxTxV, axis=-1).astype(jnp.int32)
  agree_BxT = (pred_BxT == teacher_ids_BxTxK[..., 0].astype(jnp.int32)).astype(jnp.float32)

  _, kd = losses.topk_kd_loss(x_BxTxV, teacher_ids_BxTxK, teacher_logits_BxTxK, labels_BxT,
                              loss_mask_BxT, kd_loss='fwd_kl', kd_loss_weight=1.0,
                              sft_loss_weight=0.0)

  # Calibration: bin b holds confidences in (b / N, (b + 1) / N]; conf > 0 always.
  conf_BxT = jnp.where(m_BxT > 0, jnp.exp(jnp.max(logp_BxTxV, axis=-1)), 0.0)  # no NaN * 0
  correct_BxT = (pred_BxT == labels_BxTx1[..., 0]).astype(jnp.float32)
  bin_BxT = jnp.clip(jnp.ceil(conf_BxT * n_bins).astype(jnp.int32) - 1, 0, n_bins - 1)
  w_BxTxN = jax.nn.one_hot(bin_BxT, n_bins, dtype=jnp.float32) * m_BxT[..., None]
  return {
      'ce': (masked_sum(nll_BxT), count),
      'teacher_top1_agreement': (masked_sum(agree_BxT), count),
      'kl_topk': kd['kd_loss'],
      'ece_conf_sum': (jnp.einsum('btn,bt->n', w_BxTxN, conf_BxT), count),
      'ece_acc_sum': (jnp.einsum('btn,bt->n', w_BxTxN, correct_BxT), count),
      'ece_count': (jnp.sum(w_BxTxN, axis=(0, 1)), count),
  }


def add_pairs(a: Pairs | None, b: Pairs) -> Pairs:
  """Elementwise sum of two metric aggregates (float64 numpy on the host)."""
  b = {k: (np.asarray(s, np.float64), np.asarray(c, np.float64)) for k, (s, c) in b.items()}
  if a is None:
    return b
  if set(a) != set(b):
    raise ValueError(f'add_pairs: metric names differ: {sorted(a)} vs {sorted(b)}')
  return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def summarize(pairs: Pairs) -> dict[str, float]:
  """ce, perplexity, agreement, kl_topk and ece from (aggregated) pairs; NaN when empty."""
  def mean(name):
    s, c = pairs[name]
    c = float(np.asarray(c))
    return float(np.asarray(s)) / c if c > 0 else math.nan

  ce = mean('ce')
  conf_N = np.asarray(pairs['ece_conf_sum'][0], np.float64)
  acc_N = np.asarray(pairs['ece_acc_sum'][0], np.float64)
  count_N = np.asarray(pairs['ece_count'][0], np.float64)
  total = count_N.sum()
  # sum_b (n_b / N) |acc_b / n_b - conf_b / n_b| = sum_b |acc_sum_b - conf_sum_b| / N
  ece = float(np.abs(acc_N - conf_N).sum() / total) if total > 0 else math.nan
  return {'ce': ce, 'perplexity': math.inf if ce > 709 else math.exp(ce),  # exp overflows
          'agreement': mean('teacher_top1_agreement'), 'kl_topk': mean('kl_topk'), 'ece': ece}


# Logits of at most this many elements at a time: [B, T, V] of the tutorial's student (V=256000)
# at eval.batch_size=8 and 4096 tokens would be 31 GiB in fp32, twice over with log-softmax.
CHUNK_ELEMENTS = 1 << 27


def make_eval_fn(cfg: model.ModelConfig, *, n_bins: int = 15):
  """Jitted fn(params, batch) -> pairs over a loader batch (packed rows respected); the logits
  of CHUNK_ELEMENTS / P tokens at a time (P: the padded vocabulary the head multiplies out)."""
  if not isinstance(n_bins, int) or n_bins < 1:
    raise ValueError(f'n_bins={n_bins!r}: must be a positive integer')

  @jax.jit
  def eval_fn(params, batch):
    h_BxTxD = model.hidden(cfg, params, batch['tokens'], segment_ids_BxT=batch['segment_ids'],
                           positions_BxT=batch['positions'])
    B, T, D = h_BxTxD.shape
    tokens = {'h': h_BxTxD.reshape(B * T, D),
              **{k: batch[k].reshape(B * T, *batch[k].shape[2:])
                 for k in ('labels', 'loss_mask', 'topk_ids', 'topk_logits')}}

    def one(t):  # a token as a [1, 1] batch; lax.map runs CHUNK_ELEMENTS / V of them at once
      return token_metrics(model.logits_from_hidden(cfg, params, t['h'][None, None]),
                           t['labels'][None, None], t['loss_mask'][None, None],
                           t['topk_ids'][None, None], t['topk_logits'][None, None],
                           n_bins=n_bins)
    per_token = jax.lax.map(one, tokens, batch_size=max(1, CHUNK_ELEMENTS // cfg.padded_vocab))
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), per_token)

  def run(params, batch):
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
      raise ValueError(f'eval batch: missing fields {missing} (have {sorted(batch)})')
    return eval_fn(params, {k: batch[k] for k in BATCH_KEYS})

  return run


def evaluate(cfg: model.ModelConfig, params, batches: Iterable[dict], *,
             n_bins: int = 15, where: str = 'the batches') -> dict[str, float]:
  """Summary metrics over all batches (pairs summed first, so batch sizes may differ);
  ValueError when they hold no loss token (no metric is defined). `where` names them."""
  eval_fn = make_eval_fn(cfg, n_bins=n_bins)
  total = None
  for batch in batches:
    total = add_pairs(total, jax.device_get(eval_fn(params, batch)))
  if total is None:
    raise ValueError(f'evaluate: no batches in {where}')
  if not total['ce'][1] > 0:
    raise ValueError(f'evaluate: {where} hold no loss token (every loss_mask is 0): no metric '
                     'is defined')
  return summarize(total)


def evaluate_store(model_dir: str, store: str, *, split: str = 'validation', batch_size: int,
                   max_seq_length: int, pack: bool = False, pad_to_max: bool = False,
                   full_batches: bool = False, max_batches: int = -1,
                   name: str | None = None) -> dict[str, float]:
  """`evaluate` of a model directory (fp32, one device) over a logit-store split, in store order,
  with a progress bar: its first `max_batches` batches (-1: all); `full_batches` drops a last
  partial batch, as training's validation does."""
  from tqdm import tqdm

  from jkd.data import loader, logit_store
  tok = tokenizer.load_if_saved(model_dir)
  if tok is not None:
    tokenizer.warn_if_not_the_stores(
        tok, model_dir, store,
        logit_store.read_meta(os.path.join(store, split)).tokenizer_fingerprint, 'eval')
  cfg, params = model.load(model_dir)
  cfg = dataclasses.replace(cfg, dtype='float32')
  source = loader.KDDataSource(store, split, pad_id=0)
  batches = loader.make_loader(
      store, split, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
      max_seq_length=max_seq_length, pad_id=0, pack=pack, pad_to_max=pad_to_max,
      drop_remainder=full_batches, source=source)
  total = None  # packed rows: known only once packed
  if not pack:
    total = len(source) // batch_size if full_batches else -(-len(source) // batch_size)
  if max_batches >= 0:
    batches = itertools.islice(batches, max_batches)
    total = max_batches if total is None else min(total, max_batches)
  return evaluate(cfg, params, tqdm(batches, total=total, desc=f'evaluate {name or model_dir}',
                                    unit='batch'),
                  where=f'the {"first " + str(max_batches) + " " if max_batches >= 0 else ""}'
                        f'batches of {os.path.join(store, split)}')


def run(config) -> dict[str, float]:
  """mode=eval: the metrics of `eval.model` on `eval.split` of `eval.store`, printed and (with
  `eval.output`) written as JSON (temp file, rename)."""
  from jkd.data import logit_store
  e, n = config.eval, config.data.max_seq_length
  metrics = evaluate_store(e.model, e.store, split=e.split, batch_size=e.batch_size,
                           max_seq_length=n, max_batches=e.max_batches)
  examples = logit_store.check_finished(e.store, e.split)
  if e.max_batches >= 0:
    examples = min(examples, e.max_batches * e.batch_size)
  print(f'[eval] {e.model} on {examples} examples of {os.path.join(e.store, e.split)} (cut at '
        f'data.max_seq_length={n} tokens): ' + ', '.join(f'{k} {v:.4g}' for k, v in
                                                         metrics.items()))
  if e.output and jax.process_index() == 0:
    with open(e.output + '.tmp', 'w', encoding='utf-8') as f:
      json.dump({'model': os.path.abspath(e.model), 'store': os.path.abspath(e.store),
                 'split': e.split, 'examples': examples, 'max_seq_length': n,
                 'batch_size': e.batch_size, 'max_batches': e.max_batches,
                 # strict JSON: a diverged model's perplexity (inf) is written as null
                 'metrics': {k: v if math.isfinite(v) else None for k, v in metrics.items()}},
                f, indent=1, allow_nan=False)
    os.replace(e.output + '.tmp', e.output)
  return metrics


@functools.partial(jax.jit, static_argnames=('cfg', 'greedy'))
def _next_token(cfg, params, tokens_1xP, length, key, temperature, *, greedy):
  """The token after the first `length` tokens (causal: padding beyond them is ignored)."""
  logits_1xPxV = model.forward(cfg, params, tokens_1xP)
  logits_V = jax.lax.dynamic_index_in_dim(logits_1xPxV[0], length - 1, keepdims=False)
  if greedy:
    return jnp.argmax(logits_V).astype(jnp.int32)
  return jax.random.categorical(key, logits_V / temperature).astype(jnp.int32)


def padded_length(n: int, cfg: model.ModelConfig, multiple: int = 64) -> int:
  """n rounded up to a multiple (fewer compiles), capped at the position limit."""
  return min(-(-n // multiple) * multiple, cfg.max_position_embeddings)


def generate(cfg: model.ModelConfig, params, prompt_ids, *, max_new_tokens: int,
             eos_id: int | None = None, temperature: float = 0.0, seed: int = 0) -> list[int]:
  """New token ids after `prompt_ids`: greedy (temperature 0) or sampled at `temperature`.

  Stops after `max_new_tokens` or at `eos_id` (not included in the result). Recomputes the
  full padded sequence each step (no KV cache): one compile per padded length and mode.
  """
  prompt = [int(i) for i in prompt_ids]
  if not prompt:
    raise ValueError('generate: prompt_ids is empty')
  if any(not 0 <= i < cfg.vocab_size for i in prompt):
    raise ValueError(f'generate: prompt ids must lie in [0, vocab_size={cfg.vocab_size})')
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f'generate: max_new_tokens={max_new_tokens!r} must be an integer >= 0')
  if not temperature >= 0:
    raise ValueError(f'generate: temperature={temperature} must be >= 0')
  n = len(prompt) + max_new_tokens
  if n > cfg.max_position_embeddings:
    raise ValueError(f'generate: prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) '
                     f'> max_position_embeddings={cfg.max_position_embeddings}')
  tokens_P = np.zeros(padded_length(n, cfg), np.int32)
  tokens_P[:len(prompt)] = prompt
  length, out = len(prompt), []
  key = jax.random.key(seed)
  for _ in range(max_new_tokens):
    key, step_key = jax.random.split(key)
    tok = int(_next_token(cfg, params, jnp.asarray(tokens_P[None]), jnp.int32(length), step_key,
                          jnp.float32(max(temperature, 1e-6)), greedy=temperature == 0))
    if eos_id is not None and tok == eos_id:
      break
    out.append(tok)
    tokens_P[length] = tok
    length += 1
  return out
