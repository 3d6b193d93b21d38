"""Streams a foreign checkpoint into jkd params, one group of parameter leaves at a time.

An importer describes its checkpoint as `Source`s (tensors not yet read: layer, canonical
name, shape, dtype, `read()`) and maps each source to the `Target`s it fills (a jkd leaf,
the index inside that leaf, a transform from the source's torch layout). `assemble` then

  1. checks the whole plan before reading a byte: every leaf of the ModelConfig is filled,
     every element exactly once, no source aims at a parameter the config does not have;
  2. reads the sources group by group (a group = the sources that fill the same leaves, e.g.
     one fused QKV tensor feeding q, k and v), builds those leaves in the sources' stored
     dtype, and yields them as a partial params tree.

Peak memory is one group's leaves plus one source tensor, never the whole model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from jkd import model


@dataclasses.dataclass(frozen=True)
class Source:
  """One tensor of a foreign checkpoint, not read yet."""
  layer: int | None
  name: str  # the importer's canonical name, e.g. 'qkv.weight'
  shape: tuple[int, ...]
  dtype: np.dtype
  read: Callable[[], np.ndarray]
  where: str  # file and key, for error messages


@dataclasses.dataclass(frozen=True)
class Target:
  """Where (part of) a source lands: params[path][index] = transform(tensor)."""
  path: tuple[str, ...]
  index: tuple  # (layer,) + sub-index inside the layer's slice; () for a whole leaf
  transform: Callable[[np.ndarray], np.ndarray]


def _stand_in(shape: tuple[int, ...], dtype=np.int8) -> np.ndarray:
  """A read-only array of any shape that holds one element (all strides 0): indexing,
  reshaping and transposing it give the shapes of the real thing without allocating it."""
  return np.broadcast_to(np.empty((), dtype), shape)


def _converted(src: Source, t: Target, tensor: np.ndarray, leaf_shape: tuple[int, ...]):
  """t.transform(tensor), checked to fit its slot of the leaf; ValueError naming both shapes."""
  try:
    value = t.transform(tensor)
  except ValueError as e:  # a reshape into the config's heads, groups or widths
    raise ValueError(f'{src.where}: shape {tuple(src.shape)} does not fit the model config '
                     f'({e}); its size metadata and tensors disagree (a corrupt file?)') from None
  slot = _stand_in(leaf_shape)[t.index].shape
  if value.shape != slot:
    raise ValueError(f'{src.where}: shape {tuple(src.shape)} does not fit the model config '
                     f'(it gives {value.shape} where {".".join(t.path)} needs {slot}); its size '
                     'metadata and tensors disagree (a corrupt file?)')
  return value


def _plan(cfg: model.ModelConfig, sources: list[Source],
          targets_of: Callable[[Source], list[Target]], where: str):
  """Validates coverage up front -> (targets per source, leaf shapes, leaf dtypes)."""
  abstract = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))  # no arrays made
  shapes = {tuple(k.key for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  plan, dtypes, filled, slots = [], {}, dict.fromkeys(shapes, 0), set()
  layers_seen: dict[tuple, set] = {}
  for src in sources:
    if src.layer is not None and not 0 <= src.layer < cfg.num_layers:
      raise ValueError(f'{src.where}: layer {src.layer} is beyond num_layers={cfg.num_layers} '
                       'of the model config')
    targets = targets_of(src)
    for t in targets:
      if t.path not in shapes:
        raise ValueError(f'{src.where}: the model config has no parameter {".".join(t.path)} '
                         f'(bias={cfg.bias}, position={cfg.position_embedding_type}, '
                         f'tied={cfg.share_embeddings_and_output_weights})')
      if (t.path, repr(t.index)) in slots:  # slices are unhashable before Python 3.12
        raise ValueError(f'{src.where}: {".".join(t.path)}{list(t.index)} is written twice')
      slots.add((t.path, repr(t.index)))
      filled[t.path] += _stand_in(shapes[t.path])[t.index].size
      # Transforms change only the layout: run on a stand-in they check the shapes now, before
      # a config's sizes (corrupt, say) allocate a leaf.
      _converted(src, t, _stand_in(src.shape, src.dtype), shapes[t.path])
      dtypes[t.path] = np.result_type(dtypes.get(t.path, src.dtype), src.dtype)
      if src.layer is not None:
        layers_seen.setdefault(t.path, set()).add(src.layer)
    plan.append((src, targets))
  missing = sorted('.'.join(p) for p, n in filled.items() if n == 0)
  if missing:
    raise ValueError(f'{where}: tensors are missing for parameters {missing[:8]}')
  for path, n in filled.items():
    total = int(np.prod(shapes[path]))
    if n != total:
      absent = sorted(set(range(cfg.num_layers)) - layers_seen.get(path, set()))
      detail = f'missing for layers {absent[:8]}' if absent else 'partly missing'
      raise ValueError(f'{where}: {".".join(path)} is {detail} ({n} of {total} values found)')
  return plan, shapes, dtypes


def _groups(plan) -> list[list]:
  """Sources grouped so that each leaf is built by exactly one group."""
  owner: dict[tuple, int] = {}
  groups: list[list] = []
  for item in plan:
    ids = {owner[t.path] for t in item[1] if t.path in owner}
    if not ids:
      ids = {len(groups)}
      groups.append([])
    keep = min(ids)
    for other in sorted(ids - {keep}):  # this source links groups that were separate
      groups[keep].extend(groups[other])
      groups[other] = []
    groups[keep].append(item)
    for _, targets in groups[keep]:
      for t in targets:
        owner[t.path] = keep
  return [g for g in groups if g]


def _nest(flat: dict[tuple, np.ndarray]) -> model.Params:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


PROGRESS_FROM = 256 << 20  # bytes: smaller conversions and exports run without a progress bar


def nbytes(params) -> int:
  """The bytes of a params tree's arrays."""
  return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def assemble(cfg: model.ModelConfig, sources: Iterable[Source],
             targets_of: Callable[[Source], list[Target]], where: str) -> Iterator[model.Params]:
  """Yields partial params trees with disjoint leaves that together make the whole model."""
  plan, shapes, dtypes = _plan(cfg, list(sources), targets_of, where)
  total = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s, _ in plan)
  with tqdm(total=total, unit='B', unit_scale=True, desc='convert',
            disable=total < PROGRESS_FROM) as bar:
    for group in _groups(plan):
      leaves: dict[tuple, np.ndarray] = {}
      for src, targets in sorted(group, key=lambda item: -1 if item[0].layer is None
                                 else item[0].layer):
        try:
          tensor = src.read()
        except ValueError as e:  # a missing or short file, ranks that disagree
          raise ValueError(f'{src.where}: {e}') from None
        if tuple(tensor.shape) != tuple(src.shape):
          raise ValueError(f'{src.where}: read shape {tensor.shape}, expected {src.shape}')
        for t in targets:
          if t.path not in leaves:
            leaves[t.path] = np.empty(shapes[t.path], dtypes[t.path])
          leaves[t.path][t.index] = _converted(src, t, tensor, shapes[t.path])
        bar.update(tensor.nbytes)
        del tensor
      yield _nest(leaves)


def collect(parts: Iterable[model.Params]) -> model.Params:
  """Merges the partial trees of `assemble` into one params tree (small models, tests)."""
  import jax
  flat = {}
  for part in parts:
    for path, leaf in jax.tree_util.tree_leaves_with_path(part):
      flat[tuple(k.key for k in path)] = leaf
  return _nest(flat)
