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
# many tests and restarts). A size limit turns on jax's file lock around each entry's read and
# write, so the xdist workers and their subprocesses can share it.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax'))
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402
import pytest  # noqa: E402


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
