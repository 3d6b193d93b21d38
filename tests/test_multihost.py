"""Several processes on JAX's own runtime (jax.distributed) equal one process with as many
devices: training (the same per-step losses) and extraction (the same store contents); and
the `distributed` config keys resolve as documented.

Each equivalence launches the CLI as 2 processes of 4 CPU devices, joined through a
coordinator on 127.0.0.1 (gloo collectives between them), and as 1 process of 8 devices.
"""

import glob
import os
import signal
import socket
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from configs import base
from jkd import distributed, model
from tests import test_extract as te
from tests import test_train_loop as tt

store = tt.store  # the smoke store (module fixture), extracted by one 8-device process


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _process_env(i: int, n: int, address: str, **extra) -> dict[str, str]:
  """Process i of n on CPU: this environment without the distributed variables, then the
  coordinator's when n > 1, then `extra`."""
  env = {k: v for k, v in os.environ.items() if k not in distributed.ENV.values()}
  env['JAX_PLATFORMS'] = 'cpu'
  if n > 1:
    env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
  return {**env, **extra}


def _run_processes(cmd, n: int, timeout: float = 900) -> list[str]:
  """Runs `cmd` as n processes of 8 / n CPU devices each; asserts that all exit 0; returns
  their outputs."""
  address = f'127.0.0.1:{_free_port()}'
  procs, outputs = [], []
  try:
    for i in range(n):
      env = _process_env(i, n, address,
                         XLA_FLAGS=f'--xla_force_host_platform_device_count={8 // n}')
      procs.append(subprocess.Popen(cmd, cwd=tt.REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:  # a failed or hung peer must not outlive the test
      if p.poll() is None:
        p.kill()
        p.communicate()
  failed = [(i, p.returncode, out) for i, (p, out) in enumerate(zip(procs, outputs))
            if p.returncode != 0]
  assert not failed, '\n'.join(f'--- process {i} of {n}: exit {rc}\n{out[-3000:]}'
                               for i, rc, out in failed)
  if n > 1:
    assert f'process 1/{n}, 8 cpu devices' in outputs[1], outputs[1][-2000:]
  return outputs


def test_two_processes_train_as_one_process_of_eight_devices(store, tmp_path):
  """(1, 8, 1) mesh, FSDP across the two processes (and (2, 4, 1), data-parallel across them,
  for the losses): the same losses, gradient norms and
  validation loss at every step (metrics.jsonl, written by process 0 only), the same token
  counts (tokens/s x step time), and the same
  checkpoints: steps, and the last one's params, which each process saved its shards of; and
  the same exports at the end (the model directory saved together, .nemo and HF written by
  process 0 from the whole params). Two processes profile steps 2..3 with a Perfetto file each,
  in folders of their own."""
  args = ('--config.train.max_steps=4', '--config.train.val_check_interval=2',
          '--config.train.save_interval=2', '--config.train.limit_val_batches=2')
  profile = ('--config.profile.start_step=2', '--config.profile.steps=2',
             '--config.profile.create_perfetto_trace=True')
  for run, n in (('one', 1), ('two', 2)):
    _run_processes(tt._train_cli(
        store, tmp_path / run, *args, f'--config.train.export_hf={tmp_path / run / "hf"}',
        f'--config.train.export_nemo={tmp_path / run / "student.nemo"}',
        *(profile if n > 1 else ())), n)
  # The mesh docs/gcp.md gives N VMs: data-parallel across the processes, FSDP within each.
  _run_processes(tt._train_cli(store, tmp_path / 'hybrid', *args,
                               '--config.mesh.shape=(-1,4,1)'), 2)
  for i in range(2):
    session = glob.glob(str(tmp_path / 'two' / 'profile' / f'process_{i}' / 'plugins' /
                            'profile' / '*'))
    assert len(session) == 1 and glob.glob(session[0] + '/*.xplane.pb'), session
    assert os.path.isfile(os.path.join(session[0], 'perfetto_trace.json.gz'))
  a, b, h = (tt._metrics(tmp_path / run) for run in ('one', 'two', 'hybrid'))
  assert sorted(a) == sorted(b) == sorted(h) == [1, 2, 3, 4]
  for step in a:
    keys = ['train/loss', 'train/kd_loss', 'train/sft_loss', 'train/grad_norm']
    keys += ['val/loss'] if step % 2 == 0 else []
    for key in keys:
      assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
      assert h[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    # tokens/s x step time: the real tokens of the global batch, every process's rows counted
    tokens = [r['train/tokens_per_sec'] * r['train/step_time'] for r in (a[step], b[step])]
    assert tokens[1] == pytest.approx(tokens[0], rel=1e-9) and tokens[0] > 0, step
  assert sorted(os.listdir(tmp_path / 'two' / 'checkpoints')) == ['2', '4']
  (sa, pa), (sb, pb) = tt._final_params(tmp_path / 'one'), tt._final_params(tmp_path / 'two')
  assert sa == sb == 4
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
  (_, ma), (_, mb) = (model.load(str(tmp_path / run / 'student')) for run in ('one', 'two'))
  for x, y, z in zip(jax.tree.leaves(ma), jax.tree.leaves(mb), jax.tree.leaves(pa), strict=True):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x, z, rtol=1e-5, atol=1e-7)  # the last checkpoint's params
  from safetensors.torch import load_file
  ha, hb = (load_file(str(tmp_path / run / 'hf' / 'model.safetensors')) for run in ('one', 'two'))
  assert sorted(ha) == sorted(hb) and ha
  for name in ha:  # bf16 in the file: a last-bit difference of the fp32 params may round apart
    np.testing.assert_allclose(hb[name].float().numpy(), ha[name].float().numpy(), rtol=1e-2,
                               atol=1e-6, err_msg=name)
  for run in ('one', 'two'):
    assert tarfile.is_tarfile(tmp_path / run / 'student.nemo')


def test_two_processes_distill_online_as_one_process(store, tmp_path):
  """distill.teacher_source='online' (each process reads data.train_file and runs the teacher
  on its rows of every micro-batch) as 2 processes: the losses, gradient norms and validation
  loss of 1 process with 8 devices."""
  root = store.parent  # the smoke teacher and its data
  args = ('--config.train.max_steps=3', '--config.train.val_check_interval=3',
          '--config.train.save_interval=3', '--config.train.limit_val_batches=1',
          *tt.online_args(root))
  for run, n in (('one', 1), ('two', 2)):
    _run_processes(tt._train_cli('', tmp_path / run, *args), n)
  a, b = tt._metrics(tmp_path / 'one'), tt._metrics(tmp_path / 'two')
  assert sorted(a) == sorted(b) == [1, 2, 3]
  for step in a:
    keys = ['train/loss', 'train/kd_loss', 'train/sft_loss', 'train/grad_norm']
    for key in keys + (['val/loss', 'val/kd_loss'] if step == 3 else []):
      assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)


def _config(**kw):
  c = base.get_config()
  for k, v in kw.items():
    c.distributed[k] = v
  return c


def test_distributed_settings_come_from_config_then_environment():
  assert distributed.settings(_config(), environ={}) is None  # one process: no initialize
  env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:8476', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '3', 'JAX_LOCAL_DEVICE_IDS': '0,1'}
  s = distributed.settings(_config(), environ=env)
  assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
      '10.0.0.1:8476', 4, 3, (0, 1))
  s = distributed.settings(_config(process_id=2), environ=env)  # the config wins
  assert s.process_id == 2
  assert distributed.settings(_config(num_processes=1), environ={}) is None
  # One process with its devices named (a single-node Slurm job sets JAX_LOCAL_DEVICE_IDS)
  for kw, env, ids in (({'local_device_ids': '0,1,2,3'}, {}, (0, 1, 2, 3)),
                       ({}, {'JAX_LOCAL_DEVICE_IDS': '2,3'}, (2, 3)),
                       ({}, {'JAX_NUM_PROCESSES': '1', 'JAX_PROCESS_ID': '0',
                             'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_LOCAL_DEVICE_IDS': '0,1'},
                        (0, 1))):
    s = distributed.settings(_config(**kw), environ=env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
        None, 1, 0, ids), s
  auto = distributed.settings(_config(auto=True), environ={})  # JAX detects the rest
  assert auto.auto and auto.coordinator_address is None and auto.num_processes is None


@pytest.mark.parametrize('kw, env, message', [
    ({'coordinator_address': 'h:1', 'num_processes': 2}, {}, r'distributed\.process_id is unset'),
    ({}, {'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'}, r'coordinator_address is unset'),
    ({'process_id': 2, 'num_processes': 2, 'coordinator_address': 'h:1'}, {},
     r'distributed\.process_id=2'),
    ({}, {'JAX_PROCESS_ID': 'x'}, r'JAX_PROCESS_ID=.x.: not an integer'),
    ({'coordinator_address': 'host'}, {}, r'distributed\.coordinator_address=.host.: expected'),
    ({}, {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:84x6'},
     r'JAX_COORDINATOR_ADDRESS=.10\.0\.0\.1:84x6.: expected HOST:PORT, a port in 1\.\.65535'),
    ({'coordinator_address': '[::1]:0'}, {}, r'coordinator_address=.\[::1\]:0.: expected'),
    ({'num_processes': 0}, {}, r'distributed\.num_processes=0'),
])
def test_bad_distributed_settings_name_the_key(kw, env, message):
  with pytest.raises(ValueError, match=message):
    distributed.settings(_config(**kw), environ=env)


def test_two_processes_extract_the_store_of_one_process_of_eight_devices(store, tmp_path):
  """(2, 2, 2) mesh: batch rows over data x fsdp (the two processes hold rows 0-3 and 4-7),
  vocabulary over tensor. Each process writes the rows it holds into its own blocks and
  manifest; the store reads back with every example once, each field equal to the one
  process's store. A rerun finds every example committed (whichever process wrote it)."""
  root = store.parent
  cmd = te._extract_cli(root, tmp_path / 'two', '--config.mesh.shape=(2,2,2)')
  _run_processes(cmd, 2)
  _run_processes(te._extract_cli(root, tmp_path / 'one', '--config.mesh.shape=(2,2,2)'), 1)
  manifests = sorted(f for f in os.listdir(tmp_path / 'two' / 'train')
                     if f.startswith('manifest.p'))
  assert manifests == ['manifest.p00000.json', 'manifest.p00001.json']
  a, b = te._records(tmp_path / 'one'), te._records(tmp_path / 'two')
  assert sorted(a) == sorted(b) == list(range(48))
  for index in a:
    for field in ('tokens', 'labels', 'loss_mask', 'topk_ids', 'topk_logits', 'lse'):
      np.testing.assert_array_equal(getattr(a[index], field), getattr(b[index], field),
                                    err_msg=f'{index} {field}')
  rerun = _run_processes(cmd, 2)
  assert '0 new examples' in rerun[0] and '0 new examples' in rerun[1]
  assert sorted(te._records(tmp_path / 'two')) == list(range(48))


def test_incomplete_distributed_settings_are_a_one_line_cli_error():
  """jkd.main resolves `distributed` before the backend starts and names the missing key."""
  env = {k: v for k, v in os.environ.items() if k not in distributed.ENV.values()}
  proc = subprocess.run([sys.executable, '-m', 'jkd.main', '--config', 'configs/base.py',
                         '--config.distributed.num_processes=2'], cwd=tt.REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jkd: error: distributed.coordinator_address is unset'), proc.stderr


@pytest.mark.parametrize('config', ['convert', 'export', 'eval', 'smoke'])
def test_a_one_process_mode_asked_for_several_is_refused_before_joining(config):
  """Process 0 of 2 in a one-process mode (a stray Slurm or launcher environment, say): refused
  in one line at once; it waited for its peer, then aborted, or (with both started) was refused
  only once both had joined."""
  with socket.socket() as free:
    free.bind(('127.0.0.1', 0))
    port = free.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k not in distributed.ENV.values()}
  env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
             JAX_PROCESS_ID='0')
  proc = subprocess.run([sys.executable, '-m', 'jkd.main', '--config', f'configs/{config}.py',
                         '--config.distributed.initialization_timeout=60'], cwd=tt.REPO,
                        env=env, capture_output=True, text=True, timeout=50)
  assert proc.returncode == 2, proc.stderr[-2000:]
  mode = 'pipeline' if config == 'smoke' else config
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f'jkd: error: mode={mode}: runs in one process (2 asked by distributed.num_processes or '
      'JAX_NUM_PROCESSES)'), proc.stderr


def test_an_unreachable_coordinator_is_one_line_not_an_abort():
  """Process 1 with nothing listening at the coordinator: JAX's own wait aborts the process
  (SIGABRT, a C++ check); jkd waits itself and says so in one line, exit 2."""
  with socket.socket() as free:  # a port nothing listens on
    free.bind(('127.0.0.1', 0))
    port = free.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k not in distributed.ENV.values()}
  proc = subprocess.run([sys.executable, '-m', 'jkd.main', '--config', 'configs/base.py',
                         f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                         '--config.distributed.num_processes=2',
                         '--config.distributed.process_id=1',
                         '--config.distributed.initialization_timeout=2'], cwd=tt.REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'jkd: error: coordinator 127.0.0.1:{port}: nothing answered within 2 s'
                         ), proc.stderr


def test_wait_for_coordinator_returns_once_a_port_answers():
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    distributed.wait_for_coordinator(f'127.0.0.1:{server.getsockname()[1]}', 5)


def test_a_slurm_step_does_not_narrow_the_devices_of_an_explicit_run():
  """Inside an srun step with one task per node, JAX's cluster detection would set the unset
  local_device_ids to the local rank: one GPU per process. Without distributed.auto jkd turns
  detection off, so every process keeps all of its devices (read: jax_cuda_visible_devices)."""
  snippet = ('from configs import base; from jkd import distributed; import jax; '
             'distributed.initialize(base.get_config()); '
             'print("visible", jax.config.read("jax_cuda_visible_devices")); '
             'jax.distributed.shutdown()')
  address, procs = f'127.0.0.1:{_free_port()}', []
  for i in range(2):
    env = _process_env(i, 2, address, SLURM_JOB_ID='7', SLURM_STEP_NODELIST='node[0-1]',
                       SLURM_NTASKS='2', SLURM_PROCID=str(i), SLURM_LOCALID='0')
    procs.append(subprocess.Popen([sys.executable, '-c', snippet], cwd=tt.REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    outputs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0 and 'visible all' in out, out[-2000:]


def test_one_process_keeps_to_its_named_devices():
  """JAX applies local_device_ids only inside jax.distributed.initialize: a single process (two
  runs sharing a host, GPUs 0-3 and 4-7) used to get all of the host's devices."""
  snippet = ('from configs import base; from jkd import distributed; import jax; '
             'c = base.get_config(); c.distributed.local_device_ids = "4,5"; '
             'distributed.initialize(c); '
             'print("visible", jax.config.read("jax_cuda_visible_devices"), jax.process_count())')
  proc = subprocess.run([sys.executable, '-c', snippet], cwd=tt.REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0 and 'visible 4,5 1' in proc.stdout, proc.stderr[-2000:]


_STOP_LOOP = '''
import os, signal, sys, time
import jax
from configs import base
from jkd import distributed
config = base.get_config()
config.mode, when, sig, children = sys.argv[1:]
SIG = signal.SIGINT if sig.startswith('INT') else signal.SIGTERM  # INT2: Ctrl-C twice
distributed.initialize(config)
last = jax.process_index() == jax.process_count() - 1
if config.mode not in distributed.STOPPABLE_MODES:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices('started')
  if last:
    os.kill(os.getpid(), SIG)
    time.sleep(3)
    print('survived', flush=True)
  else:  # the last one has ended before its coordinator does (JAX would abort it then)
    time.sleep(3)
  os._exit(0)  # (a peer that died would hold up jax.distributed.shutdown)
with distributed.Preemption(children=children == '1') as preemption:
  for step in range(1, 1000 if when == 'in' else 6):
    time.sleep(0.02)
    if when == 'in' and step == 3 and last:
      for _ in range(2 if sig == 'INT2' else 1):
        os.kill(os.getpid(), SIG)
    if preemption.reached():
      break
  print('stopped after step', step, flush=True)
  if when == 'late':  # after the last check
    if jax.process_count() > 1:  # together from here, so that they leave the loop together
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('late')
    if last:
      os.kill(os.getpid(), SIG)
    time.sleep(1.5)  # the notice reaches the coordination service
    if jax.process_count() > 1:
      print('notice recorded', distributed._preemption_notice(), flush=True)
if preemption.stopping:
  preemption.stop('the loop')
print('survived', flush=True)
'''


def _stop_loop(mode: str, n: int, when: str = 'in', sig: str = 'TERM', children: bool = False):
  """[((stdout, stderr), returncode)] of n processes running _STOP_LOOP; the last one sends
  itself `sig` at step 3 (`when='in'`) or after the loop's last check (`'late'`)."""
  address, procs = f'127.0.0.1:{_free_port()}', []
  for i in range(n):
    procs.append(subprocess.Popen([sys.executable, '-c', _STOP_LOOP, mode, when, sig,
                                   str(int(children))], cwd=tt.REPO,
                                  env=_process_env(i, n, address), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  try:
    return [(p.communicate(timeout=120), p.returncode) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


@pytest.mark.parametrize('n,sig,children', [(1, 'TERM', False), (2, 'TERM', False),
                                             (1, 'INT', False), (1, 'INT', True),
                                             (2, 'INT', False)])
def test_a_signal_stops_every_process_after_the_same_step(n, sig, children):
  """The last process sends itself SIGTERM, or SIGINT (Ctrl-C), at step 3: one process stops
  after the first step checked once the handler has run (3, or later on a busy machine: the
  signal is taken by another thread); two agree, through JAX's preemption service (a Ctrl-C
  reaches it as a SIGTERM), on a later step both still had to reach. A SIGTERM's processes
  exit 143; a Ctrl-C's own process ends by SIGINT, as Python ends on Ctrl-C (with `children`,
  its thread blocked the signal)."""
  results = _stop_loop('train', n, sig=sig, children=children)
  steps = set()
  for i, ((out, err), rc) in enumerate(results):
    interrupted = sig == 'INT' and i == n - 1
    assert rc == (-signal.SIGINT if interrupted else distributed.STOPPED_EXIT), (
        rc, out, err[-2000:])
    name = 'Ctrl-C' if interrupted else 'SIGTERM'
    assert f'{name}: stopped the loop; run the same command again' in err, err[-2000:]
    assert (f'KeyboardInterrupt: {distributed.STOPPED}' in err) == interrupted
    assert ('Ctrl-C again stops at once' in err) == interrupted
    steps.add(int(out.split('stopped after step ')[1].split()[0]))
  assert len(steps) == 1, steps
  assert min(steps) >= 3 if n == 1 else min(steps) > 3


def test_a_second_ctrl_c_interrupts_at_once():
  """As Python's own Ctrl-C: KeyboardInterrupt where the loop is, nothing more run."""
  [((out, err), rc)] = _stop_loop('train', 1, sig='INT2')
  assert rc == -signal.SIGINT and 'KeyboardInterrupt' in err, (rc, out, err[-2000:])
  assert 'stopped after step' not in out


@pytest.mark.parametrize('n,sig', [(1, 'TERM'), (2, 'TERM'), (1, 'INT'), (2, 'INT')])
def test_a_signal_after_the_last_check_ends_every_process_on_leaving_the_loop(n, sig):
  """After the loop's last step the signal is no stop request any more: leaving the loop ends
  the process as the signal does (SIGTERM; KeyboardInterrupt for Ctrl-C), every process of
  several too (they agree on it through JAX's service: the others die of SIGTERM, unless JAX
  aborts one first because a peer has ended)."""
  by_signal = 0
  for i, ((out, err), rc) in enumerate(_stop_loop('train', n, when='late', sig=sig)):
    own = -signal.SIGINT if sig == 'INT' and i == n - 1 else -signal.SIGTERM
    assert rc in (own, -signal.SIGABRT) if n > 1 else rc == own, (rc, out, err[-2000:])
    assert 'stopped after step 5' in out and 'survived' not in out
    if rc == own:  # (an aborted one may not have printed it)
      by_signal += 1
      assert ('notice recorded True' in out) == (n > 1), out  # the key _preemption_notice reads
  assert by_signal >= 1


def test_sigterm_ends_a_process_of_a_mode_without_a_stopping_loop():
  """JAX's preemption service, which would swallow the signal, is not started for them."""
  *_, ((out, err), rc) = _stop_loop('convert', 2)
  assert rc == -signal.SIGTERM and 'survived' not in out, (rc, out, err[-2000:])


def test_sigterm_after_the_last_check_ends_the_process_on_leaving_the_block():
  snippet = ('import os, signal\nfrom jkd import distributed\n'
             'with distributed.Preemption():\n  os.kill(os.getpid(), signal.SIGTERM)\n'
             'print("survived")\n')
  proc = subprocess.run([sys.executable, '-c', snippet], cwd=tt.REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == -signal.SIGTERM and 'survived' not in proc.stdout, proc.stderr


def test_an_ignored_sigint_stays_ignored():
  """A background job's SIGINT (ignored from the start) is no stop request; the loop's block
  leaves it as it found it."""
  snippet = ('import os, signal\nfrom jkd import distributed\n'
             'signal.signal(signal.SIGINT, signal.SIG_IGN)\n'
             'with distributed.Preemption() as p:\n  os.kill(os.getpid(), signal.SIGINT)\n'
             '  print("stopping", p.reached())\n'
             'print("after", signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n')
  proc = subprocess.run([sys.executable, '-c', snippet], cwd=tt.REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0 and proc.stdout.split() == ['stopping', 'False', 'after', 'True'], (
      proc.stdout, proc.stderr[-2000:])


_GONE_READER = '''
import sys
from jkd import distributed
f = distributed.progress_file() if sys.argv[1] == '1' else sys.stderr
f.write('first\\n')
f.flush()
sys.stdin.readline()  # the reader is gone now
for i in range(100):
  f.write(f'line {i}\\n')
  f.flush()
print('stdout too', flush=True)
open(sys.argv[2], 'w').write('finished')
'''


@pytest.mark.parametrize('tolerant', [True, False])
def test_a_progress_bar_outlives_the_reader_of_its_pipe(tmp_path, tolerant):
  """`... 2>&1 | tee log`: the Ctrl-C that stops the loop ends tee too. The bar's file then
  sends stdout and stderr to /dev/null and the run goes on to its stop; sys.stderr fails."""
  done = tmp_path / 'done'
  proc = subprocess.Popen([sys.executable, '-c', _GONE_READER, str(int(tolerant)), str(done)],
                          cwd=tt.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  assert proc.stdout.readline() == b'first\n'
  proc.stdout.close()
  proc.stdin.write(b'\n')
  proc.stdin.close()
  assert (proc.wait(timeout=60) == 0) == tolerant
  assert done.exists() == tolerant
