"""Fused LM-head top-K KD vs full-logits jnp: XLA temp memory at real shapes, wall time on CPU.

  .venv/bin/python scripts/bench_loss.py            # both parts, a few minutes on 2 CPU cores
  .venv/bin/python scripts/bench_loss.py --skip-time
  .venv/bin/python scripts/bench_loss.py --precision mixed   # (a) in training's precision only

(a) compiles (never runs) value_and_grad w.r.t. (hidden, w_out) of `fused_topk_kd` and of
`topk_kd_loss(hidden @ w_out)` at N=4096, D=2048, V=256000, K=100, in three precisions
(`--precision`), and prints `memory_analysis().temp_size_in_bytes` of each; target: fused <=
1/20 of full.
(b) times both, forward + backward, at CPU-runnable shapes; target: fused <= 1.0x of full.
`fused_topk_kd`'s default, implementation='auto', is `fused xla` on CPU (the chunked jnp sweeps)
and `fused pallas` on GPU; on CPU the Pallas kernels only run in interpret mode, so `fused
pallas` there is the interpreter's time, printed for reference. The Pallas sweeps go by
vocabulary columns and recompute the logits for the backward (4 head matmuls against the full
version's 3), which pays off where the full version is bound by memory traffic over [N, V]
(GPUs). `fused xla` goes by blocks of rows over all columns and forms the gradient in the
forward: 3 head matmuls, like the full version, without its [N, V] passes, and an fp32 [D, P]
accumulator for d_w in its temp bytes. The parity mode sweeps nothing in either (gathered
columns only).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# jkd from this checkout, also where it is not installed (the GPU machine's image: PYTHONPATH
# holds the bundle's wheels only).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jkd.kernels import fused_topk_kd as fk  # noqa: E402

MODES = {
    'parity fwd_kl (no sweep)': dict(),
    'fwd_kl + sft': dict(sft_loss_weight=1.0),
    'tail + sft': dict(tail=True, sft_loss_weight=1.0),
}


def full_loss(h, w, ids, t, labels, mask, lse, **options):
  """topk_kd_loss(h @ w): the fp32 [N, V] logits materialised."""
  return fk.fused_topk_kd_reference(h, w, ids, t, labels, mask, teacher_lse_N=lse, **options)[0]


def fused_loss(h, w, ids, t, labels, mask, lse, *, impl, **options):
  return fk.fused_topk_kd(h, w, ids, t, labels, mask, teacher_lse_N=lse, implementation=impl,
                          **options)[0]


def step(loss_fn, **kw):
  return jax.jit(jax.value_and_grad(lambda h, w, *a: loss_fn(h, w, *a, **kw), argnums=(0, 1)))


def abstract_args(n, d, v, k, h_dtype, w_dtype):
  sd = jax.ShapeDtypeStruct
  return (sd((n, d), h_dtype), sd((d, v), w_dtype), sd((n, k), jnp.int32), sd((n, k), jnp.float32),
          sd((n,), jnp.int32), sd((n,), jnp.int32), sd((n,), jnp.float32))


def concrete_args(n, d, v, k, dtype, seed=0):
  r = np.random.default_rng(seed)
  h = jnp.asarray(r.normal(size=(n, d)), dtype)
  w = jnp.asarray(r.normal(size=(d, v)) / np.sqrt(d), dtype)
  ids = jnp.asarray(np.argsort(-r.random((n, v)), -1)[:, :k], jnp.int32)
  t = jnp.sort(jnp.asarray(r.normal(size=(n, k)) * 2, jnp.float32), -1)[:, ::-1]
  t = t - t[:, :1]
  labels = jnp.asarray(r.integers(0, v, n), jnp.int32)
  mask = jnp.ones((n,), jnp.int32)
  lse = jax.nn.logsumexp(t, -1) + 1.0
  return h, w, ids, t, labels, mask, lse


def temp_bytes(fn, args):
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


PRECISIONS = {  # --precision: (name, hidden dtype, w_out dtype, compute dtype)
    'fp32': ('fp32', jnp.float32, jnp.float32, None),
    'mixed': ('bf16 compute, fp32 master w_out', jnp.bfloat16, jnp.float32, jnp.bfloat16),
    'bf16': ('bf16 hidden and w_out', jnp.bfloat16, jnp.bfloat16, None),
}


def memory(n=4096, d=2048, v=256000, k=100, precisions=tuple(PRECISIONS)):
  backend = jax.default_backend()
  print(f'(a) XLA temp bytes of value_and_grad(hidden, w_out), N={n} D={d} V={v} K={k}, '
        f'compiled for {backend}, not run')
  for precision, h_dtype, w_dtype, cdt in (PRECISIONS[p] for p in precisions):
    args = abstract_args(n, d, v, k, h_dtype, w_dtype)
    print(f'-- {precision}\n{"mode":26s} {"full jnp":>10s} {"fused pallas":>13s} '
          f'{"fused xla":>10s} {"full/pallas":>12s} {"full/xla":>9s}')
    for name, opts in MODES.items():
      full = temp_bytes(step(full_loss, compute_dtype=cdt, **opts), args)
      pal = temp_bytes(step(fused_loss, impl='pallas', compute_dtype=cdt, **opts), args)
      xla = temp_bytes(step(fused_loss, impl='xla', compute_dtype=cdt, **opts), args)
      print(f'{name:26s} {full / 2**20:6.0f} MiB {pal / 2**20:9.0f} MiB {xla / 2**20:6.0f} MiB '
            f'{full / pal:11.1f}x {full / xla:8.1f}x')
    if w_dtype == jnp.bfloat16 and backend == 'cpu':
      print('   (XLA:CPU runs bf16 dots on fp32 copies: both fused columns hold a 2000 MiB '
            'fp32 copy of w_out\n    that a GPU does not make; the no-sweep path also keeps an '
            'fp32 [D, P] accumulator for\n    d_w, which an fp32 master w_out with '
            'compute_dtype=bf16 avoids)')


def walls(fns, args, reps):
  """Best wall time of each fn over `reps` rounds; a round runs every fn once, so a burst of
  load from elsewhere hits all of them alike."""
  for fn in fns:
    jax.block_until_ready(fn(*args))  # compile + warm up
  best = [float('inf')] * len(fns)
  for _ in range(reps):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[i] = min(best[i], time.perf_counter() - t0)
  return best


def timing(n=1024, d=512, v=32000, k=100, reps=5):
  print(f'\n(b) wall time (best of {reps} interleaved rounds), value_and_grad(hidden, w_out), '
        f'N={n} D={d} V={v} K={k}, fp32, {jax.default_backend()}')
  args = concrete_args(n, d, v, k, jnp.float32)
  print(f'{"mode":28s} {"full jnp":>10s} {"fused pallas":>13s} {"fused xla":>10s} '
        f'{"pallas/full":>12s} {"xla/full":>9s}')
  default = fk.auto_implementation(cpu=jax.default_backend() == 'cpu')
  worst = 0.0
  for name, opts in MODES.items():
    full, pal, xla = walls([step(full_loss, **opts), step(fused_loss, impl='pallas', **opts),
                            step(fused_loss, impl='xla', **opts)], args, reps)
    print(f'{name:28s} {full * 1e3:7.0f} ms {pal * 1e3:10.0f} ms {xla * 1e3:7.0f} ms '
          f'{pal / full:11.2f}x {xla / full:8.2f}x')
    worst = max(worst, {'xla': xla, 'pallas': pal}[default] / full)
  print(f"target: fused (implementation='auto' = {default} here) <= 1.0x of full in every mode: "
        f"worst {worst:.2f}x, {'met' if worst <= 1.0 else 'missed'}")


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--skip-memory', action='store_true')
  parser.add_argument('--skip-time', action='store_true')
  parser.add_argument('--precision', choices=(*PRECISIONS, 'all'), default='all',
                      help="part (a)'s precisions: mixed is training's (bf16 compute, fp32 "
                           'master weights); all three by default')
  flags = parser.parse_args()
  if not flags.skip_memory:
    memory(precisions=tuple(PRECISIONS) if flags.precision == 'all' else (flags.precision,))
  if not flags.skip_time:
    timing()
