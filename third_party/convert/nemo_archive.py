"""A `.nemo` checkpoint as a tar (uncompressed or gzip) or an extracted directory.

Every member is checked before anything is read: no absolute paths, no `..`, no links
leaving the archive, only regular files and directories, and the archive must end after its
last member (tarfile stops quietly at a cut or garbled header). Members of an uncompressed tar
are read in place (they are seekable): the config, tokenizer and legacy weight pickles. A
Megatron-Core `model_weights/` directory is read by tensorstore and torch's checkpoint reader
from files, so `local_dir` copies it out first, into a temporary directory under $TMPDIR
(removed on close; a killed run leaves it behind). Gzip tars are extracted whole, after the
same checks, into such a directory: random access into a gzip stream costs a full
decompression.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from typing import IO

from tqdm import tqdm

from third_party.convert import assemble


def _normalise(name: str) -> str:
  return posixpath.normpath(name[2:] if name.startswith('./') else name)


def _unsafe(name: str) -> bool:
  return name.startswith('/') or '..' in name.split('/') or os.path.isabs(name)


class NemoArchive:
  """Read-only view of a .nemo; member names are normalised (no leading './')."""

  def __init__(self, path: str):
    self.path = path
    self._tar = None
    self._tmp = None
    if os.path.isdir(path):
      self._root = os.path.realpath(path)
      return
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such file or directory')
    try:
      tar = tarfile.open(path, 'r:')
    except tarfile.ReadError:
      try:
        tar = tarfile.open(path, 'r:gz')
      except (tarfile.ReadError, EOFError, OSError) as e:
        raise ValueError(f'{path}: not a .nemo tar archive ({e})') from None
    try:
      members = tar.getmembers()
      ended = _ends_after(tar, members)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      raise ValueError(f'{path}: truncated or corrupt tar ({e})') from None
    if not ended:  # tarfile stops quietly at a cut or garbled header: members would be missing
      last = repr(_normalise(members[-1].name)) if members else 'none'
      raise ValueError(f'{path}: truncated or corrupt tar (no end-of-archive marker after the '
                       f'last readable member, {last})')
    self._members = {}
    for m in members:
      self._check_member(m)
      if m.isfile():
        self._members[_normalise(m.name)] = m
    if _is_gzip(path):
      self._tmp = tempfile.mkdtemp(prefix='jkd-nemo-')
      try:
        tar.extractall(self._tmp, members=[m for m in members if m.isfile() or m.isdir()],
                       filter='data')
      except (tarfile.TarError, EOFError, zlib.error) as e:
        tar.close()
        self.close()
        raise ValueError(f'{path}: corrupt gzip tar ({e})') from None
      tar.close()
      self._root = os.path.realpath(self._tmp)
    else:
      self._tar = tar

  def _check_member(self, m: tarfile.TarInfo) -> None:
    name = m.name
    if _unsafe(name):
      raise ValueError(f'{self.path}: unsafe member path {name!r} (absolute or contains ..)')
    if m.issym() or m.islnk():
      target = posixpath.normpath(posixpath.join(posixpath.dirname(_normalise(name)),
                                                 m.linkname)) if m.issym() else m.linkname
      if _unsafe(m.linkname) or _unsafe(target):
        raise ValueError(f'{self.path}: member {name!r} links outside the archive '
                         f'({m.linkname!r})')
    elif not (m.isfile() or m.isdir()):
      raise ValueError(f'{self.path}: member {name!r} is not a regular file or directory')

  def close(self):
    if self._tar is not None:
      self._tar.close()
    if self._tmp is not None:
      shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _dir_path(self, name: str) -> str:
    p = os.path.realpath(os.path.join(self._root, name))
    if p != self._root and not p.startswith(self._root + os.sep):
      raise ValueError(f'{self.path}: {name!r} resolves outside the checkpoint directory')
    return p

  def names(self) -> list[str]:
    if self._tar is not None:
      return sorted(self._members)
    out = []
    for dirpath, _, files in os.walk(self._root):
      for f in files:
        out.append(os.path.relpath(os.path.join(dirpath, f), self._root).replace(os.sep, '/'))
    return sorted(out)

  def exists(self, name: str) -> bool:
    if self._tar is not None:
      return _normalise(name) in self._members
    return os.path.isfile(self._dir_path(name))

  def open(self, name: str) -> IO[bytes]:
    """A seekable binary file object for member `name`."""
    if self._tar is not None:
      member = self._members.get(_normalise(name))
      if member is None:
        raise FileNotFoundError(f'{self.path}: member {name} is missing')
      return self._tar.extractfile(member)
    path = self._dir_path(name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{self.path}: member {name} is missing')
    return open(path, 'rb')

  def read_text(self, name: str) -> str:
    with self.open(name) as f:
      try:
        return f.read().decode('utf-8')
      except UnicodeDecodeError as e:
        raise ValueError(f'{self.path}: member {name} is not valid UTF-8 ({e})') from None

  def resolve(self, ref: str, what: str) -> str:
    """The member a config reference such as `nemo:<uuid>_tok.model` names.

    `nemo:<name>` is member `<name>`. Older configs hold absolute paths (`/artifacts/x.model`)
    and a re-saved model adds another `<32 hex>_` prefix, so, as TensorRT-LLM does, fall back
    to the top-level member whose name without its uuid prefixes equals the reference's
    basename without its prefixes. Copies with identical bytes are one file, not ambiguous.
    """
    def strip_uuids(s: str) -> str:
      while len(s) > 33 and s[32] == '_' and all(c in '0123456789abcdefABCDEF' for c in s[:32]):
        s = s[33:]
      return s

    name = _normalise(ref[5:] if ref.startswith('nemo:') else ref)
    if not _unsafe(name) and self.exists(name):
      return name
    base = strip_uuids(posixpath.basename(name))
    found = [m for m in self.names() if '/' not in m and strip_uuids(m) == base]
    if not found:
      raise ValueError(f'{self.path}: {what} {ref!r}: no member {name!r} and none named '
                       f'[<uuid>_]{base}')
    if len(found) > 1:
      contents = set()
      for m in found:
        with self.open(m) as f:
          contents.add(f.read())
      if len(contents) > 1:
        raise ValueError(f'{self.path}: {what} {ref!r}: ambiguous, {len(found)} different '
                         f'members match: {", ".join(found)}')
    return found[0]

  def local_dir(self, prefix: str) -> str:
    """A filesystem directory holding the members under `prefix` (extracted if needed)."""
    if self._tar is None:
      return self._dir_path(prefix)
    if self._tmp is None:
      self._tmp = tempfile.mkdtemp(prefix='jkd-nemo-')
    dest = os.path.join(self._tmp, prefix)
    if not os.path.isdir(dest):
      members = [(name, m) for name, m in self._members.items()
                 if name.startswith(prefix.rstrip('/') + '/')]
      total = sum(m.size for _, m in members)
      with tqdm(total=total, unit='B', unit_scale=True, desc=f'copy {prefix} to {self._tmp}',
                disable=total < assemble.PROGRESS_FROM) as bar:
        for name, member in members:
          out = os.path.join(self._tmp, name)
          os.makedirs(os.path.dirname(out), exist_ok=True)
          with self._tar.extractfile(member) as src, open(out, 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
          bar.update(member.size)
    return dest


def _ends_after(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> bool:
  """Whether the two zero blocks that end a tar follow the last member's data."""
  end = max((m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
             for m in members), default=0)
  tar.fileobj.seek(end)
  return tar.fileobj.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)


def _is_gzip(path: str) -> bool:
  with open(path, 'rb') as f:
    return f.read(2) == b'\x1f\x8b'
