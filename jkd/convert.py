"""mode=convert: import a foreign checkpoint into a jkd model directory.

    python -m jkd.main --config configs/convert.py \
        --config.convert.source=PATH --config.convert.output=DIR

Dispatches on the source's format; each importer lives in third_party/convert/.
"""

from __future__ import annotations

import os
import time

from jkd import model, tokenizer


def convert(source: str, output: str) -> model.ModelConfig:
  """Imports any supported checkpoint into the model directory `output`, streaming.

  The directory gets the params (orbax, stored dtype), `model_config.json` and, when the
  source has one, the tokenizer (`tokenizer/`).
  """
  if not os.path.exists(source):
    raise FileNotFoundError(f'{source}: no such file or directory')
  if source.endswith('.gguf'):
    from third_party.convert import from_gguf
    tok = tokenizer.from_gguf(source)
    cfg, parts = from_gguf.open_gguf(source)
    _write(output, cfg, tok, parts)
    return cfg
  if source.endswith('.nemo') or os.path.isfile(os.path.join(source, 'model_config.yaml')):
    from third_party.convert import from_nemo, nemo_archive
    with nemo_archive.NemoArchive(source) as archive:
      cfg, tok, parts = from_nemo.open_nemo(archive)
      _write(output, cfg, tok, parts)
    return cfg
  raise ValueError(f'{source}: unsupported checkpoint format (supported: .gguf, .nemo tar or '
                   'extracted .nemo directory)')


def _write(output: str, cfg: model.ModelConfig, tok, parts) -> None:
  if tok is None:
    print(f'[convert] note: the source has no tokenizer; {output} will have none')
  elif tok.vocab_size > cfg.padded_vocab:
    raise ValueError(f'tokenizer vocab_size {tok.vocab_size} exceeds the embedding rows '
                     f'{cfg.padded_vocab}')
  model.save_parts(output, cfg, parts, tok)


def run(config) -> str:
  source, output = config.convert.source, config.convert.output
  t0 = time.perf_counter()
  cfg = convert(source, output)
  print(f'[convert] {source} -> {output} in {time.perf_counter() - t0:.1f}s: '
        f'{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}')
  return output
