"""config.profile: the Profiler traces exactly its window of steps (counted by the executions
of the jitted function in the trace), off writes nothing, bad keys raise naming the key, and
extraction profiles the chosen teacher batches."""

import glob
import gzip
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

from configs import base
from jkd import config as jkd_config
from jkd import extract, profiling
from tests.test_extract import RULES, _mesh, in_process, make_teacher


def executions(trace_dir, fn_name: str) -> int:
  """Runs of jit(fn_name) in the trace sessions under trace_dir (host-side Execute events)."""
  count = 0
  for path in glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*', '*.trace.json.gz')):
    with gzip.open(path) as f:
      events = json.load(f)['traceEvents']
    count += sum(1 for e in events if e.get('ph') == 'X' and not e['name'].startswith('[')
                 and e['name'].endswith(f'Execute (jit_{fn_name})'))
  return count


def _settings(tmp_path, start_step, steps, perfetto=False):
  return profiling.ProfileSettings(start_step=start_step, steps=steps, dir=str(tmp_path / 'p'),
                                   host_tracer_level=2, python_tracer=False,
                                   create_perfetto_trace=perfetto)


@jax.jit
def probe(x):
  return jnp.sin(x) + 1


def _loop(profiler, n_steps, first=1):
  mesh = jax.sharding.Mesh(jax.devices(), ('d',))  # multi-device: one Execute event per run
  x = jax.device_put(jnp.ones(16), jax.sharding.NamedSharding(mesh, jax.P('d')))
  with profiler:
    for step in range(first, n_steps + 1):
      profiler.step(step, wait=x)
      x = probe(x)


def test_the_trace_holds_exactly_the_window_and_a_perfetto_file(devices8, tmp_path):
  _loop(profiling.Profiler(_settings(tmp_path, 3, 2, perfetto=True)), 6)
  assert executions(tmp_path / 'p', 'probe') == 2
  sessions = glob.glob(str(tmp_path / 'p' / 'plugins' / 'profile' / '*'))
  assert len(sessions) == 1
  assert glob.glob(sessions[0] + '/*.xplane.pb')
  with gzip.open(os.path.join(sessions[0], 'perfetto_trace.json.gz')) as f:
    assert json.load(f)['traceEvents']


def test_a_window_past_the_loop_end_stops_with_the_loop(devices8, tmp_path):
  _loop(profiling.Profiler(_settings(tmp_path, 2, 10)), 3)
  assert executions(tmp_path / 'p', 'probe') == 2


def test_a_run_resumed_inside_or_past_the_window(devices8, tmp_path, capsys):
  """Resumed at step 4 of window 3..5: steps 4 and 5 are traced; resumed at step 7: nothing,
  and the run says so."""
  _loop(profiling.Profiler(_settings(tmp_path, 3, 3)), 6, first=4)
  assert executions(tmp_path / 'p', 'probe') == 2
  assert '[profile] steps 4..5 ->' in capsys.readouterr().out
  _loop(profiling.Profiler(_settings(tmp_path / 'b', 3, 3)), 9, first=7)
  assert not os.path.exists(tmp_path / 'b' / 'p')
  assert 'steps 3..5 ran before step 7, where this run starts: nothing traced' in (
      capsys.readouterr().out)


def test_a_window_after_the_loop_end_says_nothing_was_traced(devices8, tmp_path, capsys):
  _loop(profiling.Profiler(_settings(tmp_path, 20, 3)), 12)
  assert not os.path.exists(tmp_path / 'p')
  assert ('[profile] the run ended at step 12, before profile.start_step=20: nothing traced'
          in capsys.readouterr().out)


def test_a_wait_cut_short_still_ends_the_session(devices8, tmp_path, monkeypatch):
  """A second Ctrl-C while the window's last step finishes: the session still stops (it stayed
  open, writing nothing, and the next start_trace in the process failed)."""
  profiler = profiling.Profiler(_settings(tmp_path, 1, 1))
  profiler.step(1)

  def interrupted(x):
    raise KeyboardInterrupt
  monkeypatch.setattr(jax, 'block_until_ready', interrupted)
  with pytest.raises(KeyboardInterrupt):
    profiler.step(2, wait=jnp.ones(2))
  monkeypatch.undo()
  assert not profiler.active and glob.glob(str(tmp_path / 'p' / 'plugins' / 'profile' / '*'))
  jax.profiler.start_trace(str(tmp_path / 'q'))  # raised: a profile is already started
  jax.profiler.stop_trace()


def test_a_profile_dir_that_cannot_be_made_or_a_mode_without_steps_is_refused(tmp_path):
  """Found only at the window's end (a JaxRuntimeError traceback, the run's work up to there
  done), or never (profile.* was ignored in the other modes)."""
  (tmp_path / 'afile').write_text('')
  c = base.get_config()
  c.mode, c.workdir, c.profile.start_step = 'extract', str(tmp_path), 2
  jkd_config._validate_profile(c)  # <workdir>/profile, made at the window's end
  c.profile.dir = str(tmp_path / 'afile' / 'profile')
  with pytest.raises(ValueError, match=r"profile\.dir='.*afile/profile': cannot be made or "
                     r'written \(.*afile is not a directory\)'):
    jkd_config._validate_profile(c)
  c.profile.dir = '/proc/jkd-profile'  # os.access lets root write there; mkdir does not
  with pytest.raises(ValueError, match=r"profile\.dir='/proc/jkd-profile': cannot be made or "
                     r'written \(/proc is not writable\)'):
    jkd_config._validate_profile(c)
  assert os.listdir(tmp_path) == ['afile']  # the check's probe directory is gone
  c.profile.dir = str(tmp_path / 'new' / 'profile')
  jkd_config._validate_profile(c)
  assert os.listdir(tmp_path) == ['afile']
  c.profile.dir, c.mode = '', 'eval'
  with pytest.raises(ValueError, match=r'profile\.start_step=2: mode=eval has no steps'):
    jkd_config._validate_profile(c)


def test_profiling_off_writes_nothing(devices8, tmp_path):
  _loop(profiling.Profiler(_settings(tmp_path, -1, 3)), 4)
  assert not os.path.exists(tmp_path / 'p')


@pytest.mark.parametrize('key,value', [('start_step', 0), ('start_step', -2), ('steps', 0),
                                       ('host_tracer_level', 4), ('host_tracer_level', -1)])
def test_bad_profile_keys_raise_naming_the_key(key, value):
  c = base.get_config()
  c.profile.start_step = 1
  c.profile[key] = value
  with pytest.raises(ValueError, match=f'profile.{key}='):
    jkd_config.validate(c)
  c.profile.start_step, c.profile.steps, c.profile.host_tracer_level = -1, 0, 2
  jkd_config._validate_profile(c)  # off: steps is not read


def test_settings_default_dir_is_under_the_workdir():
  c = base.get_config()
  assert profiling.settings(c).dir == os.path.join(c.workdir, 'profile')
  assert profiling.settings(c).start_step == -1  # off by default
  assert profiling.settings(c, process_index=1, process_count=2).dir == os.path.join(
      c.workdir, 'profile', 'process_1')  # several processes: each its own folder
  c.profile.dir = '/x/p'
  assert profiling.settings(c, process_index=0, process_count=1).dir == '/x/p'


def test_a_failed_stop_is_not_retried_by_the_cleanup(devices8, tmp_path, monkeypatch):
  """A stop_trace that raises (a bad trace folder, say) reaches the loop once; the `with`
  block's close after it does not stop again (it would raise again and skip the rest of the
  loop's cleanup)."""
  stops, stop = [], jax.profiler.stop_trace

  def failing_stop():  # as the Perfetto conversion fails: after the session stopped
    stops.append(1)
    stop()
    raise RuntimeError('Invalid trace folder')
  profiler = profiling.Profiler(_settings(tmp_path, 1, 1))
  with pytest.raises(OSError, match=r"^profile\.dir='.*': writing the trace of steps 1\.\.1 "
                     r'failed: Invalid trace folder$'):  # jkd.main's one line, not a traceback
    with profiler:
      profiler.step(1)
      monkeypatch.setattr(jax.profiler, 'stop_trace', failing_stop)
      profiler.step(2)
  assert stops == [1] and not profiler.active


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  return make_teacher(tmp_path_factory.mktemp('teacher'))


def test_extraction_profiles_the_chosen_batches(devices8, teacher_dir, tmp_path):
  cfg, params, tok, examples, s = in_process(teacher_dir, tmp_path / 's')
  mesh = _mesh((2, 2, 2))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.P()))
  with profiling.Profiler(_settings(tmp_path, 2, 3)) as profiler:
    assert extract.extract_split(examples, 'train', s, mesh, RULES, cfg, params, tok,
                                 profiler) == 48
  lengths = {e['index']: len(e['tokens']) for e in examples}
  assert profiler.n == len(extract.plan_batches(lengths, 8, 16, 256)) >= 4  # one step a batch
  assert executions(tmp_path / 'p', 'records') == 3


def test_profile_lines_start_lines_of_their_own_beside_a_progress_bar(devices8, tmp_path,
                                                                      capsys):
  """The loop's bar and the [profile] lines share one log under `2>&1`: the lines clear the
  bar's last state first rather than follow it on its line."""
  import sys

  from tqdm import tqdm
  with tqdm(total=12, desc='train', file=sys.stdout) as bar:
    p = profiling.Profiler(_settings(tmp_path, 20, 3))
    for n in range(1, 13):
      p.step(n)
      bar.update(1)
    p.close()
  out = capsys.readouterr().out
  assert '[profile] the run ended at step 12' in out
  assert not re.search(r'[^\r\n]\[profile\]', out), out
