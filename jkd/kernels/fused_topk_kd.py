"""Fused LM head + top-K KD (+ SFT) loss: vocabulary tiles of `hidden @ w_out`, never [N, V].

Letter legend: N tokens, D hidden size, P columns of w_out (padded vocabulary; a shard's columns
in the vocab-parallel form), V vocabulary (columns >= V are padding, excluded everywhere),
K teacher top-K, J sparse ids per token (the K, plus the label with SFT), C columns of a tile or
of a vocabulary chunk, R rows of a block or slab.

`fused_topk_kd` returns what `losses.topk_kd_loss(hidden @ w_out, ...)` returns: it computes the
per-token statistics of x = logits_scale * hidden @ w_out that `losses.topk_kd_from_stats` takes,
- sparse: x at the J ids (N*J*D work where gathered);
- logsumexp families over the V columns, as needed by the options: lse(x) (SFT; full or tail
  normalisation), lse(x / T) (student_norm='full' at T != 1), lse of x outside the K ids (tail),
  from a sweep over the vocabulary with an online (max, sum) per token.
`_stats` is a `jax.custom_vjp`, so autodiff of losses.py yields the statistics' cotangents and the
loss math lives there only. Backward: d lse_f / dx = softmax(x / div_f) / div_f is dense, the J
ids get sparse terms; the sweep recomputes x per vocabulary chunk into dlogits [N, C], the
largest temporary, and XLA dots give d_hidden (fp32, accumulated) and that chunk of d_w.
The loss itself (`_loss`) is a custom_vjp too: its forward, when differentiated, also forms the
gradient of the weighted loss sum (metrics['loss'][0], what train.py differentiates; the loss is
that over the count), and its backward scales it. The per-token cotangents of the statistics are
known once a token's statistics are (the loss is a sum over tokens), so the backward sweep runs
right after the forward one, or, with implementation='xla' and a family, one sweep by row blocks
forms x once per block (three head dots, not four). A cotangent on the kd_loss or sft_loss sums,
or a differentiated mask or teacher input, takes autodiff through `_stats` instead
(`_loss_by_stats`).
implementation='xla' runs chunked jnp; 'auto' (the default) takes it on CPU, where Pallas only
interprets, and the Pallas kernels elsewhere. cross_tokenizer takes the student's own top-K from
a separate chunked jnp pass (running lax.top_k merge).
Vocab-parallel (mesh, vocab_axis): the same code per shard of w_out's columns in a shard_map;
sparse statistics are psum-ed (0 off-shard), logsumexps combined with pmax + psum.
Past ~500 lines this op is three modules: this one (the plan, the custom VJPs, the public op and
its reference), `vocab_tiles` (the tile math and the Pallas kernels) and `vocab_sweeps` (the
sweeps, gathered columns, statistics by name and their combination).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec

from jkd import losses
from jkd.kernels import vocab_sweeps as vs
from jkd.kernels import vocab_tiles as vt

_CHUNK_ELEMENTS = 1 << 24  # default backward chunk: [N, C] dlogits of ~16M elements
# Default row blocks of the CPU sweep: [R, P] of _CHUNK_ELEMENTS, but at least this many rows:
# d_w's dot per block contracts over R and writes all of [D, P], so fewer rows make it bound by
# that write (V=256000, D=512, N=2048, fp32 grad: 21.0 s at R=64, 12.1 s at 256 and at 512).
_MIN_BLOCK_ROWS = 256
IMPLEMENTATIONS = ('auto', 'pallas', 'xla')


class _Plan(NamedTuple):
  """Static description of one call (hashable: a custom_vjp non-diff argument)."""
  vocab_size: int
  scale: float
  fams: tuple  # ((statistic name, divisor of x, excludes the K ids), ...)
  label: bool
  cdt: Any  # compute dtype of the matmuls
  block_n: int
  block_v: int
  block_d: int
  num_warps: int
  num_stages: int
  num_splits: int | None
  chunk_v: int
  impl: str  # 'pallas' | 'xla' | 'auto' until `_on_platform` resolves it
  interpret: bool | None
  cpu: bool | None = None  # set by `_on_platform`
  block_rows: int = 1  # rows R of the CPU sweep's [R, P] blocks

  @property
  def tail(self):  # a family excludes the K ids: the kernels need them
    return any(excl for _, _, excl in self.fams)


# --- the statistics with their custom VJP ----------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _stats(h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, plan):
  """Per-token statistics (names as in losses.topk_kd_per_token) over this w's columns; ids
  are local (id - column offset) and columns >= n_valid padding; off-shard sparse ones are 0."""
  return _stats_fwd(h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, plan)[0]


def _stats_fwd(h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, plan):
  return _on_platform(_fwd, plan, h_NxD, w_DxP, lids_NxK, llabels_N, n_valid)


def _stats_bwd(plan, res, g):
  return _on_platform(_bwd, plan, res, g)


def auto_implementation(cpu: bool) -> str:
  """What implementation='auto' runs: the chunked jnp sweeps on CPU (where Pallas is only the
  interpreter), the Pallas kernels elsewhere."""
  return 'xla' if cpu else 'pallas'


def _on_platform(fn, plan, *args):
  """fn(plan, *args) with the platform in plan.cpu and 'auto' resolved (`auto_implementation`);
  lax.platform_dependent lowers only the branch of the platform compiled for."""
  def on(cpu):
    impl = auto_implementation(cpu) if plan.impl == 'auto' else plan.impl
    return lambda *a: fn(plan._replace(cpu=cpu, impl=impl), *a)
  return lax.platform_dependent(*args, cpu=on(True), default=on(False))


def _fwd(plan, h_NxD, w_DxP, lids_NxK, llabels_N, n_valid):
  h = h_NxD.astype(plan.cdt)
  sp_NxJ, ok_NxJ = vs.sparse_ids(lids_NxK, llabels_N, n_valid, plan)
  x_NxJ, lses = (vs.sweep_fwd(h, w_DxP, lids_NxK, n_valid, sp_NxJ, plan) if plan.fams
                 else (vs.gather_x(h, w_DxP, sp_NxJ, plan), ()))
  x_NxJ = jnp.where(ok_NxJ, x_NxJ, 0.0)
  out = vs.named_stats(x_NxJ, lids_NxK.shape[1], lses, plan)
  return out, (h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, x_NxJ, tuple(lses))


def _bwd(plan, res, g):
  d_h, d_w = _grads(plan, res, g)
  return d_h.astype(res[0].dtype), d_w.astype(res[1].dtype), None, None, None


def _grads(plan, res, g):
  """(d_h fp32, d_w in w's dtype) from the statistics' cotangents g; x at the sparse ids is the
  forward's."""
  h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, x_NxJ, lses = res
  h = h_NxD.astype(plan.cdt)
  sp_NxJ, ok_NxJ = vs.sparse_ids(lids_NxK, llabels_N, n_valid, plan)
  vals_NxJ = jnp.where(ok_NxJ, plan.scale * vs.sparse_cotangent(g, plan), 0.0)
  if plan.fams:
    coefs = [g[name] * (plan.scale / div) for name, div, _ in plan.fams]
    d_h, d_w = vs.sweep_bwd(h, w_DxP, lids_NxK, n_valid, lses, coefs,
                            jnp.where(ok_NxJ, sp_NxJ, -1), vals_NxJ, x_NxJ, plan)
  else:
    d_h, d_w = vs.scatter_bwd(h, w_DxP, sp_NxJ, vals_NxJ, plan)
  return d_h, d_w


_stats.defvjp(_stats_fwd, _stats_bwd)


# --- the loss: its gradient formed in the forward, the options, the public op ----------------

class _Loss(NamedTuple):
  """Static parts of the loss (the custom_vjp's non-diff argument)."""
  plan: _Plan
  options: tuple  # (name, value) pairs: losses.topk_kd_per_token's options
  axis_name: Any  # the vocabulary's mesh axis, None unsharded


def _objective(options, stats, t_NxK, mask_N, lse_N):
  """(loss, metrics) from the combined statistics; metrics['loss'][0], the weighted loss sum,
  is the objective whose gradient the forward forms."""
  stats = dict(stats)
  topk = stats.pop(vs.SPARSE[0])
  return losses.topk_kd_from_stats(topk, t_NxK, mask_N, teacher_lse_BxT=lse_N, **stats,
                                   **dict(options))


def _stats_and_grads(ctx, with_grad, plan, h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, t_NxK,
                     mask_N, lse_N):
  """(combined statistics, fp32 d_h, d_w of the weighted loss sum or None): the CPU sweep by
  row blocks (`vs.rows_sweep`); otherwise the statistics' forward, then their backward with the
  objective's cotangents, run at once (the same sweeps the autodiff of `_stats` runs). d_w is in
  w's dtype on every platform (lax.platform_dependent's branches must agree): an fp32 gradient of
  a bf16 head would be a residual twice the head's size."""
  def cotangents(stats, r0, rows):
    take = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, r0, rows, 0)  # noqa
    return jax.grad(lambda st: _objective(ctx.options, st, take(t_NxK), take(mask_N),
                                          take(lse_N))[1]['loss'][0])(stats)
  if plan.impl == 'xla' and plan.fams:
    sp_NxJ, ok_NxJ = vs.sparse_ids(lids_NxK, llabels_N, n_valid, plan)
    return vs.rows_sweep(h_NxD.astype(plan.cdt), w_DxP, lids_NxK, n_valid, sp_NxJ, ok_NxJ, plan,
                         ctx.axis_name, cotangents if with_grad else None)
  stats, res = _fwd(plan, h_NxD, w_DxP, lids_NxK, llabels_N, n_valid)
  stats = vs.combine(stats, ctx.axis_name)
  if not with_grad:
    return stats, None, None
  # The backward sweeps with the combined logsumexps give each shard its share of the dense part.
  res = res[:-1] + (tuple(stats[name] for name, _, _ in plan.fams),)
  d_h, d_w = _grads(plan, res, cotangents(stats, 0, h_NxD.shape[0]))
  return stats, d_h, d_w


def _loss_by_stats(ctx, h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, t_NxK, mask_N, lse_N):
  """The same (loss, metrics) through `_stats` and autodiff: any cotangent, any input."""
  stats = _stats(h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, ctx.plan)
  return _objective(ctx.options, vs.combine(stats, ctx.axis_name), t_NxK, mask_N, lse_N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss(ctx, h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, t_NxK, mask_N, lse_N):
  """(loss, metrics) of one shard's columns (ids local); its VJP scales a gradient formed in
  the forward when only the loss or the weighted loss sum is differentiated."""
  stats = _on_platform(functools.partial(_stats_and_grads, ctx, False), ctx.plan, h_NxD, w_DxP,
                       lids_NxK, llabels_N, n_valid, t_NxK, mask_N, lse_N)[0]
  return _objective(ctx.options, stats, t_NxK, mask_N, lse_N)


def _loss_fwd(ctx, *primals):
  args = [None if p is None else p.value for p in primals]
  t_NxK, mask_N, lse_N = args[-3:]
  if any(p is not None and p.perturbed for p in primals[-3:]):  # teacher or mask differentiated
    return _loss(ctx, *args), (args, None)
  stats, d_h, d_w = _on_platform(functools.partial(_stats_and_grads, ctx, True), ctx.plan,
                                 *args)
  out = _objective(ctx.options, stats, t_NxK, mask_N, lse_N)
  return out, (args, (d_h, d_w, out[1]['loss'][1]))


def _loss_bwd(ctx, res, ct):
  args, formed = res
  ct_loss, ct_metrics = ct
  zero = lambda c: isinstance(c, SymbolicZero)  # noqa: E731 (not differentiated)
  if formed is not None and zero(ct_metrics['kd_loss'][0]) and zero(ct_metrics['sft_loss'][0]):
    d_h, d_w, count = formed  # loss = sum / max(count, 1); the count has no cotangent path
    scale = 0.0
    if not zero(ct_loss):
      scale = scale + ct_loss / jnp.maximum(count, 1.0)
    if not zero(ct_metrics['loss'][0]):
      scale = scale + ct_metrics['loss'][0]
    if ctx.axis_name is not None:  # shard_map hands each shard 1/S of a replicated output's
      scale = lax.psum(scale, ctx.axis_name)  # cotangent (the psum in `vs.combine` transposes so)
    return ((scale * d_h).astype(args[0].dtype), (scale * d_w).astype(args[1].dtype),
            None, None, None, None, None, None)
  # Any other cotangent (kd_loss or sft_loss sums, the mask's weights): autodiff through the
  # statistics' own VJP, whose backward recomputes the logits. Integer inputs get float0.
  h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, *teacher = args
  _, vjp = jax.vjp(lambda h, w, teacher: _loss_by_stats(ctx, h, w, lids_NxK, llabels_N, n_valid,
                                                        *teacher), h_NxD, w_DxP, teacher)
  ct = jax.tree.map(lambda c: jnp.zeros(c.aval.shape, c.aval.dtype) if zero(c) else c, ct,
                    is_leaf=zero)
  d_h, d_w, d_teacher = vjp(ct)
  return (d_h, d_w, None, None, None, *d_teacher)


_loss.defvjp(_loss_fwd, _loss_bwd, symbolic_zeros=True)


def _fused_loss(h, w, ids, t, labels, mask, teacher_lse, *, plan, options, cross_tokenizer,
                axis_name):
  p = w.shape[1]
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * p
  n_valid = jnp.clip(plan.vocab_size - offset, 0, p).astype(jnp.int32)
  ids = jnp.clip(ids.astype(jnp.int32), 0, plan.vocab_size - 1)  # as jkd.losses clamps them
  labels = jnp.clip(labels.astype(jnp.int32), 0, plan.vocab_size - 1)
  if cross_tokenizer:
    ids = vs.student_topk_ids(h, w, n_valid, offset, ids.shape[1], plan, axis_name)
  return _loss(_Loss(plan, tuple(options.items()), axis_name), h, w, ids - offset,
               labels - offset, n_valid, t, mask, teacher_lse)


def _make_plan(h, w, ids, t, labels, mask, teacher_lse, *, vocab_size, options, logits_scale,
               compute_dtype, tiles, implementation, interpret):
  if h.ndim != 2 or w.ndim != 2 or w.shape[0] != h.shape[1]:
    raise ValueError(f'hidden_NxD {h.shape}, w_out_DxP {w.shape}: expected [N, D] and [D, P]')
  (n, _), p, k = h.shape, w.shape[1], ids.shape[-1]
  for name, a, shape in (('teacher_ids_NxK', ids, (n, k)), ('teacher_logits_NxK', t, (n, k)),
                         ('labels_N', labels, (n,)), ('loss_mask_N', mask, (n,)),
                         ('teacher_lse_N', teacher_lse, (n,))):
    if a is not None and tuple(a.shape) != shape:
      raise ValueError(f'{name}: shape {tuple(a.shape)}, expected {shape}')
  v = p if vocab_size is None else int(vocab_size)
  if not 0 < v <= p:
    raise ValueError(f'vocab_size={vocab_size}: must lie in [1, P={p}]')
  if not 0 < k <= v:
    raise ValueError(f'teacher_ids_NxK: K={k} must lie in [1, V={v}]')
  if not logits_scale > 0:
    raise ValueError(f'logits_scale={logits_scale}: must be > 0')
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r}: expected one of {IMPLEMENTATIONS}')
  norm = losses.resolve_options(**options, has_teacher_lse=teacher_lse is not None)
  temp, sft = options['temperature'], options['sft_loss_weight'] > 0
  fams = []  # the full-vocabulary statistics these options need (none: no sweep)
  if sft or (norm == 'full' and temp == 1):
    fams.append(('student_lse_BxT', 1.0, False))
  if norm == 'full' and temp != 1:
    fams.append(('student_lse_kd_BxT', float(temp), False))
  if options['tail']:
    fams.append(('student_tail_lse_BxT', 1.0, True))
  cdt = jnp.dtype(compute_dtype or jnp.promote_types(h.dtype, w.dtype))
  bn, bv, bd, warps, stages = [d if x is None else int(x)
                               for x, d in zip(tiles[:5], vt.default_blocks(cdt, w.dtype))]
  if implementation != 'xla':  # the Pallas kernels run (on GPU, for 'auto')
    for name, b in (('block_n', bn), ('block_v', bv), ('block_d', bd)):
      if b < 16 or b & (b - 1):
        raise ValueError(f'{name}={b}: must be a power of two >= 16 (Triton tiles)')
    if warps not in (1, 2, 4, 8, 16, 32):  # Triton asserts a power of two; 32 x 32 threads max
      raise ValueError(f'num_warps={warps}: must be a power of two in [1, 32] (Triton)')
    if stages < 1:
      raise ValueError(f'num_stages={stages}: must be >= 1 (Triton pipeline stages)')
    need = vt.smem_bytes(bn, bv, bd, cdt.itemsize, w.dtype.itemsize, stages)
    if need > vt.SMEM_LIMIT:
      raise ValueError(f'block_n={bn}, block_v={bv}, block_d={bd}, num_stages={stages}: '
                       f'~{need // 1024} KiB of shared memory, over {vt.SMEM_LIMIT // 1024} KiB')
  chunk_v = int(tiles[6] or max(512, _CHUNK_ELEMENTS // max(n, 1)))
  # Row blocks of the CPU sweep: a column chunk's [N, chunk_v] elements as [R, P]; by default
  # at least _MIN_BLOCK_ROWS rows.
  rows = (max(1, n * chunk_v // p) if tiles[6] else
          max(min(n, _MIN_BLOCK_ROWS), _CHUNK_ELEMENTS // p))
  return _Plan(v, float(logits_scale), tuple(fams), sft, cdt, bn, bv, bd, warps, stages,
               tiles[5], chunk_v, implementation, interpret, block_rows=rows)


def fused_topk_kd(hidden_NxD, w_out_DxP, teacher_ids_NxK, teacher_logits_NxK, labels_N,
                  loss_mask_N, *, teacher_lse_N=None, vocab_size=None, kd_loss='fwd_kl',
                  kd_loss_weight=1.0, sft_loss_weight=0.0, logits_scale=1.0,
                  target_logits_scale=1.0, cross_tokenizer=False, tail=False, student_norm=None,
                  beta=0.5, temperature=1.0, compute_dtype=None, mesh=None, vocab_axis=None,
                  block_n=None, block_v=None, block_d=None, num_warps=None, num_stages=None,
                  num_splits=None, chunk_v=None, implementation='auto', interpret=None):
  """`losses.topk_kd_loss(hidden @ w_out[:, :V], ...)`, same options and (loss, metrics), without
  [N, V] logits; differentiable in hidden_NxD and w_out_DxP.

  vocab_size: V, the leading columns of w_out_DxP that are vocabulary (default P).
  compute_dtype: matmul operand dtype (default: promoted input dtypes), fp32 accumulation and
    statistics. w_out is cast tile by tile, so an fp32 master w_out with compute_dtype=bf16 needs
    no bf16 copy and gets its gradient accumulated in fp32. fp32 matmuls take JAX's precision
    (`jax.default_matmul_precision`), the kernels' dots as XLA's: by default TF32 on H100
    (Triton inputPrecision tf32), IEEE fp32 under 'float32' or 'highest'.
  mesh, vocab_axis: vocab-parallel form, w_out's columns split over mesh axis vocab_axis (P
    divisible by its size), all else replicated; per-shard statistics combined by psum/pmax.
  Tiles (Pallas): block_n tokens x block_v columns, dots over block_d slices of D, powers of two
    (defaults for H100 by compute dtype, `vt.default_blocks`; P and D not multiples are padded, a
    copy of w_out); num_warps (a power of two, at most 32) and num_stages (>= 1) for Triton;
    num_splits vocabulary splits of the forward grid (None: ~2 waves of programs); chunk_v
    columns per backward chunk ([N, chunk_v] dlogits is the largest temporary).
  implementation: 'pallas', 'xla' (chunked jnp: with a vocabulary sweep, blocks of R rows over
    all P columns, R = N * chunk_v / P, by default at least 256, and an fp32 [D, P] d_w
    accumulator), or 'auto': 'xla' on CPU, 'pallas' elsewhere (lax.platform_dependent).
  interpret: for 'pallas', None = interpret mode on CPU, the Triton kernel on GPU.
  """
  options = dict(kd_loss=kd_loss, kd_loss_weight=kd_loss_weight, sft_loss_weight=sft_loss_weight,
                 target_logits_scale=target_logits_scale, tail=tail, student_norm=student_norm,
                 beta=beta, temperature=temperature)
  args = (hidden_NxD, w_out_DxP, teacher_ids_NxK, teacher_logits_NxK, labels_N, loss_mask_N,
          teacher_lse_N)
  plan = _make_plan(*args, vocab_size=vocab_size, options=options, logits_scale=logits_scale,
                    compute_dtype=compute_dtype, implementation=implementation,
                    tiles=(block_n, block_v, block_d, num_warps, num_stages, num_splits, chunk_v),
                    interpret=interpret)
  if vocab_axis is not None and (mesh is None or vocab_axis not in mesh.shape):
    raise ValueError(f'vocab_axis={vocab_axis!r}: needs a mesh with that axis (mesh={mesh})')
  if vocab_axis is not None and w_out_DxP.shape[1] % mesh.shape[vocab_axis]:
    raise ValueError(f'w_out_DxP: P={w_out_DxP.shape[1]} not divisible by the '
                     f'{mesh.shape[vocab_axis]} shards of {vocab_axis!r}')
  if hidden_NxD.shape[0] == 0:  # no token (the sweeps divide by N): the oracle's empty logits
    return fused_topk_kd_reference(*args[:-1], teacher_lse_N=teacher_lse_N, vocab_size=vocab_size,
                                   compute_dtype=compute_dtype, logits_scale=logits_scale,
                                   cross_tokenizer=cross_tokenizer, **options)
  loss = functools.partial(_fused_loss, plan=plan, options=options,
                           cross_tokenizer=cross_tokenizer, axis_name=vocab_axis)
  if vocab_axis is None:
    return loss(*args)
  rep = PartitionSpec()
  specs = (rep, PartitionSpec(None, vocab_axis)) + (rep,) * 5
  if teacher_lse_N is None:
    loss, args, specs = functools.partial(loss, teacher_lse=None), args[:-1], specs[:-1]
  # check_vma=False: the Pallas interpreter does not track varying axes (jax 0.10); the
  # transposes still sum d_hidden over shards (tested against the unsharded gradients).
  return jax.shard_map(loss, mesh=mesh, in_specs=specs, out_specs=rep, check_vma=False)(*args)


def fused_topk_kd_reference(hidden_NxD, w_out_DxP, teacher_ids_NxK, teacher_logits_NxK,
                            labels_N, loss_mask_N, *, teacher_lse_N=None, vocab_size=None,
                            compute_dtype=None, **options):
  """The oracle: `losses.topk_kd_loss` on the full fp32 logits hidden @ w_out[:, :V]."""
  v = w_out_DxP.shape[1] if vocab_size is None else vocab_size
  cdt = compute_dtype or jnp.promote_types(hidden_NxD.dtype, w_out_DxP.dtype)
  logits_NxV = jnp.dot(hidden_NxD.astype(cdt), w_out_DxP.astype(cdt),
                       preferred_element_type=jnp.float32)[:, :v]
  lse = None if teacher_lse_N is None else teacher_lse_N[None]
  return losses.topk_kd_loss(logits_NxV[None], teacher_ids_NxK[None], teacher_logits_NxK[None],
                             labels_N[None], loss_mask_N[None], teacher_lse_BxT=lse, **options)
