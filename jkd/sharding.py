"""Device mesh, logical-axis rules and state shardings.

Model code names logical axes ('embed', 'heads', 'act_batch', ...); the rules table in
`configs/base.py` maps them to mesh axes. This module turns both into `NamedSharding`s and
never names a mesh axis itself.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(shape: Sequence[int], n_devices: int, key: str = 'mesh.shape') -> tuple[int, ...]:
  """Resolves one -1 entry to fill the remaining devices; ValueError naming `key` otherwise."""
  shape = tuple(int(s) for s in shape)
  if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'{key}={shape}: sizes must be positive, with at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f'{key}={shape}: {n_devices} devices are not divisible by {known}')
    shape = tuple(n_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != n_devices:
    raise ValueError(f'{key}={shape}: needs {math.prod(shape)} devices, '
                     f'but {n_devices} are available')
  return shape


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None) -> Mesh:
  """A mesh with Auto axis types over `devices` (default: all), -1 filling the rest."""
  devices = jax.devices() if devices is None else list(devices)
  if len(axes) != len(shape):
    raise ValueError(f'mesh.shape={tuple(shape)} has {len(shape)} entries '
                     f'but mesh.axes={tuple(axes)} has {len(axes)}')
  shape = mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes),
              axis_types=(AxisType.Auto,) * len(axes))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Context in which model code's logical constraints resolve against `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_specs(boxed_tree) -> Any:
  """Logical PartitionSpecs of a boxed (flax-metadata) abstract tree."""
  return nn.get_partition_spec(boxed_tree)


def shardings_for(abstract_init: Callable[[], Any], mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for the tree `abstract_init()` builds: eval_shape -> specs -> shardings.

  `abstract_init` must return a flax-boxed tree (e.g. `model.init(cfg, rng, boxed=True)`).
  """
  boxed = jax.eval_shape(abstract_init)
  return nn.logical_to_mesh_sharding(logical_specs(boxed), mesh, rules)


def check_divisible(abstract_init: Callable[[], Any], mesh_sizes: dict[str, int], rules: Rules,
                    where: str, skip: tuple[str, ...] = ()) -> None:
  """ValueError naming the parameter, its logical axis and the mesh axes when a dimension of
  the tree `abstract_init()` builds (boxed, as for `shardings_for`) does not split evenly;
  logical axes in `skip` are not checked."""
  boxed = jax.eval_shape(abstract_init)
  is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
  specs = jax.tree.leaves(logical_specs(boxed), is_leaf=is_spec)
  for (path, leaf), logical in zip(jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed)),
                                   specs):
    for size, name, axes in zip(leaf.shape, logical, nn.logical_to_mesh_axes(logical, rules)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      n = math.prod(mesh_sizes[a] for a in axes)
      if size % n and name not in skip:
        raise ValueError(
            f'{where}: parameter {jax.tree_util.keystr(path)} has {size} along {name!r}, which '
            f'the mesh splits over {"x".join(axes)} = {n} devices (not a divisor); choose a '
            f'mesh.shape whose {"x".join(axes)} size divides {size}')


def mesh_specs(shardings) -> dict[str, PartitionSpec]:
  """{param path: PartitionSpec} for a tree of NamedShardings (the golden-table view)."""
  return {jax.tree_util.keystr(p): s.spec
          for p, s in jax.tree_util.tree_leaves_with_path(
              shardings, is_leaf=lambda x: isinstance(x, NamedSharding))}


def replicated_fraction(abstract_tree, shardings) -> float:
  """Fraction of parameter elements that every device holds in full."""
  total = replicated = 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    n = math.prod(a.shape)
    total += n
    if s.is_fully_replicated:
      replicated += n
  return replicated / max(total, 1)


def rule_axes(rules, logical) -> tuple[str, ...]:
  """Mesh axes a logical axis maps to, read from the rules table."""
  for name, target in rules:
    if name == logical:
      return () if target is None else (target,) if isinstance(target, str) else tuple(target)
  return ()


def table_layout_spec(rules: Rules) -> PartitionSpec:
  """[B, T, D] rows laid out as the embedding table holds D: rows over the batch axes that
  do not split D ('act_batch' less 'embed'), D over those that do."""
  embed = rule_axes(rules, 'embed')
  rows = tuple(a for a in rule_axes(rules, 'act_batch') if a not in embed)
  return PartitionSpec(rows or None, None, embed or None)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, T, ...] input batch: batch over the 'act_batch' rule, rest replicated."""
  logical = ('act_batch',) + (None,) * (ndim - 1)
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical, rules))


def process_rows_problem(batch: NamedSharding, n_rows: int, n_processes: int,
                         process_of: Callable[[Any], int] = lambda d: d.process_index) -> str:
  """'' when process p's devices hold exactly rows [p*n/N, (p+1)*n/N) of a batch laid out by
  `batch` (what each process's loader reads and jax.make_array_from_process_local_data places);
  else what goes wrong. A batch axis not split across the processes (the mesh's process-spanning
  axis a model axis, say) gives several processes the same rows, each with its own data."""
  per = n_rows // n_processes
  held: dict[int, set[int]] = {}
  for device, index in batch.devices_indices_map((n_rows, 1)).items():
    held.setdefault(process_of(device), set()).update(range(*index[0].indices(n_rows)))
  for p in sorted(held):
    if held[p] != set(range(p * per, (p + 1) * per)):
      return (f'process {p}\'s devices hold {len(held[p])} of the batch\'s {n_rows} rows '
              f'(rows {min(held[p])}..{max(held[p])}), not its own {per} '
              f'({p * per}..{(p + 1) * per - 1})')
  return ''
