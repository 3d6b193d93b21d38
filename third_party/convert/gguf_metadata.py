"""A GGUF file's metadata (its key-value section), without the tensors.

The values equal `gguf.GGUFReader(path).fields[key].contents()` (the tests compare them on every
field of a real file). GGUFReader builds a numpy view for every part of every value, ~1M of them
for a 49k-token vocabulary (3-4 s on a CPU core); this reads the same section in ~0.1 s. Files
of GGUF versions 2 and 3, either byte order.
"""

from __future__ import annotations

import mmap
import struct

import numpy as np

_MAGIC = b'GGUF'
# GGUF value types (gguf.GGUFValueType): fixed-size scalars by numpy type code, then the others.
_SCALARS = {0: 'u1', 1: 'i1', 2: 'u2', 3: 'i2', 4: 'u4', 5: 'i4', 6: 'f4', 7: '?', 10: 'u8',
            11: 'i8', 12: 'f8'}
_STRING, _ARRAY = 8, 9
# Arrays of arrays nested deeper than this are refused (real files nest none): without a limit
# a crafted file ends in a RecursionError.
MAX_NESTING = 16


class _Cursor:
  """Reads values of one byte order from a buffer, advancing an offset."""

  def __init__(self, buf, order: str):
    self.buf, self.order, self.offset = buf, order, 0

  def unpack(self, fmt: str):
    values = struct.unpack_from(self.order + fmt, self.buf, self.offset)
    self.offset += struct.calcsize(fmt)
    return values[0]

  def string(self) -> str:
    n = self.unpack('Q')
    end = self.offset + n
    if end > len(self.buf):
      raise ValueError(f'a string of {n} bytes runs past the end of the file')
    s = self.buf[self.offset:end].decode('utf-8')
    self.offset = end
    return s

  def numbers(self, vtype: int, n: int) -> list:
    """n fixed-size scalars of one type, in one numpy read."""
    dtype = np.dtype(_SCALARS[vtype]).newbyteorder(self.order)
    if self.offset + n * dtype.itemsize > len(self.buf):
      raise ValueError(f'{n} values run past the end of the file')
    out = np.frombuffer(self.buf, dtype, n, self.offset).tolist()
    self.offset += n * dtype.itemsize
    return out

  def value(self, vtype: int, depth: int = 0):
    if vtype == _STRING:
      return self.string()
    if vtype in _SCALARS:
      return self.numbers(vtype, 1)[0]
    if vtype == _ARRAY:
      itype, n = self.unpack('I'), self.unpack('Q')
      if itype in _SCALARS:
        return self.numbers(itype, n)
      if itype == _ARRAY and depth >= MAX_NESTING:
        raise ValueError(f'arrays nested more than {MAX_NESTING} deep: a corrupt file? '
                         'Re-download or re-convert it')
      return [self.value(itype, depth + 1) for _ in range(n)]
    raise ValueError(f'unknown GGUF value type {vtype}')


def read_metadata(path: str) -> dict:
  """{key: value} of the GGUF file's key-value section; ValueError if it is not a GGUF file of
  version 2 or 3, or is cut short."""
  with open(path, 'rb') as f:
    try:
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # an empty file cannot be mapped
      raise ValueError(f'{path}: not a GGUF file (empty)') from None
  with buf:
    if buf[:4] != _MAGIC:
      raise ValueError(f'{path}: not a GGUF file (magic {bytes(buf[:4])!r})')
    out = {}
    try:
      little = struct.unpack_from('<I', buf, 4)[0]
      cur = _Cursor(buf, '<' if little & 0xFFFF else '>')  # a version's low bytes are not 0
      cur.offset = 4
      version = cur.unpack('I')
      if version not in (2, 3):
        raise ValueError(f'GGUF version {version} is not supported (2 or 3)')
      _, n_kv = cur.unpack('Q'), cur.unpack('Q')
      for _ in range(n_kv):
        key = cur.string()
        out[key] = cur.value(cur.unpack('I'))
    except (struct.error, UnicodeDecodeError) as e:
      raise ValueError(f'{path}: unreadable GGUF metadata after {len(out)} keys ({e})') from None
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from None
    return out
