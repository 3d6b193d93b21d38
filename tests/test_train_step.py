"""jkd.train: the student step against independent references, on 8 simulated CPU devices.

Protects: sharded == unsharded, fused == reference loss, gradient accumulation under both
reductions (NeMo's mean of micro-batch means, checked against per-row gradients computed
apart), NeMo's CosineAnnealing values (a plain-Python transcription), donation, only-student
gradients, bf16 compute, a golden loss, and the config checks that must fail before compiling.
"""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base, nemotron8b_gpt2b
from jkd import config as jkd_config
from jkd import losses, model, sharding, train
from jkd.kernels import fused_topk_kd as fk

AXES = ('data', 'fsdp', 'tensor')
RULES = base.LOGICAL_AXIS_RULES
CFG = model.ModelConfig.from_dict(base.get_config().model.to_dict())  # 2 layers, D 64, V 512
L, K = 16, 4
# Adam's eps is raised so that float noise in tiny gradients cannot flip an update's sign
# (m / (sqrt(v) + eps) saturates at +-1 when |g| >> eps): equal steps then mean equal grads.
BASE = dict(max_steps=20, warmup_steps=0, constant_steps=0, lr=1e-3, min_lr=0.0, eps=1e-4,
            sft_loss_weight=0.4, precision='fp32', loss_impl='fused', fused_implementation='xla')


def nemo_cosine_annealing(step, *, lr, min_lr, warmup_steps, constant_steps, max_steps):
  """NeMo's CosineAnnealing(WarmupAnnealHoldPolicy).get_lr() at last_epoch=step, transcribed from
  nemo/core/optim/lr_scheduler.py at NVIDIA/NeMo@19668e5320a2e2af0199b6d5e0b841993be3a634 (the
  commit NeMo-Aligner pins; unchanged at 8cfedd72, 2025-09)."""
  decay_steps = max_steps - (constant_steps + warmup_steps)

  def linear_warmup_with_cosine_annealing(step):  # Megatron's form, used when constant_steps > 0
    assert lr > min_lr
    if warmup_steps > 0 and step <= warmup_steps:
      return lr * float(step) / float(warmup_steps)
    if step > warmup_steps + decay_steps:
      return min_lr
    decay_ratio = float(step - warmup_steps) / float(decay_steps)
    return min_lr + 0.5 * (math.cos(math.pi * decay_ratio) + 1.0) * (lr - min_lr)

  def cosine_annealing(initial_lr, step, max_steps, min_lr):
    mult = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    return (initial_lr - min_lr) * mult + min_lr

  if warmup_steps > 0 and step <= warmup_steps:  # _get_warmup_lr
    if constant_steps == 0:
      return lr * (step + 1) / (warmup_steps + 1)
    return linear_warmup_with_cosine_annealing(step)
  if constant_steps > 0 and (warmup_steps + decay_steps) < step <= max_steps:  # _get_constant_lr
    return linear_warmup_with_cosine_annealing(step)
  if step > max_steps:
    return min_lr
  if constant_steps == 0:  # _get_lr
    return cosine_annealing(lr, step - warmup_steps, max_steps - warmup_steps, min_lr)
  return linear_warmup_with_cosine_annealing(step)


def smoke_batch(g, seed=0):
  """A learnable global batch: each row follows x' = (5x + 3) mod V from a random start, the
  teacher puts its top logit on the true next token; prompts are masked, tails padded (segment
  0), one row is all padding."""
  rng = np.random.default_rng(seed)
  v = CFG.vocab_size
  x = np.zeros((g, L + 1), np.int64)
  x[:, 0] = rng.integers(0, v, g)
  for t in range(L):
    x[:, t + 1] = (5 * x[:, t] + 3) % v
  tokens, labels = x[:, :-1].astype(np.int32), x[:, 1:].astype(np.int32)
  lengths = rng.integers(L // 2, L + 1, g)
  prompt = rng.integers(1, L // 2, g)
  lengths[-1] = 0  # a row of padding only: zero tokens, still one NeMo micro-batch
  pos = np.arange(L)
  real = pos[None] < lengths[:, None]
  mask = (real & (pos[None] >= prompt[:, None])).astype(np.uint8)
  ids = rng.integers(0, v, (g, L, K)).astype(np.int32)
  ids[..., 0] = labels
  logits = -np.sort(rng.uniform(0, 4, (g, L, K)), -1).astype(np.float32)
  logits[..., 0] = 0.0
  tokens, labels = np.where(real, tokens, 0), np.where(real, labels, 0)
  ids, logits = np.where(real[..., None], ids, 0), np.where(real[..., None], logits, 0.0)
  return dict(tokens=tokens, labels=labels, loss_mask=mask, topk_ids=ids, topk_logits=logits,
              lse=np.where(real, 1.5, 0.0).astype(np.float32),
              segment_ids=real.astype(np.int32),
              positions=np.where(real, pos[None], 0).astype(np.int32))


@functools.lru_cache(maxsize=None)
def initial_params():
  return jax.device_get(model.init(CFG, jax.random.key(0)))


def mesh_of(shape):
  return sharding.make_mesh(AXES, shape, jax.devices()[:math.prod(shape)])


def run(tc, shape, batches):
  """Steps from the fixed initial params: (host params, metrics per step, donated?)."""
  mesh = mesh_of(shape)
  state, shardings = train.init_state(CFG, tc, initial_params(), mesh, RULES)
  step = train.make_train_step(CFG, tc, mesh, RULES, shardings)
  history, donated = [], True
  for batch in batches:
    old = jax.tree.leaves((state.params, state.opt_state))
    state, metrics = step(state, batch)
    donated &= all(x.is_deleted() for x in old)
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history, donated


@functools.lru_cache(maxsize=None)
def cached_run(shape, steps=3, g=8, **kw):
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': g, **kw})
  return run(tc, shape, [smoke_batch(g, seed=s) for s in range(steps)])


def assert_params_close(got, want, atol=2e-6):
  for path, a in jax.tree_util.tree_leaves_with_path(got):
    b = functools.reduce(lambda t, k: t[k.key], path, want)
    np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def assert_metrics_close(got, want, rtol=1e-5):
  for g, w in zip(got, want):
    for k in ('loss', 'kd_loss', 'sft_loss', 'grad_norm', 'lr'):
      np.testing.assert_allclose(np.asarray(g[k], np.float64), np.asarray(w[k], np.float64),
                                 rtol=rtol, atol=1e-7, err_msg=k)


def test_sharded_2x2x2_equals_unsharded_for_3_steps(devices8):
  """DP=4 (data x fsdp) x TP=2 with the vocab-parallel fused loss == one device."""
  p8, m8, _ = cached_run((2, 2, 2))
  p1, m1, _ = cached_run((1, 1, 1))
  assert_metrics_close(m8, m1)
  assert_params_close(p8, p1)
  assert not np.allclose(p8['embed'], initial_params()['embed'])  # it trained


@pytest.mark.parametrize('shape', [(2, 4, 1), (2, 2, 2)])
def test_data_and_fsdp_mesh_moves_embedding_rows_without_replicating_them(devices8, shape):
  """Batch rows over (data, fsdp) and the embedding's hidden dim over fsdp (the multi-host mesh
  (-1, 8, 1), and with tensor > 1): the looked-up rows and their cotangent are never gathered
  whole, [R, T, D] on every device (XLA's fallback, of which it warns 'Involuntary full
  rematerialization'); the step is the one device's."""
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': 8})
  mesh = mesh_of(shape)
  state, sh = train.init_state(CFG, tc, initial_params(), mesh, RULES)
  hlo = train.make_train_step(CFG, tc, mesh, RULES, sh).lower(state, smoke_batch(8)).compile(
      ).as_text()
  r = tc.micro_batch_size * train.data_parallel_size(dict(mesh.shape), RULES)  # a micro-step's
  assert not re.findall(rf'= \w+\[{r},{L},{CFG.hidden_size}\]\S* all-gather\(', hlo)
  p, m, _ = cached_run(shape)
  p1, m1, _ = cached_run((1, 1, 1))
  assert_metrics_close(m, m1)
  assert_params_close(p, p1)


def test_micro_batch_split_is_nemo_order_and_moves_no_data(devices8):
  """Micro-step i holds DP rank r's i-th micro-batch (NeMo's contiguous per-rank buckets), and
  the split compiles to no collective (a plain [G] -> [M, R] reshape would shuffle rows)."""
  mesh, g, mbs = mesh_of((2, 2, 2)), 16, 2  # DP 4: ranks hold 4 rows, 2 micro-steps of 2 each
  rows = jax.device_put(np.arange(g * 3).reshape(g, 3), sharding.batch_sharding(mesh, RULES))
  with sharding.activate(mesh, RULES):
    split = jax.jit(functools.partial(train.micro_split, micro_batch_size=mbs, mesh=mesh,
                                      rules=RULES))
    got = np.asarray(split(rows))[..., 0] // 3
    text = split.lower(rows).compile().as_text()
  want = [[r * 4 + i * mbs + j for r in range(4) for j in range(mbs)] for i in range(2)]
  np.testing.assert_array_equal(got, want)
  for op in ('collective-permute', 'all-to-all', 'all-gather', 'all-reduce'):
    assert op not in text, op


@pytest.mark.parametrize('impl', ['xla', 'pallas'])


def test_fused_loss_gives_the_reference_step(devices8, impl):
  """The fused LM-head kernel (nested in the data-parallel shard_map) == full-logits loss."""
  pf, mf, _ = cached_run((2, 2, 2), fused_implementation=impl)
  pr, mr, _ = cached_run((2, 2, 2), loss_impl='reference')
  assert_metrics_close(mf, mr)
  assert_params_close(pf, pr)


@pytest.mark.parametrize('impl', ['xla', 'pallas'])
def test_step_scales_the_gradient_formed_in_the_forward(devices8, monkeypatch, impl):
  """The step differentiates the fused loss's weighted sum (nested in the data-parallel
  shard_map, vocab-parallel over 'tensor', in the micro-step scan): its backward scales the
  head's gradient formed in the forward and never traces autodiff through the statistics."""
  def fail(*a, **k):
    raise AssertionError('the backward took autodiff through the statistics')
  monkeypatch.setattr(fk, '_loss_by_stats', fail)
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': 8, 'fused_implementation': impl})
  mesh = mesh_of((2, 2, 2))
  state, sh = train.init_state(CFG, tc, initial_params(), mesh, RULES)
  train.make_train_step(CFG, tc, mesh, RULES, sh).trace(state, smoke_batch(8))


def test_state_is_donated(devices8):
  assert cached_run((2, 2, 2))[2]


def per_row_reference(tc, batch):
  """NeMo's objective computed apart: each row alone (MBS=1), full-logits loss, grads by
  jax.grad per row, averaged; then Megatron clipping and the same AdamW update."""
  params = jax.tree.map(jnp.asarray, initial_params())

  @jax.jit
  def row_loss(p, row):
    logits = model.forward(CFG, p, row['tokens'][None], segment_ids_BxT=row['segment_ids'][None],
                           positions_BxT=row['positions'][None])
    loss, m = losses.topk_kd_loss(logits, row['topk_ids'][None], row['topk_logits'][None],
                                  row['labels'][None], row['loss_mask'][None],
                                  logits_scale=tc.logits_scale, **tc.loss_options)
    return loss, {k: s / jnp.maximum(c, 1.0) for k, (s, c) in m.items()}

  g = batch['tokens'].shape[0]
  outs = [jax.value_and_grad(row_loss, has_aux=True)(params, {k: v[i] for k, v in batch.items()})
          for i in range(g)]
  means = {k: np.mean([o[0][1][k] for o in outs]) for k in ('loss', 'kd_loss', 'sft_loss')}
  grads = jax.tree.map(lambda *gs: sum(gs) / g, *[o[1] for o in outs])
  norm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(grads))))
  grads = jax.tree.map(lambda x: x * min(1.0, tc.gradient_clip_val / (norm + 1e-6)), grads)
  opt = train.make_optimizer(tc)
  updates, _ = opt.update(grads, opt.init(params), params)
  return jax.device_get(jax.tree.map(jnp.add, params, updates)), means, norm


def test_nemo_reduction_is_the_mean_of_micro_batch_means(devices8):
  """GBS 4 / MBS 1 on DP=4 ranks: loss, grad norm and the step equal the per-row means; a
  single token mean over the 4 rows (MBS 4 on one rank) is a different objective."""
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': 4, 'loss_impl': 'reference'})
  batch = smoke_batch(4, seed=3)
  params, metrics, _ = run(tc, (2, 2, 1), [batch])
  want_params, want_means, want_norm = per_row_reference(tc, batch)
  for k in ('loss', 'kd_loss', 'sft_loss'):
    s, c = metrics[0][k]
    assert c == 4  # groups, the padding-only row included (NeMo counts its micro-batch)
    np.testing.assert_allclose(s / c, want_means[k], rtol=1e-5)
  np.testing.assert_allclose(metrics[0]['grad_norm'], want_norm, rtol=1e-5)
  assert_params_close(params, want_params)
  one_batch = global_token_mean_run(micro_batch_size=4)[0]  # = NeMo's with one group of 4
  assert not np.allclose(one_batch['embed'], params['embed'], rtol=0, atol=1e-6)


@functools.lru_cache(maxsize=None)
def global_token_mean_run(micro_batch_size):
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': 4, 'reduction': 'global_token_mean',
                            'micro_batch_size': micro_batch_size})
  return run(tc, (1, 1, 1), [smoke_batch(4, seed=3)])


def test_accumulation_under_global_token_mean_equals_one_batch(devices8):
  """GBS 4 as 4 micro-batches of 1 == GBS 4 as one micro-batch of 4 (reduction
  global_token_mean); the loss pair counts masked tokens."""
  p_acc, m_acc, _ = global_token_mean_run(micro_batch_size=1)
  p_one, m_one, _ = global_token_mean_run(micro_batch_size=4)
  assert m_acc[0]['loss'][1] == smoke_batch(4, seed=3)['loss_mask'].sum()
  assert_metrics_close(m_acc, m_one)
  assert_params_close(p_acc, p_one)


@pytest.mark.parametrize('sched', [
    dict(lr=1e-5, min_lr=9e-7, warmup_steps=10, constant_steps=0, max_steps=100),  # tutorial
    dict(lr=3e-5, min_lr=9e-7, warmup_steps=10, constant_steps=30, max_steps=100),  # Megatron form
    dict(lr=2e-4, min_lr=0.0, warmup_steps=0, constant_steps=0, max_steps=50),
    dict(lr=2e-4, min_lr=1e-5, warmup_steps=0, constant_steps=7, max_steps=50),
])
def test_schedule_matches_nemo_cosine_annealing(sched):
  schedule = train.make_schedule(train.TrainConfig(**sched))
  steps = sorted({0, 1, 2, 5, 9, 10, 11, 12, 25, 49, 50, 51, 62, 63, 64, 69, 70, 71, 99, 100,
                  101, 150})
  got = np.asarray([schedule(jnp.int32(s)) for s in steps], np.float64)
  want = np.asarray([nemo_cosine_annealing(s, **sched) for s in steps])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)


# Golden (CPU, fp32): the first update's loss on the seed-0 params and smoke batch.
GOLDEN_LOSS_0 = 2.716945


def test_loss_decreases_golden_loss_and_lr_per_update(devices8):
  """Default loss path (fused kernel, 'auto': its chunked jnp form on CPU; NeMo reduction) on
  smoke data at seed 0."""
  tc = train.TrainConfig(global_batch_size=8, max_steps=10, warmup_steps=2, constant_steps=0,
                         lr=1e-2, min_lr=1e-3, sft_loss_weight=0.4, precision='fp32')
  _, hist, _ = run(tc, (2, 2, 2), [smoke_batch(8, seed=0)] * 6)
  losses_ = [h['loss'][0] / h['loss'][1] for h in hist]
  assert losses_[-1] < 0.7 * losses_[0], losses_
  np.testing.assert_allclose(losses_[0], GOLDEN_LOSS_0, rtol=1e-5)
  lrs = [nemo_cosine_annealing(n, lr=1e-2, min_lr=1e-3, warmup_steps=2, constant_steps=0,
                               max_steps=10) for n in range(6)]
  np.testing.assert_allclose([h['lr'] for h in hist], lrs, rtol=1e-6)


def test_bf16_compute_runs_and_tracks_fp32(devices8):
  """precision='bf16': finite, within 2% of the fp32 losses, master weights still fp32."""
  p16, m16, _ = cached_run((2, 2, 2), precision='bf16')
  _, m32, _ = cached_run((2, 2, 2))
  for a, b in zip(m16, m32):
    assert np.isfinite(a['grad_norm'])
    np.testing.assert_allclose(a['loss'][0], b['loss'][0], rtol=2e-2)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(p16))  # fp32 master weights


def test_eval_step_gives_the_train_step_metrics(devices8):
  """eval_fn(params, batch) == the metrics the train step reported for the same params."""
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': 8})  # as cached_run((2, 2, 2))
  mesh = mesh_of((2, 2, 2))
  state, sh = train.init_state(CFG, tc, initial_params(), mesh, RULES)
  got = jax.device_get(train.make_eval_step(CFG, tc, mesh, RULES, sh)(state.params,
                                                                     smoke_batch(8, seed=0)))
  want = cached_run((2, 2, 2))[1][0]
  for k in ('loss', 'kd_loss', 'sft_loss'):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)


def test_unpacked_rows_need_no_segment_mask(devices8):
  """train.pack=False drops the segment mask (one right-padded example per row: causal attention
  already keeps real tokens off the padding); the steps equal those with the mask."""
  p_mask, m_mask, _ = cached_run((2, 2, 2), pack=True)
  p, m, _ = cached_run((2, 2, 2))
  assert_metrics_close(m, m_mask, rtol=1e-6)
  assert_params_close(p, p_mask, atol=1e-7)
  for pack in (False, True):  # a [B, 1, T, T] mask is built only for packed rows
    tc = train.TrainConfig(**{**BASE, 'global_batch_size': 8, 'pack': pack})
    jaxpr = str(jax.make_jaxpr(lambda b, tc=tc: train._micro_sums(
        CFG, tc, mesh_of((1, 1, 1)), RULES, initial_params(), b, b['loss_mask']))(
            smoke_batch(8)))
    assert (f'bool[8,1,{L},{L}]' in jaxpr) == pack


def test_run_config_applies_the_run_settings():
  """The step runs the student at train.precision, train.remat_policy, train.attention and
  train.scan_unroll, whatever its model_config.json says."""
  tc = train.TrainConfig(precision='bf16', remat_policy='dots', attention='xla', scan_unroll=0)
  cfg = train.run_config(CFG, tc)
  assert (cfg.dtype, cfg.remat_policy, cfg.attention, cfg.scan_unroll) == (
      'bfloat16', 'dots', 'xla', 0)


def test_bf16_pallas_step_lowers_for_cuda(devices8, cudnn_stand_in, triton_h100_stand_in):
  """The whole step (Triton kernel nested in the data-parallel shard_map, vocab-parallel over
  'tensor'; cuDNN attention in the layer scan) lowers for GPU; CPU runs only the interpreter."""
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': 8, 'fused_implementation': 'pallas',
                            'precision': 'bf16', 'attention': 'cudnn'})
  mesh = mesh_of((2, 2, 2))
  state, sh = train.init_state(CFG, tc, initial_params(), mesh, RULES)
  step = train.make_train_step(CFG, tc, mesh, RULES, sh)
  text = step.trace(state, smoke_batch(8)).lower(lowering_platforms=('cuda',)).as_text()
  assert 'triton' in text
  # Sharded, jax's cuDNN attention is a custom-partitioned call (forward, backward) until XLA
  # partitions it; XLA's own attention would hold [B, N, T, T] scores.
  assert text.count('@CustomSPMDPartitioning(') == 2 and f'x{L}x{L}x' not in text


def test_only_the_student_is_differentiated(devices8):
  """The objective's gradient w.r.t. the teacher's logits and logsumexp (fused path, tail on
  so the lse is used) is exactly zero; the state holds the student only."""
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': 4, 'tail': True})
  mesh = mesh_of((2, 1, 2))
  state, sh = train.init_state(CFG, tc, initial_params(), mesh, RULES)
  assert jax.tree.structure(state.params) == jax.tree.structure(initial_params())
  batch = {k: jnp.asarray(v) for k, v in smoke_batch(4).items()}

  def objective(params, teacher_logits, teacher_lse):
    b = dict(batch, topk_logits=teacher_logits, lse=teacher_lse)
    m = train._accumulate(train.run_config(CFG, tc), tc, mesh, RULES, sh.params, params, b,
                          with_grad=False)[0]
    return m['loss'][0] / m['loss'][1]

  with sharding.activate(mesh, RULES):
    g_p, g_t, g_lse = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(
        state.params, batch['topk_logits'], batch['lse'])
  assert np.all(np.asarray(g_t) == 0) and np.all(np.asarray(g_lse) == 0)
  assert float(jnp.abs(g_p['embed']).max()) > 0


def train_config(**overrides):
  c = nemotron8b_gpt2b.get_config('train')
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


@pytest.mark.parametrize('overrides,stored_k,message', [
    ({'train.global_batch_size': 12}, None, 'train.global_batch_size=12'),  # 12 % (1 x 8)
    ({'train.micro_batch_size': 3}, None, 'train.global_batch_size=128'),  # 128 % (3 x 8)
    ({'train.save_interval': 1500}, None, 'train.save_interval=1500'),
    ({'train.max_epochs': 0}, None, 'train.max_epochs=0'),
    ({'train.max_steps': -1, 'train.max_epochs': -1}, None, 'nothing bounds the run'),
    ({'distill.top_k': 8}, 4, 'distill.top_k=8'),
    ({'train.constant_steps': 1000}, None, 'train.constant_steps=1000'),
    ({'distill.kd_loss': 'kl'}, None, "distill.kd_loss='kl'"),
    ({'distill.reduction': 'sum'}, None, "distill.reduction='sum'"),
    ({'train.min_lr': 1e-4}, None, 'train.min_lr=0.0001'),
    ({'train.attention': 'flash'}, None, "train.attention='flash'"),
    ({'train.remat_policy': 'some'}, None, "train.remat_policy='some'"),
    ({'train.scan_unroll': -1}, None, 'train.scan_unroll=-1'),
    ({'train.betas': ('a', 'b')}, None, "train.betas=('a', 'b'): expected two numbers"),
    ({'train.betas': (0.9, 1.0)}, None, 'train.betas=(0.9, 1.0)'),
])


def test_invalid_combinations_fail_before_compiling(overrides, stored_k, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    train.validate_config(train_config(**overrides), stored_k=stored_k, n_devices=8)


def test_save_interval_is_free_without_validation():
  """NeMo asserts save_interval % val_check_interval only when it validates."""
  c = train_config(**{'train.save_interval': 1500, 'train.limit_val_batches': 0})
  train.validate_config(c, stored_k=None, n_devices=8)


def test_config_validate_runs_the_train_checks(devices8):
  c = train_config(**{'train.global_batch_size': 12})
  c.mesh.shape = (1, -1, 1)
  with pytest.raises(ValueError, match='train.global_batch_size=12'):
    jkd_config.validate(c)


def test_step_rejects_a_batch_of_the_wrong_size_at_trace_time(devices8):
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': 4})
  mesh = mesh_of((1, 1, 1))
  state, sh = train.init_state(CFG, tc, initial_params(), mesh, RULES)
  with pytest.raises(ValueError, match='train.global_batch_size=4'):
    train.make_train_step(CFG, tc, mesh, RULES, sh)(state, smoke_batch(8))


def test_tutorial_config_has_the_tutorial_values():
  c = nemotron8b_gpt2b.get_config('train')
  tc = train.validate_config(c, stored_k=4, n_devices=8)
  assert (tc.global_batch_size, tc.micro_batch_size, tc.lr, tc.weight_decay, tc.constant_steps,
          tc.max_steps, tc.val_check_interval, tc.save_interval, tc.limit_val_batches) == (
              128, 1, 1e-5, 0.01, 0, 100, 1000, 1000, 5)
  assert (tc.sft_loss_weight, tc.kd_loss_weight, tc.kd_loss, tc.logits_scale,
          tc.target_logits_scale) == (0.4, 1.0, 'fwd_kl', 1.0, 1.0)
  assert c.data.max_seq_length == 4096 and tuple(c.mesh.shape) == (1, 8, 1)
  assert c.train.save_nemo_on_train_end
  assert nemotron8b_gpt2b.get_config('extract').extract.top_k == 4


def test_weight_decay_groups_as_nemo():
  """NeMo's groups: decay on weight matrices and embeddings, none on biases; norm scales decay
  as in a Megatron-Core student (decay_norm_scales, the default), not as legacy apex norms."""
  cfg = model.ModelConfig.from_dict({**CFG.to_dict(), 'bias': True})
  params = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  for norms in (True, False):
    mask = train.decay_mask(params, norms=norms)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['embed']"] and flat["['lm_head']"] and flat["['layers']['attn']['q']['kernel']"]
    assert not flat["['layers']['attn']['q']['bias']"]
    assert not flat["['layers']['mlp_norm']['bias']"]
    scales = [k for k in flat if k.endswith("norm']['scale']")]
    assert len(scales) == 3 and all(flat[k] == norms for k in scales)  # two per layer, final
    # embed, lm_head and the six kernels (q, k, v, o, fc1, fc2), then the three norm scales
    assert sum(flat.values()) == 8 + 3 * norms


def test_optimizer_is_apex_adamw_with_nemos_defaults():
  """Three AdamW updates of random gradients equal a numpy transcription of apex's FusedAdam
  (adam_w_mode, bias correction) at NeMo-Aligner's defaults (betas 0.9 / 0.98, eps 1e-8,
  weight decay 0.01), decay on kernels and none on biases: the moments, their correction and
  beta2 are checked here independently of the step tests, whose reference uses the same optax
  transform."""
  tc = dataclasses.replace(train.TrainConfig(), lr=1e-3, min_lr=1e-4, warmup_steps=1,
                           constant_steps=0, max_steps=5, decay_norm_scales=False)
  assert (tc.betas, tc.eps, tc.weight_decay) == ((0.9, 0.98), 1e-8, 0.01)
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
            'bias': rng.normal(size=(3,)).astype(np.float32)}
  opt = train.make_optimizer(tc)
  state, got = opt.init(params), params
  want = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in want.items()}
  v = {k: np.zeros_like(x) for k, x in want.items()}
  for n in range(3):
    grads = {k: rng.normal(size=x.shape).astype(np.float32) for k, x in params.items()}
    updates, state = opt.update(grads, state, got)
    got = optax.apply_updates(got, updates)
    lr = float(train.make_schedule(tc)(n))
    for k in want:
      g = grads[k].astype(np.float64)
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.98 * v[k] + 0.02 * g * g
      adam = (m[k] / (1 - 0.9**(n + 1))) / (np.sqrt(v[k] / (1 - 0.98**(n + 1))) + 1e-8)
      want[k] = want[k] - lr * (adam + (0.01 * want[k] if k == 'kernel' else 0.0))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize('decay_norm_scales', [True, False])
def test_optimizer_decays_norm_scales_by_lr_times_wd(decay_norm_scales):
  """With zero gradients AdamW's update is the decay alone, p -= lr * wd * p (apex's
  ADAM_MODE_1): on norm scales exactly when decay_norm_scales, never on biases."""
  cfg = model.ModelConfig.from_dict({**CFG.to_dict(), 'bias': True})
  params = jax.tree.map(lambda x: x + 0.5, model.init(cfg, jax.random.key(0)))
  tc = dataclasses.replace(train.TrainConfig(), lr=0.1, min_lr=0.01, warmup_steps=0,
                           constant_steps=0, weight_decay=0.25, max_steps=10,
                           decay_norm_scales=decay_norm_scales)
  assert float(train.make_schedule(tc)(0)) == pytest.approx(0.1)  # update 0 runs at the peak
  opt = train.make_optimizer(tc)
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['final_norm']['scale'], params['final_norm']['scale'] * (
      1 - 0.1 * 0.25 if decay_norm_scales else 1.0), rtol=1e-6)
  np.testing.assert_array_equal(new['final_norm']['bias'], params['final_norm']['bias'])
  np.testing.assert_allclose(new['embed'], params['embed'] * (1 - 0.1 * 0.25), rtol=1e-6)


def test_online_teacher_runs_on_each_micro_batch(devices8, monkeypatch):
  """distill.teacher_source='online': the teacher's forward runs inside each micro-step on its
  R = micro_batch_size x DP rows (on the global batch it held G rows' activations at once),
  and the step equals the store path's step fed the teacher's top-K of the whole batch."""
  g, shape = 8, (2, 2, 1)  # 2 micro-steps of R = 4 rows (DP = data x fsdp)
  tc = train.TrainConfig(**{**BASE, 'global_batch_size': g, 'top_k': None})
  mesh = mesh_of(shape)
  t_cfg = dataclasses.replace(CFG, num_layers=1)
  t_params = model.init(t_cfg, jax.random.key(7))
  t_sh = sharding.shardings_for(lambda: model.init(t_cfg, jax.random.key(7), boxed=True), mesh,
                                RULES)
  teacher = train.OnlineTeacher(t_cfg, t_sh, k=K, vocab_tile=128)
  rows = []
  real_add = train.OnlineTeacher.add_topk
  monkeypatch.setattr(train.OnlineTeacher, 'add_topk', lambda self, m, r, p, batch, s: (
      rows.append(batch['tokens'].shape[0]) or real_add(self, m, r, p, batch, s)))
  batch = smoke_batch(g)
  raw = {k: batch[k] for k in train.RAW_KEYS}
  state, sh = train.init_state(CFG, tc, initial_params(), mesh, RULES)
  _, online = train.make_train_step(CFG, tc, mesh, RULES, sh, teacher=teacher)(
      state, raw, jax.device_put(t_params, t_sh))
  assert rows == [4]  # traced once, in the scan's body
  from jkd import extract
  with sharding.activate(mesh, RULES):
    ids, vals, lse = jax.jit(extract.teacher_topk(t_cfg, mesh, RULES, k=K, vocab_tile=128))(
        t_params, raw['tokens'], None, raw['positions'])
  state, sh = train.init_state(CFG, tc, initial_params(), mesh, RULES)
  _, stored = train.make_train_step(CFG, tc, mesh, RULES, sh)(
      state, {**raw, 'topk_ids': ids, 'topk_logits': vals, 'lse': lse})
  assert_metrics_close([jax.device_get(online)], [jax.device_get(stored)])


def test_no_sft_term_logs_no_sft_loss(devices8):
  """sft_loss_weight=0 computes no CE (NeMo logs its zeros, which read as a perfect CE): the
  step's metrics have no sft_loss then; kd_loss and loss are there."""
  _, history, _ = cached_run((1, 1, 1), steps=1, sft_loss_weight=0.0)
  assert 'sft_loss' not in history[0] and {'loss', 'kd_loss'} <= set(history[0])
  _, history, _ = cached_run((1, 1, 1), steps=1)
  assert history[0]['sft_loss'][0] > 0
