"""mode=pipeline: every stage that exists, end to end, on the configured model.

Today: initialise config.model sharded over the mesh, save it as a model directory, load it
back into the same shardings, and time sharded forward passes. Later stages (convert,
extract, train, eval, export) join this list as they land.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from jkd import config as jkd_config
from jkd import model, sharding


def run(config) -> dict[str, float]:
  mesh_cfg = jkd_config.mesh_config(config)
  cfg = jkd_config.model_config(config)
  mesh = sharding.make_mesh(mesh_cfg.axes, mesh_cfg.shape)
  logging.info('mesh %s', dict(mesh.shape))
  timings = {}

  # Stage 1: sharded init -> model directory -> sharded load.
  t0 = time.perf_counter()
  rng = jax.random.key(config.seed)
  shardings = sharding.shardings_for(lambda: model.init(cfg, rng, boxed=True), mesh,
                                     mesh_cfg.rules)
  params = jax.jit(lambda r: model.init(cfg, r), out_shardings=shardings)(rng)
  model_dir = os.path.join(config.workdir, 'model')
  model.save(model_dir, cfg, params)
  cfg, params = model.load(model_dir, shardings)
  timings['init_save_load_s'] = time.perf_counter() - t0
  print(f'[pipeline] model: {sum(x.size for x in jax.tree.leaves(params)):,} params '
        f'-> {model_dir}')

  # Stage 2: sharded forward, timed; next-token CE on random tokens is ~ln(V) at init.
  b, t = config.pipeline.batch_size, config.pipeline.seq_len
  with sharding.activate(mesh, mesh_cfg.rules):
    @jax.jit
    def next_token_ce(params, tokens_BxT):
      logits_BxTxV = model.forward(cfg, params, tokens_BxT)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits_BxTxV[:, :-1], tokens_BxT[:, 1:]).mean()

    data_rng = np.random.default_rng(config.seed)
    batch_sharding = sharding.batch_sharding(mesh, mesh_cfg.rules)
    ces = []
    for step in tqdm(range(config.pipeline.steps + 1), desc='forward', unit='batch'):
      tokens = jax.device_put(data_rng.integers(0, cfg.vocab_size, (b, t), np.int32),
                              batch_sharding)
      if step == 1:  # step 0 includes the compile
        t0 = time.perf_counter()
      ces.append(float(next_token_ce(params, tokens)))
  elapsed = time.perf_counter() - t0
  timings['forward_tokens_per_s'] = config.pipeline.steps * b * t / elapsed
  ce = float(np.mean(ces))
  print(f'[pipeline] forward: mean next-token CE {ce:.4f} (ln V = {np.log(cfg.vocab_size):.4f}), '
        f'{timings["forward_tokens_per_s"]:,.0f} tokens/s')
  if not np.isfinite(ce):
    raise ValueError(f'forward produced a non-finite loss {ce}')
  return {'ce': ce, **timings}
