"""The student's train step: state, AdamW + NeMo's CosineAnnealing, one jitted step per batch.

Letter legend: G global batch rows (global_batch_size), DP data-parallel size (the mesh axes
the 'act_batch' rule names), M micro-steps per step = G / (micro_batch_size * DP), R rows per
micro-step = micro_batch_size * DP, L row length, K teacher top-K, D hidden, P padded vocab.

What it reproduces from NeMo-Aligner (spec §2, §3.1), and where it differs:
- AdamW with decoupled weight decay (apex distributed_fused_adam: p -= lr * (adam + wd * p)),
  fp32 master params and moments sharded like the params (fsdp + tensor), compute in
  `precision`. NeMo's groups (get_params_for_weight_decay_optimization): no decay on biases,
  nor on the parameters of apex's norm classes, which only legacy (non-Megatron-Core) models
  build. NeMo-Aligner's students are Megatron-Core models, whose norms (Transformer Engine's,
  Megatron's own) are not those classes: their scales are decayed. So `decay_norm_scales`
  (default) decays norm scales and no bias; False exempts norms too (legacy NeMo, and
  Megatron-Core's own optimizer); do_layer_norm_weight_decay=True decays everything.
- NeMo's CosineAnnealing (nemo/core/optim/lr_scheduler.py) over max_steps updates; update n
  (0-based) uses lr(n), as NeMo steps the scheduler after the optimizer. constant_steps are
  held at min_lr *after* the decay (Megatron's form), not at the peak.
- Clipping on the global fp32 L2 norm, grads * min(1, clip / (norm + 1e-6)) (Megatron);
  grad_norm is the norm before clipping. gradient_clip_val=0 turns clipping off.
- Micro-batches as NeMo's samplers cut them: DP rank r's i-th micro-batch holds rows
  r*G/DP + i*MBS ... of the global batch. All M micro-steps run in one lax.scan, accumulating
  fp32 gradients.
- reduction='nemo': the objective is the mean, over the G/MBS groups of MBS consecutive rows
  (one rank's micro-batch), of the group's masked token mean; it does not depend on DP, so any
  mesh gives the same step. 'global_token_mean': masked sum over the global batch / its tokens.
  Both losses (jkd.losses, the fused kernel) take the mask as per-token weights in [0, 1] and
  return weighted sums: the step passes mask / group count (nemo) or the mask (global).
- Metrics: loss, kd_loss, sft_loss as (sum, count) pairs (nemo: sum of group means, number of
  groups; global: token sums, token count), grad_norm, lr (of this update). With
  sft_loss_weight=0 no CE is computed and sft_loss is left out (NeMo logs its zeros).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jkd import losses, model, sharding
from jkd.kernels import fused_topk_kd as fk
from jkd.train_config import (PRECISIONS, TrainConfig,  # noqa: F401 (re-exports)
                              data_parallel_size, train_config, validate_config)

BATCH_KEYS = ('tokens', 'labels', 'loss_mask', 'topk_ids', 'topk_logits', 'lse', 'segment_ids',
              'positions')
RAW_KEYS = tuple(k for k in BATCH_KEYS if k not in ('topk_ids', 'topk_logits', 'lse'))


def make_schedule(tc: TrainConfig) -> optax.Schedule:
  """NeMo's CosineAnnealing (warmup_steps, constant_steps, min_lr) over tc.max_steps updates."""
  if tc.max_steps <= 0:
    raise ValueError(f'train.max_steps={tc.max_steps}: the schedule needs a step count '
                     '(resolve max_epochs into max_steps first)')
  peak, floor, total = tc.lr, tc.min_lr, tc.max_steps
  warm, const = tc.warmup_steps, tc.constant_steps
  decay = total - warm - const

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    if const == 0:  # NeMo: warmup (s + 1) / (W + 1), cosine over max_steps - W
      warm_lr = peak * (s + 1) / (warm + 1)
      lr = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * (s - warm) / max(total - warm, 1)))
    else:  # Megatron's form: warmup s / W, cosine over the decay steps, then min_lr
      warm_lr = peak * s / max(warm, 1)
      ratio = (s - warm) / max(decay, 1)
      lr = floor + 0.5 * (jnp.cos(jnp.pi * ratio) + 1) * (peak - floor)
      lr = jnp.where(s > warm + decay, floor, lr)
    lr = jnp.where(s > total, floor, lr)
    if warm > 0:
      lr = jnp.where(s <= warm, warm_lr, lr)
    return lr

  return schedule


def decay_mask(params, *, norms: bool):
  """True where weight decay applies: not biases, and norm parameters only if `norms`."""
  def decays(path, _):
    names = [getattr(p, 'key', None) for p in path]
    in_norm = any(str(n).endswith('norm') for n in names[:-1])
    return names[-1] != 'bias' and (norms or not in_norm)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """AdamW on the schedule; clipping happens in the step (Megatron's formula)."""
  mask = None if tc.do_layer_norm_weight_decay else functools.partial(
      decay_mask, norms=tc.decay_norm_scales)
  return optax.adamw(make_schedule(tc), b1=tc.betas[0], b2=tc.betas[1], eps=tc.eps,
                     weight_decay=tc.weight_decay, mask=mask)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 updates done (the schedule's count)
  params: Any  # fp32 master weights
  opt_state: Any


def init_state(model_cfg: model.ModelConfig, tc: TrainConfig, params, mesh, rules):
  """(TrainState, its shardings): params (consumed; None = random init from tc.seed) and AdamW
  state placed over fsdp + tensor by the rules."""
  p_sh = sharding.shardings_for(lambda: model.init(model_cfg, jax.random.key(0), boxed=True),
                                mesh, rules)
  rep = NamedSharding(mesh, PartitionSpec())
  if params is None:
    with sharding.activate(mesh, rules):
      params = jax.jit(functools.partial(model.init, model_cfg), out_shardings=p_sh)(
          jax.random.key(tc.seed))
  else:
    model.check_params(model_cfg, params)
    params = jax.jit(lambda p: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p),
                     out_shardings=p_sh)(params)
  opt = make_optimizer(tc)
  pdef = jax.tree.structure(params)
  is_params = lambda x: isinstance(x, dict) and jax.tree.structure(x) == pdef  # noqa: E731
  o_sh = jax.tree.map(lambda x: p_sh if is_params(x) else rep, jax.eval_shape(opt.init, params),
                      is_leaf=is_params)
  # out_shardings: a plain jit(opt.init) would leave the moments on one device.
  opt_state = jax.jit(opt.init, out_shardings=o_sh)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), rep)
  return (TrainState(step=step, params=params, opt_state=opt_state),
          TrainState(step=rep, params=p_sh, opt_state=o_sh))


def batch_shardings(mesh, rules, keys=BATCH_KEYS):
  """{batch key: NamedSharding}: rows over the batch axes, the rest replicated."""
  return {k: sharding.batch_sharding(mesh, rules, 3 if k in ('topk_ids', 'topk_logits') else 2)
          for k in keys}


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
  """distill.teacher_source='online': the teacher's top-K is computed inside each micro-step,
  on its R rows, sharded like the extraction and never differentiated; its params come in as a
  step argument."""
  cfg: model.ModelConfig
  param_shardings: Any
  k: int
  vocab_tile: int

  def add_topk(self, mesh, rules, teacher_params, batch, segment_ids_BxT):
    from jkd import extract
    fn = extract.teacher_topk(self.cfg, mesh, rules, k=self.k, vocab_tile=self.vocab_tile)
    ids, vals, lse = jax.lax.stop_gradient(fn(teacher_params, batch['tokens'], segment_ids_BxT,
                                              batch['positions']))
    return {**batch, 'topk_ids': ids, 'topk_logits': vals, 'lse': lse}


def _fused_sums(cfg, tc, mesh, rules, h_RxLxD, w_DxP, ids, t, labels, wts, lse):
  """The fused kernel per data-parallel shard of rows (vocab-parallel inside when the 'vocab'
  rule's axis is larger than 1); returns the global weighted sums."""
  batch_axes = sharding.rule_axes(rules, 'act_batch')
  vocab_axes = [a for a in sharding.rule_axes(rules, 'vocab') if mesh.shape[a] > 1]
  if len(vocab_axes) > 1 or set(vocab_axes) & set(batch_axes):
    raise ValueError(f'mesh.rules: the fused loss needs one vocab axis apart from the batch '
                     f'axes (got vocab {vocab_axes}, batch {batch_axes})')
  vocab_axis = vocab_axes[0] if vocab_axes else None
  manual = tuple(a for a in mesh.axis_names if a != vocab_axis)
  rows = PartitionSpec(batch_axes or None)
  args = [h_RxLxD, w_DxP, ids, t, labels, wts] + ([] if lse is None else [lse])

  def local(h, w, ids, t, labels, wts, *lse):
    n = h.shape[0] * h.shape[1]
    _, m = fk.fused_topk_kd(
        h.reshape(n, -1), w, ids.reshape(n, -1), t.reshape(n, -1), labels.reshape(n),
        wts.reshape(n), teacher_lse_N=lse[0].reshape(n) if lse else None,
        vocab_size=cfg.vocab_size, logits_scale=tc.logits_scale,
        cross_tokenizer=tc.cross_tokenizer, compute_dtype=cfg.compute_dtype,
        mesh=jax.sharding.get_abstract_mesh() if vocab_axis else None, vocab_axis=vocab_axis,
        implementation=tc.fused_implementation, **tc.loss_options)
    return {k: s[None] for k, (s, _) in m.items()}  # this shard's sums, stacked outside

  specs = [rows, PartitionSpec()] + [rows] * (len(args) - 2)
  # Rows are split over the batch axes only (copies elsewhere hold the same sums, so out_specs
  # keeps one); the shards' sums are added outside, so no collective of ours sits in here for
  # check_vma=False (the Pallas interpreter tracks no varying axes) to mis-transpose. The
  # replicated w's cotangent is summed over the shards by shard_map (sharded == unsharded test).
  sums = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=rows,
                       axis_names=set(manual), check_vma=False)(*args)
  return {k: jnp.sum(v) for k, v in sums.items()}


def segment_ids(tc, batch):
  """The rows' segment ids when train.pack; else None: a row then holds one right-padded
  example, and causal attention alone keeps its tokens off the padding (no [T, T] mask, and
  cuDNN runs its plain causal kernel)."""
  return batch['segment_ids'] if tc.pack else None


def _micro_sums(cfg, tc, mesh, rules, params, mb, wts_RxL):
  """Weighted loss sums of one micro-step: {'loss', 'kd_loss', 'sft_loss'} -> scalar."""
  ids, t = mb['topk_ids'], mb['topk_logits']
  if tc.top_k is not None:
    if tc.top_k > ids.shape[-1]:
      raise ValueError(f'distill.top_k={tc.top_k}: exceeds the batch K={ids.shape[-1]}')
    ids, t = ids[..., :tc.top_k], t[..., :tc.top_k]
  lse = mb['lse'] if tc.tail else None
  inputs = dict(segment_ids_BxT=segment_ids(tc, mb), positions_BxT=mb['positions'])
  # Named scopes only label ops in profiles (docs/profiling.md); backward ops carry them too.
  if tc.loss_impl == 'reference':
    with jax.named_scope('student_forward'):
      logits = model.forward(cfg, params, mb['tokens'], **inputs)
    with jax.named_scope('kd_loss'):
      _, m = losses.topk_kd_loss(logits, ids, t, mb['labels'], wts_RxL, teacher_lse_BxT=lse,
                                 logits_scale=tc.logits_scale,
                                 cross_tokenizer=tc.cross_tokenizer, **tc.loss_options)
    return {k: s for k, (s, _) in m.items()}
  with jax.named_scope('student_forward'):
    h = model.hidden(cfg, params, mb['tokens'], **inputs)
  with jax.named_scope('fused_loss'):
    return _fused_sums(cfg, tc, mesh, rules, h, model.output_weights(cfg, params), ids, t,
                       mb['labels'], wts_RxL, lse)


def micro_split(x, micro_batch_size, mesh, rules):
  """[G, ...] sharded over the batch axes -> [M, R, ...], micro-step i holding DP rank r's i-th
  micro-batch (rows r*G/DP + i*MBS ...) on rank r: no data moves."""
  dp = data_parallel_size(dict(mesh.shape), rules)
  n_micro = x.shape[0] // (dp * micro_batch_size)
  x = jnp.swapaxes(x.reshape((dp, n_micro, micro_batch_size) + x.shape[1:]), 0, 1)
  x = x.reshape((n_micro, dp * micro_batch_size) + x.shape[3:])
  spec = sharding.batch_sharding(mesh, rules, x.ndim - 1).spec
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, *spec)))


def _accumulate(cfg, tc, mesh, rules, p_sh, params, batch, with_grad, teacher=None,
                teacher_params=None):
  """Scans the micro-steps: (metrics pairs, objective grads or None). An online `teacher`
  adds each micro-batch's top-K inside its micro-step (its forward holds R rows, not G)."""
  g = batch['tokens'].shape[0]
  mbs = tc.micro_batch_size
  dp = data_parallel_size(dict(mesh.shape), rules)
  if g % (mbs * dp):
    raise ValueError(f'batch of {g} rows: not divisible by micro_batch_size={mbs} x '
                     f'data-parallel size {dp}')
  n_micro = g // (mbs * dp)
  mbatch = {k: micro_split(batch[k], mbs, mesh, rules)
             for k in (BATCH_KEYS if teacher is None else RAW_KEYS)}
  m_MxRxL = jnp.clip(mbatch['loss_mask'].astype(jnp.float32), 0.0, 1.0)
  if tc.reduction == 'nemo':
    count_MxDx1x1 = jnp.sum(m_MxRxL.reshape(n_micro, dp, mbs, -1), axis=(2, 3), keepdims=True)
    wts = (m_MxRxL.reshape(n_micro, dp, mbs, -1) / jnp.maximum(count_MxDx1x1, 1.0)
           ).reshape(m_MxRxL.shape)
    count = jnp.float32(g // mbs)  # groups: the objective is the mean of their means
  else:
    wts, count = m_MxRxL, jnp.sum(m_MxRxL)
  denom = jnp.maximum(count, 1.0)
  sums_fn = functools.partial(_micro_sums, cfg, tc, mesh, rules)

  def body(carry, xs):
    mb, w = xs
    if teacher is not None:
      with jax.named_scope('teacher_topk'):
        mb = teacher.add_topk(mesh, rules, teacher_params, mb, segment_ids(tc, mb))
    if with_grad:  # d(weighted loss sum)/d(student params); the teacher arrays are constants
      def objective(p):
        s = sums_fn(p, mb, w)
        return s['loss'], s
      grads, sums = jax.grad(objective, has_aux=True)(params)
      acc = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, carry[1], grads), p_sh)
    else:
      sums, acc = sums_fn(params, mb, w), carry[1]
    return (jax.tree.map(jnp.add, carry[0], sums), acc), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in ('loss', 'kd_loss', 'sft_loss')}
  acc0 = (jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), p_sh)
          if with_grad else None)
  (sums, grads), _ = jax.lax.scan(body, (zeros, acc0), (mbatch, wts))
  # No SFT term, no CE computed (its zeros read as a perfect CE): not a metric then.
  metrics = {k: (s, count) for k, s in sums.items()
             if not (k == 'sft_loss' and tc.sft_loss_weight == 0)}
  grads = jax.tree.map(lambda x: x / denom, grads) if with_grad else None
  return metrics, grads


def run_config(model_cfg, tc):
  """The student as the step runs it: the run's precision, remat policy, attention and layer
  scan unrolling."""
  return dataclasses.replace(model_cfg, dtype=PRECISIONS[tc.precision],
                             remat_policy=tc.remat_policy, attention=tc.attention,
                             scan_unroll=tc.scan_unroll)


def make_train_step(model_cfg, tc: TrainConfig, mesh, rules, state_shardings,
                    teacher: OnlineTeacher | None = None):
  """step_fn(state, batch) -> (state, metrics), jitted once, state donated.

  batch: the global batch as a dict with BATCH_KEYS (other keys are ignored), G rows. With an
  online `teacher`: step_fn(state, batch, teacher_params), the batch without the top-K keys.
  """
  cfg, opt, schedule = run_config(model_cfg, tc), make_optimizer(tc), make_schedule(tc)

  def step(state: TrainState, batch, teacher_params=None):
    if batch['tokens'].shape[0] != tc.global_batch_size:
      raise ValueError(f'batch of {batch["tokens"].shape[0]} rows: expected '
                       f'train.global_batch_size={tc.global_batch_size}')
    with jax.named_scope('micro_steps'):  # the lax.scan over micro-batches, fwd + bwd
      metrics, grads = _accumulate(cfg, tc, mesh, rules, state_shardings.params, state.params,
                                   batch, with_grad=True, teacher=teacher,
                                   teacher_params=teacher_params)
    with jax.named_scope('optimizer'):
      grad_norm = optax.tree.norm(grads)
      if tc.gradient_clip_val > 0:
        scale = jnp.minimum(1.0, tc.gradient_clip_val / (grad_norm + 1e-6))
        grads = jax.tree.map(lambda x: x * scale, grads)
      updates, opt_state = opt.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  rep = NamedSharding(mesh, PartitionSpec())
  keys = RAW_KEYS if teacher is not None else BATCH_KEYS
  extra = (teacher.param_shardings,) if teacher is not None else ()
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings(mesh, rules, keys),
                                       *extra),
                   out_shardings=(state_shardings, rep), donate_argnums=0)
  return _wrap(jitted, mesh, rules, keys)


def make_eval_step(model_cfg, tc: TrainConfig, mesh, rules, state_shardings,
                   teacher: OnlineTeacher | None = None):
  """eval_fn(params, batch) -> metrics pairs, micro-batched and reduced as the train step
  (eval_fn(params, batch, teacher_params) with an online teacher)."""
  cfg = run_config(model_cfg, tc)

  def evaluate(params, batch, teacher_params=None):
    return _accumulate(cfg, tc, mesh, rules, state_shardings.params, params, batch,
                       with_grad=False, teacher=teacher, teacher_params=teacher_params)[0]

  keys = RAW_KEYS if teacher is not None else BATCH_KEYS
  extra = (teacher.param_shardings,) if teacher is not None else ()
  jitted = jax.jit(evaluate, in_shardings=(state_shardings.params,
                                           batch_shardings(mesh, rules, keys), *extra),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))
  return _wrap(jitted, mesh, rules, keys)


def _wrap(jitted, mesh, rules, keys=BATCH_KEYS):
  """(x, batch, *extra) -> jitted(x, batch, *extra) inside the mesh and logical rules (the
  model's activation constraints resolve at trace time), passing only `keys` of the batch;
  `.trace` and `.lower` likewise (`.trace(...).lower(lowering_platforms=('cuda',))` checks a
  GPU lowering on CPU)."""
  def pick(batch):
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f'batch: missing keys {missing}')
    return {k: batch[k] for k in keys}

  def call(x, batch, *extra):
    with sharding.activate(mesh, rules):
      return jitted(x, pick(batch), *extra)

  def trace(x, batch, *extra):
    with sharding.activate(mesh, rules):
      return jitted.trace(x, pick(batch), *extra)

  call.trace = trace
  call.lower = lambda x, batch, *extra: trace(x, batch, *extra).lower()
  return call
