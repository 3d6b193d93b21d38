"""The drivers of `fused_topk_kd` on one shard's columns of w_out: the vocabulary sweeps, the
gathered-column work, the statistics by name and their vocab-parallel combination, and the
student's own top-K ids (cross_tokenizer).

Letters as in `fused_topk_kd` (N tokens, D hidden, P columns, K top-K, J sparse ids, C chunk
columns, R rows of a block or slab). Two sweeps:
- by columns, chunks of plan.chunk_v (`sweep_fwd`, `sweep_bwd`): the Pallas kernels of
  `vocab_tiles`, or the same tile math in chunked jnp; the backward recomputes x. The Pallas form
  always, and the xla form when autodiff goes through the statistics' own VJP.
- by rows, blocks of plan.block_rows over all P columns (`rows_sweep`): implementation='xla'
  with a logsumexp family, x computed once per block; with cotangents, d_h and d_w from the same
  block (three dots against the column sweeps' four, an fp32 [D, P] d_w accumulator).
The sparse x (the K ids, the label) come from the chunk or block in memory in the xla sweeps, and
otherwise from gathered columns of w_out (`gather_x`), in slabs of R rows of w_out: R rows of [P]
fit in cache on CPU, the [R, N, J] gathers stay bounded on GPU; gathered once, in the forward
(the backward's exact sparse dlogits start from the forward's x). Without a family (NeMo parity, no
SFT) gathered columns and a scatter-add for d_w (`scatter_bwd`) are the whole job.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jkd.kernels import vocab_tiles as vt

_GATHER_BYTES = 1 << 25  # gathered w_out columns [R, N, J] per slab (GPU)
_SLAB_BYTES = 1 << 20  # w_out rows [R, P] per slab (CPU: a column touches R cache lines)
# Rows of w_out cast per slab for the CPU sweep's d_h dot (fp32 head, bf16 compute; D=512,
# P=32000, N=2048: the op ran 1.5x slower at 8 rows)
_CAST_ROWS = 32
SPARSE = ('student_topk_BxTxK', 'label_logit_BxT')  # the sparse statistics' names


def _round_up(n, m):
  return -(-n // m) * m


def _pad_to(a, axis, size):
  if a.shape[axis] == size:
    return a
  return jnp.pad(a, [(0, size - a.shape[axis]) if i == axis else (0, 0) for i in range(a.ndim)])


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


def _cast_slabs(w, axis, width, step, carry, plan):
  """step(carry, offset, slab of w along axis in the compute dtype): w whole where it is in that
  dtype, else slabs of `width` cast one at a time, so an fp32 master head gets no [D, P] copy."""
  if w.dtype == plan.cdt:
    return step(carry, 0, w)
  return _loop_chunks(w.shape[axis], width, lambda c, o, size: step(
      c, o, lax.dynamic_slice_in_dim(w, o, size, axis).astype(plan.cdt)), carry)


def _xla_x(h, w, c0, width, plan):
  w_DxC = lax.dynamic_slice_in_dim(w, c0, width, axis=1).astype(plan.cdt)
  return plan.scale * jnp.dot(h, w_DxC, preferred_element_type=jnp.float32)


def _xla_keep_masks(lids_NxK, n_valid, c0, width, plan):
  cols_1xC = c0 + lax.broadcasted_iota(jnp.int32, (1, width), 1)
  in_k_NxC = None
  if plan.tail:  # membership by scatter: N*K work instead of K passes over the chunk
    rel_NxK = lids_NxK - c0
    rel_NxK = jnp.where((rel_NxK >= 0) & (rel_NxK < width), rel_NxK, width)
    in_k_NxC = jnp.zeros((lids_NxK.shape[0], width), jnp.bool_).at[
        jnp.arange(lids_NxK.shape[0])[:, None], rel_NxK].set(True, mode='drop')
  return vt.keep_masks(cols_1xC, n_valid, in_k_NxC, plan)


def _padded(plan, h, w, *rows):
  """Kernel operands padded to whole tiles (copies only where a size is not a multiple)."""
  n, d, p = (_round_up(h.shape[0], plan.block_n), _round_up(h.shape[1], plan.block_d),
             _round_up(w.shape[1], plan.block_v))
  return (_pad_to(_pad_to(h, 0, n), 1, d), _pad_to(_pad_to(w, 0, d), 1, p),
          *[_pad_to(r, 0, n) for r in rows])


def sweep_fwd(h, w, lids, n_valid, sp_ids, plan):
  """(x at the sparse ids [N, J], per-family local logsumexps [N])."""
  if plan.impl == 'pallas':
    hp, wp, lidsp = _padded(plan, h, w, lids)
    lses = vt.pallas_sweep_fwd(hp, wp, lidsp, n_valid, plan)
    return gather_x(h, w, sp_ids, plan), [lse_N[:h.shape[0]] for lse_N in lses]

  def step(carry, c0, width):  # the sparse x come from the chunk in memory
    x_sp_NxJ, state = carry
    x_NxC = _xla_x(h, w, c0, width, plan)
    rel_NxJ = sp_ids - c0
    in_c_NxJ = (rel_NxJ >= 0) & (rel_NxJ < width)
    x_sp_NxJ += jnp.where(in_c_NxJ, jnp.take_along_axis(x_NxC, rel_NxJ, 1, mode='clip'), 0.0)
    keeps = _xla_keep_masks(lids, n_valid, c0, width, plan)
    return x_sp_NxJ, vt.online_update(state, x_NxC, keeps, plan)
  init = (jnp.zeros(sp_ids.shape, jnp.float32), vt.init_state(h.shape[0], plan))
  x_sp_NxJ, state = _loop_chunks(w.shape[1], plan.chunk_v, step, init)
  return x_sp_NxJ, [vt.finish(m_N, l_N) for m_N, l_N in state]


def sweep_bwd(h, w, lids, n_valid, lses, coefs, sp_ids, sp_vals, x_sp_NxJ, plan):
  """(d_h fp32 [N, D], d_w [D, P]): per vocabulary chunk, dense dlogits (kernel or jnp) plus
  the sparse terms scattered in; d_h += dl @ w_c^T, d_w[:, chunk] = h^T @ dl. x_sp_NxJ: the
  forward's x at the sparse ids (the Pallas form's exact sparse dlogits start from it)."""
  n, d, p = h.shape[0], h.shape[1], w.shape[1]
  if plan.impl == 'pallas':
    h, w, lids, sp_ids, sp_vals, x_sp_NxJ, *fam = _padded(plan, h, w, lids, sp_ids, sp_vals,
                                                          x_sp_NxJ, *lses, *coefs)
    lses, coefs = fam[:len(lses)], fam[len(lses):]
  rows_Nx1 = jnp.arange(h.shape[0])[:, None]
  h_DxN = _materialized(h.T) if plan.cpu else h.T
  if plan.impl == 'pallas':
    exact_NxJ = _sparse_dl(x_sp_NxJ, lids, n_valid, lses, coefs, sp_ids, sp_vals, plan)

  def step(carry, c0, width):
    d_h_NxD, d_w_DxP = carry
    rel_NxJ = sp_ids - c0
    rel_NxJ = jnp.where((rel_NxJ >= 0) & (rel_NxJ < width), rel_NxJ, width)
    if plan.impl == 'pallas':  # the kernel's dlogits (compute dtype), the sparse columns set
      dl_NxC = vt.pallas_chunk_dl(h, w, lids, n_valid, lses, coefs, jnp.asarray(c0, jnp.int32),
                                  width, plan)
      dl_NxC = dl_NxC.at[rows_Nx1, rel_NxJ].set(exact_NxJ, mode='drop')
    else:  # fp32 until the sparse terms are in (see _sparse_dl; and XLA:CPU scatters bf16 in
      # fp32 and then feeds the dots below fp32 operands, at half the speed of its bf16 ones)
      keeps = _xla_keep_masks(lids, n_valid, c0, width, plan)
      dl_NxC = vt.dense_dl(_xla_x(h, w, c0, width, plan), keeps, lses, coefs, plan)
      dl_NxC = dl_NxC.at[rows_Nx1, rel_NxJ].add(sp_vals, mode='drop').astype(plan.cdt)
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


def _sparse_dl(x_NxJ, lids, n_valid, lses, coefs, sp_ids, sp_vals, plan):
  """dlogits at the sparse columns [N, J] (compute dtype) from x there (the forward's): their
  dense part and every sparse value at that column (the K ids, the label), summed in fp32 before
  one rounding. The kernel's dlogits are rounded to the compute dtype first, and a sparse value
  added to them there would lose what they cancel to: a confident label's p - 1 is below bf16's
  resolution of p, as is a converged student's q - p at the teacher's ids (full-vocabulary
  forms)."""
  ok_NxJ = sp_ids >= 0  # -1: none (off this shard's columns, or masked)
  in_k_NxJ = (sp_ids[:, :, None] == lids[:, None, :]).any(-1) if plan.tail else None
  keeps = vt.keep_masks(jnp.where(ok_NxJ, sp_ids, n_valid), n_valid, in_k_NxJ, plan)
  same_NxJxJ = sp_ids[:, :, None] == sp_ids[:, None, :]  # a column named twice sums both
  total_NxJ = jnp.einsum('nij,nj->ni', same_NxJxJ.astype(jnp.float32), sp_vals)
  return (vt.dense_dl(x_NxJ, keeps, lses, coefs, plan) + total_NxJ).astype(plan.cdt)


def rows_sweep(h, w, lids, n_valid, sp_ids, ok, plan, axis_name, cotangents=None):
  """CPU, with a vocabulary sweep: blocks of R rows over all P columns, x_RxP computed once.
  Returns the per-token statistics (combined over vocabulary shards) and, given
  cotangents(stats_R, r0, R) -> d objective / d stats_R (per row, so a block's own statistics
  suffice), that objective's (d_h fp32, d_w in w's dtype) from the same block: d_h rows written
  once, d_w accumulated over blocks in fp32 and cast once. Three dots per block against the
  column sweeps' four (their backward recomputes x, since a dense cotangent needs the finished
  logsumexps); the two with w run over its `_cast_slabs`."""
  n, p = h.shape[0], w.shape[1]
  h_DxN = _materialized(h.T) if plan.cpu else h.T
  k = lids.shape[1]

  def step(carry, r0, rows):
    stats, d_h_NxD, d_w_DxP = carry
    take = lambda a: lax.dynamic_slice_in_dim(a, r0, rows, 0)  # noqa: E731
    sp_RxJ, ok_RxJ, h_RxD = take(sp_ids), take(ok), take(h)

    def x_slab(x_RxP, c0, w_DxC):
      x_RxC = jnp.dot(h_RxD, w_DxC, preferred_element_type=jnp.float32)
      return lax.dynamic_update_slice_in_dim(x_RxP, x_RxC, c0, axis=1)
    x_RxP = plan.scale * _cast_slabs(w, 1, plan.chunk_v, x_slab,
                                     jnp.zeros((rows, p), jnp.float32), plan)
    keeps = _xla_keep_masks(take(lids), n_valid, 0, p, plan)
    x_sp_RxJ = jnp.where(ok_RxJ, jnp.take_along_axis(x_RxP, sp_RxJ, 1), 0.0)
    lses = [vt.finish(m_R, l_R) for m_R, l_R in
            vt.online_update(vt.init_state(rows, plan), x_RxP, keeps, plan)]
    st = combine(named_stats(x_sp_RxJ, k, lses, plan), axis_name)
    stats = {name: lax.dynamic_update_slice_in_dim(stats[name], v, r0, 0)
             for name, v in st.items()}
    if cotangents is None:
      return stats, d_h_NxD, d_w_DxP
    g = cotangents(st, r0, rows)
    coefs = [g[name] * (plan.scale / div) for name, div, _ in plan.fams]
    dl_RxP = vt.dense_dl(x_RxP, keeps, [st[name] for name, _, _ in plan.fams], coefs, plan)
    vals_RxJ = jnp.where(ok_RxJ, plan.scale * sparse_cotangent(g, plan), 0.0)
    dl_RxP = dl_RxP.at[jnp.arange(rows)[:, None], sp_RxJ].add(vals_RxJ).astype(plan.cdt)

    def d_h_slab(d_h_RxD, d0, w_SxP):  # slabs of w's rows: dl_RxP is read whole, not sliced
      d_h_RxS = lax.dot_general(dl_RxP, w_SxP, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
      return lax.dynamic_update_slice_in_dim(d_h_RxD, d_h_RxS, d0, axis=1)
    d_h_RxD = _cast_slabs(w, 0, _CAST_ROWS, d_h_slab, jnp.zeros((rows, h.shape[1]), jnp.float32),
                          plan)
    d_w_DxP = d_w_DxP + jnp.dot(lax.dynamic_slice_in_dim(h_DxN, r0, rows, 1), dl_RxP,
                                preferred_element_type=jnp.float32)
    return stats, lax.dynamic_update_slice_in_dim(d_h_NxD, d_h_RxD, r0, 0), d_w_DxP
  shapes = named_stats(jnp.zeros(sp_ids.shape, jnp.float32), k,
                       [jnp.zeros((n,), jnp.float32)] * len(plan.fams), plan)
  grads = ((jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
           if cotangents is not None else (None, None))
  stats, d_h, d_w = _loop_chunks(n, plan.block_rows, step, (shapes, *grads), align=8)
  return stats, d_h, None if d_w is None else d_w.astype(w.dtype)


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


def gather_x(h, w, ids_NxJ, plan):
  """fp32 x = scale * h . w[:, id] at in-range ids, summed slab by slab over D."""
  def body(x_NxJ, d0, h_NxR, w_RxP):
    return x_NxJ + jnp.einsum('nr,rnj->nj', h_NxR.astype(jnp.float32),
                              _columns(w_RxP, ids_NxJ, plan))
  return plan.scale * _over_slabs(h, w, ids_NxJ, plan, body,
                                  jnp.zeros(ids_NxJ.shape, jnp.float32))


def scatter_bwd(h, w, ids_NxJ, vals_NxJ, plan):
  """(d_h fp32, d_w in w's dtype) of sum_j vals * (h . w[:, id]), slab by slab over D: gathered
  columns give d_h's columns R, a scatter-add of the updates d_w's rows (in fp32, a slab's rows
  complete, then cast)."""
  def body(carry, d0, h_NxR, w_RxP):
    d_h_NxD, d_w_DxP = carry
    d_h_NxR = jnp.einsum('nj,rnj->nr', vals_NxJ, _columns(w_RxP, ids_NxJ, plan))
    upd_RxNxJ = h_NxR.T.astype(jnp.float32)[:, :, None] * vals_NxJ[None]
    d_w_RxP = jnp.zeros(w_RxP.shape, jnp.float32).at[:, ids_NxJ].add(upd_RxNxJ)
    return (lax.dynamic_update_slice_in_dim(d_h_NxD, d_h_NxR, d0, 1),
            lax.dynamic_update_slice_in_dim(d_w_DxP, d_w_RxP.astype(w.dtype), d0, 0))
  init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
  return _over_slabs(h, w, ids_NxJ, plan, body, init)


# --- the statistics by name, and their combination over vocabulary shards --------------------

def sparse_ids(lids_NxK, llabels_N, n_valid, plan):
  """([N, J] local ids: the K, then the label with SFT; 0 where off this shard's columns, and
  that mask)."""
  sp_NxJ = jnp.concatenate([lids_NxK, llabels_N[:, None]], 1) if plan.label else lids_NxK
  ok_NxJ = (sp_NxJ >= 0) & (sp_NxJ < n_valid)
  return jnp.where(ok_NxJ, sp_NxJ, 0), ok_NxJ


def named_stats(x_sp_NxJ, k, lses, plan):
  """The statistics by name (as losses.topk_kd_per_token takes them): x at the K ids, at the
  label (SFT), and each family's logsumexp."""
  out = dict(zip(SPARSE, (x_sp_NxJ[:, :k], x_sp_NxJ[:, -1])[:1 + plan.label]))
  out.update({name: lse_N for (name, _, _), lse_N in zip(plan.fams, lses)})
  return out


def sparse_cotangent(g, plan):
  """[N, J] cotangent of x at the sparse ids (the K, then the label) from the named ones."""
  if not plan.label:
    return g[SPARSE[0]]
  return jnp.concatenate([g[SPARSE[0]], g[SPARSE[1]][:, None]], 1)


def combine(stats, axis_name):
  """Per-shard statistics -> the full vocabulary's: sparse x psum-ed (0 off-shard), logsumexps
  combined with pmax + psum. Unsharded (axis_name None): unchanged."""
  if axis_name is None:
    return stats
  out = {}
  for name, v_N in stats.items():
    if name in SPARSE:
      out[name] = lax.psum(v_N, axis_name)
    else:
      m_N = lax.pmax(lax.stop_gradient(v_N), axis_name)
      out[name] = m_N + jnp.log(lax.psum(jnp.exp(v_N - m_N), axis_name))
  return out


# --- cross-tokenizer: the student's own top-K ids --------------------------------------------

def student_topk_ids(h, w, n_valid, offset, k, plan, axis_name):
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
