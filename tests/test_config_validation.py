"""jkd.config.validate rejects impossible configs at start-up: a ValueError naming the keys, with
nothing written to disk and nothing compiled (jax's compile log stays empty)."""

import importlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import pytest
from ml_collections import ConfigDict

from configs import base
from jkd import config as jkd_config
from jkd.data import logit_store


def _config(tmp, mode, **keys):
  """configs/base.py in `mode` with paths under tmp and `keys` ('section__key') overridden."""
  c = base.get_config()
  c.mode, c.workdir = mode, str(tmp / 'run')
  if mode != 'pipeline':  # it names its own (jkd.config.PIPELINE_SETS)
    c.extract.teacher, c.extract.output = str(tmp / 'teacher'), str(tmp / 'store')
    c.train.store, c.data.train_file = str(tmp / 'store'), str(tmp / 'train.jsonl')
    c.convert.source, c.convert.output = str(tmp / 'model.nemo'), str(tmp / 'out')
    c.export.source, c.export.hf = str(tmp / 'model'), str(tmp / 'hf')
  c.train.global_batch_size, c.data.max_seq_length = 8, 64
  for key, value in keys.items():
    section, _, name = key.rpartition('__')
    (c[section] if section else c)[name] = value
  return c


def _inputs(tmp, vocab=512, k=100):
  """What the modes read: a teacher dir with model_config.json, data, a store's train split."""
  (tmp / 'teacher').mkdir()
  cfg = jkd_config.model_config(base.get_config())
  (tmp / 'teacher' / 'model_config.json').write_text(json.dumps(cfg.to_dict()))
  (tmp / 'train.jsonl').write_text('{"input": "a", "output": "b"}\n')
  (tmp / 'model.nemo').write_bytes(b'')
  (tmp / 'model').mkdir()
  (tmp / 'model' / 'model_config.json').write_text(json.dumps(cfg.to_dict()))
  logit_store.Writer(str(tmp / 'store'), 'train', logit_store.StoreMeta(k=k, vocab_size=vocab),
                     process_index=0)


def _missing(c):
  c.unlock()
  del c['distill']
  return c


def _wrong_type(c):
  d = c.to_dict()
  d['train']['lr'], d['mesh']['shape'] = 'fast', 8
  return ConfigDict(d)


def _unknown(c):
  c.unlock()
  c.train.learning_rate = 1e-4
  return c


# A pipeline on a random teacher that passes validation (each case below breaks one key).
_PIPE = {'pipeline__teacher': 'random', 'pipeline__student_layers': 1, 'data__format': 'chatml',
         'distill__reduction': 'global_token_mean', 'distill__sft_loss_weight': 0.4}
CASES = {  # id: (mode, keys, change or None, keys the message must name)
    'missing key': ('train', {}, _missing, ['distill']),
    'wrong types': ('train', {}, _wrong_type, ['train.lr', 'mesh.shape']),
    'unknown key': ('train', {}, _unknown, ['train.learning_rate']),
    'extract batch vs mesh': ('extract', {'extract__batch_size': 6, 'mesh__shape': (2, 2, 2)},
                              None, ['extract.batch_size', 'mesh.shape']),
    'extract range': ('extract', {'extract__start_idx': 9, 'extract__end_idx': 3}, None,
                      ['extract.start_idx', 'extract.end_idx']),
    'extract codec': ('extract', {'extract__codec': 'lz4'}, None, ['extract.codec']),
    'store inside the teacher': ('extract', {'extract__output': 'TMP/teacher/store'}, None,
                                 ['extract.output', 'extract.teacher']),
    'convert onto its source': ('convert', {'convert__output': 'TMP/model.nemo'}, None,
                                ['convert.output', 'convert.source']),
    'export twice to one path': ('export', {'export__nemo': 'TMP/hf'}, None,
                                 ['export.hf', 'export.nemo']),
    'workdir is the store': ('train', {'workdir': 'TMP/store'}, None, ['workdir', 'train.store']),
    'top_k above the store K': ('train', {'distill__top_k': 101}, None,
                                ['distill.top_k', 'store/train/manifest.json']),
    'student vocab vs store': ('train', {'model__vocab_size': 300}, None,
                               ['store/train/manifest.json', 'config.model',
                                'distill.cross_tokenizer']),
    'top_k above extract.top_k online': (
        'train', {'distill__teacher_source': 'online', 'extract__top_k': 8, 'distill__top_k': 16},
        None, ['distill.top_k', 'extract.top_k']),
    'online with cross_tokenizer': (
        'train', {'distill__teacher_source': 'online', 'distill__cross_tokenizer': True}, None,
        ['distill.cross_tokenizer', 'distill.teacher_source']),
    'seq length not a multiple of 8': ('train', {'data__max_seq_length': 60}, None,
                                       ['data.max_seq_length']),
    'seq beyond learned positions': (
        'train', {'model__position_embedding_type': 'learned_absolute',
                  'model__max_position_embeddings': 32}, None,
        ['data.max_seq_length', 'max_position_embeddings', 'config.model']),
    'teacher positions': ('extract', {'data__max_seq_length': 4096}, 'learned teacher',
                          ['data.max_seq_length', 'teacher/model_config.json']),
    'extract top_k above the teacher vocab': ('extract', {'extract__top_k': 1000}, None,
                                              ['extract.top_k', 'teacher/model_config.json']),
    'heads not split by the tensor axis': ('train', {'mesh__shape': (1, 1, 8)}, None,
                                           ['config.model', "'kv_heads'", 'tensor = 8',
                                            'mesh.shape']),
    'teacher heads not split by the tensor axis': (
        'extract', {'mesh__shape': (1, 1, 8)}, None,
        ['teacher/model_config.json', "'kv_heads'", 'tensor = 8', 'mesh.shape']),
    'export .nemo path taken': ('export', {'export__nemo': 'TMP/taken.nemo'}, 'nemo taken',
                                ['taken.nemo', 'already exists']),
    'export to HF without a HF class': ('export', {}, 'gelu model',
                                        ['export.hf', 'model/model_config.json',
                                         'position_embedding_type']),
    'train export to HF without a HF class': (
        'train', {'train__export_hf': 'TMP/hf', 'model__activation': 'gelu'}, None,
        ['train.export_hf', 'config.model', 'position_embedding_type']),
    'cudnn attention in fp32': ('train', {'train__attention': 'cudnn', 'train__precision': 'fp32'},
                                None, ['train.attention', "train.precision='bf16'"]),
    'cudnn attention on a CPU': ('train', {'train__attention': 'cudnn'}, None,
                                 ['train.attention', 'runs on a GPU', 'backend is cpu']),
    'cudnn attention for a head dim it cannot take': (
        'train', {'train__attention': 'cudnn', 'model__kv_channels': 12}, 'a GPU',
        ['config.model', "model.attention='cudnn'", 'head dim 12']),
    'no train batches': ('train', {'train__limit_train_batches': 0}, None,
                         ['train.limit_train_batches']),
    'train batches with no epochs': ('train', {'train__limit_train_batches': 10,
                                               'train__max_steps': 20, 'train__max_epochs': -1},
                                     None, ['train.limit_train_batches=10', 'max_epochs=-1']),
    'checkpoints kept': ('train', {'train__checkpoint_max_to_keep': 0}, None,
                         ['train.checkpoint_max_to_keep']),
    'no workdir': ('train', {'workdir': ''}, None, ['workdir is empty', '--config.workdir=DIR']),
    'HF export inside the final student': ('train', {'train__export_hf': 'TMP/run/student/hf'},
                                           None, ['train.export_hf', 'run/student', 'outside']),
    'a .nemo as the student': ('train', {'train__student': 'TMP/model.nemo'}, None,
                               ['model.nemo', 'not a jkd model directory', 'configs/convert.py',
                                '--config.convert.source=']),
    'eval output a directory': ('eval', {'eval__model': 'TMP/model', 'eval__store': 'TMP/store',
                                         'eval__split': 'train', 'eval__output': 'TMP/teacher'},
                                None, ['eval.output', 'is a directory']),
    'pipeline prunes more layers than it has': ('pipeline', {'pipeline__teacher': 'random',
                                                             'pipeline__student_layers': 3},
                                                None, ['pipeline.student_layers',
                                                       'model.num_layers']),
    'pipeline SFT-only weight': ('pipeline', {**_PIPE, 'pipeline__sft_only_weight': 0.0}, None,
                                 ['pipeline.sft_only_weight']),
    'pipeline given its own paths': ('pipeline', {**_PIPE, 'data__train_file': 'TMP/train.jsonl',
                                                  'extract__end_idx': 9, 'eval__batch_size': 3},
                                     None, ['data.train_file, extract.end_idx, eval.batch_size',
                                            'set by the pipeline itself']),
    'pipeline given keys of other modes': (
        'pipeline', {**_PIPE, 'convert__output': 'TMP/out', 'export__hf': 'TMP/hf',
                     'train__save_nemo_on_train_end': True}, None,
        ['train.save_nemo_on_train_end, convert.output, export.hf', 'other modes only']),
    'pipeline export dtype unknown': ('pipeline', {**_PIPE, 'export__dtype': 'fp8'}, None,
                                      ["export.dtype='fp8'"]),
    'train export dtype unknown': ('train', {'train__export_hf': 'TMP/hf2',
                                             'export__dtype': 'fp8'}, None,
                                   ["export.dtype='fp8'"]),
    'pipeline teacher empty': ('pipeline', {**_PIPE, 'pipeline__teacher': ''}, None,
                               ['pipeline.teacher is empty']),
    'mesh shape not integers': ('train', {'mesh__shape': (1, -1, 1.5)}, None,
                                ['mesh.shape=(1, -1, 1.5)', 'integers']),
    'mesh rules not pairs': ('train', {'mesh__rules': (5,)}, None, ['mesh.rules=(5,)', 'pairs']),
    'online teacher vocab tile zero': ('train', {'distill__teacher_source': 'online',
                                                 'extract__vocab_tile': 0}, None,
                                       ['extract.vocab_tile=0', 'positive']),
    'online teacher dtype unknown': ('train', {'distill__teacher_source': 'online',
                                               'extract__dtype': 'fp16'}, None,
                                     ["extract.dtype='fp16'", 'bfloat16']),
    'online data format unknown': ('train', {'distill__teacher_source': 'online',
                                             'data__format': 'xml'}, None,
                                   ["data.format='xml'", 'chatml']),
    'online teacher given a range': ('train', {'distill__teacher_source': 'online',
                                               'extract__end_idx': 9}, None,
                                     ['extract.start_idx=0, end_idx=9', 'whole data.train_file']),
    'chunk index without a chunk size': ('extract', {'extract__chunk_index': 3}, None,
                                         ['extract.chunk_index=3', 'extract.examples_per_chunk']),
    'chunk and a range': ('extract', {'extract__examples_per_chunk': 4, 'extract__end_idx': 9},
                          None, ['extract.examples_per_chunk=4', 'extract.end_idx=9']),
    'mesh rule of an unknown logical axis': ('train', {'mesh__rules': (('embedd', 'fsdp'),)},
                                             None, ['mesh.rules', "'embedd'", 'act_batch']),
    'mesh rule given twice': ('train', {'mesh__rules': (('embed', 'fsdp'), ('embed', None))},
                              None, ['mesh.rules', "'embed'", 'two rules']),
    'W&B without wandb': ('train', {'train__wandb_project': 'jkd'}, 'no wandb',
                          ['train.wandb_project', 'pip install wandb']),
    'pipeline online teacher': ('pipeline', {**_PIPE, 'distill__teacher_source': 'online'}, None,
                                ['distill.teacher_source', 'store']),
    'pipeline plain data': ('pipeline', {**_PIPE, 'data__format': 'plain'}, None,
                            ['data.format', 'chatml']),
    'pipeline pure KD': ('pipeline', {**_PIPE, 'distill__sft_loss_weight': 0.0}, None,
                         ['distill.sft_loss_weight', 'val/sft_loss']),
    'pipeline curve on scaled logits': ('pipeline', {**_PIPE, 'distill__logits_scale': 2.0}, None,
                                        ['distill.logits_scale', 'step 0']),
    'pipeline curve of part of the split': ('pipeline', {**_PIPE, 'train__limit_val_batches': 1},
                                            None, ['train.limit_val_batches', 'step 0']),
    'pipeline curve of micro-batch means': ('pipeline', {**_PIPE, 'distill__reduction': 'nemo'},
                                            None, ['distill.reduction', 'global_token_mean']),
    'pipeline unknown teacher source': ('pipeline', {**_PIPE, 'distill__teacher_source': 'x'},
                                        None, ['distill.teacher_source', 'expected store']),
    'pipeline validation split below a batch': (
        'pipeline', {**_PIPE, 'pipeline__max_val_examples': 4}, None,
        ['pipeline.max_val_examples', 'train.global_batch_size=8']),
    'train.student and config.model': ('train', {'train__student': 'TMP/model',
                                                  'model__activation': 'gelu'}, None,
                                        ['model.activation', "train.student='", 'leave them out']),
    'pipeline teacher and config.model': ('pipeline', {**_PIPE, 'pipeline__teacher': 'smollm2',
                                                       'model__num_layers': 4}, None,
                                          ['model.num_layers', "pipeline.teacher='smollm2'"]),
    'pipeline no validation examples': (
        'pipeline', {**_PIPE, 'pipeline__max_val_examples': 0, 'train__limit_val_batches': 0},
        None, ['pipeline.max_val_examples=0', 'no validation conversations']),
    'pipeline train examples below -1': ('pipeline', {**_PIPE, 'pipeline__max_train_examples': -2},
                                         None, ['pipeline.max_train_examples=-2', '-1 = all']),
    'pipeline teacher missing': ('pipeline', {'pipeline__teacher': 'TMP/nope.gguf'}, None,
                                 ['pipeline.teacher', 'nope.gguf']),
    'pipeline corpus missing': ('pipeline', {'pipeline__corpus': 'TMP/yaml'}, None,
                                ['pipeline.corpus', 'yaml']),
    'packing without max_steps': ('train', {'train__pack': True, 'train__max_steps': -1}, None,
                                  ['train.pack', 'train.max_steps']),
    'packing bounded by epochs': ('train', {'train__pack': True, 'train__max_steps': 2000},
                                  None, ['train.pack', 'train.max_epochs=-1']),
    # (All 8 devices are process 0's here, so any mesh gives process 0 every row.)
    'batch not split over the processes': ('train', {'mesh__shape': (1, 1, -1)}, 'two processes',
                                           ['mesh.shape=(1, 1, -1)', "process 0's devices hold "
                                            '8 of the batch', 'act_batch']),
    'packing with several processes': ('train', {'train__pack': True, 'train__max_steps': 2000,
                                                 'train__max_epochs': -1},
                                       'two processes', ['train.pack', 'one process']),
    'pipeline with several processes': ('pipeline', {'pipeline__teacher': 'random'},
                                        'two processes', ['mode=pipeline', 'one process']),
    'restore path missing': ('train', {'train__restore_from_path': 'TMP/nope'}, None,
                             ['train.restore_from_path', 'nope']),
    'several processes without fixed padding': ('train', {'train__pad_to_max_length': False},
                                                'two processes', ['train.pad_to_max_length']),
    '.nemo without torch': ('export', {'export__nemo': 'TMP/m.nemo'}, 'no torch',
                            ['export.nemo', 'torch']),
    'eval with several processes': ('eval', {'eval__model': 'TMP/model', 'eval__store': 'TMP/store',
                                             'eval__split': 'train'},
                                    'two processes', ['mode=eval', 'one process']),
    'eval without a model': ('eval', {'eval__store': 'TMP/store'}, None, ['eval.model']),
    # every process wrote the same files
    'export with several processes': ('export', {}, 'two processes', ['mode=export',
                                                                      'one process']),
    'convert with several processes': ('convert', {}, 'two processes', ['mode=convert',
                                                                        'one process']),
}


def _tree(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, dirs, files in os.walk(root) for f in dirs + files)


@pytest.mark.parametrize('name', CASES)
def test_impossible_config_names_its_keys_before_any_write_or_compile(
    name, tmp_path, caplog, monkeypatch, devices8):
  mode, keys, change, named = CASES[name]
  _inputs(tmp_path)
  keys = {k: v.replace('TMP', str(tmp_path)) if isinstance(v, str) else v
          for k, v in keys.items()}
  c = _config(tmp_path, mode, **keys)
  if change == 'learned teacher':
    path = tmp_path / 'teacher' / 'model_config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), 'max_position_embeddings': 64,
                                'position_embedding_type': 'learned_absolute'}))
  elif change == 'gelu model':
    path = tmp_path / 'model' / 'model_config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), 'activation': 'gelu'}))
  elif change == 'nemo taken':
    (tmp_path / 'taken.nemo').write_bytes(b'')
  elif change == 'two processes':
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
  elif change == 'a GPU':
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  elif change in ('no torch', 'no wandb'):
    real, gone = importlib.util.find_spec, change.split()[1]
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda m, *a: None if m == gone else real(m, *a))
  elif change:
    c = change(c)
  before = _tree(tmp_path)
  with caplog.at_level(logging.DEBUG, 'jax'), jax.log_compiles():
    with pytest.raises((ValueError, OSError, ImportError)) as e:
      jkd_config.validate(c)
  message = str(e.value)
  assert all(key in message for key in named), message
  assert '\n' not in message
  assert _tree(tmp_path) == before
  assert not [r for r in caplog.records if r.getMessage().startswith('Compiling ')]


def test_the_compile_check_sees_a_compile(caplog):
  """The no-compile assertion above can fail: a jitted call in the same window is logged."""
  with caplog.at_level(logging.DEBUG, 'jax'), jax.log_compiles():
    jax.jit(lambda x: x + 1)(jnp.ones(3))
  assert [r for r in caplog.records if r.getMessage().startswith('Compiling ')]


def test_every_shipped_config_has_exactly_the_base_keys():
  """configs/*.py all start from base; check_keys accepts them (and the check finds base)."""
  for name in ('base', 'convert', 'demo', 'export', 'extract', 'smoke', 'nemotron8b_gpt2b'):
    jkd_config.check_keys(importlib.import_module(f'configs.{name}').get_config())


def test_base_config_as_shipped_asks_for_what_training_needs(devices8):
  """configs/base.py runs mode=train (its defaults are NeMo-Aligner's training settings); alone
  it stops at the one thing it cannot default, the teacher's store."""
  c = base.get_config()
  assert c.mode == 'train'
  with pytest.raises(ValueError, match=r'train\.store is empty'):
    jkd_config.validate(c)


def test_base_config_missing_is_said_not_skipped(monkeypatch, tmp_path):
  monkeypatch.setattr(jkd_config, 'BASE_CONFIG', str(tmp_path / 'configs' / 'base.py'))
  jkd_config._base_module.cache_clear()
  try:
    with pytest.raises(ImportError, match=r'configs/base\.py: missing'):
      jkd_config.check_keys(base.get_config())
  finally:
    jkd_config._base_module.cache_clear()


def test_the_pipeline_cases_break_one_key_of_a_valid_config(tmp_path, devices8):
  jkd_config.validate(_config(tmp_path, 'pipeline', **_PIPE))


def test_a_random_teacher_vocabulary_is_padded_to_fit_the_mesh(tmp_path, devices8, monkeypatch):
  """The random teacher takes SmolLM2's vocabulary, unknown at validation: the mesh check
  leaves it out, and the teacher pads it as NeMo does (128 x the tensor-parallel size)."""
  from jkd import model, pipeline, tokenizer
  from tests.test_data_chat import char_tokenizer
  _inputs(tmp_path)
  c = _config(tmp_path, 'pipeline', **_PIPE, mesh__shape=(1, 4, 2), model__vocab_size=511)
  jkd_config.validate(c)  # 511 rows would not split over tensor = 2; the teacher's will
  with pytest.raises(ValueError, match="'vocab'.*tensor = 2"):
    jkd_config.validate(_config(tmp_path, 'train', mesh__shape=(1, 4, 2), model__vocab_size=511))
  tok = char_tokenizer()
  monkeypatch.setattr(tokenizer, 'from_gguf', lambda path: tok)
  monkeypatch.setattr(pipeline.assets, 'smollm2_gguf', lambda: 'unused.gguf')
  pipeline._random_teacher(c, str(tmp_path / 'teacher_random'))
  cfg = model.load_config(str(tmp_path / 'teacher_random'))
  assert tok.vocab_size % 2 and (cfg.vocab_size, cfg.padded_vocab) == (tok.vocab_size, 256)


@pytest.mark.parametrize('name,variants', [
    ('base', ()), ('convert', ()), ('eval', ()), ('export', ()), ('extract', ()), ('smoke', ()),
    ('demo', ('quick',)), ('nemotron8b_gpt2b', ('extract', 'train'))])
def test_a_config_files_unknown_variant_is_refused(name, variants):
  """`--config configs/X.py:VARIANT` with a variant X does not define is an error naming the
  file and its variants (a misspelt one ran the default config)."""
  module = importlib.import_module(f'configs.{name}')
  for arg in (None, '', *variants):
    module.get_config(arg)
  expected = ''.join(' or ' + v for v in variants)
  with pytest.raises(ValueError, match=rf"configs/{name}\.py: unknown variant 'bogus' "
                                       rf"\(expected none{expected}\)"):
    module.get_config('bogus')


def test_convert_refuses_an_output_that_is_no_model_directory(tmp_path):
  """convert.output may be new, empty, or a model directory left by a killed write: a complete
  one, or one holding anything else, is refused before the conversion, which would replace its
  params/; the writers of model directories refuse the latter too, before removing anything."""
  from jkd import model
  from tests.test_data_chat import char_tokenizer
  _inputs(tmp_path)
  out = tmp_path / 'out'
  jkd_config.validate(_config(tmp_path, 'convert'))  # new
  (out / 'params').mkdir(parents=True)
  (out / 'params' / 'mine.txt').write_text('a user file')
  (out / '.nfs0001').write_text('')
  jkd_config.validate(_config(tmp_path, 'convert'))  # an interrupted write: params/ only
  (out / 'model_config.json').write_text('{}')  # a complete model: replaced silently before
  with pytest.raises(ValueError, match=rf'^convert\.output={out}: already holds a jkd model '
                                       r'\(model_config\.json\), which the conversion would '
                                       'replace'):
    jkd_config.validate(_config(tmp_path, 'convert'))
  os.remove(out / 'model_config.json')
  (out / 'notes.txt').write_text('a user file')
  with pytest.raises(ValueError, match=rf'^convert\.output={out}: holds notes\.txt, which no '
                                       'jkd model directory has'):
    jkd_config.validate(_config(tmp_path, 'convert'))
  cfg = jkd_config.model_config(base.get_config())
  (out / 'model_config.json').write_text('{}')
  params = model.init(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match='holds notes.txt'):
    model.save(str(out), cfg, params)
  with pytest.raises(ValueError, match='holds notes.txt'):  # with a tokenizer (convert, prune)
    model.save_parts(str(out), cfg, [params], char_tokenizer())
  assert (out / 'params' / 'mine.txt').is_file() and (out / 'model_config.json').is_file()
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match='exists and is not a directory'):
    jkd_config.validate(_config(tmp_path, 'convert', convert__output=str(tmp_path / 'file')))
