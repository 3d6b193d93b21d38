"""mode=export: a jkd model directory -> `.nemo` (Megatron-Core, torch_dist) and/or Hugging Face.

    python -m jkd.main --config configs/export.py --config.export.source=DIR \
        --config.export.nemo=student.nemo --config.export.hf=student_hf

Each exporter lives in third_party/convert/ (to_nemo.py, to_hf.py); the tokenizer saved in the
model directory travels with the weights (a `nemo:` artifact, or files beside the safetensors).
"""

from __future__ import annotations

import os
import tempfile
import time

from jkd import model, tokenizer


def _tokenizer(directory: str):
  if not os.path.isdir(os.path.join(directory, 'tokenizer')):
    print(f'[export] note: {directory} has no tokenizer; the export will have none')
    return None
  return tokenizer.load(directory)


def export(source: str, *, nemo: str = '', hf: str = '', dtype: str = 'bfloat16') -> list[str]:
  """Writes the requested exports of model directory `source`; returns their paths."""
  if not nemo and not hf:
    raise ValueError('export.nemo and export.hf are both empty: set at least one')
  import jax
  cfg, params = model.load(source)
  params = jax.device_get(params)  # numpy on the host: both writers work tensor by tensor
  tok = _tokenizer(source)
  written = []
  if nemo:
    from third_party.convert import to_nemo
    files, section = to_nemo.tokenizer_artifacts(tok) if tok else (None, None)
    written.append(to_nemo.export_nemo(cfg, params, nemo, dtype=dtype, tokenizer_files=files,
                                       tokenizer_section=section))
  if hf:
    from third_party.convert import to_hf
    with tempfile.TemporaryDirectory() as tmp:
      tok_dir = None
      if tok is not None:
        tok_dir = os.path.join(tmp, 'tok')
        os.makedirs(tok_dir)
        for name, data in tok.files.items():
          path = os.path.join(tok_dir, name)
          try:
            with open(path, 'wb') as f:
              f.write(data)
          except OSError as e:  # a failed write (a full disk) does not name its file
            raise OSError(e.errno, e.strerror, path) from None
      written.append(to_hf.export_hf(cfg, params, hf, dtype=dtype, tokenizer_dir=tok_dir,
                                     bos_token_id=tok.bos_id if tok else None,
                                     eos_token_id=tok.eos_id if tok else None))
  return written


def run(config) -> list[str]:
  c = config.export
  t0 = time.perf_counter()
  paths = export(c.source, nemo=c.nemo, hf=c.hf, dtype=c.dtype)
  print(f'[export] {c.source} -> {", ".join(paths)} in {time.perf_counter() - t0:.1f}s')
  return paths
