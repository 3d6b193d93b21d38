"""Preallocated fp32 jkd params that importers fill one converted tensor at a time.

Importers stream a checkpoint tensor by tensor; each converted tensor lands at
`params[path][layer][sub]` with its shape checked against what the ModelConfig builds.
A path may end in a tuple: the sub-index inside one layer's slice (e.g. the gate or up
half of the gated fc1 kernel [L, D, 2, F]).
"""

from __future__ import annotations

import numpy as np

from jkd import model


class ParamBuffer:

  def __init__(self, cfg: model.ModelConfig):
    import jax  # only for the abstract shapes; no arrays are made on a device
    self.cfg = cfg
    abstract = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    self.params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract)
    self.filled: set[tuple] = set()  # (keys, layer, repr(sub)) written so far

  def put(self, path: tuple, layer: int | None, value: np.ndarray, where: str,
          source_shape: tuple | None = None) -> None:
    """params[path][layer][sub] = value; ValueError naming `where` on a missing leaf or shape."""
    keys, sub = (path[:-1], path[-1]) if isinstance(path[-1], tuple) else (path, ())
    node = self.params
    for key in keys:
      if not isinstance(node, dict) or key not in node:
        raise ValueError(f'{where}: the model config has no parameter {".".join(keys)} '
                         f'(bias={self.cfg.bias}, position={self.cfg.position_embedding_type}, '
                         f'tied={self.cfg.share_embeddings_and_output_weights})')
      node = node[key]
    slot = ((layer,) if layer is not None else ()) + sub
    if value.shape != node[slot].shape:
      shape = tuple(source_shape if source_shape is not None else value.shape)
      raise ValueError(f'{where}: shape {shape} does not fit the model config '
                       f'(expected {node[slot].shape} after conversion)')
    node[slot] = value
    self.filled.add((keys, layer, repr(sub)))  # slices are unhashable before 3.12
