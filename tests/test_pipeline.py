"""mode=pipeline end to end on the smoke config (tiny random teacher and student, 12 steps):
every artifact the report names exists and is well formed; a rerun reuses every stage; a
finished workdir with other settings is refused; a run SIGKILLed at the ends of stages (outputs
written, record not) restarts and ends with the same results; a jkd model directory as the
teacher is copied whole."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from configs import base
from jkd import config as jkd_config
from jkd import model, pipeline, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *overrides, timeout=600):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  return subprocess.run(
      [sys.executable, '-m', 'jkd.main', '--config', 'configs/smoke.py',
       f'--config.workdir={workdir}', *overrides], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=timeout)


def test_smoke_pipeline_end_to_end(tmp_path):
  """One test (the stages depend on each other): run, check, rerun, refuse other settings."""
  workdir = tmp_path
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'mode=pipeline process 0/1, 8 cpu devices' in proc.stdout
  _check_artifacts(workdir)
  _check_results(workdir)
  _check_rerun_is_cached(workdir)
  _check_other_settings_refused(workdir)
  _check_kills_at_stage_ends(workdir, tmp_path / 'cut')


def _check_kills_at_stage_ends(whole, cut):
  """4 seeded kills among the stage ends: each leaves a stage's outputs complete but
  unrecorded, which the restart must redo over. Seed 17 picks the 2nd, 3rd, 8th and 10th stage
  ends of the chain, counted across the restarts (a restart redoes the killed stage first, so
  the n-th kill lands on the stage its count reaches from there): with 13 stages, after the
  teacher's `.nemo` twice, then the student's `.nemo` and the student's import."""
  from tests.faults import harness
  argv = [sys.executable, '-m', 'jkd.main', '--config', 'configs/smoke.py',
          f'--config.workdir={cut}']
  n_stages = len(json.loads((whole / 'stages.json').read_text()))
  cut.mkdir()
  # The whole run's compilation cache (conftest's): the chain's runs compile the same programs
  # and its kills land at stage ends, never inside a cache write.
  environ = harness.env(cut, JAX_COMPILATION_CACHE_DIR=os.environ['JAX_COMPILATION_CACHE_DIR'])
  killed = []  # the stage each kill left recorded as started, not finished

  def unfinished():
    record = json.loads((cut / 'stages.json').read_text())
    killed.extend(name for name, entry in record.items() if not entry.get('finished', True))
  kills = harness.kill_chain(argv, environ, cut, n_points=n_stages, kills=4, seed=17,
                             only='pipeline.stage_done', after_kill=unfinished)
  assert [k.position for k in kills] == [2, 3, 8, 10]
  assert killed == ['teacher: export .nemo', 'teacher: export .nemo', 'student: export .nemo',
                    'student: import .nemo'], killed
  a, b = (json.loads((d / 'results.json').read_text()) for d in (whole, cut))
  for key in ('metrics', 'val', 'samples'):
    assert a[key] == b[key], key


def _check_artifacts(workdir):
  artifacts = report.check_report(str(workdir / 'report.md'))
  assert len(artifacts) >= 7
  for path in artifacts:
    assert os.path.exists(path), path
    if path.endswith('.nemo'):
      with tarfile.open(path) as tar:  # a real .nemo: config + Megatron-Core weights
        names = tar.getnames()
      assert any(n.endswith('model_config.yaml') for n in names), names
      assert any(n.endswith('.metadata') for n in names), names
    elif path.endswith('_hf'):
      assert os.path.isfile(os.path.join(path, 'config.json'))
      assert any(n.endswith('.safetensors') for n in os.listdir(path))
  with open(workdir / 'val_ce.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  text = (workdir / 'report.md').read_text()
  assert '![validation CE](val_ce.png)' in text


def _check_results(workdir):
  results = json.loads((workdir / 'results.json').read_text())
  teacher_cfg = model.load_config(str(workdir / 'teacher'))
  student_cfg = model.load_config(str(workdir / 'student_init'))
  assert (teacher_cfg.num_layers, student_cfg.num_layers) == (4, 2)
  # The curves start at the init's CE on the rows training validates on (full batches).
  init_ce = json.loads((workdir / 'stages.json').read_text())[
      'evaluate: init on full batches']['result']['ce']
  for run in ('kd', 'sft'):
    steps, ces = results['val'][run]
    assert steps == [0, 4, 8, 12] and ces[0] == init_ce and all(np.isfinite(ces))
    m = results['metrics'][run]
    assert set(m) >= {'ce', 'perplexity', 'agreement', 'kl_topk', 'ece'}
    assert np.isclose(m['perplexity'], np.exp(m['ce']))
    assert ces[-1] != init_ce  # the students trained
  assert len(results['samples']) == 2
  assert all(set(s) == {'prompt', 'teacher', 'kd', 'sft'} for s in results['samples'])
  stages = [stage for stage, _, _ in results['timings']]
  assert stages[0] == 'teacher: import' and 'extract' in stages and stages[-1] == 'generate'


def _check_rerun_is_cached(workdir):
  """Cached whole, also with settings that change how a stage runs, not what it writes."""
  before = (workdir / 'results.json').read_text()
  proc = _run(workdir, '--config.train.checkpoint_max_to_keep=7', '--config.train.worker_count=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  cached = [line for line in proc.stdout.splitlines() if line.endswith(')') and ': cached (' in line]
  results = json.loads((workdir / 'results.json').read_text())
  assert len(cached) == len(results['timings']), proc.stdout
  assert all(cached for _, _, cached in results['timings'])
  assert json.loads(before)['metrics'] == results['metrics']


def _check_other_settings_refused(workdir):
  proc = _run(workdir, '--config.train.lr=0.5')
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('jkd: error:') and 'train.lr: 0.0002 -> 0.5' in last and f'delete {workdir}/kd to redo' in last, proc.stderr[-2000:]


def test_a_model_directory_teacher_is_copied(tmp_path):
  """pipeline.teacher may be a jkd model directory (what mode=convert writes): the teacher stage
  copies it whole, over whatever a killed copy left, and never writes into the source."""
  c = base.get_config()
  cfg = jkd_config.model_config(c)
  source, out = tmp_path / 'teacher', tmp_path / 'run' / 'teacher_source'
  model.save(str(source), cfg, model.init(cfg, jax.random.key(0)))
  (source / 'tokenizer').mkdir()
  (source / 'tokenizer' / 'vocab.txt').write_text('a\n')
  out.mkdir(parents=True)
  (out / 'left_by_a_killed_copy').write_text('')
  before = sorted(p.relative_to(source) for p in source.rglob('*'))
  c.pipeline.teacher = str(source)
  pipeline._teacher_source(c, str(out))
  assert sorted(p.relative_to(out) for p in out.rglob('*')) == before
  assert sorted(p.relative_to(source) for p in source.rglob('*')) == before
  (_, want), (_, got) = model.load(str(source)), model.load(str(out))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))


def test_an_interrupted_stage_continues_with_its_own_settings_only(tmp_path):
  """A stage killed with partial files (an exception here) is recorded as started: a rerun with
  other settings is refused naming them and the files, one with the same settings continues."""
  out = tmp_path / 'out'

  def crash():
    out.mkdir(exist_ok=True)
    (out / 'part').write_text('half')
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    pipeline._Stages(str(tmp_path))('train', crash, settings={'train.lr': 1e-4},
                                    outputs=[str(out / 'done')], home=str(out))
  stages = pipeline._Stages(str(tmp_path))  # the rerun
  with pytest.raises(ValueError, match=rf'interrupted .*train\.lr: 0\.0001 -> 0\.001.*delete '
                                       rf'{out} to redo'):
    stages('train', lambda: None, settings={'train.lr': 1e-3}, outputs=[str(out / 'done')],
           home=str(out))
  ran = []
  stages('train', lambda: ran.append((out / 'part').read_text()) or (out / 'done').touch(),
         settings={'train.lr': 1e-4}, outputs=[str(out / 'done')], home=str(out))
  assert ran == ['half']
  assert json.loads((tmp_path / 'stages.json').read_text())['train']['finished']
  (out / 'done').unlink()  # a finished stage's output gone, its checkpoints still there
  with pytest.raises(ValueError, match=rf'finished .*train\.lr: 0\.0001 -> 0\.001.*delete {out}'):
    pipeline._Stages(str(tmp_path))('train', lambda: None, settings={'train.lr': 1e-3},
                                    outputs=[str(out / 'done')], home=str(out))


def test_worker_count_is_neutral_for_a_finished_stage_only(tmp_path):
  """A finished stage is cached under another train.worker_count (how it ran, not what it
  wrote); an interrupted one is not continued under one, whose checkpoints hold a Grain
  iterator state of another form (the train loop would refuse it, naming restore_from_path)."""
  out, settings = tmp_path / 'out', {'train.lr': 1e-4, 'train.worker_count': 0}

  def crash():
    out.mkdir(exist_ok=True)
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    pipeline._Stages(str(tmp_path))('train', crash, settings=settings,
                                    outputs=[str(out / 'done')], home=str(out))
  other = {**settings, 'train.worker_count': 2}
  with pytest.raises(ValueError, match=r'interrupted .*\(train\.worker_count: 0 -> 2\)'):
    pipeline._Stages(str(tmp_path))('train', lambda: None, settings=other,
                                    outputs=[str(out / 'done')], home=str(out))
  pipeline._Stages(str(tmp_path))('train', lambda: (out / 'done').touch(), settings=settings,
                                  outputs=[str(out / 'done')], home=str(out))
  ran = []
  pipeline._Stages(str(tmp_path))('train', lambda: ran.append(1), settings=other,
                                  outputs=[str(out / 'done')], home=str(out))
  assert ran == []  # cached


def test_without_validation_step0_is_the_whole_splits_ce():
  """limit_val_batches=0 lets the validation split be smaller than one batch (config
  validation allows it): the full-batch evaluation, which would find no batch, is not run."""
  from configs import smoke
  config = smoke.get_config()
  config.train.limit_val_batches = 0
  metrics = {'init': {'ce': 7.5}}

  def no_full_batch():
    raise ValueError('evaluate: no batches')
  assert pipeline._step0_ce(config, metrics, no_full_batch) == 7.5
  config.train.limit_val_batches = -1
  assert pipeline._step0_ce(config, metrics, lambda: {'ce': 6.0}) == 6.0


def test_the_trained_steps_come_from_the_metrics_not_the_curve(tmp_path):
  """With validation off (limit_val_batches=0) the curve is the step-0 point alone; the report's
  step count is still the steps trained."""
  (tmp_path / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': s, 'train/loss': 1.0}) + '\n' for s in (1, 2, 3)))
  assert pipeline._val_curve(str(tmp_path), 5.0) == (([0], [5.0]), 3)


class _Stop(Exception):
  pass


def _stub_stages(monkeypatch):
  """pipeline.run with every stage's work replaced by writing its outputs; evaluate stops it."""
  from jkd import extract, train_loop

  def model_dir(d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, model.CONFIG_FILE), 'w', encoding='utf-8') as f:
      f.write('{}')

  def data(config, out):
    os.makedirs(out, exist_ok=True)
    for split in ('train', 'val'):
      with open(os.path.join(out, f'{split}.jsonl'), 'w', encoding='utf-8') as f:
        f.write('{}\n')

  def store(config):
    for split in ('train', 'validation'):
      os.makedirs(os.path.join(config.extract.output, split), exist_ok=True)

  def train(config):
    os.makedirs(config.train.export_hf, exist_ok=True)
    os.makedirs(os.path.join(config.workdir, 'student'), exist_ok=True)
    for path in (config.train.export_nemo, os.path.join(config.train.export_hf, 'config.json'),
                 os.path.join(config.workdir, 'student', model.CONFIG_FILE),
                 os.path.join(config.workdir, 'metrics.jsonl')):
      with open(path, 'w', encoding='utf-8') as f:
        f.write('{}')

  def stop(*args, **kwargs):
    raise _Stop
  monkeypatch.setattr(pipeline, '_teacher_source', lambda config, out: model_dir(out))
  monkeypatch.setattr(pipeline.export, 'export', lambda src, nemo, dtype: open(nemo, 'w').close())
  monkeypatch.setattr(pipeline.convert, 'convert', lambda src, dst: model_dir(dst))
  monkeypatch.setattr(pipeline, '_data', data)
  monkeypatch.setattr(pipeline, '_calibration', lambda *args: (None, None))
  monkeypatch.setattr(pipeline.prune, 'prune_model_dir',
                      lambda src, dst, **kw: model_dir(dst) or {'keep': [0], 'importance': None})
  monkeypatch.setattr(extract, 'run', store)
  monkeypatch.setattr(train_loop, 'run', train)
  monkeypatch.setattr(pipeline, '_evaluate', stop)


def _demo_quick(workdir):
  from configs import demo
  config = demo.get_config('quick')
  config.workdir = str(workdir)
  return config


def _stages_run(capsys, workdir, **changes):
  """(the stages that ran before evaluate, the error) of pipeline.run on configs/demo.py:quick
  with `changes` ({'section.key': value})."""
  config = _demo_quick(workdir)
  for key, value in changes.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  capsys.readouterr()
  error = None
  try:
    pipeline.run(config)
  except _Stop:
    pass
  except ValueError as e:
    error = str(e)
  started = [line[len('[pipeline] '):-len(' ...')]
             for line in capsys.readouterr().out.splitlines() if line.endswith(' ...')]
  return [name for name in started if name != 'evaluate'], error  # evaluate never finishes


def test_a_changed_setting_redoes_only_the_stages_that_read_it(tmp_path, monkeypatch, capsys):
  """Each stage is compared on the keys it reads and on those of the stages whose outputs it
  reads: the seed (a SmolLM2 teacher) is read by the trainings only, pipeline.sft_only_weight by
  the SFT-only training only, the KD weights by the KD training only (the SFT-only one sets its
  own); the data's settings by what reads the data (the pruning first), not by the teacher.
  Records are compared on the keys both they and the run have."""
  _stub_stages(monkeypatch)
  ran, error = _stages_run(capsys, tmp_path)
  assert error is None and len(ran) == 10 and ran[-2:] == ['train: KD + SFT', 'train: SFT only']
  assert _stages_run(capsys, tmp_path) == ([], None)
  # Records of an older jkd: a stage's record holding keys it does not read (every earlier
  # stage's), or lacking keys it reads now (not read when it ran): compared on the keys in both.
  record = json.loads((tmp_path / 'stages.json').read_text())
  record['data']['settings']['seed'] = 7
  del record['train: KD + SFT']['settings']['distill.kd_loss']
  (tmp_path / 'stages.json').write_text(json.dumps(record))
  assert _stages_run(capsys, tmp_path) == ([], None)
  ran, error = _stages_run(capsys, tmp_path, seed=1)
  assert ran == [] and error.startswith("stage 'train: KD + SFT' finished") and (
      '(seed: 0 -> 1)' in error), error
  # ... naming the later stages' files that read the changed key too (one error per stage made
  # a round of deleting and rerunning for each)
  assert f'(and {tmp_path}/sft, which read them too)' in error, error
  ran, error = _stages_run(capsys, tmp_path, **{'pipeline.sft_only_weight': 0.5})
  assert ran == [] and error.startswith("stage 'train: SFT only' finished") and (
      '(pipeline.sft_only_weight: 1.0 -> 0.5)' in error) and 'read them too' not in error, error
  ran, error = _stages_run(capsys, tmp_path, **{'distill.kd_loss_weight': 0.5})
  assert ran == [] and error.startswith("stage 'train: KD + SFT' finished") and (
      '(distill.kd_loss_weight: 1.0 -> 0.5)' in error), error
  shutil.rmtree(tmp_path / 'kd')
  assert _stages_run(capsys, tmp_path, **{'distill.kd_loss_weight': 0.5}) == (
      ['train: KD + SFT'], None)
  # The KD term's own keys are not the SFT-only run's (it trains the same without them): only
  # the KD run is named (both were, and the SFT-only run was redone for identical results).
  ran, error = _stages_run(capsys, tmp_path, **{'distill.kd_loss_weight': 0.5,
                                                'distill.kd_loss': 'bwd_kl', 'distill.top_k': 4})
  assert ran == [] and error.startswith("stage 'train: KD + SFT' finished") and (
      'read them too' not in error), error
  # A run's student directory, which evaluation and generation read, is one of its outputs:
  # gone, the run is redone (it was taken as cached, and evaluation failed on it).
  shutil.rmtree(tmp_path / 'sft' / 'student')
  assert _stages_run(capsys, tmp_path, **{'distill.kd_loss_weight': 0.5}) == (
      ['train: SFT only'], None)
  # A copied workdir's errors name its own files (the records held absolute paths: following the
  # message deleted the original's stages).
  shutil.copytree(tmp_path, tmp_path.parent / 'copy', ignore=shutil.ignore_patterns('random'))
  ran, error = _stages_run(capsys, tmp_path.parent / 'copy', seed=1)
  assert error and f'(and {tmp_path.parent}/copy/sft, which read them too)' in error, error
  (tmp_path.parent / 'copy' / 'stages.json').write_text('')
  with pytest.raises(ValueError, match=r'copy/stages\.json: unreadable'):
    pipeline.run(_demo_quick(tmp_path.parent / 'copy'))
  # A random teacher reads the seed, config.model and the mesh's vocabulary split, not the rest
  # of the mesh (the trainings do).
  random = tmp_path / 'random'
  assert len(_stages_run(capsys, random, **{'pipeline.teacher': 'random'})[0]) == 10
  ran, error = _stages_run(capsys, random, **{'pipeline.teacher': 'random',
                                              'mesh.shape': (8, 1, 1)})
  assert ran == [] and error.startswith("stage 'train: KD + SFT' finished") and (
      'mesh.shape' in error), error
  ran, error = _stages_run(capsys, random, **{'pipeline.teacher': 'random',
                                              'mesh.shape': (1, 1, 8)})
  assert ran == [] and error.startswith("stage 'teacher: import' finished") and (
      'teacher vocab split: 1 -> 8' in error), error
  shutil.rmtree(tmp_path / 'data')
  ran, error = _stages_run(capsys, tmp_path, **{'distill.kd_loss_weight': 0.5,
                                                'pipeline.max_val_examples': 7})
  assert ran == ['data'] and error.startswith("stage 'student: prune' finished") and (
      '(pipeline.max_val_examples: ' in error), error
