"""The demo pipeline on a tiny random teacher: every stage in 1-1.5 minutes on 2 CPU cores (CI).

    python -m jkd.main --config configs/smoke.py

Same stages as configs/demo.py (teacher -> .nemo -> import, data, pruned student, extraction,
KD + SFT and SFT-only students, evaluation, replies, report) with a 4-layer random teacher of
GPT-2B-001's architecture at toy size (SmolLM2's tokenizer), 2-layer student, 64 conversations
and 12 steps. The numbers mean nothing; the artifacts and their formats are what the test
checks.
"""

from configs import base, demo


def get_config(arg=None):
  base.check_variant(arg, 'configs/smoke.py')
  c = demo.get_config()
  c.workdir = '/tmp/jkd/smoke'
  c.seed = 0

  c.pipeline.teacher = 'random'
  c.model.num_layers = 4
  c.model.max_position_embeddings = 256  # the rest of config.model: base's toy GPT-2B-001
  c.pipeline.max_train_examples = 64
  c.pipeline.max_val_examples = 16
  c.pipeline.student_layers = 2
  c.pipeline.calibration_examples = 8
  c.pipeline.num_samples = 2
  c.pipeline.max_new_tokens = 4

  c.data.max_seq_length = 64
  c.extract.top_k = 8
  c.extract.batch_size = 8
  c.extract.vocab_tile = 8192
  c.train.global_batch_size = 8
  c.train.micro_batch_size = 1  # 8 rows: one per device under the tests' 8 simulated devices
  c.train.max_steps = 12
  c.train.max_epochs = -1  # 64 examples are 8 steps an epoch: run on into the second
  c.train.val_check_interval = 4
  c.train.save_interval = 4
  return c
