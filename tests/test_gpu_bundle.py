"""The GPU bundle (scripts/gpu_bundle.sh builds .device/, scripts/gpu_bundle_run.sh runs it on a
lent GPU machine without network, scripts/gpu_bundle.py is their Python side): the pinned wheels
against requirements.lock and pyproject.toml, the dry runs' commands, the size limit and the
runner's files with stand-ins for pip, python and the GPU, and the tokenizer-only GGUF against
the real SmolLM2 file. Syntax and shellcheck: tests/test_scripts.py (every scripts/*.sh)."""

import importlib.util
import os
import re
import shlex
import subprocess

import pytest

from jkd import assets
from jkd import tokenizer as jt
from tests.test_tokenizer import SMOLLM2_TEXTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_SH = os.path.join(REPO, 'scripts', 'gpu_bundle.sh')
RUN_SH = os.path.join(REPO, 'scripts', 'gpu_bundle_run.sh')
SETTINGS = {'DRY_RUN', 'PYTHON', 'OUT', 'CHECK_DIR', 'SITE', 'HOST_PYTHON', 'JKD_CACHE',
            'GPU_BUNDLE_LIMIT_MIB', 'GPU_CHECK_DIR', 'XLA_FLAGS', 'JKD_XLA_FLAGS_OFF', 'PYTHONPATH'}
ENV = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith('T_')}
# pyproject dependencies the GPU image has at a version of its own, which the bundle leaves to
# it: jax/jaxlib/numpy/ml_dtypes are its CUDA build's; the rest are version-tolerant. A new
# dependency must land here or in WHEELS.
IMAGE_OWN = {'jax', 'jaxlib', 'numpy', 'ml-dtypes', 'absl-py', 'pyyaml', 'tqdm', 'safetensors',
             'matplotlib'}
# The image's own package that transformers 5.2 rejects (tokenizers 0.23.2 > 0.23.0), and what
# transformers 5.2 needs that the image lacks: both must be in the bundle.
TRANSFORMERS_NEEDS = {'tokenizers', 'typer-slim'}
LIMITS = ('T_DEVICES', 'T_PYTEST', 'T_BENCH_LOSS', 'T_BENCH_TRAIN', 'T_SMOKE')


def norm(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def sh(script, *args, env=None, cwd=REPO, timeout=120):
  return subprocess.run(['bash', script, *args], cwd=cwd, env={**ENV, **(env or {})},
                        capture_output=True, text=True, timeout=timeout)


def commands(stdout: str) -> list[list[str]]:
  """The `+ cmd` lines of a dry run, each split into words as a shell would."""
  lines = stdout.splitlines()
  assert lines and all(line.startswith('+ ') for line in lines), stdout
  return [shlex.split(line[2:]) for line in lines]


def pinned() -> dict[str, str]:
  """normalised name -> version of gpu_bundle.sh's WHEELS, as its dry run downloads them."""
  proc = sh(BUNDLE_SH, '--dry-run')
  assert proc.returncode == 0, proc.stderr
  pins = {}
  for cmd in commands(proc.stdout):
    if cmd[1:4] == ['-m', 'pip', 'download']:
      name, version = cmd[-1].split('==')
      assert norm(name) not in pins, cmd
      pins[norm(name)] = version
  return pins


def lock() -> dict[str, str]:
  with open(os.path.join(REPO, 'requirements.lock')) as f:
    return {norm(n): v for n, _, v in (l.strip().partition('==') for l in f if '==' in l)}


def test_dry_run_downloads_each_pinned_wheel_for_the_gpu_image():
  proc = sh(BUNDLE_SH, '--dry-run')
  assert proc.returncode == 0 and not proc.stderr, proc.stderr
  cmds = commands(proc.stdout)
  assert cmds[0] == ['rm', '-rf', '.device'] and cmds[1] == ['mkdir', '-p', '.device/whl',
                                                            '.device/cache']
  downloads = [c for c in cmds if c[1:4] == ['-m', 'pip', 'download']]
  assert len(downloads) == len(pinned()) >= 13, cmds
  for cmd in downloads:
    assert cmd[0] == '.venv/bin/python' and cmd[-3:-1] == ['-d', '.device/whl'], cmd
    assert {'--no-deps', '--only-binary=:all:'} <= set(cmd), cmd
    flags = ' '.join(cmd)
    assert '--python-version 3.12 --implementation cp' in flags, cmd
    assert '--platform manylinux_2_28_x86_64' in flags and '--platform any' in flags, cmd
  assert cmds[-3] == ['env', 'PYTHONPATH=.', '.venv/bin/python', 'scripts/gpu_bundle.py', 'cache',
                      '.device/cache']
  assert cmds[-2:] == [['cp', 'scripts/gpu_bundle_run.sh', '.device/run.sh'],
                       ['chmod', '+x', '.device/run.sh']]
  ignored = subprocess.run(['git', 'check-ignore', '.device/whl/x.whl', '.device/run.sh'],
                           cwd=REPO, capture_output=True, text=True).stdout.split()
  assert ignored == ['.device/whl/x.whl', '.device/run.sh']  # by the committed .gitignore


def test_pins_are_the_lock_versions_and_cover_what_the_image_lacks():
  pins, locked = pinned(), lock()
  for name, version in pins.items():  # typer-slim, tokenizers and transformers are in the lock
    assert name in locked and locked[name] == version, (name, version, locked.get(name))
  assert {'grain', 'array-record', 'ml-collections', 'gguf', 'portpicker', 'tensorboardx',
          'flax', 'optax', 'orbax-checkpoint', 'tensorstore', 'transformers'} <= set(pins)
  assert TRANSFORMERS_NEEDS <= set(pins)
  import tomllib
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    deps = tomllib.load(f)['project']['dependencies']
  for dep in deps:
    name = norm(re.split(r'[=<>!~\[ ]', dep)[0])
    assert name in pins or name in IMAGE_OWN, f'{dep}: neither bundled nor left to the image'
    if name in pins and '==' in dep:
      assert dep.split('==')[1] == pins[name], (dep, pins[name])


@pytest.mark.parametrize('args,message', [
    (('--bogus',), "unknown argument '--bogus'"),
    (('--out',), '--out needs a value'),
    (('--out', '.'), "--out '.': not a folder"),
    (('--out', 'docs'), '--out docs holds more than a bundle'),
    (('--out', 'bundle_here'), 'inside the repository but not git-ignored'),
])
def test_bad_out_fails_with_a_message(args, message):
  proc = sh(BUNDLE_SH, '--dry-run', *args)
  assert proc.returncode == 2 and not proc.stdout, proc.stdout
  assert message in proc.stderr, proc.stderr


# A stand-in for the venv's python: pip download writes a wheel-named file of STUB_BYTES,
# gpu_bundle.py cache makes its folder.
FAKE_PIP = """#!/bin/bash
if [[ $2 == pip && $3 == download ]]; then
  d=${@: -2:1}; spec=${@: -1}
  head -c "${STUB_BYTES:-1000}" /dev/zero > "$d/${spec%%==*}-${spec##*==}-py3-none-any.whl"
elif [[ $1 == scripts/gpu_bundle.py && $2 == cache ]]; then
  mkdir -p "$3/x"
else
  exit 9
fi
"""


def _stub(tmp_path, name, body):
  path = tmp_path / name
  path.write_text(body)
  path.chmod(0o755)
  return str(path)


def test_bundle_reports_its_size_and_refuses_over_the_limit(tmp_path):
  python = _stub(tmp_path, 'python', FAKE_PIP)
  out = tmp_path / 'bundle'
  out.mkdir()
  (out / 'whl').mkdir()
  (out / 'whl' / 'stale.whl').write_text('from an older bundle')
  proc = sh(BUNDLE_SH, '--out', str(out), env={'PYTHON': python})
  assert proc.returncode == 0, proc.stderr
  assert 'outside the repository' in proc.stderr  # a tmp folder: allowed, with a note
  wheels = sorted(os.listdir(out / 'whl'))
  assert len(wheels) == len(pinned()) and 'stale.whl' not in wheels, wheels
  assert os.access(out / 'run.sh', os.X_OK) and (out / 'cache' / 'x').is_dir()
  assert re.search(r'gpu_bundle: \S+ [\d.]+ MiB \(\d+ wheels .*working tree [\d.]+ MiB = '
                   r'[\d.]+ MiB of the 64 MiB', proc.stdout), proc.stdout
  # 1 MiB of wheels each: over a 10 MiB limit, with a message and a non-zero status.
  proc = sh(BUNDLE_SH, '--out', str(out), env={'PYTHON': python, 'STUB_BYTES': str(1 << 20),
                                               'GPU_BUNDLE_LIMIT_MIB': '10'})
  assert proc.returncode == 1 and 'is over the 10 MiB a device call carries' in proc.stderr, (
      proc.stdout, proc.stderr)


def _fake_bundle(tmp_path):
  bundle = tmp_path / 'bundle'
  (bundle / 'whl').mkdir(parents=True)
  (bundle / 'cache').mkdir()
  for name in ('grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl',
               'orbax_checkpoint-0.12.8-py3-none-any.whl'):
    (bundle / 'whl' / name).write_text('')
  (bundle / 'run.sh').write_text(open(RUN_SH).read())
  return bundle


def test_runner_dry_run_installs_to_site_and_fits_the_call(tmp_path):
  bundle = _fake_bundle(tmp_path)
  proc = sh(str(bundle / 'run.sh'), '--dry-run', '--skip', 'bench_train')
  assert proc.returncode == 0, proc.stderr
  cmds = commands(proc.stdout)
  install = next(c for c in cmds if c[1:4] == ['-m', 'pip', 'install'])
  assert {'--no-index', '--no-deps', '--upgrade'} <= set(install), install
  assert install[install.index('--target') + 1] == '/tmp/site'
  assert install[-2:] == [f'{bundle}/whl/grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl',
                          f'{bundle}/whl/orbax_checkpoint-0.12.8-py3-none-any.whl']
  [export] = [c for c in cmds if c[0] == 'export']
  assert {'PYTHONPATH=/tmp/site', f'JKD_CACHE={bundle}/cache', 'JAX_PLATFORMS=cuda'} <= set(export)
  assert ['python3', 'scripts/gpu_bundle.py', 'versions', 'grain==0.2.18',
          'orbax_checkpoint==0.12.8'] in cmds
  check = cmds[-1]
  assert check[0] == 'env' and check[-6:] == ['bash', 'scripts/gpu_check.sh', '--out',
                                              '/tmp/jkd/gpu_check', '--skip', 'bench_train']
  limits = dict(w.split('=', 1) for w in check[1:-6])
  assert limits.pop('PYTHON') == 'python3' and set(limits) == set(LIMITS), limits
  # Inside one 600 s call, with time left for the start-up, the install and the copies.
  assert sum(int(v) for v in limits.values()) <= 560, limits


def test_runner_needs_a_bundle():
  proc = sh(RUN_SH, '--dry-run')  # the committed copy: scripts/ holds no wheels
  assert proc.returncode == 2 and 'no wheels in' in proc.stderr, proc.stderr


# The GPU machine's python3 (and gpu_check.sh's PYTHON): pip install makes the target, the
# smoke run leaves a trace, everything else passes.
FAKE_HOST_PYTHON = """#!/bin/bash
echo "python $* [XLA_FLAGS=${XLA_FLAGS:-}]" >> "$CALLS"
if [[ -n ${UNKNOWN_FLAG:-} && "$*" == *jax.devices* && ${XLA_FLAGS:-} == *--xla_gpu* ]]; then
  echo "F0000 parse_flags_from_env.cc:234] Unknown flags in XLA_FLAGS: --xla_gpu_x" >&2
  exit 134
fi
if [[ $2 == pip && $3 == install ]]; then
  [[ -z ${FAIL_PIP:-} ]] || exit 1
  while [[ $1 != --target ]]; do shift; done
  mkdir -p "$2"
elif [[ "$*" == *jkd.main* ]]; then
  for a in "$@"; do
    if [[ $a == --config.workdir=* ]]; then
      mkdir -p "${a#*=}/kd/profile" && touch "${a#*=}/kd/profile/host.xplane.pb"
    fi
  done
fi
"""


def _run_fake_bundle(tmp_path, **env):
  """run.sh of a fake bundle with the stand-in python3 and nvidia-smi: (process, the python
  calls it made, one line each with their XLA_FLAGS). `env` adds variables (FAIL_PIP, ...)."""
  bundle = _fake_bundle(tmp_path)
  calls = tmp_path / 'calls.txt'
  _stub(tmp_path, 'python3', FAKE_HOST_PYTHON)
  _stub(tmp_path, 'nvidia-smi', '#!/bin/sh\necho "NVIDIA H100 80GB HBM3 (stand-in)"\n')
  proc = sh(str(bundle / 'run.sh'), timeout=180, env={
      'PATH': f'{tmp_path}:{ENV["PATH"]}', 'HOST_PYTHON': 'python3', 'CALLS': str(calls),
      'OUT': str(tmp_path / 'out'), 'CHECK_DIR': str(tmp_path / 'check'),
      'SITE': str(tmp_path / 'site'), **env})
  return proc, calls.read_text() if calls.exists() else ''


def test_runner_sends_back_at_most_8_flat_files(tmp_path):
  proc, called = _run_fake_bundle(tmp_path)
  out = tmp_path / 'out'
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  files = sorted(os.listdir(out))
  assert files == ['gpu_check-bench_loss.log', 'gpu_check-bench_train.log',
                   'gpu_check-devices.log', 'gpu_check-pytest.log', 'gpu_check-smoke.log',
                   'run.log'], files
  assert len(files) <= 8 and all(re.fullmatch(r'[A-Za-z0-9._-]+', f) for f in files)
  log = (out / 'run.log').read_text()
  assert 'NVIDIA H100 80GB HBM3 (stand-in)' in log and 'smoke: ok' in log, log
  assert log.index('+ export PYTHONPATH=') < log.index('gpu_check summary'), log
  assert f'--target {tmp_path}/site' in called and 'scripts/gpu_bundle.py versions' in called
  steps = [c for c in called.splitlines() if 'jkd.main' in c or 'bench_' in c]
  assert steps and all('--xla_gpu_enable_latency_hiding_scheduler' in c for c in steps), steps
  assert (tmp_path / 'site').is_dir()


def test_runner_checks_without_xla_flags_this_jaxlib_does_not_know(tmp_path):
  """The image's jaxlib aborts on an unknown flag of xla_flags.sh: the probe sees it, says so,
  and every step runs without the flags (and passes)."""
  proc, called = _run_fake_bundle(tmp_path, UNKNOWN_FLAG='1')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  log = (tmp_path / 'out' / 'run.log').read_text()
  assert 'checking without them (JKD_XLA_FLAGS_OFF=1)' in log and '--xla_gpu_x' in log, log
  steps = [c for c in called.splitlines() if 'jkd.main' in c or 'bench_' in c]
  assert steps and all(c.endswith('[XLA_FLAGS=]') for c in steps), steps


def test_runner_stops_when_the_wheels_do_not_install(tmp_path):
  """A failed pip install (say, an image without Python 3.12) is exit 2, and the check does
  not run on the image's own versions."""
  proc, called = _run_fake_bundle(tmp_path, FAIL_PIP='1')
  assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'the bundle is unusable' in (tmp_path / 'out' / 'run.log').read_text()
  assert 'pip install' in called and 'jkd.main' not in called


def _load_gpu_bundle_py():
  spec = importlib.util.spec_from_file_location(
      'gpu_bundle', os.path.join(REPO, 'scripts', 'gpu_bundle.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_versions_says_which_pins_are_not_in_use(capsys):
  gb = _load_gpu_bundle_py()
  import gguf  # noqa: F401  (installed here at the lock's version)
  assert gb.versions([f'gguf=={lock()["gguf"]}']) == []
  assert gb.versions(['gguf==0.0.1', 'no-such-package==1.0']) == [
      f'gguf==0.0.1 (found {lock()["gguf"]})', 'no-such-package==1.0 (found absent)']
  assert 'NOT IN USE' in capsys.readouterr().out


@pytest.fixture(scope='module')
def smollm2_real():
  return assets.smollm2_gguf(verbose=False)


@pytest.mark.slow
def test_tokenizer_only_gguf_reads_as_the_real_file(smollm2_real, tmp_path):
  """The stripped file keeps every general.* and tokenizer.* field, no tensors, and jkd's
  tokenizer reads the same ids from it; a copy missing the token types does not pass."""
  import gguf
  gb = _load_gpu_bundle_py()
  small = str(tmp_path / 'small.gguf')
  n = gb.tokenizer_only(smollm2_real, small)
  real_r, small_r = gguf.GGUFReader(smollm2_real), gguf.GGUFReader(small)
  kept = {k: f for k, f in real_r.fields.items() if k.startswith(('general.', 'tokenizer.'))}
  assert n == len(kept) >= 20 and 'tokenizer.chat_template' in kept
  assert set(small_r.fields) == set(kept) | {'GGUF.version', 'GGUF.tensor_count', 'GGUF.kv_count'}
  for key, field in kept.items():
    assert small_r.fields[key].types == field.types, key
    assert small_r.fields[key].contents() == field.contents(), key
  assert len(small_r.tensors) == 0 and os.path.getsize(small) < 3e6
  real, stripped = jt.from_gguf(smollm2_real), jt.from_gguf(small)
  for text in SMOLLM2_TEXTS:
    assert stripped.encode(text) == real.encode(text), text
  assert (stripped.bos_id, stripped.eos_id, stripped.pad_id, stripped.vocab_size) == (
      real.bos_id, real.eos_id, real.pad_id, real.vocab_size) == (1, 2, 2, 49152)
  gb.same_tokenizer(smollm2_real, small)
  # Without the token types, the control tokens are plain tokens: same_tokenizer must object.
  broken = str(tmp_path / 'broken.gguf')
  gb.tokenizer_only(smollm2_real, broken,
                    keep=lambda k: gb._kept(k) and k != 'tokenizer.ggml.token_type')
  assert jt.from_gguf(broken).encode('<|im_start|>') != real.encode('<|im_start|>')
  with pytest.raises(ValueError, match='differs'):
    gb.same_tokenizer(smollm2_real, broken)


@pytest.mark.slow
def test_filled_cache_is_found_by_jkd_assets_without_a_download(smollm2_real, tmp_path,
                                                                monkeypatch):
  gb = _load_gpu_bundle_py()
  corpus = assets.chatterbot_english(verbose=False)
  dest = tmp_path / 'cache'
  written = gb.fill_cache(str(dest), verbose=False)
  with pytest.raises(ValueError, match='inside'):  # never fills the cache it reads
    gb.fill_cache(os.path.join(assets.cache_dir(), 'sub'), verbose=False)

  def no_download(*args, **kwargs):
    raise AssertionError(f'jkd.assets downloaded: {args}')
  monkeypatch.setattr(assets.subprocess, 'run', no_download)
  monkeypatch.setenv('JKD_CACHE', str(dest))
  path = assets.smollm2_gguf(verbose=False)
  assert path == written[0] and os.path.getsize(path) < 3e6
  assert jt.from_gguf(path).files == jt.from_gguf(smollm2_real).files
  folder = assets.chatterbot_english(verbose=False)
  assert folder == written[1] and sorted(os.listdir(folder)) == sorted(os.listdir(corpus))
  assert len(os.listdir(folder)) == 21
