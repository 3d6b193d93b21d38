"""One vocabulary tile of x = scale * hidden @ w_out: the online-logsumexp and dense-cotangent math
that the Pallas kernels and the chunked jnp sweeps (`vocab_sweeps`) share, and the Pallas
kernels (Triton on GPU, interpret mode on CPU) that sweep it for `fused_topk_kd`.

Letters: N tokens, D hidden size, P columns of w_out, K teacher top-K, C columns of a tile or
chunk, S vocabulary splits of the forward grid. The `plan` argument is fused_topk_kd's `_Plan`
(tile sizes, compute dtype, the logsumexp families). The forward kernel streams
vocabulary tiles (each an fp32 accumulation of dots over block_d slices of D) and keeps an online
(max, sum of exp) per token and logsumexp family; its grid is (row blocks, vocabulary splits).
The backward kernel recomputes a chunk's tiles and writes its dense dlogits [N, C].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_NEG = -1e30  # log 0 stand-in, as in jkd.losses
SMEM_LIMIT = 227 * 1024  # H100/H200 shared memory per block
_TARGET_PROGRAMS = 264  # forward grid: ~2 waves over 132 SMs


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


# --- tile math shared by the Pallas kernels and the chunked jnp sweeps -----------------------

def keep_masks(cols_1xC, n_valid, in_k_NxC, plan):
  """Per family, the tile's columns it sums: the vocabulary's, without the K ids for the tail."""
  valid_1xC = cols_1xC < n_valid
  return [valid_1xC & ~in_k_NxC if excl else valid_1xC for _, _, excl in plan.fams]


def init_state(n, plan):
  return tuple((jnp.full((n,), _NEG, jnp.float32), jnp.zeros((n,), jnp.float32))
               for _ in plan.fams)


def online_update(state, x_NxC, keeps, plan):
  """One tile into the running (max, sum of exp) of each logsumexp family."""
  new = []
  for (m_N, l_N), keep_NxC, (_, div, _) in zip(state, keeps, plan.fams):
    xf_NxC = jnp.where(keep_NxC, x_NxC / div if div != 1 else x_NxC, _NEG)
    m_new_N = jnp.maximum(m_N, jnp.max(xf_NxC, axis=1))
    e_NxC = jnp.where(keep_NxC, jnp.exp(xf_NxC - m_new_N[:, None]), 0.0)
    new.append((m_new_N, l_N * jnp.exp(m_N - m_new_N) + jnp.sum(e_NxC, axis=1)))
  return tuple(new)


def finish(m_N, l_N):
  return jnp.where(l_N > 0, m_N + jnp.log(jnp.where(l_N > 0, l_N, 1.0)), _NEG)


def dense_dl(x_NxC, keeps, lses, coefs, plan):
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


def _tile_keep_masks(nvalid_ref, ids_ref, col0, plan):
  cols_1xC = col0 + lax.broadcasted_iota(jnp.int32, (1, plan.block_v), 1)
  in_k_NxC = None
  if ids_ref is not None:  # K compares per element, only for the tail
    in_k_NxC = lax.fori_loop(0, ids_ref.shape[1],
                             lambda k, acc: acc | (ids_ref[:, pl.ds(k, 1)] == cols_1xC),
                             jnp.zeros((ids_ref.shape[0], plan.block_v), jnp.bool_))
  return keep_masks(cols_1xC, nvalid_ref[0], in_k_NxC, plan)


def _fwd_kernel(nvalid_ref, h_ref, w_ref, *refs, plan, tiles_per_split):
  ids_ref, lse_refs = (refs[0], refs[1:]) if plan.tail else (None, refs)
  bv = plan.block_v
  first = pl.program_id(1) * tiles_per_split
  n_tiles = jnp.clip(pl.cdiv(nvalid_ref[0], bv) - first, 0, tiles_per_split)  # skip padding

  def body(j, state):
    col0 = pl.multiple_of((first + j) * bv, bv)
    x_NxC = _tile_x(h_ref, w_ref, col0, plan)
    return online_update(state, x_NxC, _tile_keep_masks(nvalid_ref, ids_ref, col0, plan), plan)
  state = lax.fori_loop(0, n_tiles, body, init_state(h_ref.shape[0], plan))
  for lse_ref, (m_N, l_N) in zip(lse_refs, state):
    lse_ref[...] = finish(m_N, l_N)[None, :]


def _bwd_kernel(c0_ref, nvalid_ref, h_ref, w_ref, *refs, plan):
  ids_ref, refs = (refs[0], refs[1:]) if plan.tail else (None, refs)
  *fam_refs, dl_ref = refs
  col0 = pl.multiple_of(c0_ref[0] + pl.program_id(1) * plan.block_v, plan.block_v)
  x_NxC = _tile_x(h_ref, w_ref, col0, plan)
  dl_NxC = dense_dl(x_NxC, _tile_keep_masks(nvalid_ref, ids_ref, col0, plan),
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


def pallas_sweep_fwd(h, w, lids, n_valid, plan):
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


def pallas_chunk_dl(h, w, lids, n_valid, lses, coefs, c0, width, plan):
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
