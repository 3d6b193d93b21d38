"""The CLI: one-line errors with a non-zero exit (the pipeline itself: test_pipeline.py)."""

import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  return subprocess.run([sys.executable, '-m', 'jkd.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('override, message', [
    ('--config.model.activation=swish', "model.activation='swish': unknown"),
    ('--config.model.num_attention_heads=5', 'model.num_attention_heads=5: does not divide'),
    ('--config.mesh.shape=(3,1,1)', 'mesh.shape=(3, 1, 1): needs 3 devices, but 8'),
    ('--config.mode=distil', "mode='distil': unknown"),
    ('--config.pipeline.student_layers=0', 'pipeline.student_layers=0: must be positive'),
    ('--config.train.save_interval=5', 'train.save_interval=5: must be a multiple of'),
    ('--config.data.format=yaml', "data.format='yaml': expected one of"),
    # None resets a placeholder (an int one used to fail to parse, a str one became 'None');
    # the run then stops at the next override, a bad mode.
    ('--config.distill.top_k=None --config.mode=nope', "mode='nope': unknown"),
    ('--config.distill.student_norm=None --config.mode=nope', "mode='nope': unknown"),
    ('--config.train.lr=None', 'wrong type train.lr=None'),  # not a placeholder
    ('--config.train.lrr=1', '--config.train.lrr: unknown key \'lrr\' Did you mean "lr"'),
    ('--config.nonexistent=None', "--config.nonexistent: unknown key 'nonexistent'"),
    # Only the value None resets: a value ending in '=None' is a string like any other.
    ('--config.mode=x=None', "mode='x=None': unknown"),
])
def test_bad_config_is_one_line_error_and_exit_2(override, message):
  proc = _run('--config', 'configs/smoke.py', *override.split())
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jkd: error:') and message in last, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('args, line', [
    (('--config', 'configs/nope.py'), 'jkd: error: configs/nope.py: no such config file (--config)'),
    (('--config=configs/nope.py:quick',), 'jkd: error: configs/nope.py: no such config file'),
    (('--config', 'configs/smoke.py', 'extra'), 'jkd: error: unexpected arguments extra'),
    ((), 'jkd: error: --config is required'),
])
def test_bad_command_line_is_one_line(args, line):
  proc = _run(*args)
  assert proc.returncode == 2 and proc.stderr.startswith(line), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_typo_in_override_key_fails_loudly():
  proc = _run('--config', 'configs/smoke.py', '--config.modle.hidden_size=3')
  assert proc.returncode != 0 and 'modle' in proc.stderr


def test_a_config_file_loads_from_any_working_directory(tmp_path):
  """configs/*.py import configs.base: from outside the repository that was
  "--config: No module named 'configs'"."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ''}
  proc = subprocess.run([sys.executable, '-m', 'jkd.main', '--config',
                         os.path.join(REPO, 'configs', 'smoke.py'), '--config.mode=bogus'],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
      "jkd: error: mode='bogus': unknown"), proc.stderr
  # A config file of the user's own, outside configs/, imports jkd's configs.base too.
  (tmp_path / 'my_run.py').write_text(
      'from configs import base\n\n\ndef get_config():\n  c = base.get_config()\n'
      "  c.mode = 'bogus'\n  return c\n")
  proc = subprocess.run([sys.executable, '-m', 'jkd.main', '--config', 'my_run.py'],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
      "jkd: error: mode='bogus': unknown"), proc.stderr


def test_convert_of_missing_source_names_the_file(tmp_path):
  proc = _run('--config', 'configs/convert.py', f'--config.convert.source={tmp_path}/x.gguf',
              f'--config.convert.output={tmp_path}/out')
  assert proc.returncode == 2 and f'{tmp_path}/x.gguf: no such file' in proc.stderr


@pytest.mark.parametrize('raised, stderr', [
    ('KeyboardInterrupt', 'jkd: interrupted (Ctrl-C)\n'),
    ('KeyboardInterrupt(distributed.STOPPED)', ''),  # the stop's own line was printed
])
def test_ctrl_c_ends_the_cli_by_sigint_without_a_traceback(raised, stderr):
  """A calling shell script sees a death by SIGINT, as after any Python program's Ctrl-C, and
  stops too; JKD_TRACEBACK=1 shows the traceback."""
  snippet = ('import sys\nfrom jkd import distributed, main\nsys.excepthook = main._excepthook\n'
             f'raise {raised}\n')
  for debug in ('', '1'):
    proc = subprocess.run([sys.executable, '-c', snippet], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'JKD_TRACEBACK': debug})
    assert proc.returncode == -signal.SIGINT, proc.stderr[-2000:]
    if debug:
      assert proc.stderr.startswith('Traceback') and 'KeyboardInterrupt' in proc.stderr
    else:
      assert proc.stderr == stderr
