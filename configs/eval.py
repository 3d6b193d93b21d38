"""Evaluate a jkd model directory on a logit-store split.

    python -m jkd.main --config configs/eval.py --config.eval.model=/tmp/run/student \
        --config.eval.store=/tmp/store --config.eval.output=/tmp/run/eval.json

Prints and (with eval.output) writes CE, perplexity, top-1 agreement with the teacher, KL to
the teacher's top-K and ECE over the split (jkd/evaluate.py for their definitions), with what
they are over: the examples, data.max_seq_length (longer ones are cut there) and the batching.
A split with no loss token is refused (no metric is defined).
"""

from configs import base


def get_config(arg=None):
  base.check_variant(arg, 'configs/eval.py')
  c = base.get_config()
  c.mode = 'eval'
  return c
