"""Mesh construction, the logical-axis rules, and sharded == unsharded on 8 simulated devices."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import smoke
from jkd import config as jkd_config
from jkd import model, sharding
from tests import hf_reference as ref

# {param path: PartitionSpec} for configs/smoke.py on a (2, 2, 2) mesh. Column-parallel
# q/k/v/fc1 split their outputs over 'tensor', row-parallel o/fc2 their inputs; the hidden
# axis of every weight is split over 'fsdp'; the stacked layer axis is never split.
GOLDEN_SMOKE_SPECS = {
    "['embed']": P('tensor', 'fsdp'),
    "['final_norm']['bias']": P(None),
    "['final_norm']['scale']": P(None),
    "['layers']['attn']['k']['kernel']": P(None, 'fsdp', 'tensor', None),
    "['layers']['attn']['o']['kernel']": P(None, 'tensor', None, 'fsdp'),
    "['layers']['attn']['q']['kernel']": P(None, 'fsdp', 'tensor', None),
    "['layers']['attn']['v']['kernel']": P(None, 'fsdp', 'tensor', None),
    "['layers']['attn_norm']['bias']": P(None, None),
    "['layers']['attn_norm']['scale']": P(None, None),
    "['layers']['mlp']['fc1']['kernel']": P(None, 'fsdp', None, 'tensor'),
    "['layers']['mlp']['fc2']['kernel']": P(None, 'tensor', 'fsdp'),
    "['layers']['mlp_norm']['bias']": P(None, None),
    "['layers']['mlp_norm']['scale']": P(None, None),
    "['lm_head']": P('fsdp', 'tensor'),
}


def _smoke():
  config = smoke.get_config()
  return jkd_config.model_config(config), jkd_config.mesh_config(config)


def test_golden_partition_specs_for_smoke_config(devices8):
  cfg, mesh_cfg = _smoke()
  mesh = sharding.make_mesh(mesh_cfg.axes, (2, 2, 2))
  shardings = sharding.shardings_for(lambda: model.init(cfg, jax.random.key(0), boxed=True),
                                     mesh, mesh_cfg.rules)
  assert sharding.mesh_specs(shardings) == GOLDEN_SMOKE_SPECS


def test_replicated_fraction_is_small(devices8):
  cfg, mesh_cfg = _smoke()
  mesh = sharding.make_mesh(mesh_cfg.axes, (2, 2, 2))
  shardings = sharding.shardings_for(lambda: model.init(cfg, jax.random.key(0), boxed=True),
                                     mesh, mesh_cfg.rules)
  abstract = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  assert sharding.replicated_fraction(abstract, shardings) < 0.01  # only norms replicate


@pytest.mark.parametrize('arch', ['llama', 'gpt3'])
def test_sharded_forward_equals_unsharded(devices8, arch):
  """(data, fsdp, tensor) = (2, 2, 2): same logits, and the output really is sharded."""
  cfg, params, _ = ref.ARCHITECTURES[arch]()
  _, mesh_cfg = _smoke()
  tokens = np.random.default_rng(0).integers(0, ref.V, (4, ref.T), dtype=np.int32)
  unsharded = np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, tokens))

  mesh = sharding.make_mesh(mesh_cfg.axes, (2, 2, 2))
  shardings = sharding.shardings_for(lambda: model.init(cfg, jax.random.key(0), boxed=True),
                                     mesh, mesh_cfg.rules)
  params_sharded = jax.device_put(params, shardings)
  tokens_sharded = jax.device_put(tokens, sharding.batch_sharding(mesh, mesh_cfg.rules))
  with sharding.activate(mesh, mesh_cfg.rules):
    out = jax.jit(lambda p, t: model.forward(cfg, p, t))(params_sharded, tokens_sharded)
  assert not out.sharding.is_fully_replicated
  assert len(params_sharded['layers']['mlp']['fc2']['kernel'].addressable_shards[0].data
             .reshape(-1)) == params['layers']['mlp']['fc2']['kernel'].size // 4
  np.testing.assert_allclose(np.asarray(out), unsharded, atol=2e-5)


def test_mesh_minus_one_fills_remaining_devices(devices8):
  mesh = sharding.make_mesh(('data', 'fsdp', 'tensor'), (2, -1, 1))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}


@pytest.mark.parametrize('shape', [(3, 1, 1), (2, 2, 1), (-1, -1, 1), (0, -1, 1), (3, -1, 1)])
def test_mesh_not_matching_device_count_raises_naming_the_key(devices8, shape):
  with pytest.raises(ValueError, match=r'mesh\.shape='):
    sharding.make_mesh(('data', 'fsdp', 'tensor'), shape)


def test_rules_naming_an_unknown_mesh_axis_are_rejected():
  config = smoke.get_config()
  with config.unlocked():
    config.mesh.rules = (('embed', 'model'),)
  with pytest.raises(ValueError, match=r"mesh\.rules: logical axis 'embed' maps to 'model'"):
    jkd_config.mesh_config(config)


@pytest.mark.parametrize('shape, process_of, problem', [
    ((1, 8, 1), lambda d: d.id // 4, ''),  # two processes of four devices, batch over fsdp
    ((2, 2, 2), lambda d: d.id // 4, ''),  # data spans the processes
    ((1, 4, 2), lambda d: d.id // 4, ''),  # tensor within a process
    ((1, 1, 8), lambda d: d.id // 4, "process 0's devices hold 16 of the batch's 16 rows"),
    ((1, 2, 4), lambda d: d.id % 2, "process 0's devices hold 16 of the batch's 16 rows"),
    ((1, 8, 1), lambda d: 1 - d.id // 4, "process 0's devices hold 8 of the batch's 16 rows "
                                          r'\(rows 8..15\), not its own 8 \(0..7\)'),
])
def test_each_process_must_hold_its_own_rows_of_the_batch(devices8, shape, process_of, problem):
  """With several processes, process p feeds rows [p*G/N, (p+1)*G/N) of every batch: the
  batch's sharding must put exactly those rows on its devices, none on another's."""
  rules = _smoke()[1].rules
  mesh = sharding.make_mesh(('data', 'fsdp', 'tensor'), shape)
  got = sharding.process_rows_problem(sharding.batch_sharding(mesh, rules), 16, 2, process_of)
  assert (got == '') if not problem else re.match(problem, got), got
