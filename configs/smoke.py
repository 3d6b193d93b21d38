"""Tiny end-to-end run on CPU, used by the tests and the quickstart.

    python -m jkd.main --config configs/smoke.py

Initialises a 2-layer GPT-2B-001-shaped model (layernorm1p, fast-swiglu, 50% RoPE) sharded
over every device, saves and reloads it as a model directory, and times sharded forward
passes. Prints the mean next-token cross-entropy (about ln(vocab_size) for random weights).
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.mode = 'pipeline'
  c.workdir = '/tmp/jkd/smoke'
  c.mesh.shape = (-1, 1, 1)
  c.pipeline.batch_size = 8
  c.pipeline.seq_len = 32
  c.pipeline.steps = 2
  return c
