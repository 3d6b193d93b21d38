"""Stage one of the tutorial: the teacher's top-K logits for every token of the chat data.

    python -m jkd.main --config configs/extract.py --config.extract.teacher=/tmp/teacher \
        --config.data.train_file=train.jsonl --config.data.validation_file=val.jsonl \
        --config.extract.output=/tmp/store

Writes a logit store (docs/logit_store.md) with splits train/ and validation/; a rerun resumes.
"""

from configs import base


def get_config(arg=None):
  base.check_variant(arg, 'configs/extract.py')
  c = base.get_config()
  c.mode = 'extract'
  return c
