"""Import a checkpoint into a jkd model directory.

    python -m jkd.main --config configs/convert.py \
        --config.convert.source=SmolLM2-135M-Instruct.Q4_1.gguf --config.convert.output=/tmp/smollm2

Sources: .gguf, .nemo tar, extracted .nemo directory (docs/checkpoints.md). Writes params
(orbax), model_config.json; `jkd.model.load(output)` reads it back.
"""

from configs import base


def get_config(arg=None):
  base.check_variant(arg, 'configs/convert.py')
  c = base.get_config()
  c.mode = 'convert'
  return c
