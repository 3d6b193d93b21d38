"""scripts/bench_train.py end to end at a tiny shape (both columns), and its CPU line."""

import os
import re
import runpy
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'bench_train.py')
TINY = ['--device', 'cpu', '--layers', '1', '--hidden', '64', '--ffn', '128', '--heads', '2',
        '--kv-heads', '1', '--vocab', '512', '--seq-len', '32', '--batch', '2',
        '--micro-batch', '2', '--top-k', '4', '--steps', '1', '--warmup', '1']


@pytest.fixture(scope='module')
def bench():
  old = sys.argv
  sys.argv = [SCRIPT]  # the script parses its flags at import
  try:
    return runpy.run_path(SCRIPT, run_name='bench_train')
  finally:
    sys.argv = old


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
"""


@pytest.mark.parametrize('kind,tflops', [
    ('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H100 PCIe', 756), ('NVIDIA H100 NVL', 835),
    ('NVIDIA H200', 989), ('NVIDIA GH200 480GB', 989), ('NVIDIA A100-SXM4-80GB', 312),
    ('NVIDIA L4', 121), ('NVIDIA L40', 181), ('NVIDIA L40S', 362), ('NVIDIA B200', 2250),
    ('NVIDIA T4', None),
])
def test_mfu_peak_is_the_devices_own(bench, kind, tflops):
  """A device kind that contains another's name (L40S holds L4, H100 PCIe holds H100) gets
  its own peak; an unknown one none (the script then asks for --peak-tflops)."""
  got = bench['peak_flops'](kind, None)
  assert (got and got / 1e12) == tflops
  assert bench['peak_flops'](kind, 100.0) == 100e12


def test_host_cpu_names_the_model_and_its_bf16_units(bench, tmp_path):
  path = tmp_path / 'cpuinfo'
  host_cpu = lambda p: bench['host_cpu'](bench['cpu_bf16_units'](p))  # noqa: E731
  path.write_text(CPUINFO)
  assert host_cpu(str(path)) == (
      'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz | bf16 units: amx_bf16, avx512_bf16')
  path.write_text(CPUINFO.replace(' avx512_bf16 amx_bf16 amx_tile amx_int8', ''))
  assert host_cpu(str(path)).endswith('| bf16 units: none (no AMX)')
  assert host_cpu(str(tmp_path / 'absent')) == ''


def test_precision_auto_is_bf16_only_where_the_cpu_has_bf16_units(bench, tmp_path):
  """torch's bf16 matmul on a CPU without bf16 units is a slow fallback: auto takes fp32 there;
  bf16 with amx_bf16 or avx512_bf16 and on GPU; an explicit choice stands."""
  path = tmp_path / 'cpuinfo'
  units = bench['cpu_bf16_units']
  resolve = lambda p, gpu, path: bench['resolve_precision'](p, gpu, units(path))  # noqa: E731
  path.write_text(CPUINFO)
  assert resolve('auto', False, str(path))[0] == 'bf16'
  path.write_text(CPUINFO.replace(' amx_bf16 amx_tile amx_int8', ''))  # avx512_bf16 alone
  assert resolve('auto', False, str(path))[0] == 'bf16'
  path.write_text(CPUINFO.replace(' avx512_bf16 amx_bf16 amx_tile amx_int8', ''))
  precision, why = resolve('auto', False, str(path))
  assert precision == 'fp32' and 'no bf16 matrix units' in why
  assert resolve('auto', True, str(path))[0] == 'bf16'
  assert resolve('bf16', False, str(path)) == ('bf16', '')
  assert resolve('auto', False, str(tmp_path / 'absent'))[0] == 'fp32'


def test_malloc_env_records_only_allocator_settings(bench):
  env = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1', 'MALLOC_ARENA_MAX': '1', 'HOME': '/root'}
  assert bench['malloc_env'](env) == 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1 MALLOC_ARENA_MAX=1'
  assert bench['malloc_env']({'HOME': '/root'}).startswith('allocator defaults')


def test_the_jkd_column_runs_on_one_device_of_several(bench, devices8):
  """The PyTorch column runs on one device and MFU divides by one device's peak: on a machine
  with several (an 8-GPU VM), jkd's step takes one of them too, not all."""
  flags = bench['parse_flags'](TINY + ['--precision', 'fp32'])
  s, _, _ = bench['resolve'](flags)
  state, _, batch = bench['jkd_setup'](s, bench['make_batch'](s, 0), flags, 'none')
  assert {len(x.sharding.device_set) for x in jax.tree.leaves((state, batch))} == {1}


def test_tiny_run_prints_both_columns_and_the_ratio():
  torch = pytest.importorskip('torch')
  proc = subprocess.run([sys.executable, SCRIPT, *TINY, '--skip-flops-check'], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
                             'JAX_PLATFORMS': 'cpu'})  # one CPU device, as a user runs it
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert re.search(rf'jkd \(JAX\)\s+PyTorch {re.escape(torch.__version__)}', out), out
  losses = re.search(r'first-step loss\s+([0-9.]+)\s+([0-9.]+)', out)
  # Same objective on the same batch, each side its own random init: the first losses lie close
  assert losses and abs(float(losses[1]) - float(losses[2])) < 0.5, out
  ratio = re.search(r'jkd / PyTorch tokens/s: ([0-9.]+)x \(best\), ([0-9.]+)x \(median\)', out)
  assert ratio and float(ratio[1]) > 0, out
  assert '\nmalloc: ' in out, out
  assert '\njkd layer scan: train.scan_unroll=0 (all layers unrolled, no loop)' in out, out
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      model = next((line.split(':', 1)[1].strip() for line in f
                    if line.startswith('model name')), None)
    if model:
      assert f'cpu: {model} | bf16 units: ' in out, out
