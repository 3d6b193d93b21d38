"""Megatron-Core `torch_dist` checkpoints (torch.distributed.checkpoint files), read without
torch and without running code from the files.

  model_weights/.metadata        pickled torch DCP `Metadata`: per key its global shape, dtype
                                 and chunks; per chunk the file, byte offset and length
  model_weights/__<r>_<i>.distcp chunks, each a `torch.save` zip blob at (offset, length)

`.metadata` is unpickled with an allow-list that turns torch's metadata dataclasses into plain
records (and Megatron's, which some versions add); each chunk blob is read by torch_pickle
through a window onto the .distcp file, lazily, so one layer of a stacked tensor costs one
layer's bytes. ../shared/docs/nemo_checkpoint_format.md §1.4 (Dt).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle

import ml_dtypes
import numpy as np

from third_party.convert import torch_pickle

_TORCH_DTYPES = {
    'float32': np.float32, 'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16,
    'float64': np.float64, 'int64': np.int64, 'int32': np.int32, 'int16': np.int16,
    'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
}


class _Record:
  """Stand-in for a metadata dataclass: keeps the pickled state, runs nothing."""

  def __init__(self, *args):
    self.args = args

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
      state = {**(state[0] or {}), **state[1]}  # (dict, slots) of slotted dataclasses
    if isinstance(state, dict):
      self.__dict__.update(state)
    else:
      self.state = state  # TensorProperties pickles a tuple: (dtype, layout, ...)


_DCP = 'torch.distributed.checkpoint.'
# torch <= 2.3's checkpoint metadata holds the TensorProperties of torch.distributed._shard.
_SHARD = 'torch.distributed._shard.sharded_tensor.metadata'
_RECORDS = {(_DCP + 'metadata', n) for n in (
    'Metadata', 'TensorStorageMetadata', 'TensorProperties', 'ChunkStorageMetadata',
    'BytesStorageMetadata', 'MetadataIndex', 'StorageMeta')} | {
        (_DCP + 'filesystem', '_StorageInfo'), (_SHARD, 'TensorProperties')}
_FUNCTIONS = {
    ('torch', 'Size'): tuple,
    (_DCP + 'metadata', '_MEM_FORMAT_ENCODING'): int,
    (_SHARD, 'MEM_FORMAT_ENCODING'): int,
    ('torch.serialization', '_get_layout'): str,
    ('pathlib', 'PosixPath'): lambda *parts: '/'.join(parts),
    ('pathlib._local', 'PosixPath'): lambda *parts: '/'.join(parts),
    ('collections', 'OrderedDict'): dict,
}


class _MetadataUnpickler(pickle.Unpickler):

  def __init__(self, f, where: str):
    super().__init__(f)
    self._where = where

  def find_class(self, module, name):
    if module == 'torch' and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    if (module, name) in _FUNCTIONS:
      return _FUNCTIONS[(module, name)]
    if (module, name) in _RECORDS or module.startswith('megatron.core.dist_checkpointing.'):
      return _Record
    raise torch_pickle.UnsafePickleError(
        f'{self._where}: refusing to unpickle {module}.{name} (not checkpoint metadata)')


@dataclasses.dataclass(frozen=True)
class Chunk:
  offsets: tuple[int, ...]
  sizes: tuple[int, ...]
  file: str
  offset: int
  length: int


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  shape: tuple[int, ...]
  dtype: np.dtype
  chunks: tuple[Chunk, ...]


class _Window(io.RawIOBase):
  """Read-only view of bytes [start, start + length) of a file."""

  def __init__(self, f, start: int, length: int):
    self._f, self._start, self._length, self._pos = f, start, length, 0

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self._pos

  def seek(self, pos, whence=io.SEEK_SET):
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
    self._pos = max(0, base + pos)
    return self._pos

  def readinto(self, b):
    n = max(0, min(len(b), self._length - self._pos))
    self._f.seek(self._start + self._pos)
    got = self._f.readinto(memoryview(b)[:n])
    self._pos += got
    return got


class Reader:
  """Tensors of a torch_dist directory: `tensors[key]` (shape, dtype), `read(key, layer)`."""

  def __init__(self, root: str, where: str):
    self.root, self.where = root, where
    path = os.path.join(root, '.metadata')
    if not os.path.isfile(path):
      raise ValueError(f'{where}: .metadata is missing (not a torch_dist checkpoint)')
    with open(path, 'rb') as f:
      try:
        md = _MetadataUnpickler(f, f'{where}/.metadata').load()
      except torch_pickle.UnsafePickleError:
        raise
      except Exception as e:
        raise ValueError(f'{where}/.metadata: corrupt ({type(e).__name__}: {e})') from None
    try:
      self.tensors = self._index(md)
    except (AttributeError, TypeError, KeyError) as e:
      raise ValueError(f'{where}/.metadata: unexpected layout ({type(e).__name__}: {e})') from None

  def _index(self, md) -> dict[str, TensorInfo]:
    storage = {}
    for index, info in md.storage_data.items():
      if getattr(info, 'transform_descriptors', None):
        raise ValueError(f'{self.where}: {index.fqn}: stored with transforms '
                         f'{info.transform_descriptors} (compressed checkpoints are not supported)')
      storage[(index.fqn, tuple(getattr(index, 'offset', None) or ()))] = info
    tensors = {}
    for key, meta in md.state_dict_metadata.items():
      if not hasattr(meta, 'chunks'):
        continue  # BytesStorageMetadata: Transformer Engine _extra_state, not weights
      props = meta.properties
      dtype = props.state[0] if hasattr(props, 'state') else props.dtype
      chunks = []
      for c in meta.chunks:
        info = storage.get((key, tuple(c.offsets)))
        if info is None:
          raise ValueError(f'{self.where}: {key}: chunk at {tuple(c.offsets)} has no storage')
        chunks.append(Chunk(tuple(c.offsets), tuple(c.sizes), info.relative_path,
                            int(info.offset), int(info.length)))
      tensors[key] = TensorInfo(tuple(meta.size), np.dtype(dtype), tuple(chunks))
    return tensors

  def _load_chunk(self, chunk: Chunk, key: str, rows: tuple[int, int] | None) -> np.ndarray:
    path = os.path.join(self.root, chunk.file)
    where = f'{self.where}/{chunk.file}: {key} chunk {chunk.offsets}'
    if os.path.basename(chunk.file) != chunk.file or not os.path.isfile(path):
      raise ValueError(f'{where}: data file is missing')
    with open(path, 'rb') as f:
      lazy = torch_pickle.load(io.BufferedReader(_Window(f, chunk.offset, chunk.length)), where)
      if not isinstance(lazy, torch_pickle.LazyTensor) or lazy.shape != chunk.sizes:
        raise ValueError(f'{where}: expected a tensor of shape {chunk.sizes}')
      return (lazy.rows(*rows) if rows else lazy).load()

  def read(self, key: str, layer: int | None = None) -> np.ndarray:
    """The global tensor `key`, or its slice [layer] along axis 0, from its chunks."""
    info = self.tensors[key]
    shape = info.shape[1:] if layer is not None else info.shape
    out = np.empty(shape, info.dtype)
    covered = 0
    for c in info.chunks:
      if layer is not None:
        if not c.offsets[0] <= layer < c.offsets[0] + c.sizes[0]:
          continue
        rows = (layer - c.offsets[0], layer - c.offsets[0] + 1)
        data = self._load_chunk(c, key, rows)[0]
        offsets, sizes = c.offsets[1:], c.sizes[1:]
      else:
        data, offsets, sizes = self._load_chunk(c, key, None), c.offsets, c.sizes
      out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = data
      covered += data.size
    if covered != out.size:
      raise ValueError(f'{self.where}: {key}: chunks cover {covered} of {out.size} values')
    return out
