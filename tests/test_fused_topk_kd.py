"""jkd.kernels.fused_topk_kd against its full-logits oracle (`topk_kd_loss(h @ w)`), in value, in
metrics and in both gradients, for every loss mode; the Pallas kernels run in interpret mode
(implementation='pallas'; the default, 'auto', takes the chunked jnp sweeps on CPU).

Shapes are chosen so nothing is a multiple of a tile: N=37 tokens (block_n 16), D=40 (block_d
16), P=300 stored columns of which V=290 are vocabulary (block_v 32, padding excluded), backward
chunks of 96 columns with a remainder, three forward vocabulary splits of unequal length.
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from jkd import sharding
from jkd.kernels import fused_topk_kd as fk
from jkd.kernels import vocab_sweeps as vs
from jkd.kernels import vocab_tiles as vt
from tests import hlo

N, D, P, V, K = 37, 40, 300, 290, 6
TILES = dict(block_n=16, block_v=32, block_d=16, chunk_v=96, num_splits=3,
             implementation='pallas')


def make_batch(seed=0, *, n=N, d=D, p=P, v=V, k=K, mask='random'):
  """Teacher record as stored (descending max-shifted top-K, ids, lse) + student h, w.

  Row 1 is a NeMo padding position (mask 0, the eos id repeated K times, logits 0, a label
  out of range): it must not change anything.
  """
  rng = np.random.default_rng(seed)
  zt = (rng.normal(size=(n, v)) * 3).astype(np.float32)
  zt -= zt.max(-1, keepdims=True)
  ids = np.argsort(-zt, axis=-1, kind='stable')[:, :k].astype(np.int32)
  t = np.take_along_axis(zt, ids, -1)
  lse = np.log(np.exp(zt.astype(np.float64)).sum(-1)).astype(np.float32)
  labels = rng.integers(0, v, n).astype(np.int32)
  m = rng.integers(0, 2, n).astype(np.int32) if mask == 'random' else np.zeros(n, np.int32)
  if mask == 'random':
    m[0] = 1
  m[1], ids[1], t[1], labels[1] = 0, 2, 0.0, v + 7
  return dict(h=rng.normal(size=(n, d)).astype(np.float32),
              w=(rng.normal(size=(d, p)) * 3 / np.sqrt(d)).astype(np.float32),
              ids=ids, t=t, labels=labels, mask=m, lse=lse)


def value_and_grads(fn, b, *, h=None, w=None, vocab_size=V, **kw):
  """(loss, metric sums, d_h, d_w) of fn, jitted."""
  def f(h, w):
    loss, metrics = fn(h, w, b['ids'], b['t'], b['labels'], b['mask'], teacher_lse_N=b['lse'],
                       vocab_size=vocab_size, **kw)
    return loss, {n: s for n, (s, _) in metrics.items()}
  (loss, sums), (d_h, d_w) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
      b['h'] if h is None else h, b['w'] if w is None else w)
  return loss, sums, d_h, d_w


def assert_close(got, want, rtol):
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
    np.testing.assert_allclose(g, e, rtol=rtol, atol=rtol * np.abs(e).max(initial=1e-6))


MODES = {
    'parity_fwd_kl': dict(),
    'parity_bwd_kl_scaled': dict(kd_loss='bwd_kl', logits_scale=1.7, target_logits_scale=0.8,
                                 kd_loss_weight=0.6),
    'fwd_kl_sft': dict(sft_loss_weight=0.5),
    'bwd_kl_sft_scaled': dict(kd_loss='bwd_kl', sft_loss_weight=1.0, logits_scale=1.3),
    'sft_only': dict(kd_loss_weight=0.0, sft_loss_weight=1.0),
    'jsd_sft': dict(kd_loss='jsd', beta=0.3, sft_loss_weight=0.2),
    'jsd_temperature': dict(kd_loss='jsd', temperature=1.5),
    'tail_fwd_kl_sft': dict(tail=True, sft_loss_weight=0.3, logits_scale=1.2),
    'tail_bwd_kl': dict(tail=True, kd_loss='bwd_kl'),
    'full_norm': dict(student_norm='full'),
    'full_norm_temperature_sft': dict(student_norm='full', temperature=2.0, sft_loss_weight=0.3,
                                      logits_scale=0.9),
    'cross_tokenizer_sft': dict(cross_tokenizer=True, sft_loss_weight=0.2),
    'cross_tokenizer_tail': dict(cross_tokenizer=True, tail=True),
}


@pytest.mark.parametrize('mode', MODES)
def test_pallas_matches_full_logits(mode):
  """The Pallas path (interpret mode on CPU) equals the oracle, every mode."""
  b = make_batch(1)
  want = value_and_grads(fk.fused_topk_kd_reference, b, **MODES[mode])
  got = value_and_grads(fk.fused_topk_kd, b, **TILES, **MODES[mode])
  assert_close(got, want, 2e-5)


@pytest.mark.parametrize('mode', ['fwd_kl_sft', 'tail_bwd_kl', 'full_norm_temperature_sft',
                                  'cross_tokenizer_sft'])
def test_xla_implementation_matches_full_logits(mode):
  """The chunked-jnp fallback (same sweeps, no Pallas) equals the oracle."""
  b = make_batch(2)
  want = value_and_grads(fk.fused_topk_kd_reference, b, **MODES[mode])
  got = value_and_grads(fk.fused_topk_kd, b, implementation='xla', chunk_v=96, **MODES[mode])
  assert_close(got, want, 2e-5)


def test_empty_mask_gives_zero_loss_and_gradients():
  """NeMo's reduction with no masked-in token: loss 0, gradients 0, no NaN from padding rows."""
  b = make_batch(3, mask='zeros')
  loss, _, d_h, d_w = value_and_grads(fk.fused_topk_kd, b, **TILES, tail=True,
                                      sft_loss_weight=1.0)
  assert float(loss) == 0.0
  assert not np.any(np.asarray(d_h)) and not np.any(np.asarray(d_w))


@pytest.mark.parametrize('impl', [dict(implementation='pallas'),
                                  dict(implementation='xla', chunk_v=96)])
@pytest.mark.parametrize('w_dtype', [jnp.bfloat16, jnp.float32])
def test_bf16_compute(w_dtype, impl):
  """bf16 matmuls (fp32 accumulation) with a bf16 head, or an fp32 master head cast tile by
  tile (its gradient stays fp32): close to the oracle computing in bf16 too. The xla form casts
  the fp32 head by slabs of 96 columns and of 32 rows, both with a remainder."""
  b = make_batch(4)
  h, w = jnp.asarray(b['h'], jnp.bfloat16), jnp.asarray(b['w'], w_dtype)
  for opts in (dict(sft_loss_weight=0.5), dict(tail=True), dict()):
    kw = dict(h=h, w=w, compute_dtype=jnp.bfloat16, **opts)
    want = value_and_grads(fk.fused_topk_kd_reference, b, **kw)
    got = value_and_grads(fk.fused_topk_kd, b, **impl, **kw)
    assert got[2].dtype == jnp.bfloat16 and got[3].dtype == w_dtype
    assert_close(got, want, 2e-2)


def test_bf16_backward_keeps_a_confident_tokens_label_gradient():
  """bf16 compute, SFT on tokens the student already predicts with 1 - p in (1e-4, 3e-3):
  the label's gradient p - 1 is below bf16's resolution of p, so the sparse terms join the
  dense dlogits in fp32, in the Pallas kernel as in the jnp sweep. Each such row's d_h stays
  within 5% of the fp32 computation on the same bf16 operands (adding them after the kernel's
  bf16 cast lost most of it: 73-89% error). Closer to 1 (1 - p ~ 1e-6), the fp32 logsumexp's
  own resolution limits the fused op in fp32 too, as it does any softmax formed from it."""
  b = make_batch(9)
  b['mask'][:] = 1
  h, w = jnp.asarray(b['h'] * 6, jnp.bfloat16), jnp.asarray(b['w'], jnp.bfloat16)
  x = np.asarray(jnp.dot(h, w, preferred_element_type=jnp.float32), np.float64)[:, :V]
  b['labels'] = x.argmax(1).astype(np.int32)
  gap = 1 - 1 / np.exp(x - x.max(1, keepdims=True)).sum(1)  # 1 - p of the label
  confident = (gap > 1e-4) & (gap < 3e-3)
  assert confident.sum() >= 5
  opts = dict(sft_loss_weight=1.0, kd_loss_weight=0.0)
  want = np.asarray(value_and_grads(fk.fused_topk_kd_reference, b, h=h.astype(jnp.float32),
                                    w=w.astype(jnp.float32), **opts)[2], np.float64)
  for impl in (TILES, dict(implementation='xla', chunk_v=96)):
    got = value_and_grads(fk.fused_topk_kd, b, h=h, w=w, compute_dtype=jnp.bfloat16, **impl,
                          **opts)[2]
    err = (np.linalg.norm(np.asarray(got, np.float64) - want, axis=1)
           / np.linalg.norm(want, axis=1))
    assert err[confident].max() < 0.05, (impl['implementation'], err[confident])


def _largest_intermediate(jaxpr):
  """(largest array size among all equations, number of pallas_calls), sub-jaxprs included."""
  big, calls = 0, 0
  for eqn in jaxpr.eqns:
    calls += eqn.primitive.name == 'pallas_call'
    for var in eqn.outvars:
      big = max(big, int(np.prod(getattr(var.aval, 'shape', ()))))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      b, c = _largest_intermediate(sub)
      big, calls = max(big, b), calls + c
  return big, calls


@pytest.mark.parametrize('mode,sweeps', [('parity_fwd_kl', False), ('jsd_temperature', False),
                                         ('fwd_kl_sft', True), ('tail_bwd_kl', True)])
def test_no_token_by_vocab_array(mode, sweeps):
  """No [N, V]-sized array anywhere in forward + backward; the parity modes without SFT have no
  vocabulary sweep at all (gathered columns only), the others run the kernels."""
  n = 70  # N * V > D * P (the head and its gradient) and > the gathered columns [D, N, K]
  b = make_batch(5, n=n, d=24)
  def f(h, w):
    return fk.fused_topk_kd(h, w, b['ids'], b['t'], b['labels'], b['mask'],
                            teacher_lse_N=b['lse'], vocab_size=V, **TILES, **MODES[mode])[0]
  jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(b['h'], b['w']).jaxpr
  big, calls = _largest_intermediate(jaxpr)
  assert big < n * V
  assert (calls > 0) == sweeps


def test_auto_takes_xla_on_cpu_and_pallas_elsewhere():
  """implementation='auto' resolves per platform at lowering: 'xla' for cpu (Pallas would only
  interpret), 'pallas' for cuda; on CPU it computes exactly what 'xla' computes."""
  plan = fk._Plan(V, 1.0, (), False, jnp.dtype(jnp.float32), 16, 32, 16, 4, 3, None, 96, 'auto',
                 None)
  def probe():
    return fk._on_platform(lambda p: jnp.int32(fk.IMPLEMENTATIONS.index(p.impl) + 10 * p.cpu),
                           plan)
  assert int(jax.jit(probe)()) == fk.IMPLEMENTATIONS.index('xla') + 10
  cuda = jax.jit(probe).trace().lower(lowering_platforms=('cuda',)).as_text()
  assert f'constant dense<{fk.IMPLEMENTATIONS.index("pallas")}>' in cuda
  b = make_batch(10)
  for mode in ('fwd_kl_sft', 'parity_fwd_kl'):
    auto = value_and_grads(fk.fused_topk_kd, b, chunk_v=96, **MODES[mode])
    xla = value_and_grads(fk.fused_topk_kd, b, chunk_v=96, implementation='xla', **MODES[mode])
    for a, x in zip(jax.tree.leaves(auto), jax.tree.leaves(xla)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(x))


def test_slab_rows():
  """Rows of w_out per slab of the gathered-column work: ~1 MiB of [R, P] on CPU, [R, N, J]
  gathers bounded elsewhere; a power of two dividing D, at least 1."""
  assert vs._slab_rows(1024, 100, 32000, 512, cpu=True) == 8
  assert vs._slab_rows(4096, 101, 256000, 2048, cpu=True) == 1
  assert vs._slab_rows(4096, 101, 256000, 2048, cpu=False) == 16
  assert vs._slab_rows(4096, 101, 256000, 40, cpu=False) == 8
  assert vs._slab_rows(1 << 20, 101, 32000, 2048, cpu=False) == 1


@pytest.mark.parametrize('n,p,chunk_v,rows', [
    (2048, 32000, None, 524),  # [R, P] of the default 2^24 elements
    (2048, 256000, None, 256),  # at least 256 rows: d_w's dot contracts over them
    (100, 256000, None, 100),  # at most N
    (37, 300, 96, 11),  # an explicit chunk_v: its [N, chunk_v] elements exactly
])
def test_cpu_sweep_block_rows(n, p, chunk_v, rows):
  sd = jax.ShapeDtypeStruct
  plan = fk._make_plan(
      sd((n, 8), jnp.float32), sd((8, p), jnp.float32), sd((n, 4), jnp.int32),
      sd((n, 4), jnp.float32), sd((n,), jnp.int32), sd((n,), jnp.int32), None, vocab_size=None,
      options=dict(kd_loss='fwd_kl', kd_loss_weight=1.0, sft_loss_weight=0.4,
                   target_logits_scale=1.0, tail=False, student_norm=None, beta=0.5,
                   temperature=1.0),
      logits_scale=1.0, compute_dtype=None, tiles=(None,) * 6 + (chunk_v,),
      implementation='xla', interpret=None)
  assert plan.block_rows == rows


@pytest.mark.parametrize('n_cols,width,align,chunks', [
    (32000, 8192, 128, [6400] * 5),  # narrowed to a divisor: one loop body
    (256000, 8192, 128, [6400] * 40),
    (300, 96, 32, [96, 96, 96, 12]),  # no multiple of 32 in (48, 96] divides 300
    (290, 96, 128, [96, 96, 96, 2]),  # width below align: kept
    (60, 96, 128, [60]),
    (4096, 1024, 256, [1024] * 4),
])
def test_loop_chunks_cover_every_column_once(n_cols, width, align, chunks):
  """_loop_chunks visits [0, n_cols) once, in chunks of the width it picks: the widest multiple
  of `align` in (width / 2, width] that divides n_cols, else whole chunks and a remainder."""
  seen = []
  def step(count_C, c0, w):
    seen.append(w)
    return lax.dynamic_update_slice_in_dim(
        count_C, lax.dynamic_slice_in_dim(count_C, c0, w) + 1, c0, 0)
  count = jax.jit(lambda c: vs._loop_chunks(n_cols, width, step, c, align))(
      jnp.zeros(n_cols, jnp.int32))
  np.testing.assert_array_equal(count, np.ones(n_cols, np.int32))
  assert sum(chunks) == n_cols  # the table's own check
  # step is traced once for the loop body, and once more for a remainder
  assert seen == chunks[:1] + ([chunks[-1]] if chunks[-1] != chunks[0] else [])


def test_cpu_bf16_backward_runs_bf16_dots():
  """With compute_dtype=bf16 and a vocabulary that whole chunks cover, every dot of the
  compiled CPU forward + backward takes bf16 operands. XLA:CPU had upcast to fp32 (half the
  speed of its bf16 kernels) the d_h dot, whose w_out chunk came transposed, and both backward
  dots of the remainder chunk; it still does so for the d_w dot of a remainder chunk."""
  n, d, p, k = 512, 256, 5120, 16  # chunk_v 2048 narrows to 1280 x 4: no remainder
  sd = jax.ShapeDtypeStruct
  args = (sd((n, d), jnp.bfloat16), sd((d, p), jnp.float32), sd((n, k), jnp.int32),
          sd((n, k), jnp.float32), sd((n,), jnp.int32), sd((n,), jnp.int32))
  def f(h, w, ids, t, labels, mask):
    return fk.fused_topk_kd(h, w, ids, t, labels, mask, compute_dtype=jnp.bfloat16,
                            chunk_v=2048, **MODES['fwd_kl_sft'])[0]
  dots = hlo.dot_dtypes(jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().as_text())
  assert len(dots) >= 3 and all(x[:2] == ('bf16', 'bf16') for x in dots), dots


@pytest.mark.parametrize('impl,mode', [('xla', 'fwd_kl_sft'), ('xla', 'tail_bwd_kl'),
                                       ('xla', 'parity_fwd_kl'), ('pallas', 'jsd_sft')])
def test_other_cotangents_take_autodiff_through_the_statistics(impl, mode):
  """The gradient formed in the forward serves the loss and the weighted loss sum; a cotangent
  on the kd_loss or sft_loss sums, or a differentiated mask (per-token weights), takes autodiff
  through the statistics' VJP instead. Both equal the oracle."""
  b = make_batch(12)
  mask_w = np.asarray(b['mask'], np.float32) * np.linspace(0.5, 1.0, N, dtype=np.float32)

  def objective(fn, **kw):
    def f(h, w, m):
      loss, mt = fn(h, w, b['ids'], b['t'], b['labels'], m, teacher_lse_N=b['lse'],
                    vocab_size=V, **kw)
      return loss + 0.3 * mt['kd_loss'][0] + 0.7 * mt['sft_loss'][0] - 0.2 * mt['loss'][0]
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(b['h'], b['w'], mask_w)
  kw = dict(MODES[mode], **(TILES if impl == 'pallas' else dict(implementation=impl)))
  kw.update(chunk_v=96)
  want = objective(fk.fused_topk_kd_reference, **MODES[mode])
  assert_close(objective(fk.fused_topk_kd, **kw), want, 2e-5)

  def kd_sum(fn, **kw):  # the integer 0/1 mask as stored: no cotangent of its own
    return jax.jit(jax.grad(lambda h, w: fn(h, w, b['ids'], b['t'], b['labels'], b['mask'],
                                            teacher_lse_N=b['lse'], vocab_size=V,
                                            **kw)[1]['kd_loss'][0], argnums=(0, 1)))(b['h'], b['w'])
  assert_close(kd_sum(fk.fused_topk_kd, **kw), kd_sum(fk.fused_topk_kd_reference, **MODES[mode]),
               2e-5)


@pytest.mark.parametrize('impl', ['xla', 'pallas'])
def test_loss_gradient_is_formed_in_the_forward(monkeypatch, devices8, impl):
  """Differentiating the loss, the weighted loss sum (as train.py) or both, unsharded and
  vocab-parallel, scales the gradient formed in the forward, to the oracle's gradient: autodiff
  through the statistics (`_loss_by_stats`) is never traced."""
  def fail(*a, **k):
    raise AssertionError('the backward took autodiff through the statistics')
  monkeypatch.setattr(fk, '_loss_by_stats', fail)
  b = make_batch(13, p=320)
  mesh = sharding.make_mesh(('data', 'fsdp', 'tensor'), (2, 1, 4), devices8)

  def grads(fn, a, c, **kw):  # d (a * loss + c * weighted loss sum) / d (h, w)
    def f(h, w):
      loss, metrics = fn(h, w, b['ids'], b['t'], b['labels'], b['mask'], teacher_lse_N=b['lse'],
                         vocab_size=V, **kw)
      return a * loss + c * metrics['loss'][0]
    return jax.jit(jax.grad(f, argnums=(0, 1)))(b['h'], b['w'])
  for sharded in ({}, dict(mesh=mesh, vocab_axis='tensor')):
    kw = dict(TILES, implementation=impl, **MODES['fwd_kl_sft'], **sharded)
    for a, c in ((1.0, 0.0), (0.0, 1.0), (1.0, 0.5)):
      assert_close(grads(fk.fused_topk_kd, a, c, **kw),
                   grads(fk.fused_topk_kd_reference, a, c, **MODES['fwd_kl_sft']), 2e-5)


def test_row_blocks_run_three_dots():
  """The CPU sweep (xla with SFT) runs three dots per row block, x = h_R @ w, d_h and d_w, and
  none more for the backward: the column sweeps ran four (their backward recomputed x)."""
  n, d, p, k = 512, 256, 5120, 16  # chunk_v 2048: blocks of 128 rows, one loop body
  sd = jax.ShapeDtypeStruct
  args = (sd((n, d), jnp.float32), sd((d, p), jnp.float32), sd((n, k), jnp.int32),
          sd((n, k), jnp.float32), sd((n,), jnp.int32), sd((n,), jnp.int32))
  def f(h, w, ids, t, labels, mask):
    return fk.fused_topk_kd(h, w, ids, t, labels, mask, chunk_v=2048, implementation='xla',
                            **MODES['fwd_kl_sft'])[0]
  text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().as_text()
  assert len(hlo.dot_dtypes(text)) == 3


def _column_gathers(jaxpr):
  """Gathers of w_out columns ([R, P] -> [R, N, J], `vs.gather_x`) in a jaxpr and its
  sub-jaxprs (loop bodies, platform branches)."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'gather':
      count += eqn.invars[0].aval.ndim == 2 and eqn.outvars[0].aval.ndim == 3
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          count += _column_gathers(sub)
  return count


@pytest.mark.parametrize('mode', ['fwd_kl_sft', 'tail_bwd_kl'])
def test_pallas_backward_reuses_the_forwards_sparse_x(mode):
  """The Pallas path gathers w_out's columns at the sparse ids in the forward only: the
  gradient's trace holds as many column gathers as the loss's alone (the backward's exact
  sparse dlogits start from the forward's x, a [N, J] residual)."""
  b = make_batch(3)

  def f(h, w):
    return fk.fused_topk_kd(h, w, b['ids'], b['t'], b['labels'], b['mask'],
                            teacher_lse_N=b['lse'], vocab_size=V, **TILES, **MODES[mode])[0]
  value_only = _column_gathers(jax.make_jaxpr(f)(b['h'], b['w']).jaxpr)
  assert value_only > 0
  assert _column_gathers(jax.make_jaxpr(jax.grad(f, (0, 1)))(b['h'], b['w']).jaxpr) == value_only


@pytest.mark.parametrize('slab_bytes', [1, 4 * 4 * P, 1 << 30])
@pytest.mark.parametrize('mode', ['parity_fwd_kl', 'jsd_temperature', 'cross_tokenizer_tail'])
def test_gathered_columns_any_slab(monkeypatch, slab_bytes, mode):
  """The gathered-column statistics and their backward (gathers for d_h, a scatter-add for d_w)
  equal the oracle for slabs of 1, 4 and 8 rows (the largest power of two dividing D=40)."""
  monkeypatch.setattr(vs, '_SLAB_BYTES', slab_bytes)
  b = make_batch(11)
  want = value_and_grads(fk.fused_topk_kd_reference, b, **MODES[mode])
  assert_close(value_and_grads(fk.fused_topk_kd, b, chunk_v=96, **MODES[mode]), want, 2e-5)


@pytest.mark.parametrize('impl,mode,cdt', [
    ('xla', 'parity_fwd_kl', None), ('pallas', 'fwd_kl_sft', None),
    ('xla', 'tail_fwd_kl_sft', None),
    ('xla', 'fwd_kl_sft', jnp.bfloat16),  # the fp32 head cast to bf16 slab by slab
])
def test_temp_memory_holds_no_copy_of_the_head(impl, mode, cdt):
  """XLA's temp bytes of forward + backward (compiled for CPU) hold no [D, P] copy of w_out:
  loops slice the head in place (a reshaped head as loop input got copied). The column sweeps
  write d_w chunk by chunk into the gradient itself: well under one [D, P] fp32. The row-block
  sweep (xla with a vocabulary sweep) forms d_w in the forward: its fp32 accumulator is one
  [D, P], and a copy of the head on top of it, even in bf16, would pass 1.5 of them (1.57 with
  the bf16 copy it made for compute_dtype=bf16; 1.13 without)."""
  n, d, p, k = 512, 256, 32768, 16
  sd = jax.ShapeDtypeStruct
  args = (sd((n, d), jnp.float32), sd((d, p), jnp.float32), sd((n, k), jnp.int32),
          sd((n, k), jnp.float32), sd((n,), jnp.int32), sd((n,), jnp.int32), sd((n,), jnp.float32))
  def f(h, w, ids, t, labels, mask, lse):
    return fk.fused_topk_kd(h, w, ids, t, labels, mask, teacher_lse_N=lse, implementation=impl,
                            compute_dtype=cdt, chunk_v=1024, **MODES[mode])[0]
  compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile()
  head = d * p * 4
  limit = head * 5 // 4 if impl == 'xla' and mode != 'parity_fwd_kl' else head // 2
  assert compiled.memory_analysis().temp_size_in_bytes < limit


@pytest.mark.parametrize('impl,mode', [('pallas', 'fwd_kl_sft'), ('xla', 'parity_fwd_kl'),
                                       ('xla', 'fwd_kl_sft')])
def test_bf16_heads_gradient_is_held_in_bf16(impl, mode):
  """The gradient formed in the forward is a residual in w_out's dtype: with fwd and bwd
  apart (`jax.vjp` under jit), the residuals of a bf16 head are the head itself (kept for the
  statistics' own VJP) and a bf16 d_w, ~2.05 heads in all; an fp32 d_w (lax.platform_dependent's
  branches once agreed on fp32) made them 3.05."""
  n, d, p, k = 512, 256, 32768, 16
  sd = jax.ShapeDtypeStruct
  args = (sd((n, d), jnp.bfloat16), sd((d, p), jnp.bfloat16), sd((n, k), jnp.int32),
          sd((n, k), jnp.float32), sd((n,), jnp.int32), sd((n,), jnp.int32))
  def residuals(h, w, ids, t, labels, mask):
    return jax.vjp(lambda h, w: fk.fused_topk_kd(
        h, w, ids, t, labels, mask, implementation=impl, compute_dtype=jnp.bfloat16,
        chunk_v=1024, **MODES[mode])[0], h, w)[1]
  compiled = jax.jit(residuals).lower(*args).compile()
  assert compiled.memory_analysis().output_size_in_bytes < d * p * 2 * 5 // 2


@pytest.mark.parametrize('impl,mode', [('xla', 'fwd_kl_sft'), ('pallas', 'tail_fwd_kl_sft'),
                                       ('xla', 'parity_fwd_kl'), ('xla', 'cross_tokenizer_sft')])
def test_no_tokens_match_the_oracle(impl, mode):
  """N=0 tokens (the sweeps' default sizes divide by N): loss 0, the oracle's metrics and zero
  gradients of the inputs' shapes and dtypes."""
  b = {name: a if name == 'w' else a[:0] for name, a in make_batch(14).items()}
  want = value_and_grads(fk.fused_topk_kd_reference, b, **MODES[mode])
  got = value_and_grads(fk.fused_topk_kd, b, implementation=impl, **MODES[mode])
  assert float(got[0]) == 0.0
  assert [(g.shape, g.dtype) for g in got[2:]] == [(g.shape, g.dtype) for g in want[2:]]
  assert_close(got, want, 0.0)


@pytest.mark.parametrize('precision,expected', [
    (None, None), ('float32', (lax.Precision.HIGHEST,) * 2)])
def test_kernel_dots_take_jax_matmul_precision(precision, expected):
  """The Pallas kernels' dots leave the precision to `jax.default_matmul_precision`, as XLA's
  own dots: None lowers to Triton's tf32 for fp32 operands on cuda, HIGHEST to ieee fp32."""
  b = make_batch(15)

  def kernel_precisions(jaxpr, inside=False):
    out = []
    for eqn in jaxpr.eqns:
      if inside and eqn.primitive.name == 'dot_general':
        out.append(eqn.params['precision'])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        out += kernel_precisions(sub, inside or eqn.primitive.name == 'pallas_call')
    return out
  def f(h, w):
    return fk.fused_topk_kd(h, w, b['ids'], b['t'], b['labels'], b['mask'],
                            teacher_lse_N=b['lse'], vocab_size=V, **TILES,
                            **MODES['tail_fwd_kl_sft'])[0]
  with jax.default_matmul_precision(precision):
    found = kernel_precisions(jax.make_jaxpr(jax.grad(f, (0, 1)))(b['h'], b['w']).jaxpr)
  assert len(found) >= 2 and set(found) == {expected}


@pytest.mark.parametrize('d', [2048, 4096])
def test_cuda_lowering_at_real_shapes(d, triton_h100_stand_in):
  """Forward + backward lower to Triton for cuda at N=8192, V=256000, K=100 (bf16), default
  implementation and tiles within H100 shared memory, and no [N, V] tensor appears in the
  lowered module."""
  n, v, k = 8192, 256000, 100  # N differs from D: a [N, V] tensor is recognisable
  for cdt, wdt in ((jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
                   (jnp.float32, jnp.float32)):
    bn, bv, bd, _, stages = vt.default_blocks(cdt, wdt)
    sizes = jnp.dtype(cdt).itemsize, jnp.dtype(wdt).itemsize
    assert vt.smem_bytes(bn, bv, bd, *sizes, stages) <= vt.SMEM_LIMIT
  sd = jax.ShapeDtypeStruct
  args = (sd((n, d), jnp.bfloat16), sd((d, v), jnp.bfloat16), sd((n, k), jnp.int32),
          sd((n, k), jnp.float32), sd((n,), jnp.int32), sd((n,), jnp.int32), sd((n,), jnp.float32))
  for opts in (dict(sft_loss_weight=1.0), dict(tail=True, student_norm='full'),
               dict(student_norm='full', temperature=2.0, sft_loss_weight=0.5)):
    def f(h, w, ids, t, labels, mask, lse, opts=opts):
      return fk.fused_topk_kd(h, w, ids, t, labels, mask, teacher_lse_N=lse, **opts)[0]
    lowered = jax.jit(jax.grad(f, argnums=(0, 1))).trace(*args).lower(
        lowering_platforms=('cuda',))
    text = lowered.as_text()
    assert text.count('xla.gpu.triton') >= 2, opts  # forward kernel + backward chunk kernel
    assert f'{n}x{v}x' not in text


@pytest.mark.parametrize('impl,mode', [('pallas', 'fwd_kl_sft'), ('pallas', 'parity_fwd_kl'),
                                       ('xla', 'cross_tokenizer_tail'),
                                       ('pallas', 'full_norm_temperature_sft')])
def test_vocab_parallel_equals_unsharded(devices8, impl, mode):
  """w_out split over 'tensor' (4 shards, the last one partly padding): per-shard statistics
  combined by psum/pmax equal the unsharded result, and the logits are never all-gathered."""
  mesh = sharding.make_mesh(('data', 'fsdp', 'tensor'), (2, 1, 4), devices8)
  b = make_batch(6, p=320)
  kw = dict(TILES, implementation=impl, **MODES[mode])
  want = value_and_grads(fk.fused_topk_kd, b, **kw)
  got = value_and_grads(fk.fused_topk_kd, b, mesh=mesh, vocab_axis='tensor', **kw)
  assert_close(got, want, 2e-5)
  assert_close(got, value_and_grads(fk.fused_topk_kd_reference, b, **MODES[mode]), 2e-5)
  if not MODES[mode].get('cross_tokenizer'):  # that one gathers K candidates per shard
    f = functools.partial(fk.fused_topk_kd, mesh=mesh, vocab_axis='tensor', vocab_size=V, **kw)
    text = jax.jit(jax.grad(lambda h, w: f(h, w, b['ids'], b['t'], b['labels'], b['mask'],
                                           teacher_lse_N=b['lse'])[0], argnums=(0, 1))).lower(
        b['h'], b['w']).compile().as_text()
    assert 'all-gather' not in text


@pytest.mark.gpu
@pytest.mark.parametrize('mode', ['fwd_kl_sft', 'tail_fwd_kl_sft', 'full_norm_temperature_sft'])
def test_triton_kernels_on_gpu(mode):
  """The compiled Triton kernels (default tiles, bf16) against the oracle at a real width."""
  b = make_batch(9, n=1000, d=2048, p=32768, v=32000, k=100)
  h, w = jnp.asarray(b['h'], jnp.bfloat16), jnp.asarray(b['w'], jnp.bfloat16)
  kw = dict(h=h, w=w, vocab_size=32000, **MODES[mode])
  want = value_and_grads(fk.fused_topk_kd_reference, b, **kw)
  assert_close(value_and_grads(fk.fused_topk_kd, b, **kw), want, 2e-2)


@pytest.mark.parametrize('kw,match', [
    (dict(vocab_size=P + 1), 'vocab_size'),
    (dict(block_v=48), 'block_v'),
    (dict(block_v=1024, block_d=256), 'shared memory'),
    (dict(num_warps=3), 'num_warps'),
    (dict(num_warps=64), 'num_warps'),
    (dict(num_stages=0), 'num_stages'),
    (dict(implementation='cuda'), 'implementation'),
    (dict(logits_scale=0.0), 'logits_scale'),
    (dict(tail=True, teacher_lse_N=None), 'teacher_lse'),
    (dict(kd_loss='kl'), 'kd_loss'),
    (dict(vocab_axis='tensor'), 'vocab_axis'),
])
def test_invalid_arguments_raise(kw, match):
  """Bad options fail at call time with a one-line ValueError naming the argument."""
  b = make_batch(7)
  kw = dict(dict(teacher_lse_N=b['lse']), **kw)
  with pytest.raises(ValueError, match=match):
    fk.fused_topk_kd(b['h'], b['w'], b['ids'], b['t'], b['labels'], b['mask'], **kw)


def test_shape_mismatch_raises():
  b = make_batch(8)
  with pytest.raises(ValueError, match='labels_N'):
    fk.fused_topk_kd(b['h'], b['w'], b['ids'], b['t'], b['labels'][:-1], b['mask'])
  with pytest.raises(ValueError, match='K=7'):
    fk.fused_topk_kd(b['h'], b['w'][:, :5], b['ids'][:, :1].repeat(7, 1), b['t'][:, :1].repeat(
        7, 1), b['labels'], b['mask'])
