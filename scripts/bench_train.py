"""jkd's train step vs a PyTorch reference step: tokens/s, model FLOP/s and (GPU) MFU, one run.

  .venv/bin/python scripts/bench_train.py               # CPU defaults, a few minutes on 2 cores
  .venv/bin/python scripts/bench_train.py --preset cpu_v256k  # the tutorial's vocabulary, ~3 min
  .venv/bin/python scripts/bench_train.py --precision fp32 --fused-implementation xla  # fp32
  python scripts/bench_train.py --device gpu --preset 1b  # ~1.1B Llama student, MFU vs bf16 peak

Both sides train the same Llama-shaped student (RMSNorm, SwiGLU, RoPE, GQA, no biases, untied
head; random init, same shapes) on the same batch with the same objective and optimizer:
- jkd: `train.make_train_step` (fp32 master params, `--precision` compute, KD fwd_kl x 1.0 +
  SFT x 0.4, NeMo reduction, AdamW (0.9, 0.98) wd 0.01, clipping 1.0, micro-batches in one
  lax.scan; the layer scan unrolled on CPU, `--scan-unroll`), compiled once; the loss is the
  fused LM head + top-K kernel or full logits.
- PyTorch: `transformers.LlamaForCausalLM` (sdpa attention) -> full logits -> NeMo-Aligner's
  `_TopKLogitsCrossEntropy` forward written in plain torch (global max shift, teacher and student
  softmax over the K ids, forward KL, + 0.4 x full-vocab CE, masked token mean per micro-batch,
  / number of micro-batches), autograd, `clip_grad_norm_(1.0)`, `torch.optim.AdamW((0.9, 0.98),
  weight_decay=0.01)` (no decay on norms, as NeMo and jkd); bf16 is autocast over fp32 params.
`--precision auto` (the default) computes in bf16 on GPU and on CPUs with bf16 matrix units
(avx512_bf16, amx_bf16), in fp32 on other CPUs: there torch's bf16 matmul takes a slow fallback
(about 70x slower than its fp32 one), so a bf16 ratio would time that fallback.
Steady state: `--warmup` steps (compile included) are dropped, then `--steps` timed steps each
(jax: block_until_ready); best and median are printed. On CPU the two sides' steps interleave
(alternating which goes first), so load from other processes hits both alike; tokens are all
G x T positions of a step. On CPU both libraries get all schedulable cores: XLA:CPU sizes its
intra-op pool to them and torch.set_num_threads is set to the same number; the "cores busy" row
(process CPU time / wall time over the timed steps) shows what each really used. The "cpu" line
names the CPU and its bf16 matrix units: torch's oneDNN uses AMX tiles where the CPU has them,
XLA:CPU does not, so the ratio moves with the CPU. The "malloc" line records the allocator
settings, which both columns share, and the ratio moves with them. Both sides page-fault on
fresh memory every step (XLA:CPU maps a new temp buffer, about 0.7 GB at the cpu preset, per
execution; torch allocates its full-vocabulary logits and activations anew).
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>` keeps freed memory in glibc's
heap and removes the faults of both, which speeds torch up more than jkd (about 1.0x at the cpu
preset); `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35, THP in madvise mode) speeds jkd
up and slows torch. Defaults are what users of either library get, so the benchmark runs with
them. On GPU, torch runs first and frees its memory before jax allocates (jax's allocator set to
grow on demand); without CUDA in torch the PyTorch column is skipped.

Model FLOPs per step (PaLM's convention: causal attention counted as full; recomputation, by
rematerialisation or by the fused head's backward, not counted):
  tokens x (6 x N_mm + 12 x layers x T x heads x head_dim)
(with the attention term at 6, the scores a causal mask keeps, the MFU is printed too: about
0.92x the first at the 1b preset, where attention is 15% of the count).
with N_mm the matmul parameters (q, k, v, o, fc1, fc2 of every layer + the D x V head; not the
input embedding, a gather). MFU = model FLOP/s of the median step / the device's dense bf16
peak (`PEAK_BF16`; the best step's is printed beside it).
XLA's `cost_analysis()` flops of the compiled jkd step are printed as a cross-check; XLA counts a
while-loop body once, so with the layer scan (unless unrolled), the micro-batch scan and the fused
loss's vocabulary loops that count is a lower bound. A loop-free variant of the step (1 layer,
reference loss, one micro-step; compiled, never run) is therefore compared with the formula too.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import re
import resource
import statistics
import sys
import time

PRESETS = {  # student shapes; flags override any entry
    'cpu': dict(layers=4, hidden=512, ffn=1408, heads=8, kv_heads=4, vocab=32000, seq_len=256,
                batch=8, micro_batch=8, top_k=100, steps=6, warmup=2),
    # TinyLlama-1.1B's shape: 1.10B parameters.
    '1b': dict(layers=22, hidden=2048, ffn=5632, heads=32, kv_heads=4, vocab=32000, seq_len=2048,
               batch=16, micro_batch=2, top_k=100, steps=10, warmup=3),
}
# The seed tutorial's vocabulary (Nemotron's 256000) on the CPU student: the LM head then
# dominates, as it does for the tutorial's 2B student.
PRESETS['cpu_v256k'] = dict(PRESETS['cpu'], vocab=256000, steps=3, warmup=1)
# Dense bf16 peak FLOP/s by a pattern of jax's device_kind (first match wins, so the specific
# forms come first: 'NVIDIA H100 PCIe' is not an SXM H100, 'NVIDIA L40S' no L4).
PEAK_BF16 = ((r'H100 PCIe', 756e12), (r'H100 NVL', 835e12), (r'GH200|H200|H100', 989e12),
             (r'A100', 312e12), (r'L40S', 362e12), (r'L40\b', 181e12), (r'L4\b', 121e12),
             (r'B200', 2250e12))
KD_WEIGHT, SFT_WEIGHT, LR = 1.0, 0.4, 1e-4


def parse_flags(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--device', choices=('auto', 'cpu', 'gpu'), default='auto')
  p.add_argument('--preset', choices=tuple(PRESETS), default=None,
                 help="shape preset (default: 'cpu' on CPU, '1b' on GPU)")
  for name in PRESETS['cpu']:
    p.add_argument('--' + name.replace('_', '-'), type=int, default=None,
                   help='overrides the preset' + (' (G rows)' if name == 'batch' else ''))
  p.add_argument('--precision', choices=('auto', 'fp32', 'bf16'), default='auto',
                 help='compute dtype (params and optimizer stay fp32 on both sides); auto: '
                      'bf16 on GPU and on CPUs with bf16 matrix units, else fp32')
  p.add_argument('--loss-impl', choices=('fused', 'reference'), default='fused')
  p.add_argument('--fused-implementation', choices=('auto', 'xla', 'pallas'), default='auto',
                 help='auto: pallas on GPU, xla on CPU (Pallas on CPU is the interpreter)')
  p.add_argument('--remat', choices=('none', 'full', 'dots', 'dots_no_batch'), default='none',
                 help="jkd remat policy; torch gets HF gradient checkpointing unless 'none'")
  p.add_argument('--attention', choices=('auto', 'xla', 'cudnn'), default='auto',
                 help='jkd attention: auto = cuDNN flash attention on GPU in bf16, else XLA')
  p.add_argument('--scan-unroll', type=int, default=None,
                 help='jkd train.scan_unroll: layers per layer-scan iteration, 0 = all '
                      '(default: 0 on CPU, where it is measured faster; 1 on GPU)')
  p.add_argument('--skip-torch', action='store_true')
  p.add_argument('--torch-compile', action='store_true', help='torch.compile the HF model')
  p.add_argument('--peak-tflops', type=float, default=None,
                 help='peak bf16 TFLOP/s for MFU when the device is not in the table')
  p.add_argument('--skip-flops-check', action='store_true',
                 help='skip compiling the loop-free variant that cross-checks the FLOP formula')
  p.add_argument('--seed', type=int, default=0)
  return p.parse_args(argv)


FLAGS = parse_flags()
if FLAGS.device != 'auto':  # before jax is imported: the platform is fixed at first use
  os.environ['JAX_PLATFORMS'] = {'cpu': 'cpu', 'gpu': 'cuda'}[FLAGS.device]
# On a GPU torch runs first; jax must not grab 75% of the memory before torch is done.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.9')  # the cap when it grows

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from configs import base  # noqa: E402
from jkd import model, sharding, train  # noqa: E402
from jkd.kernels import fused_topk_kd  # noqa: E402


def resolve(flags):
  """(shape dict, on_gpu, fused implementation) from the flags and the backend."""
  try:
    on_gpu = jax.default_backend() == 'gpu'
  except (RuntimeError, AssertionError) as e:  # JAX_PLATFORMS=cuda without a CUDA jaxlib/GPU
    sys.exit(f'--device {flags.device}: jax found no such backend ({type(e).__name__}: {e})')
  shape = dict(PRESETS[flags.preset or ('1b' if on_gpu else 'cpu')])
  for name in shape:
    if getattr(flags, name) is not None:
      shape[name] = getattr(flags, name)
  impl = flags.fused_implementation
  if impl == 'auto':
    impl = fused_topk_kd.auto_implementation(cpu=jax.default_backend() == 'cpu')
  return shape, on_gpu, impl


def make_batch(s, seed):
  """The global batch as numpy [G, T] / [G, T, K]: one example per row, prompt (first quarter)
  masked, teacher top-K at distinct ids with descending logits, the first 0."""
  r = np.random.default_rng(seed)
  g, t, v, k = s['batch'], s['seq_len'], s['vocab'], s['top_k']
  tokens = r.integers(0, v, (g, t), dtype=np.int32)
  labels = np.concatenate([tokens[:, 1:], r.integers(0, v, (g, 1), dtype=np.int32)], 1)
  loss_mask = np.ones((g, t), np.int32)
  loss_mask[:, :t // 4] = 0
  # Distinct ids per token: a fixed set of K distinct ids shifted by a per-token offset mod V.
  base_k = r.choice(v, k, replace=False).astype(np.int64)
  ids = ((r.integers(0, v, (g, t, 1)) + base_k) % v).astype(np.int32)
  logits = -np.sort(np.abs(r.normal(size=(g, t, k))) * 3, -1).astype(np.float32)
  logits -= logits[..., :1]
  lse = (np.log(np.sum(np.exp(logits), -1)) + 0.5).astype(np.float32)  # > the top-K's lse
  return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, topk_ids=ids,
              topk_logits=logits, lse=lse, segment_ids=np.ones((g, t), np.int32),
              positions=np.broadcast_to(np.arange(t, dtype=np.int32), (g, t)).copy())


def student_config(s):
  return model.ModelConfig(
      num_layers=s['layers'], hidden_size=s['hidden'], ffn_hidden_size=s['ffn'],
      num_attention_heads=s['heads'], num_query_groups=s['kv_heads'], vocab_size=s['vocab'],
      normalization='rmsnorm', activation='swiglu', bias=False, position_embedding_type='rope',
      rotary_percentage=1.0, max_position_embeddings=s['seq_len'],
      share_embeddings_and_output_weights=False)


def model_flops(s, causal: bool = False):
  """(FLOPs per step by the formula in the module docstring, N_mm, total params); `causal`:
  the attention term halved (the scores a causal mask keeps), the other convention."""
  d, f, n, g, v, nl = s['hidden'], s['ffn'], s['heads'], s['kv_heads'], s['vocab'], s['layers']
  h = d // n
  per_layer = d * n * h + 2 * d * g * h + n * h * d + 3 * d * f
  n_mm = nl * per_layer + d * v
  total = n_mm + v * d + (2 * nl + 1) * d  # + input embedding + RMSNorm scales
  tokens = s['batch'] * s['seq_len']
  attention = (6 if causal else 12) * nl * s['seq_len'] * n * h
  return tokens * (6 * n_mm + attention), n_mm, total


class Timer:
  """Wall time per timed call, and process CPU time over them (for 'cores busy')."""

  def __init__(self, fn):
    self.fn, self.times, self.cpu = fn, [], 0.0

  def __call__(self, timed):
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    self.fn()
    t1, ru1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if timed:
      self.times.append(t1 - t0)
      self.cpu += (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)

  @property
  def best(self):
    return min(self.times)

  @property
  def median(self):
    return statistics.median(self.times)

  @property
  def cores_busy(self):
    return self.cpu / sum(self.times)


def measure(timers, n_warmup, n_steps):
  """Runs the timers' steps interleaved, step i of each side back to back, alternating which
  goes first: on a shared CPU a load burst then hits both sides alike."""
  for i in range(n_warmup + n_steps):
    for t in timers[::-1] if i % 2 else timers:
      t(timed=i >= n_warmup)


# --- jkd -----------------------------------------------------------------------------------

def scan_unroll(flags):
  """train.scan_unroll for the jkd column: --scan-unroll, else all layers on CPU, a loop on GPU."""
  if flags.scan_unroll is not None:
    return flags.scan_unroll
  return 1 if jax.default_backend() == 'gpu' else 0


def jkd_setup(s, np_batch, flags, remat, **overrides):
  """(state, step, batch on the mesh) for shapes s: random init, on one device (the PyTorch
  column runs on one, and MFU divides by one device's peak)."""
  tc = dataclasses.replace(
      train.TrainConfig(), global_batch_size=s['batch'], micro_batch_size=s['micro_batch'],
      max_steps=1000, warmup_steps=10, constant_steps=0, lr=LR, min_lr=LR / 10,
      kd_loss='fwd_kl', kd_loss_weight=KD_WEIGHT, sft_loss_weight=SFT_WEIGHT,
      decay_norm_scales=False,  # as the PyTorch groups: no decay on norms
      precision=flags.precision, seed=flags.seed, remat_policy=remat,
      scan_unroll=scan_unroll(flags), **{'attention': flags.attention, **overrides})
  cfg, rules = student_config(s), base.LOGICAL_AXIS_RULES
  mesh = sharding.make_mesh(('data', 'fsdp', 'tensor'), (1, 1, 1), jax.devices()[:1])
  state, state_sh = train.init_state(cfg, tc, None, mesh, rules)
  b_sh = train.batch_shardings(mesh, rules)
  batch = {k: jax.device_put(np_batch[k], b_sh[k]) for k in train.BATCH_KEYS}
  return state, train.make_train_step(cfg, tc, mesh, rules, state_sh), batch


def xla_flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def build_jkd(s, np_batch, flags, impl):
  state, step, batch = jkd_setup(s, np_batch, flags, flags.remat, loss_impl=flags.loss_impl,
                                 fused_implementation=impl)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  t0 = time.perf_counter()
  # The step's own executable (same trace, shardings, donation): calling it directly compiles
  # once, and cost_analysis describes the program that is timed.
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  out = {'state': state, 'losses': []}
  del state  # donated at the first step

  def one_step():
    out['state'], m = compiled(out['state'], batch)
    jax.block_until_ready((out['state'], m))
    out['losses'].append(float(m['loss'][0] / m['loss'][1]))

  def check():
    if not all(math.isfinite(x) for x in out['losses']):
      sys.exit(f'jkd: non-finite loss {out["losses"]}')
    res['loss0'] = out['losses'][0]

  res = dict(timer=Timer(one_step), n_params=n_params, xla_flops=xla_flops(compiled),
             compile_s=compile_s, device=jax.devices()[0].device_kind, finish=check)
  return res


def xla_flops_loop_free(s, np_batch, flags):
  """(XLA flops, formula FLOPs) of the step at 1 layer, reference loss, 1 micro-step: every
  loop then runs once, so XLA's count (a while body counted once) is the whole program's; no
  remat, whose recomputation the formula leaves out; XLA's attention (cost analysis counts no
  FLOPs in a custom call such as cuDNN's)."""
  s1 = dict(s, layers=1, micro_batch=s['batch'])
  state, step, batch = jkd_setup(s1, np_batch, flags, 'none', loss_impl='reference',
                                 attention='xla')
  return xla_flops(step.lower(state, batch).compile()), model_flops(s1)[0]


# --- PyTorch reference --------------------------------------------------------------------

def nemo_topk_kd_sft(logits_BxTxV, ids_BxTxK, t_BxTxK, labels_BxT, mask_BxT):
  """NeMo-Aligner's _TopKLogitsCrossEntropy forward (spec §3.2, fwd_kl, same tokenizer) and the
  per-micro-batch masked token mean (§3.1), in plain torch."""
  import torch
  x = logits_BxTxV.float()
  x = x - x.amax(-1, keepdim=True).detach()  # global max shift, a constant
  x_k = torch.gather(x, -1, ids_BxTxK)
  lse_t = torch.logsumexp(t_BxTxK, -1, keepdim=True)
  p_k = torch.exp(t_BxTxK - lse_t)
  kd = -(p_k * x_k).sum(-1) + torch.logsumexp(x_k, -1) + (p_k * (t_BxTxK - lse_t)).sum(-1)
  sft = torch.logsumexp(x, -1) - torch.gather(x, -1, labels_BxT[..., None])[..., 0]
  loss = KD_WEIGHT * kd + SFT_WEIGHT * sft
  m = mask_BxT.clamp(0, 1).float()
  return (loss * m).sum() / m.sum().clamp(min=1.0)


def torch_status(on_gpu):
  """(torch module or None, reason it is skipped)."""
  try:
    import torch
  except ImportError:
    return None, 'torch is not installed'
  if on_gpu and not torch.cuda.is_available():
    return None, f'torch {torch.__version__} has no CUDA device here'
  return torch, ''


def build_torch(torch, s, np_batch, flags, on_gpu, threads):
  import transformers
  dev = torch.device('cuda' if on_gpu else 'cpu')
  if not on_gpu:
    torch.set_num_threads(threads)
  # XLA's default fp32 dot precision on GPU is TF32; give torch the same.
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  torch.manual_seed(flags.seed)
  cfg = transformers.LlamaConfig(
      vocab_size=s['vocab'], hidden_size=s['hidden'], intermediate_size=s['ffn'],
      num_hidden_layers=s['layers'], num_attention_heads=s['heads'],
      num_key_value_heads=s['kv_heads'], max_position_embeddings=s['seq_len'],
      rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
      use_cache=False)
  cfg._attn_implementation = 'sdpa'
  net = transformers.LlamaForCausalLM(cfg).to(dev).train()
  if flags.remat != 'none':
    net.gradient_checkpointing_enable()
  n_params = sum(p.numel() for p in net.parameters())
  fwd = torch.compile(net) if flags.torch_compile else net
  decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
  no_decay = [p for n, p in net.named_parameters() if p.ndim < 2]  # RMSNorm scales
  groups = [dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0)]
  try:  # the fused kernel where this torch has it (CPU and CUDA since 2.4)
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=1e-8, fused=True)
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=1e-8)
  tb = {k: torch.from_numpy(np.ascontiguousarray(np_batch[k])).to(dev)
        for k in ('tokens', 'labels', 'loss_mask', 'topk_ids', 'topk_logits', 'positions')}
  tb['topk_ids'], tb['labels'] = tb['topk_ids'].long(), tb['labels'].long()
  mbs, n_micro = s['micro_batch'], s['batch'] // s['micro_batch']
  amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=flags.precision == 'bf16')
  losses = []

  live = dict(net=net, opt=opt, tb=tb, fwd=fwd)  # free() drops them: nothing else holds them
  del net, opt, tb, fwd, decay, no_decay, groups

  def one_step():
    net, opt, tb, fwd = live['net'], live['opt'], live['tb'], live['fwd']
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(n_micro):  # NeMo: each micro-batch's token mean / number of micro-batches
      sl = slice(i * mbs, (i + 1) * mbs)
      with amp:
        logits = fwd(input_ids=tb['tokens'][sl], position_ids=tb['positions'][sl]).logits
      loss = nemo_topk_kd_sft(logits, tb['topk_ids'][sl], tb['topk_logits'][sl],
                              tb['labels'][sl], tb['loss_mask'][sl]) / n_micro
      loss.backward()
      total += loss.detach()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    losses.append(float(total))  # a sync point, like block_until_ready
    if on_gpu:
      torch.cuda.synchronize()

  def free():
    res['loss0'] = losses[0]
    live.clear()
    gc.collect()
    if on_gpu:
      torch.cuda.empty_cache()

  res = dict(timer=Timer(one_step), n_params=n_params, version=torch.__version__, finish=free)
  return res


# --- report ---------------------------------------------------------------------------------

def tf(flops):
  """FLOPs as TF, or GF below 1 TF."""
  return f'{flops / 1e12:.3f} TF' if flops >= 1e12 else f'{flops / 1e9:.2f} GF'


def peak_flops(device_kind, override_tflops):
  if override_tflops:
    return override_tflops * 1e12
  for pattern, peak in PEAK_BF16:
    if re.search(pattern, device_kind, re.IGNORECASE):
      return peak
  return None


def malloc_env(environ=os.environ):
  """The allocator settings both columns run under (they share one process), for the record."""
  tuned = [f'{k}={v}' for k, v in sorted(environ.items())
           if k in ('GLIBC_TUNABLES', 'LD_PRELOAD') or k.startswith('MALLOC_')]
  return ' '.join(tuned) or 'allocator defaults (no GLIBC_TUNABLES, MALLOC_* or LD_PRELOAD)'


def cpu_bf16_units(cpuinfo='/proc/cpuinfo'):
  """(model name, [bf16 matrix units]) of this host's CPU from /proc/cpuinfo; None where absent."""
  try:
    with open(cpuinfo, encoding='utf-8', errors='replace') as f:
      text = f.read()
  except OSError:
    return None
  fields = {k.strip(): v.strip() for k, v in (line.split(':', 1) for line in
                                              text.splitlines()[:64] if ':' in line)}
  flags = set(fields.get('flags', '').split())
  return fields.get('model name', 'unknown'), [u for u in ('amx_bf16', 'avx512_bf16')
                                               if u in flags]


def host_cpu(cpu):
  """'model name | bf16 matrix units' of `cpu_bf16_units()` ('' for None). torch's oneDNN runs
  bf16 matmuls on AMX tiles where the CPU has them; XLA:CPU's kernels (jax 0.10) do not, so the
  ratio of the two columns depends on this line."""
  if cpu is None:
    return ''
  name, units = cpu
  return (f"{name} | bf16 units: {', '.join(units) or 'none'}"
          + ('' if 'amx_bf16' in units else ' (no AMX)'))


def resolve_precision(precision, on_gpu, cpu):
  """(precision, why) for --precision. auto: bf16 on GPU and on CPUs with bf16 matrix units
  (avx512_bf16, amx_bf16), fp32 on other CPUs, where torch's bf16 matmul takes a slow fallback
  (1.7 GFLOP/s against 114 fp32 on 2 cores of an AMD EPYC with AVX2 only, [2048, 512] x
  [512, 8000]) and a bf16 ratio would measure that fallback, not the libraries. cpu: as
  `cpu_bf16_units()` gives it."""
  if precision != 'auto':
    return precision, ''
  if on_gpu:
    return 'bf16', ' (--precision auto: GPU)'
  if cpu and cpu[1]:
    return 'bf16', f" (--precision auto: the CPU has {', '.join(cpu[1])})"
  return 'fp32', (' (--precision auto: the CPU has no bf16 matrix units, where torch runs bf16 '
                  'matmuls on a slow fallback)')


def main(flags):
  s, on_gpu, impl = resolve(flags)
  cpu = None if on_gpu else cpu_bf16_units()  # /proc/cpuinfo, read once
  flags.precision, why_precision = resolve_precision(flags.precision, on_gpu, cpu)
  if s['batch'] % s['micro_batch']:
    sys.exit(f"--batch {s['batch']} is not a multiple of --micro-batch {s['micro_batch']}")
  threads = len(os.sched_getaffinity(0))
  flops, n_mm, n_total = model_flops(s)
  tokens = s['batch'] * s['seq_len']
  print(f"jkd train step vs PyTorch reference | jax {jax.__version__}, backend "
        f"{jax.default_backend()}: one {jax.devices()[0].device_kind} for each column (of "
        f"{jax.device_count()} here)")
  print(f"student: layers={s['layers']} D={s['hidden']} F={s['ffn']} heads={s['heads']} "
        f"kv_heads={s['kv_heads']} V={s['vocab']} untied, {n_total / 1e6:.1f}M params "
        f"(N_mm {n_mm / 1e6:.1f}M)")
  print(f"batch: G={s['batch']} rows x T={s['seq_len']} = {tokens} tokens/step, micro-batch "
        f"{s['micro_batch']}, K={s['top_k']}; loss fwd_kl x {KD_WEIGHT} + SFT x {SFT_WEIGHT}; "
        f"precision {flags.precision}{why_precision}, remat {flags.remat}")
  run_cfg = train.run_config(student_config(s), dataclasses.replace(
      train.TrainConfig(), precision=flags.precision, attention=flags.attention,
      scan_unroll=scan_unroll(flags)))
  print(f"jkd attention: {model.attention_implementation(run_cfg)} (--attention "
        f"{flags.attention}); rows unpacked, so no segment mask")
  unrolled = run_cfg.layers_per_scan_step == run_cfg.num_layers
  print(f"jkd layer scan: train.scan_unroll={run_cfg.scan_unroll} ("
        f"{'all layers unrolled, no loop' if unrolled else 'a loop'})")
  print(f"jkd loss: loss_impl={flags.loss_impl}" +
        (f", fused_implementation={impl}" if flags.loss_impl == 'fused' else ''))
  print(f"timing: {s['warmup']} warmup steps dropped, {s['steps']} timed steps each")
  print(f"model FLOPs/step = tokens x (6 x N_mm + 12 x layers x T x heads x head_dim) = "
        f"{tf(flops)}")
  np_batch = make_batch(s, flags.seed)

  torch, why = (None, '--skip-torch') if flags.skip_torch else torch_status(on_gpu)
  if cpu is not None:
    print(f'cpu: {host_cpu(cpu)}')
  if not on_gpu:
    print(f'malloc: {malloc_env()}')
  if torch is not None and not on_gpu:
    print(f'threads: XLA:CPU intra-op pool = {threads} schedulable CPUs; '
          f'torch.set_num_threads({threads})')
  load0 = os.getloadavg()[0]
  res_t = None
  if torch is None:
    print(f'PyTorch column skipped: {why}')
  elif on_gpu:  # one side at a time: torch first, its memory freed before jax allocates
    res_t = build_torch(torch, s, np_batch, flags, on_gpu, threads)
    measure([res_t['timer']], s['warmup'], s['steps'])
    res_t['finish']()
  else:
    res_t = build_torch(torch, s, np_batch, flags, on_gpu, threads)
  res_j = build_jkd(s, np_batch, flags, impl)
  measure([res_j['timer']] + ([res_t['timer']] if res_t and not on_gpu else []),
          s['warmup'], s['steps'])
  load1 = os.getloadavg()[0]
  res_j['finish']()
  if res_t and not on_gpu:
    res_t['finish']()

  peak = peak_flops(res_j['device'], flags.peak_tflops) if on_gpu else None
  unit, scale = ('T', 1e12) if on_gpu else ('G', 1e9)
  cols = [('jkd (JAX)', res_j)] + ([(f"PyTorch {res_t['version']}", res_t)] if res_t else [])
  rows = [
      ('params (counted)', lambda r: f"{r['n_params'] / 1e6:.2f}M"),
      ('step time best', lambda r: f"{r['timer'].best * 1e3:.0f} ms"),
      ('step time median', lambda r: f"{r['timer'].median * 1e3:.0f} ms"),
      ('tokens/s (best)', lambda r: f"{tokens / r['timer'].best:,.0f}"),
      ('tokens/s (median)', lambda r: f"{tokens / r['timer'].median:,.0f}"),
      (f'model {unit}FLOP/s (best)', lambda r: f"{flops / r['timer'].best / scale:.1f}"),
      ('cores busy', lambda r: f"{r['timer'].cores_busy:.2f}"),
      ('first-step loss', lambda r: f"{r['loss0']:.4f}"),
  ]
  causal_flops = model_flops(s, causal=True)[0]
  if peak:
    rows.append((f'MFU (median) vs {peak / 1e12:.0f} TF bf16',
                 lambda r: f"{flops / r['timer'].median / peak:.1%}"))
    rows.append(('MFU (best)', lambda r: f"{flops / r['timer'].best / peak:.1%}"))
    rows.append(('MFU (median), causal at 1/2', lambda r:
                 f"{causal_flops / r['timer'].median / peak:.1%}"))
  print(f"\n{'':30s}" + ''.join(f'{name:>22s}' for name, _ in cols))
  for label, fn in rows:
    print(f'{label:30s}' + ''.join(f'{fn(r):>22s}' for _, r in cols))
  print(f"{'jkd compile':30s}{res_j['compile_s']:21.1f}s")
  print(f"{'jkd XLA cost_analysis flops':30s}{tf(res_j['xla_flops']):>21s} "
        f"({res_j['xla_flops'] / flops:.2f}x the model FLOPs; XLA counts each while-loop body "
        f"once: {'' if unrolled else 'layer scan, '}micro-batch scan, fused-loss vocabulary "
        f"chunks" + ('; and nothing inside custom calls: cuDNN attention, Pallas kernels)'
                     if on_gpu else ')'))
  if not flags.skip_flops_check:
    xla1, model1 = xla_flops_loop_free(s, np_batch, flags)
    print(f"{'  same, loop-free variant':30s}{tf(xla1):>21s} vs formula {tf(model1)} "
          f"({xla1 / model1:.3f}x; 1 layer, reference loss, 1 micro-step)")
  if on_gpu and not peak:
    print(f"MFU: no peak known for {res_j['device']!r}; pass --peak-tflops")
  if not on_gpu:
    print(f'load average (1 min) before / after the timed steps: {load0:.2f} / '
          f'{load1:.2f} (other processes share these {threads} CPUs when > ~1)')
  if res_t:
    best = res_t['timer'].best / res_j['timer'].best
    med = res_t['timer'].median / res_j['timer'].median
    print(f'\njkd / PyTorch tokens/s: {best:.2f}x (best), {med:.2f}x (median); target >= 1.5x')
  if peak:
    print(f"jkd MFU {flops / res_j['timer'].median / peak:.1%} (median step; best "
          f"{flops / res_j['timer'].best / peak:.1%}; "
          f"{causal_flops / res_j['timer'].median / peak:.1%} with causal attention counted at "
          f"half); target >= 45% for a ~1B student, by PaLM's count")


if __name__ == '__main__':
  main(FLAGS)
