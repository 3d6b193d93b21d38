"""mode=convert: import a foreign checkpoint into a jkd model directory.

    python -m jkd.main --config configs/convert.py \
        --config.convert.source=PATH --config.convert.output=DIR

Dispatches on the source's format; each importer lives in third_party/convert/.
"""

from __future__ import annotations

import os
import time

from jkd import model


def convert(source: str, output: str) -> model.ModelConfig:
  """Imports any supported checkpoint into the model directory `output`, streaming."""
  if not os.path.exists(source):
    raise FileNotFoundError(f'{source}: no such file or directory')
  if source.endswith('.gguf'):
    from third_party.convert import from_gguf
    cfg, parts = from_gguf.open_gguf(source)
    model.save_parts(output, cfg, parts)
    return cfg
  if source.endswith('.nemo') or os.path.isfile(os.path.join(source, 'model_config.yaml')):
    from third_party.convert import from_nemo, nemo_archive
    with nemo_archive.NemoArchive(source) as archive:
      cfg, parts = from_nemo.open_nemo(archive)
      model.save_parts(output, cfg, parts)
    return cfg
  raise ValueError(f'{source}: unsupported checkpoint format (supported: .gguf, .nemo tar or '
                   'extracted .nemo directory)')


def run(config) -> str:
  source, output = config.convert.source, config.convert.output
  t0 = time.perf_counter()
  cfg = convert(source, output)
  print(f'[convert] {source} -> {output} in {time.perf_counter() - t0:.1f}s: '
        f'{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}')
  return output
