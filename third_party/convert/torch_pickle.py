"""Reads `torch.save` files (zip format) as numpy, without torch and without running code.

The pickle inside is read by an unpickler whose `find_class` admits only an allow-list
(tensor-rebuild functions, storage types, OrderedDict, BytesIO for Transformer Engine's
`_extra_state`); anything else is refused with an error naming the file and the global.
Tensors come back lazy: `LazyTensor.load()` reads one tensor's bytes when asked, so a
converter can stream a checkpoint tensor by tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
import zlib

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'DoubleStorage': np.float64, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class UnsafePickleError(ValueError):
  """A pickle asked for something outside the allow-list."""


@dataclasses.dataclass(frozen=True)
class _Storage:
  zf: zipfile.ZipFile
  member: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor inside a torch zip file; `load()` reads it (C-contiguous numpy copy)."""
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  @property
  def dtype(self):
    return np.dtype(self.storage.dtype)

  def rows(self, start: int, stop: int) -> 'LazyTensor':
    """The view [start:stop] along axis 0, still unread."""
    return dataclasses.replace(self, offset=self.offset + start * self.stride[0],
                               shape=(stop - start,) + self.shape[1:])

  def load(self) -> np.ndarray:
    itemsize = self.dtype.itemsize
    where = f'{self.storage.zf.filename}: {self.storage.member}'
    # The view must lie inside the storage and hold each element once: as_strided checks
    # nothing, so a negative stride read memory outside the buffer (a crafted file segfaulted)
    # and a zero one made a small storage a tensor of any size.
    if (len(self.stride) != len(self.shape) or self.offset < 0
        or any(n < 0 for n in self.shape) or any(s < 0 for s in self.stride)):
      raise ValueError(f'{where}: a tensor view of shape {self.shape}, strides {self.stride}, '
                       f'offset {self.offset}: not a checkpoint tensor')
    if not self.shape:
      count = 1
    else:  # elements spanned by this view of the storage
      count = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
      if any(n == 0 for n in self.shape):
        return np.zeros(self.shape, self.dtype)
      span = 1  # dimensions by stride: each must step past all inner ones, or elements repeat
      for s, n in sorted((s, n) for n, s in zip(self.shape, self.stride) if n > 1):
        if s < span:
          raise ValueError(f'{where}: a tensor view of shape {self.shape}, strides '
                           f'{self.stride} repeats storage elements (an expanded tensor): not '
                           'a checkpoint tensor')
        span += s * (n - 1)
    try:
      with self.storage.zf.open(self.storage.member) as f:
        f.seek(self.offset * itemsize)
        buf = f.read(count * itemsize)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a damaged member or its header
      raise ValueError(f'{where} is unreadable ({e}); the checkpoint is damaged') from None
    if len(buf) != count * itemsize:
      raise ValueError(f'{where} is truncated')
    flat = np.frombuffer(buf, self.dtype)
    view = np.lib.stride_tricks.as_strided(
        flat, self.shape, tuple(s * itemsize for s in self.stride), writeable=False)
    return view.copy(order="C")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


def _latin1_bytes(text, encoding='latin1'):
  """Protocol-2 pickles spell `bytes` as _codecs.encode(str, 'latin1'); nothing else is let in."""
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise UnsafePickleError(f'refusing _codecs.encode with encoding {encoding!r}')
  return text.encode('latin1')


_ALLOWED = {
    ('_codecs', 'encode'): _latin1_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('_io', 'BytesIO'): io.BytesIO,
    ('torch', 'Size'): tuple,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, f, zf: zipfile.ZipFile, prefix: str, where: str):
    super().__init__(f)
    self._zf, self._prefix, self._where = zf, prefix, where

  def find_class(self, module, name):
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise UnsafePickleError(f'{self._where}: refusing to unpickle {module}.{name} '
                            '(only tensors and plain containers are allowed)')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise UnsafePickleError(f'{self._where}: unexpected persistent id {pid!r:.80}')
    _, dtype, key, _location, _numel = pid
    if dtype not in _STORAGE_DTYPES.values():
      raise UnsafePickleError(f'{self._where}: unexpected storage type {dtype!r:.80}')
    member = f'{self._prefix}data/{key}'
    if member not in self._zf.NameToInfo:
      raise ValueError(f'{self._where}: storage {member} is missing')
    return _Storage(self._zf, member, dtype)


def load(fileobj, where: str):
  """Unpickles a torch zip checkpoint from a seekable binary file object.

  `where` names the file in error messages. The zip stays open as long as the returned
  LazyTensors are alive (they hold it).
  """
  try:
    zf = zipfile.ZipFile(fileobj)
  except zipfile.BadZipFile:
    raise ValueError(f'{where}: not a torch zip checkpoint (legacy or corrupt file)') from None
  pkl = [n for n in zf.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
  if len(pkl) != 1:
    raise ValueError(f'{where}: expected one data.pkl in the zip, found {len(pkl)}')
  prefix = pkl[0][:-len('data.pkl')]
  with zf.open(pkl[0]) as f:
    try:
      return _Unpickler(io.BytesIO(f.read()), zf, prefix, where).load()
    except (UnsafePickleError, ValueError):
      raise
    except Exception as e:  # a corrupt pickle: report it, never a deep traceback
      raise ValueError(f'{where}: corrupt pickle ({type(e).__name__}: {e})') from None
