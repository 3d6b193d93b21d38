"""mode=convert: import a foreign checkpoint into a jkd model directory.

    python -m jkd.main --config configs/convert.py \
        --config.convert.source=PATH --config.convert.output=DIR

Dispatches on the source's format; each importer lives in third_party/convert/.
"""

from __future__ import annotations

import os
import time

from jkd import model


def import_checkpoint(source: str) -> tuple[model.ModelConfig, model.Params]:
  """Reads any supported checkpoint -> (ModelConfig, fp32 numpy params)."""
  if not os.path.exists(source):
    raise FileNotFoundError(f'{source}: no such file or directory')
  if source.endswith('.gguf'):
    from third_party.convert import from_gguf
    return from_gguf.load_gguf(source)
  if source.endswith('.nemo') or os.path.isfile(os.path.join(source, 'model_config.yaml')):
    from third_party.convert import from_nemo
    return from_nemo.load_nemo(source)
  raise ValueError(f'{source}: unsupported checkpoint format (supported: .gguf, .nemo tar or '
                   'extracted .nemo directory)')


def run(config) -> str:
  source, output = config.convert.source, config.convert.output
  t0 = time.perf_counter()
  cfg, params = import_checkpoint(source)
  print(f'[convert] read {source} in {time.perf_counter() - t0:.1f}s: {cfg.num_layers} layers, '
        f'hidden {cfg.hidden_size}, vocab {cfg.vocab_size}')
  model.save(output, cfg, params)
  print(f'[convert] wrote {output}')
  return output
