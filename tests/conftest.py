"""Test setup: CPU with 8 simulated devices (set before jax is imported), offline HF."""

import os

_flag = '--xla_force_host_platform_device_count=8'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
# One persistent compilation cache for the tests and the jkd subprocesses they start (inherited
# through the environment): a cached executable is the one a fresh compile builds, so it only
# saves compile time, where a 2-core machine spends much of the suite (the same train steps in
# many tests and restarts). Without a size limit (-1): with one, jax rescans the whole directory
# (some 1,600 entries by the end) under a file lock at every write, which cost the suite about
# 2 minutes (measured: 890 s with a 4 GiB limit, 766 s without). Without the lock, a process
# that reads an entry while another writes it warns and compiles the program itself.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax'))
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', '-1')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import signal  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# A suite started in the background of a non-interactive shell (`make test &`, nohup) inherits
# SIGINT ignored, and so would every job its tests start: jkd leaves an ignored SIGINT alone,
# which is right for such a job, but the Ctrl-C tests need SIGINT as a terminal leaves it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

# The tests' own programs compile with jax's `jax_disable_most_optimizations`: XLA's CPU backend
# without LLVM's optimisation passes. The programs (HLO and XLA's passes) are the same, only
# their machine code is slower, which the tests' tiny shapes rarely feel: they spend their time
# compiling (measured: test_model, test_fused_topk_kd and test_losses in 112 s instead of 164
# s). The jkd jobs the tests start keep the default: they run longer, many from the compilation
# cache, and some over SmolLM2's 49k-token vocabulary, where slower code costs more than the
# compiles saved. JAX_DISABLE_MOST_OPTIMIZATIONS=0 (or 1) sets both.
if 'JAX_DISABLE_MOST_OPTIMIZATIONS' not in os.environ:
  jax.config.update('jax_disable_most_optimizations', True)


def pytest_collection_modifyitems(config, items):
  if any(d.platform == 'gpu' for d in jax.devices()):
    return
  skip = pytest.mark.skip(reason='needs a GPU (gpu marker)')
  for item in items:
    if 'gpu' in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def cudnn_stand_in(monkeypatch):
  """Lets cuDNN attention lower for cuda on a machine without CUDA: jax checks cuDNN's version
  and the GPU's compute capability while tracing; this stands in cuDNN 9.10 on an H100 (jax's
  private checks, test-only)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(fa, 'check_compute_capability', lambda capability: True)
  monkeypatch.setattr(fa, 'is_cuda_compute_capability_equal', lambda capability: False)


@pytest.fixture
def triton_h100_stand_in(monkeypatch):
  """Lets Triton kernels lower for cuda on a machine without a GPU under jax >= 0.11, whose
  Triton lowering asks which GPU it compiles for; this answers an H100 (jax's private lookup,
  test-only; jax 0.10, the pinned version, has no such lookup and needs no stand-in).
  `jax.sharding.use_abstract_mesh` with an H100 `AbstractDevice` would do for a kernel at top
  level, but a shard_map sets its own mesh, built from the CPU devices."""
  try:
    from jax._src.pallas.triton import gpu_info
  except ImportError:
    return
  monkeypatch.setattr(gpu_info, 'get_device_kind', lambda: 'NVIDIA H100 80GB HBM3')


@pytest.fixture(scope='session')
def devices8():
  assert jax.device_count() == 8, 'tests expect 8 simulated CPU devices'
  return jax.devices()
