"""Export a jkd model directory to NeMo and/or Hugging Face.

    python -m jkd.main --config configs/export.py --config.export.source=/tmp/student \
        --config.export.nemo=/tmp/student.nemo --config.export.hf=/tmp/student_hf

Writes a .nemo in the Megatron-Core layout (torch_dist; needs `pip install 'jkd[convert]'`)
and/or a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads
(docs/checkpoints.md).
"""

from configs import base


def get_config(arg=None):
  base.check_variant(arg, 'configs/export.py')
  c = base.get_config()
  c.mode = 'export'
  return c
