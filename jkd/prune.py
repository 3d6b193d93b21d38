"""Depth pruning: a student made of a subset of the teacher's layers.

Block importance follows ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language
Models are More Redundant Than You Expect"): a layer that barely turns the residual stream,
i.e. whose input and output have cosine similarity near 1, matters little, so
BI_i = 1 - E_tokens[cos(x_in_i, x_out_i)]. Minitron (Muralidharan et al., 2024, "Compact
Language Models via Pruning and Knowledge Distillation") ranks layers that way, drops the least
important ones in one shot, keeps embeddings, width and tokenizer, and recovers the loss with
knowledge distillation from the unpruned teacher. Both observe that the first and last layers
matter most, so `choose_layers` keeps them by default.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jkd import model, tokenizer


def block_importance(cfg: model.ModelConfig, params: model.Params, tokens_BxT,
                     loss_mask_BxT=None) -> np.ndarray:
  """BI of each layer [L]: 1 - mean over masked tokens of cos(residual in, residual out).

  Runs the embedding, then one layer at a time through the same `Block` the decoder scans
  (the layer's slice of the stacked params), in fp32 whatever `cfg.dtype` says.
  """
  cfg = dataclasses.replace(cfg, dtype='float32')
  model.check_params(cfg, params)
  tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
  mask_BxT = (np.ones(tokens_BxT.shape, bool) if loss_mask_BxT is None
              else np.asarray(loss_mask_BxT).astype(bool))
  if tokens_BxT.ndim != 2 or mask_BxT.shape != tokens_BxT.shape:
    raise ValueError(f'tokens {tokens_BxT.shape} must be [B, T] and the loss mask '
                     f'{mask_BxT.shape} the same shape')
  if not mask_BxT.any():
    raise ValueError('the loss mask selects no token')
  positions_BxT, attn_mask = model._inputs(tokens_BxT, None, None)
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)

  @jax.jit
  def embed(embed_params, tokens_BxT):
    x_BxTxD = jnp.take(embed_params['embed'], tokens_BxT, axis=0)
    if 'pos_embed' in embed_params:  # learned absolute positions, as in Decoder
      x_BxTxD = x_BxTxD + jnp.take(embed_params['pos_embed'], positions_BxT, axis=0)
    return x_BxTxD

  @jax.jit
  def layer(layer_params, x_BxTxD):  # same shapes for every layer: compiled once
    y_BxTxD, _ = model.Block(cfg).apply({'params': layer_params}, x_BxTxD, positions_BxT,
                                        attn_mask)
    dot_BxT = jnp.sum(x_BxTxD * y_BxTxD, -1)
    norms_BxT = jnp.linalg.norm(x_BxTxD, axis=-1) * jnp.linalg.norm(y_BxTxD, axis=-1)
    return y_BxTxD, dot_BxT / jnp.maximum(norms_BxT, jnp.finfo(jnp.float32).tiny)

  x_BxTxD = embed(f32({k: params[k] for k in ('embed', 'pos_embed') if k in params}),
                  tokens_BxT)
  importance_L = np.zeros(cfg.num_layers)
  for i in range(cfg.num_layers):
    x_BxTxD, cos_BxT = layer(f32(jax.tree.map(lambda a: a[i], params['layers'])), x_BxTxD)
    importance_L[i] = 1.0 - np.asarray(cos_BxT, np.float64)[mask_BxT].mean()
  return importance_L


def _is_index(x) -> bool:
  """An integer, not a bool (True is an int in Python, and numpy indexes with bools as masks)."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_num_keep(num_layers: int, num_keep, keep_first_last: bool) -> None:
  if not _is_index(num_keep) or not 1 <= num_keep <= num_layers:
    raise ValueError(f'num_keep={num_keep!r}: must be an integer in [1, {num_layers}]')
  if keep_first_last and num_layers > 1 and num_keep < 2:
    raise ValueError(f'num_keep={num_keep}: keeping the first and last layers needs >= 2')


def choose_layers(importance_L, num_keep: int, *, keep_first_last: bool = True) -> list[int]:
  """Sorted indices of the `num_keep` most important layers (ties: the earlier layer wins).

  With `keep_first_last` the first and last layers are kept whatever their score.
  """
  importance_L = np.asarray(importance_L, np.float64)
  if importance_L.ndim != 1 or importance_L.size == 0 or not np.isfinite(importance_L).all():
    raise ValueError(f'importance must be a non-empty finite 1-D array, got shape '
                     f'{importance_L.shape}')
  n = importance_L.size
  _check_num_keep(n, num_keep, keep_first_last)
  forced = {0, n - 1} if keep_first_last else set()
  ranked = [int(i) for i in np.argsort(-importance_L, kind='stable') if int(i) not in forced]
  return sorted(forced | set(ranked[:num_keep - len(forced)]))


def prune_depth(cfg: model.ModelConfig, params: model.Params,
                keep: list[int]) -> tuple[model.ModelConfig, model.Params]:
  """The model made of layers `keep` (in order); embeddings, width and head are unchanged."""
  keep = list(keep)
  if not keep or not all(_is_index(k) for k in keep):
    raise ValueError(f'keep={keep!r}: must be a non-empty list of layer indices')
  if any(b <= a for a, b in zip(keep, keep[1:])):
    raise ValueError(f'keep={keep}: must be sorted and without repeats')
  if keep[0] < 0 or keep[-1] >= cfg.num_layers:
    raise ValueError(f'keep={keep}: indices must lie in [0, {cfg.num_layers})')
  model.check_params(cfg, params)
  index = np.asarray(keep, np.int64)
  pruned = dict(params, layers=jax.tree.map(lambda a: a[index], params['layers']))
  return dataclasses.replace(cfg, num_layers=len(keep)), pruned


def evenly_spaced(num_layers: int, num_keep: int) -> list[int]:
  """`num_keep` layer indices spread evenly over [0, num_layers), first and last included."""
  _check_num_keep(num_layers, num_keep, keep_first_last=True)
  # Steps of (L-1)/(n-1) >= 1 keep the rounded indices distinct.
  return [int(i) for i in np.round(np.linspace(0, num_layers - 1, num_keep))]


def prune_model_dir(src_dir: str, dst_dir: str, *, num_layers: int,
                    calibration_tokens_BxT=None, loss_mask_BxT=None) -> dict:
  """Loads `src_dir`, keeps `num_layers` layers, writes the student to `dst_dir`.

  Layers are chosen by block importance on the calibration tokens when given, else evenly
  spaced; the tokenizer is copied when the source has one.
  """
  if os.path.realpath(src_dir) == os.path.realpath(dst_dir):  # a link to it too
    raise ValueError(f'{dst_dir}: pruning in place would overwrite the teacher')
  cfg, params = model.load(src_dir)
  importance = None
  if calibration_tokens_BxT is not None:
    importance = block_importance(cfg, params, calibration_tokens_BxT, loss_mask_BxT)
    keep = choose_layers(importance, num_layers)
  else:
    keep = evenly_spaced(cfg.num_layers, num_layers)
  new_cfg, new_params = prune_depth(cfg, params, keep)
  model.save(dst_dir, new_cfg, new_params, tokenizer.load_if_saved(src_dir))
  how = 'by block importance' if importance is not None else 'evenly spaced'
  print(f'[prune] {src_dir} -> {dst_dir}: kept {len(keep)}/{cfg.num_layers} layers '
        f'{how}: {keep}')
  return {'keep': keep,
          'importance': None if importance is None else [float(b) for b in importance]}
