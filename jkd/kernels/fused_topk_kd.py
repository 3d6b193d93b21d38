"""Fused LM head + top-K KD (+ SFT) loss: vocabulary tiles of `hidden @ w_out`, never [N, V].

Letter legend: N tokens, D hidden size, P columns of w_out (padded vocabulary; a shard's columns
in the vocab-parallel form), V vocabulary (columns >= V are padding, excluded everywhere),
K teacher top-K, J sparse ids per token (the K, plus the label with SFT), C columns of a tile or
of a vocabulary chunk, S vocabulary splits of the forward grid.

`fused_topk_kd` returns what `losses.topk_kd_loss(hidden @ w_out, ...)` returns: it computes the
per-token statistics of x = logits_scale * hidden @ w_out that `losses.topk_kd_from_stats` takes,
- sparse: x at the J ids, from gathered columns of w_out (N*J*D work, in slabs of R rows of
  w_out: R rows of [P] fit in cache on CPU, the [R, N, J] gathers stay bounded on GPU);
- logsumexp families over the V columns, as needed by the options: lse(x) (SFT; full or tail
  normalisation), lse(x / T) (student_norm='full' at T != 1), lse of x outside the K ids (tail).
  The forward kernel streams vocabulary tiles (each an fp32 accumulation of dots over D slices)
  and keeps an online (max, sum) per token; its grid is (row blocks, vocabulary splits).
`_stats` is a `jax.custom_vjp`, so autodiff of losses.py yields the statistics' cotangents and the
loss math lives there only. Backward: d lse_f / dx = softmax(x / div_f) / div_f is dense, the J
ids get sparse terms. Per vocabulary chunk, the backward kernel recomputes the tiles and writes
the dense dlogits [N, C] (compute dtype), the sparse terms are scattered into it, and XLA dots
give d_hidden (fp32, accumulated) and that chunk of d_w (written once). The largest temporary is
[N, C]. Without any family (NeMo parity, no SFT) nothing sweeps the vocabulary: gathered
columns only, and a scatter-add for d_w, slab by slab.
The loss itself (`_loss`) is a custom_vjp too: its forward, when differentiated, also forms the
gradient of the weighted loss sum (metrics['loss'][0], what train.py differentiates; the loss is
that over the count), and its backward scales it. The per-token cotangents of the statistics are
known once a token's statistics are (the loss is a sum over tokens), so the column sweeps run
their backward right after the forward, and implementation='xla' with a vocabulary sweep
(`_rows_sweep`) goes by blocks of rows over all columns: x_RxP once, the cotangents, then d_h and
d_w from the same block, three dots where the column sweeps need four (their backward recomputes
x, since the dense part needs the finished logsumexps), at the cost of an fp32 [D, P] d_w
accumulator. A cotangent on the kd_loss or sft_loss sums, or a differentiated mask or teacher
input, takes autodiff through `_stats` instead (`_loss_by_stats`).
implementation='xla' runs chunked jnp; 'auto' (the default) takes it on CPU, where Pallas only
interprets, and the Pallas kernels elsewhere. cross_tokenizer takes the student's own top-K from
a separate chunked jnp pass (running lax.top_k merge), then gathers as above.
Vocab-parallel (mesh, vocab_axis): the same code per shard of w_out's columns in a shard_map;
sparse statistics are psum-ed (0 off-shard), logsumexps combined with pmax + psum.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jax.sharding import PartitionSpec

from jkd import losses

_NEG = -1e30  # log 0 stand-in, as in jkd.losses
SMEM_LIMIT = 227 * 1024  # H100/H200 shared memory per block
_TARGET_PROGRAMS = 264  # forward grid: ~2 waves over 132 SMs
_GATHER_BYTES = 1 << 25  # gathered w_out columns [R, N, J] per slab (GPU)
_SLAB_BYTES = 1 << 20  # w_out rows [R, P] per slab (CPU: a column touches R cache lines)
_CHUNK_ELEMENTS = 1 << 24  # default backward chunk: [N, C] dlogits of ~16M elements
# Default row blocks of the CPU sweep: [R, P] of _CHUNK_ELEMENTS, but at least this many rows:
# d_w's dot per block contracts over R and writes all of [D, P], so fewer rows make it bound by
# that write (V=256000, D=512, N=2048, fp32 grad: 21.0 s at R=64, 12.1 s at 256 and at 512).
_MIN_BLOCK_ROWS = 256
_SPARSE = ('student_topk_BxTxK', 'label_logit_BxT')
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


def default_blocks(compute_dtype, w_dtype=None):
  """(block_n, block_v, block_d, num_warps, num_stages) for H100/H200 by operand dtypes."""
  if jnp.dtype(compute_dtype).itemsize >= 4:
    return 64, 128, 32, 4, 3
  wide_w = jnp.dtype(w_dtype or compute_dtype).itemsize >= 4  # fp32 tiles of a master head
  return 64, 256, 32 if wide_w else 64, 8, 3


def smem_bytes(block_n, block_v, block_d, h_itemsize, w_itemsize, num_stages):
  """Triton shared memory estimate: pipelined operand tiles plus one fp32 tile for reductions."""
  return (num_stages * (block_n * block_d * h_itemsize + block_d * block_v * w_itemsize)
          + block_n * block_v * 4)


def _round_up(n, m):
  return -(-n // m) * m


def _pad_to(a, axis, size):
  if a.shape[axis] == size:
    return a
  return jnp.pad(a, [(0, size - a.shape[axis]) if i == axis else (0, 0) for i in range(a.ndim)])


# --- tile math shared by the Pallas kernels and the chunked jnp sweeps -----------------------

def _keeps(cols_1xC, n_valid, in_k_NxC, plan):
  valid_1xC = cols_1xC < n_valid
  return [valid_1xC & ~in_k_NxC if excl else valid_1xC for _, _, excl in plan.fams]


def _init_state(n, plan):
  return tuple((jnp.full((n,), _NEG, jnp.float32), jnp.zeros((n,), jnp.float32))
               for _ in plan.fams)


def _online_update(state, x_NxC, keeps, plan):
  """One tile into the running (max, sum of exp) of each logsumexp family."""
  new = []
  for (m_N, l_N), keep_NxC, (_, div, _) in zip(state, keeps, plan.fams):
    xf_NxC = jnp.where(keep_NxC, x_NxC / div if div != 1 else x_NxC, _NEG)
    m_new_N = jnp.maximum(m_N, jnp.max(xf_NxC, axis=1))
    e_NxC = jnp.where(keep_NxC, jnp.exp(xf_NxC - m_new_N[:, None]), 0.0)
    new.append((m_new_N, l_N * jnp.exp(m_N - m_new_N) + jnp.sum(e_NxC, axis=1)))
  return tuple(new)


def _finish(m_N, l_N):
  return jnp.where(l_N > 0, m_N + jnp.log(jnp.where(l_N > 0, l_N, 1.0)), _NEG)


def _dense_dl(x_NxC, keeps, lses, coefs, plan):
  """sum_f coef_f * exp(x / div_f - lse_f): the dense part of d loss / d logits on a tile."""
  dl_NxC = 0.0
  for keep_NxC, lse_N, coef_N, (_, div, _) in zip(keeps, lses, coefs, plan.fams):
    xf_NxC = x_NxC / div if div != 1 else x_NxC
    dl_NxC = dl_NxC + jnp.where(keep_NxC, coef_N[:, None] * jnp.exp(xf_NxC - lse_N[:, None]), 0.0)
  return dl_NxC


# --- Pallas kernels (Triton on GPU, interpret mode on CPU) -----------------------------------

def _tile_x(h_ref, w_ref, col0, plan):
  """fp32 x tile [bn, bv] at columns col0 + [0, bv): dots over D slices (Triton pipelines them)."""
  bd, bv = plan.block_d, plan.block_v

  def body(d, acc_NxC):
    d0 = pl.multiple_of(d * bd, bd)
    w_DxC = w_ref[pl.ds(d0, bd), pl.ds(col0, bv)].astype(plan.cdt)
    return acc_NxC + jnp.dot(h_ref[:, pl.ds(d0, bd)], w_DxC, preferred_element_type=jnp.float32)
  acc_NxC = lax.fori_loop(0, h_ref.shape[1] // bd, body,
                          jnp.zeros((h_ref.shape[0], bv), jnp.float32))
  return acc_NxC * plan.scale


def _tile_keeps(nvalid_ref, ids_ref, col0, plan):
  cols_1xC = col0 + lax.broadcasted_iota(jnp.int32, (1, plan.block_v), 1)
  in_k_NxC = None
  if ids_ref is not None:  # K compares per element, only for the tail
    in_k_NxC = lax.fori_loop(0, ids_ref.shape[1],
                             lambda k, acc: acc | (ids_ref[:, pl.ds(k, 1)] == cols_1xC),
                             jnp.zeros((ids_ref.shape[0], plan.block_v), jnp.bool_))
  return _keeps(cols_1xC, nvalid_ref[0], in_k_NxC, plan)


def _fwd_kernel(nvalid_ref, h_ref, w_ref, *refs, plan, tiles_per_split):
  ids_ref, lse_refs = (refs[0], refs[1:]) if plan.tail else (None, refs)
  bv = plan.block_v
  first = pl.program_id(1) * tiles_per_split
  n_tiles = jnp.clip(pl.cdiv(nvalid_ref[0], bv) - first, 0, tiles_per_split)  # skip padding

  def body(j, state):
    col0 = pl.multiple_of((first + j) * bv, bv)
    x_NxC = _tile_x(h_ref, w_ref, col0, plan)
    return _online_update(state, x_NxC, _tile_keeps(nvalid_ref, ids_ref, col0, plan), plan)
  state = lax.fori_loop(0, n_tiles, body, _init_state(h_ref.shape[0], plan))
  for lse_ref, (m_N, l_N) in zip(lse_refs, state):
    lse_ref[...] = _finish(m_N, l_N)[None, :]


def _bwd_kernel(c0_ref, nvalid_ref, h_ref, w_ref, *refs, plan):
  ids_ref, refs = (refs[0], refs[1:]) if plan.tail else (None, refs)
  *fam_refs, dl_ref = refs
  col0 = pl.multiple_of(c0_ref[0] + pl.program_id(1) * plan.block_v, plan.block_v)
  x_NxC = _tile_x(h_ref, w_ref, col0, plan)
  dl_NxC = _dense_dl(x_NxC, _tile_keeps(nvalid_ref, ids_ref, col0, plan),
                     [r[...] for r in fam_refs[0::2]], [r[...] for r in fam_refs[1::2]], plan)
  dl_ref[...] = dl_NxC.astype(dl_ref.dtype)


def _pallas(kernel, args, *, grid, in_specs, out_specs, out_shape, plan):
  def run(interpret):
    params = None if interpret else plt.CompilerParams(num_warps=plan.num_warps,
                                                       num_stages=plan.num_stages)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret,
                          compiler_params=params)(*args)
  return run(plan.cpu if plan.interpret is None else plan.interpret)  # interpreted on CPU


def _operand_specs(plan, h, w, lids):
  """(n_valid, h, w[, ids]): row blocks of h and ids; w whole (the kernels slice it)."""
  bn = plan.block_n
  specs = [pl.BlockSpec((1,), lambda *_: (0,)),
           pl.BlockSpec((bn, h.shape[1]), lambda i, *_: (i, 0)),
           pl.BlockSpec(w.shape, lambda *_: (0, 0))]
  if plan.tail:
    specs.append(pl.BlockSpec((bn, lids.shape[1]), lambda i, *_: (i, 0)))
  return specs


def _pallas_sweep_fwd(h, w, lids, n_valid, plan):
  """Per-family local logsumexps [N] (inputs padded to whole tiles)."""
  n_rows, n_tiles = h.shape[0] // plan.block_n, w.shape[1] // plan.block_v
  splits = plan.num_splits or -(-_TARGET_PROGRAMS // n_rows)
  tps = -(-n_tiles // max(1, min(splits, n_tiles)))
  splits = -(-n_tiles // tps)
  lse_SxN = jax.ShapeDtypeStruct((splits, h.shape[0]), jnp.float32)
  outs = _pallas(functools.partial(_fwd_kernel, plan=plan, tiles_per_split=tps),
                 [n_valid[None], h, w] + ([lids] if plan.tail else []),
                 grid=(n_rows, splits), in_specs=_operand_specs(plan, h, w, lids),
                 out_specs=[pl.BlockSpec((1, plan.block_n), lambda i, s: (s, i))] * len(plan.fams),
                 out_shape=[lse_SxN] * len(plan.fams), plan=plan)
  return [jax.nn.logsumexp(o_SxN, axis=0) for o_SxN in outs]


def _pallas_chunk_dl(h, w, lids, n_valid, lses, coefs, c0, width, plan):
  """Dense dlogits [N, width] (compute dtype) of the chunk at column c0, tiles recomputed."""
  fam_args = [a for pair in zip(lses, coefs) for a in pair]
  row_spec = pl.BlockSpec((plan.block_n,), lambda i, j: (i,))
  return _pallas(functools.partial(_bwd_kernel, plan=plan),
                 [c0[None], n_valid[None], h, w] + ([lids] if plan.tail else []) + fam_args,
                 grid=(h.shape[0] // plan.block_n, width // plan.block_v),
                 in_specs=[pl.BlockSpec((1,), lambda i, j: (0,))]
                 + _operand_specs(plan, h, w, lids) + [row_spec] * len(fam_args),
                 out_specs=pl.BlockSpec((plan.block_n, plan.block_v), lambda i, j: (i, j)),
                 out_shape=jax.ShapeDtypeStruct((h.shape[0], width), plan.cdt), plan=plan)


# --- sweep drivers (Pallas, or the same tile math in chunked jnp) ----------------------------

def _materialized(x):
  """x computed once, before the loops that read it: XLA folds a transpose into a dot's
  dimension numbers otherwise, and XLA:CPU runs transposed-operand dots slower (GPUs do not)."""
  return lax.optimization_barrier(x)


def _loop_chunks(n_cols, width, step, carry, align=128):
  """step(carry, c0, width) over [0, n_cols): a loop of whole chunks, then the remainder. The
  width is first narrowed, by at most half, to a multiple of `align` that divides n_cols where
  one exists: then one loop body serves every chunk (a remainder chunk is a second copy of the
  step, and XLA:CPU ran its odd-width dots at half the speed of the loop's)."""
  width = min(width, n_cols)
  width = next((c for c in range(width - width % align, width // 2, -align)
                if c and n_cols % c == 0), width)
  n_full, rem = divmod(n_cols, width)
  carry = lax.fori_loop(0, n_full, lambda i, c: step(c, i * width, width), carry)
  return step(carry, n_full * width, rem) if rem else carry


def _xla_x(h, w, c0, width, plan):
  w_DxC = lax.dynamic_slice_in_dim(w, c0, width, axis=1).astype(plan.cdt)
  return plan.scale * jnp.dot(h, w_DxC, preferred_element_type=jnp.float32)


def _xla_keeps(lids_NxK, n_valid, c0, width, plan):
  cols_1xC = c0 + lax.broadcasted_iota(jnp.int32, (1, width), 1)
  in_k_NxC = None
  if plan.tail:  # membership by scatter: N*K work instead of K passes over the chunk
    rel_NxK = lids_NxK - c0
    rel_NxK = jnp.where((rel_NxK >= 0) & (rel_NxK < width), rel_NxK, width)
    in_k_NxC = jnp.zeros((lids_NxK.shape[0], width), jnp.bool_).at[
        jnp.arange(lids_NxK.shape[0])[:, None], rel_NxK].set(True, mode='drop')
  return _keeps(cols_1xC, n_valid, in_k_NxC, plan)


def _padded(plan, h, w, *rows):
  """Kernel operands padded to whole tiles (copies only where a size is not a multiple)."""
  n, d, p = (_round_up(h.shape[0], plan.block_n), _round_up(h.shape[1], plan.block_d),
             _round_up(w.shape[1], plan.block_v))
  return (_pad_to(_pad_to(h, 0, n), 1, d), _pad_to(_pad_to(w, 0, d), 1, p),
          *[_pad_to(r, 0, n) for r in rows])


def _sweep_fwd(h, w, lids, n_valid, sp_ids, plan):
  """(x at the sparse ids [N, J], per-family local logsumexps [N])."""
  if plan.impl == 'pallas':
    hp, wp, lidsp = _padded(plan, h, w, lids)
    lses = _pallas_sweep_fwd(hp, wp, lidsp, n_valid, plan)
    return _gather_x(h, w, sp_ids, plan), [lse_N[:h.shape[0]] for lse_N in lses]

  def step(carry, c0, width):  # the sparse x come from the chunk in memory
    x_sp_NxJ, state = carry
    x_NxC = _xla_x(h, w, c0, width, plan)
    rel_NxJ = sp_ids - c0
    in_c_NxJ = (rel_NxJ >= 0) & (rel_NxJ < width)
    x_sp_NxJ += jnp.where(in_c_NxJ, jnp.take_along_axis(x_NxC, rel_NxJ, 1, mode='clip'), 0.0)
    return x_sp_NxJ, _online_update(state, x_NxC, _xla_keeps(lids, n_valid, c0, width, plan),
                                    plan)
  init = (jnp.zeros(sp_ids.shape, jnp.float32), _init_state(h.shape[0], plan))
  x_sp_NxJ, state = _loop_chunks(w.shape[1], plan.chunk_v, step, init)
  return x_sp_NxJ, [_finish(m_N, l_N) for m_N, l_N in state]


def _sweep_bwd(h, w, lids, n_valid, lses, coefs, sp_ids, sp_vals, plan):
  """(d_h fp32 [N, D], d_w [D, P]): per vocabulary chunk, dense dlogits (kernel or jnp) plus
  the sparse terms scattered in; d_h += dl @ w_c^T, d_w[:, chunk] = h^T @ dl."""
  n, d, p = h.shape[0], h.shape[1], w.shape[1]
  if plan.impl == 'pallas':
    h, w, lids, sp_ids, sp_vals, *fam = _padded(plan, h, w, lids, sp_ids, sp_vals, *lses, *coefs)
    lses, coefs = fam[:len(lses)], fam[len(lses):]
  rows_Nx1 = jnp.arange(h.shape[0])[:, None]
  h_DxN = _materialized(h.T) if plan.cpu else h.T

  def step(carry, c0, width):
    d_h_NxD, d_w_DxP = carry
    if plan.impl == 'pallas':
      dl_NxC = _pallas_chunk_dl(h, w, lids, n_valid, lses, coefs, jnp.asarray(c0, jnp.int32),
                                width, plan)
    else:  # fp32 until the sparse terms are in: XLA:CPU scatters bf16 in fp32 and then feeds
      # the dots below fp32 operands, at half the speed of its bf16 ones
      keeps = _xla_keeps(lids, n_valid, c0, width, plan)
      dl_NxC = _dense_dl(_xla_x(h, w, c0, width, plan), keeps, lses, coefs, plan)
    rel_NxJ = sp_ids - c0
    rel_NxJ = jnp.where((rel_NxJ >= 0) & (rel_NxJ < width), rel_NxJ, width)
    dl_NxC = dl_NxC.at[rows_Nx1, rel_NxJ].add(sp_vals.astype(dl_NxC.dtype), mode='drop')
    dl_NxC = dl_NxC.astype(plan.cdt)
    w_DxC = lax.dynamic_slice_in_dim(w, c0, width, axis=1).astype(plan.cdt)
    d_h_NxD = d_h_NxD + lax.dot_general(dl_NxC, w_DxC, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
    d_w_DxC = jnp.dot(h_DxN, dl_NxC, preferred_element_type=jnp.float32).astype(w.dtype)
    return d_h_NxD, lax.dynamic_update_slice_in_dim(d_w_DxP, d_w_DxC, c0, axis=1)
  chunk, align = ((plan.chunk_v, 128) if plan.impl == 'xla' else
                  (_round_up(plan.chunk_v, plan.block_v), plan.block_v))
  d_h, d_w = _loop_chunks(w.shape[1], chunk, step,
                          (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, w.dtype)), align)
  return d_h[:n, :d], d_w[:d, :p]


def _rows_sweep(h, w, lids, n_valid, sp_ids, ok, plan, axis_name, cotangents=None):
  """CPU, with a vocabulary sweep: blocks of R rows over all P columns, x_RxP computed once.
  Returns the per-token statistics (combined over vocabulary shards) and, given
  cotangents(stats_R, r0, R) -> d objective / d stats_R (per row, so a block's own statistics
  suffice), that objective's (d_h, d_w) in fp32 from the same block: d_h rows written once, d_w
  accumulated over blocks. Three dots per block against the column sweeps' four (their
  backward recomputes x, since a dense cotangent needs the finished logsumexps)."""
  n, p = h.shape[0], w.shape[1]
  w_c = w.astype(plan.cdt)
  h_DxN = _materialized(h.T) if plan.cpu else h.T
  k = lids.shape[1]

  def step(carry, r0, rows):
    stats, d_h_NxD, d_w_DxP = carry
    take = lambda a: lax.dynamic_slice_in_dim(a, r0, rows, 0)  # noqa: E731
    sp_RxJ, ok_RxJ = take(sp_ids), take(ok)
    x_RxP = plan.scale * jnp.dot(take(h), w_c, preferred_element_type=jnp.float32)
    keeps = _xla_keeps(take(lids), n_valid, 0, p, plan)
    x_sp_RxJ = jnp.where(ok_RxJ, jnp.take_along_axis(x_RxP, sp_RxJ, 1), 0.0)
    lses = [_finish(m_R, l_R) for m_R, l_R in
            _online_update(_init_state(rows, plan), x_RxP, keeps, plan)]
    st = _combine(_named_stats(x_sp_RxJ, k, lses, plan), axis_name)
    stats = {name: lax.dynamic_update_slice_in_dim(stats[name], v, r0, 0)
             for name, v in st.items()}
    if cotangents is None:
      return stats, d_h_NxD, d_w_DxP
    g = cotangents(st, r0, rows)
    coefs = [g[name] * (plan.scale / div) for name, div, _ in plan.fams]
    dl_RxP = _dense_dl(x_RxP, keeps, [st[name] for name, _, _ in plan.fams], coefs, plan)
    vals_RxJ = jnp.where(ok_RxJ, plan.scale * _sparse_cotangent(g, plan), 0.0)
    dl_RxP = dl_RxP.at[jnp.arange(rows)[:, None], sp_RxJ].add(vals_RxJ).astype(plan.cdt)
    d_h_RxD = lax.dot_general(dl_RxP, w_c, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    d_w_DxP = d_w_DxP + jnp.dot(lax.dynamic_slice_in_dim(h_DxN, r0, rows, 1), dl_RxP,
                                preferred_element_type=jnp.float32)
    return stats, lax.dynamic_update_slice_in_dim(d_h_NxD, d_h_RxD, r0, 0), d_w_DxP
  shapes = _named_stats(jnp.zeros(sp_ids.shape, jnp.float32), k,
                        [jnp.zeros((n,), jnp.float32)] * len(plan.fams), plan)
  grads = ((jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
           if cotangents is not None else (None, None))
  return _loop_chunks(n, plan.block_rows, step, (shapes, *grads), align=8)


# --- gathered columns: the sparse statistics, and the whole job without a sweep --------------

def _slab_rows(n, j, p, d, cpu):
  """Rows R of w_out per slab of the gathered-column work, a power of two dividing D. CPU: the
  slab [R, P] stays in cache (~1 MiB), since a column gather or scatter touches one cache line
  per row; elsewhere the gathered columns [R, N, J] stay bounded (_GATHER_BYTES)."""
  budget, per_row = (_SLAB_BYTES, 4 * p) if cpu else (_GATHER_BYTES, 4 * n * j)
  return min(1 << max(0, (budget // per_row).bit_length() - 1), d & -d)


def _over_slabs(h, w, ids_NxJ, plan, body, init):
  """body(carry, d0, h[:, d0:d0+R], w[d0:d0+R]) over the slabs of D; h and w are read in place
  (slicing, not reshaping, keeps XLA from copying w into the loop)."""
  d = h.shape[1]
  r = _slab_rows(h.shape[0], ids_NxJ.shape[1], w.shape[1], d, plan.cpu)

  def step(i, carry):
    d0 = i * r
    return body(carry, d0, lax.dynamic_slice_in_dim(h, d0, r, 1),
                lax.dynamic_slice_in_dim(w, d0, r, 0))
  return lax.fori_loop(0, d // r, step, init)


def _columns(w_RxP, ids_NxJ, plan):
  """fp32 w[:, id] [R, N, J], rounded to the compute dtype as the matmuls round it."""
  return jnp.take(w_RxP, ids_NxJ, axis=1).astype(plan.cdt).astype(jnp.float32)


def _gather_x(h, w, ids_NxJ, plan):
  """fp32 x = scale * h . w[:, id] at in-range ids, summed slab by slab over D."""
  def body(x_NxJ, d0, h_NxR, w_RxP):
    return x_NxJ + jnp.einsum('nr,rnj->nj', h_NxR.astype(jnp.float32),
                              _columns(w_RxP, ids_NxJ, plan))
  return plan.scale * _over_slabs(h, w, ids_NxJ, plan, body,
                                  jnp.zeros(ids_NxJ.shape, jnp.float32))


def _scatter_bwd(h, w, ids_NxJ, vals_NxJ, plan):
  """(d_h, d_w fp32) of sum_j vals * (h . w[:, id]), slab by slab over D: gathered columns
  give d_h's columns R, a scatter-add of the updates d_w's rows (an fp32 [D, P] accumulator:
  the output itself for an fp32 w_out)."""
  def body(carry, d0, h_NxR, w_RxP):
    d_h_NxD, d_w_DxP = carry
    d_h_NxR = jnp.einsum('nj,rnj->nr', vals_NxJ, _columns(w_RxP, ids_NxJ, plan))
    upd_RxNxJ = h_NxR.T.astype(jnp.float32)[:, :, None] * vals_NxJ[None]
    d_w_RxP = jnp.zeros(w_RxP.shape, jnp.float32).at[:, ids_NxJ].add(upd_RxNxJ)
    return (lax.dynamic_update_slice_in_dim(d_h_NxD, d_h_NxR, d0, 1),
            lax.dynamic_update_slice_in_dim(d_w_DxP, d_w_RxP, d0, 0))
  init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
  return _over_slabs(h, w, ids_NxJ, plan, body, init)


# --- the statistics with their custom VJP ----------------------------------------------------

def _sparse_ids(lids_NxK, llabels_N, n_valid, plan):
  sp_NxJ = jnp.concatenate([lids_NxK, llabels_N[:, None]], 1) if plan.label else lids_NxK
  ok_NxJ = (sp_NxJ >= 0) & (sp_NxJ < n_valid)
  return jnp.where(ok_NxJ, sp_NxJ, 0), ok_NxJ


def _named_stats(x_sp_NxJ, k, lses, plan):
  """The statistics by name (as losses.topk_kd_per_token takes them): x at the K ids, at the
  label (SFT), and each family's logsumexp."""
  out = dict(zip(_SPARSE, (x_sp_NxJ[:, :k], x_sp_NxJ[:, -1])[:1 + plan.label]))
  out.update({name: lse_N for (name, _, _), lse_N in zip(plan.fams, lses)})
  return out


def _sparse_cotangent(g, plan):
  """[N, J] cotangent of x at the sparse ids (the K, then the label) from the named ones."""
  if not plan.label:
    return g[_SPARSE[0]]
  return jnp.concatenate([g[_SPARSE[0]], g[_SPARSE[1]][:, None]], 1)


def _combine(stats, axis_name):
  """Per-shard statistics -> the full vocabulary's: sparse x psum-ed (0 off-shard), logsumexps
  combined with pmax + psum. Unsharded (axis_name None): unchanged."""
  if axis_name is None:
    return stats
  out = {}
  for name, v_N in stats.items():
    if name in _SPARSE:
      out[name] = lax.psum(v_N, axis_name)
    else:
      m_N = lax.pmax(lax.stop_gradient(v_N), axis_name)
      out[name] = m_N + jnp.log(lax.psum(jnp.exp(v_N - m_N), axis_name))
  return out


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
  sp_NxJ, ok_NxJ = _sparse_ids(lids_NxK, llabels_N, n_valid, plan)
  x_NxJ, lses = (_sweep_fwd(h, w_DxP, lids_NxK, n_valid, sp_NxJ, plan) if plan.fams
                 else (_gather_x(h, w_DxP, sp_NxJ, plan), ()))
  out = _named_stats(jnp.where(ok_NxJ, x_NxJ, 0.0), lids_NxK.shape[1], lses, plan)
  return out, (h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, tuple(lses))


def _bwd(plan, res, g):
  d_h, d_w = _grads(plan, res, g)
  return d_h.astype(res[0].dtype), d_w.astype(res[1].dtype), None, None, None


def _grads(plan, res, g):
  """(d_h fp32, d_w) from the statistics' cotangents g."""
  h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, lses = res
  h = h_NxD.astype(plan.cdt)
  sp_NxJ, ok_NxJ = _sparse_ids(lids_NxK, llabels_N, n_valid, plan)
  vals_NxJ = jnp.where(ok_NxJ, plan.scale * _sparse_cotangent(g, plan), 0.0)
  if plan.fams:
    coefs = [g[name] * (plan.scale / div) for name, div, _ in plan.fams]
    d_h, d_w = _sweep_bwd(h, w_DxP, lids_NxK, n_valid, lses, coefs,
                          jnp.where(ok_NxJ, sp_NxJ, -1), vals_NxJ, plan)
  else:
    d_h, d_w = _scatter_bwd(h, w_DxP, sp_NxJ, vals_NxJ, plan)
  return d_h, d_w


_stats.defvjp(_stats_fwd, _stats_bwd)


# --- the loss: cross-tokenizer ids, vocab-parallel combination, options ---------------------

def _student_topk_ids(h, w, n_valid, offset, k, plan, axis_name):
  """Global ids of the student's own top-K over V (descending; ties to the lower id)."""
  h, w = lax.stop_gradient(h).astype(plan.cdt), lax.stop_gradient(w)
  n = h.shape[0]

  def step(carry, c0, width):
    vals_NxK, ids_NxK = carry
    cols_1xC = c0 + lax.broadcasted_iota(jnp.int32, (1, width), 1)
    x_NxC = jnp.where(cols_1xC < n_valid, _xla_x(h, w, c0, width, plan), -jnp.inf)
    vals_NxK, pos_NxK = lax.top_k(jnp.concatenate([vals_NxK, x_NxC], 1), k)
    cand_NxJ = jnp.concatenate([ids_NxK, jnp.broadcast_to(cols_1xC, (n, width))], 1)
    return vals_NxK, jnp.take_along_axis(cand_NxJ, pos_NxK, 1)
  init = (jnp.full((n, k), -jnp.inf, jnp.float32), jnp.zeros((n, k), jnp.int32))
  vals_NxK, ids_NxK = _loop_chunks(w.shape[1], plan.chunk_v, step, init)
  ids_NxK = ids_NxK + offset
  if axis_name is not None:  # K candidates per shard, never the logits
    vals_NxK = lax.all_gather(vals_NxK, axis_name, axis=1, tiled=True)
    ids_NxK = lax.all_gather(ids_NxK, axis_name, axis=1, tiled=True)
    ids_NxK = jnp.take_along_axis(ids_NxK, lax.top_k(vals_NxK, k)[1], 1)
  return ids_NxK


class _Loss(NamedTuple):
  """Static parts of the loss (the custom_vjp's non-diff argument)."""
  plan: _Plan
  options: tuple  # (name, value) pairs: losses.topk_kd_per_token's options
  axis_name: Any  # the vocabulary's mesh axis, None unsharded


def _objective(options, stats, t_NxK, mask_N, lse_N):
  """(loss, metrics) from the combined statistics; metrics['loss'][0], the weighted loss sum,
  is the objective whose gradient the forward forms."""
  stats = dict(stats)
  topk = stats.pop(_SPARSE[0])
  return losses.topk_kd_from_stats(topk, t_NxK, mask_N, teacher_lse_BxT=lse_N, **stats,
                                   **dict(options))


def _stats_and_grads(ctx, with_grad, plan, h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, t_NxK,
                     mask_N, lse_N):
  """(combined statistics, fp32 d_h, d_w of the weighted loss sum or None): the CPU sweep by
  row blocks (`_rows_sweep`); otherwise the statistics' forward, then their backward with the
  objective's cotangents, run at once (the same sweeps the autodiff of `_stats` runs)."""
  def cotangents(stats, r0, rows):
    take = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, r0, rows, 0)  # noqa
    return jax.grad(lambda st: _objective(ctx.options, st, take(t_NxK), take(mask_N),
                                          take(lse_N))[1]['loss'][0])(stats)
  if plan.impl == 'xla' and plan.fams:
    sp_NxJ, ok_NxJ = _sparse_ids(lids_NxK, llabels_N, n_valid, plan)
    return _rows_sweep(h_NxD.astype(plan.cdt), w_DxP, lids_NxK, n_valid, sp_NxJ, ok_NxJ, plan,
                       ctx.axis_name, cotangents if with_grad else None)
  stats, res = _fwd(plan, h_NxD, w_DxP, lids_NxK, llabels_N, n_valid)
  stats = _combine(stats, ctx.axis_name)
  if not with_grad:
    return stats, None, None
  # The backward sweeps with the combined logsumexps give each shard its share of the dense part.
  res = res[:-1] + (tuple(stats[name] for name, _, _ in plan.fams),)
  d_h, d_w = _grads(plan, res, cotangents(stats, 0, h_NxD.shape[0]))
  return stats, d_h, d_w.astype(jnp.float32)


def _loss_by_stats(ctx, h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, t_NxK, mask_N, lse_N):
  """The same (loss, metrics) through `_stats` and autodiff: any cotangent, any input."""
  stats = _stats(h_NxD, w_DxP, lids_NxK, llabels_N, n_valid, ctx.plan)
  return _objective(ctx.options, _combine(stats, ctx.axis_name), t_NxK, mask_N, lse_N)


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
      scale = lax.psum(scale, ctx.axis_name)  # cotangent (the psum in `_combine` transposes so)
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
  ids = jnp.clip(ids.astype(jnp.int32), 0, plan.vocab_size - 1)  # as take_along_axis 'clip'
  labels = jnp.clip(labels.astype(jnp.int32), 0, plan.vocab_size - 1)
  if cross_tokenizer:
    ids = _student_topk_ids(h, w, n_valid, offset, ids.shape[1], plan, axis_name)
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
                               for x, d in zip(tiles[:5], default_blocks(cdt, w.dtype))]
  if implementation != 'xla':  # the Pallas kernels run (on GPU, for 'auto')
    for name, b in (('block_n', bn), ('block_v', bv), ('block_d', bd)):
      if b < 16 or b & (b - 1):
        raise ValueError(f'{name}={b}: must be a power of two >= 16 (Triton tiles)')
    need = smem_bytes(bn, bv, bd, cdt.itemsize, w.dtype.itemsize, stages)
    if need > SMEM_LIMIT:
      raise ValueError(f'block_n={bn}, block_v={bv}, block_d={bd}, num_stages={stages}: '
                       f'~{need // 1024} KiB of shared memory, over {SMEM_LIMIT // 1024} KiB')
  chunk_v = int(tiles[6] or max(512, _CHUNK_ELEMENTS // n))
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
    no bf16 copy and gets its gradient accumulated in fp32.
  mesh, vocab_axis: vocab-parallel form, w_out's columns split over mesh axis vocab_axis (P
    divisible by its size), all else replicated; per-shard statistics combined by psum/pmax.
  Tiles (Pallas): block_n tokens x block_v columns, dots over block_d slices of D, powers of two
    (defaults for H100 by compute dtype, `default_blocks`; P and D not multiples are padded, a
    copy of w_out); num_splits vocabulary splits of the forward grid (None: ~2 waves of
    programs); chunk_v columns per backward chunk ([N, chunk_v] dlogits is the largest
    temporary). implementation: 'pallas', 'xla' (chunked jnp: with a vocabulary sweep, blocks of
    R rows over all P columns, R = N * chunk_v / P, by default at least 256, and an fp32 [D, P]
    d_w accumulator), or 'auto': 'xla' on CPU, 'pallas' elsewhere (lax.platform_dependent).
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
  loss = functools.partial(_fused_loss, plan=plan, options=options,
                           cross_tokenizer=cross_tokenizer, axis_name=vocab_axis)
  if vocab_axis is None:
    return loss(*args)
  if mesh is None or vocab_axis not in mesh.shape:
    raise ValueError(f'vocab_axis={vocab_axis!r}: needs a mesh with that axis (mesh={mesh})')
  if w_out_DxP.shape[1] % mesh.shape[vocab_axis]:
    raise ValueError(f'w_out_DxP: P={w_out_DxP.shape[1]} not divisible by the '
                     f'{mesh.shape[vocab_axis]} shards of {vocab_axis!r}')
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
