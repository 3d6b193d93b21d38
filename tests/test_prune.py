"""jkd.prune: depth pruning vs HF with the same layers removed, block importance vs HF
hidden states, layer choice and the model-directory round trip."""

import json
import os

import jax
import numpy as np
import pytest
import torch

from jkd import model, prune, tokenizer
from tests import hf_reference as ref

NUM_LAYERS = 5


@pytest.fixture
def five_layers(monkeypatch):
  """The hf_reference builders read the module-level layer count at call time."""
  monkeypatch.setattr(ref, 'L', NUM_LAYERS)

  def build(arch='llama', **kw):
    cfg, params, hf = ref.ARCHITECTURES[arch](**kw)
    assert cfg.num_layers == hf.config.num_hidden_layers == NUM_LAYERS
    return cfg, params, hf
  return build


def _tokens(b=2, t=ref.T, seed=3):
  return np.random.default_rng(seed).integers(0, ref.V, (b, t), dtype=np.int32)


def _forward(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, x: model.forward(cfg, p, x))(params, tokens))


def _hf_pruned_logits(hf, keep, tokens):
  hf.model.layers = torch.nn.ModuleList([hf.model.layers[i] for i in keep])
  hf.config.num_hidden_layers = len(keep)
  with torch.no_grad():
    out = hf(torch.as_tensor(tokens, dtype=torch.long), use_cache=False)
  return out.logits.float().numpy()


@pytest.mark.parametrize('keep', [[0, 2, 4], [1, 3], [0, 1, 2, 3, 4], [2]])
def test_pruned_logits_match_hf_with_the_same_layers_removed(five_layers, keep):
  """Protects prune_depth's layer selection and order against an independent HF model."""
  cfg, params, hf = five_layers('llama', tied=True)
  new_cfg, new_params = prune.prune_depth(cfg, params, keep)
  assert new_cfg.num_layers == len(keep)
  model.check_params(new_cfg, new_params)
  tokens = _tokens()
  ours, theirs = _forward(new_cfg, new_params, tokens), _hf_pruned_logits(hf, keep, tokens)
  diff = float(np.abs(ours - theirs).max())
  print(f'keep={keep}: max |jkd - HF| = {diff:.2e}')
  assert diff <= 1e-5 * max(1.0, float(np.abs(theirs).max()))


def test_prune_all_layers_is_bit_identical_and_wrong_keep_is_detected(five_layers):
  """Keeping every layer changes nothing; the parity check above can fail (negative control)."""
  cfg, params, hf = five_layers('llama')
  tokens = _tokens()
  same_cfg, same_params = prune.prune_depth(cfg, params, list(range(NUM_LAYERS)))
  assert same_cfg == cfg
  np.testing.assert_array_equal(_forward(same_cfg, same_params, tokens),
                                _forward(cfg, params, tokens))
  wrong_cfg, wrong_params = prune.prune_depth(cfg, params, [0, 1, 4])
  theirs = _hf_pruned_logits(hf, [0, 2, 4], tokens)
  assert np.abs(_forward(wrong_cfg, wrong_params, tokens) - theirs).max() > 1e-2


@pytest.mark.parametrize('keep', [[], [0, 0], [2, 1], [0, 5], [-1, 2], [0.0, 1], [False, True],
                                  [np.bool_(False), np.bool_(True)]])
def test_prune_depth_rejects_bad_keep(keep):
  cfg, params, _ = ref.llama()
  with pytest.raises(ValueError, match='keep='):
    prune.prune_depth(cfg, params, keep)


def _hf_block_importance(hf, tokens, mask):
  """1 - masked mean cos(layer input, layer output) from HF's residual stream, in numpy."""
  captured = []  # the residual after the last layer is the final norm's input
  hook = hf.base_model.get_submodule('norm' if hasattr(hf.base_model, 'norm') else 'ln_f')
  handle = hook.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
  with torch.no_grad():
    out = hf(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True,
             use_cache=False)
  handle.remove()
  # hidden_states[i] is layer i's input; the last entry is after the final norm.
  stream = [h.double().numpy() for h in out.hidden_states[:-1]] + [captured[0].double().numpy()]
  assert len(stream) == NUM_LAYERS + 1
  bi = []
  for x, y in zip(stream[:-1], stream[1:]):
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    bi.append(1.0 - cos[mask].mean())
  return np.array(bi)


@pytest.mark.parametrize('arch', ['llama', 'gpt3'])  # RoPE and learned absolute positions
def test_block_importance_matches_hf_hidden_states(five_layers, arch):
  """Protects the embedding, per-layer slicing, cosine and masked mean of block_importance."""
  cfg, params, hf = five_layers(arch)
  tokens = _tokens(b=3)
  mask = np.random.default_rng(4).random(tokens.shape) < 0.6
  ours = prune.block_importance(cfg, params, tokens, mask)
  theirs = _hf_block_importance(hf, tokens, mask)
  print(f'{arch}: BI {np.round(ours, 4)}; max |jkd - HF| {np.abs(ours - theirs).max():.1e}')
  assert ours.shape == (NUM_LAYERS,) and (ours > 1e-3).all()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  # The mask matters: all tokens give a different answer.
  assert np.abs(prune.block_importance(cfg, params, tokens) - ours).max() > 1e-4


def test_identity_layer_scores_zero_and_is_dropped_first(five_layers):
  """A layer that adds nothing to the residual stream has BI 0 and is the one pruned."""
  cfg, params, _ = five_layers('llama')
  layers = params['layers']
  for kernel in (layers['attn']['o']['kernel'], layers['mlp']['fc2']['kernel']):
    kernel[2] = 0.0
  bi = prune.block_importance(cfg, params, _tokens())
  assert abs(bi[2]) <= 1e-6 and (np.delete(bi, 2) > 1e-3).all()
  assert prune.choose_layers(bi, NUM_LAYERS - 1) == [0, 1, 3, 4]


def test_choose_layers_ranks_and_keeps_first_last():
  bi = np.array([0.01, 0.5, 0.2, 0.9, 0.3, 0.02])
  assert prune.choose_layers(bi, 3) == [0, 3, 5]  # first and last win over 0.5
  assert prune.choose_layers(bi, 3, keep_first_last=False) == [1, 3, 4]
  assert prune.choose_layers(bi, 2) == [0, 5]
  assert prune.choose_layers(bi, 6) == list(range(6))
  assert prune.choose_layers([0.1, 0.1, 0.1, 0.1], 3) == [0, 1, 3]  # ties: earlier wins
  assert prune.choose_layers([0.7], 1) == [0]
  assert prune.choose_layers(bi, 1, keep_first_last=False) == [3]


@pytest.mark.parametrize('importance, num_keep, match', [
    ([0.1, 0.2, 0.3], 0, 'num_keep'), ([0.1, 0.2, 0.3], 4, 'num_keep'),
    ([0.1, 0.2, 0.3], 1, 'first and last'), ([0.1, 0.2, 0.3], 2.0, 'num_keep'),
    ([0.1, 0.2, 0.3], True, 'num_keep=True: must be an integer'),
    ([], 1, 'importance'), ([[0.1, 0.2]], 1, 'importance'), ([0.1, np.nan], 2, 'importance')])
def test_choose_layers_rejects_bad_arguments(importance, num_keep, match):
  with pytest.raises(ValueError, match=match):
    prune.choose_layers(importance, num_keep)


def test_evenly_spaced_includes_first_and_last():
  assert prune.evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
  assert prune.evenly_spaced(5, 5) == [0, 1, 2, 3, 4]
  assert prune.evenly_spaced(5, 2) == [0, 4]
  for n in range(2, 31):
    keep = prune.evenly_spaced(30, n)
    assert len(set(keep)) == n and keep[0] == 0 and keep[-1] == 29


def _tokenizer():
  vocab = {chr(ord('a') + i): i for i in range(26)}
  tok = tokenizer._byte_level_bpe(vocab, [], 'test', special=[], added=[], split_digits=False,
                                  add_prefix_space=False)
  return tokenizer.Tokenizer('huggingface', {tokenizer.HF_FILE: tok.to_str().encode()},
                             bos_id=1, eos_id=2, pad_id=None)


@pytest.mark.parametrize('calibrate', [True, False])
def test_prune_model_dir_round_trip(five_layers, tmp_path, capsys, calibrate):
  """The student directory loads, has the kept layers and the teacher's tokenizer."""
  cfg, params, _ = five_layers('llama')
  params['layers']['mlp']['fc2']['kernel'][1] = 0.0  # layer 1: the least important
  params['layers']['attn']['o']['kernel'][1] = 0.0
  src, dst = str(tmp_path / 'teacher'), str(tmp_path / 'student')
  model.save(src, cfg, params)
  tokenizer.save(_tokenizer(), src)
  tokens = _tokens()
  result = prune.prune_model_dir(src, dst, num_layers=4,
                                 calibration_tokens_BxT=tokens if calibrate else None)
  want = [0, 2, 3, 4] if calibrate else [0, 1, 3, 4]
  assert result['keep'] == want
  assert (result['importance'] is not None) == calibrate
  assert 'kept 4/5 layers' in capsys.readouterr().out
  new_cfg, new_params = model.load(dst)
  assert new_cfg.num_layers == 4
  expected_cfg, expected_params = prune.prune_depth(cfg, params, want)
  assert new_cfg == expected_cfg
  np.testing.assert_array_equal(_forward(new_cfg, new_params, tokens),
                                _forward(expected_cfg, expected_params, tokens))
  assert tokenizer.load(dst).fingerprint == tokenizer.load(src).fingerprint


def test_prune_model_dir_without_tokenizer_and_in_place(tmp_path):
  """No tokenizer in the source: none in the student (a stale one is removed); no in-place."""
  cfg, params, _ = ref.llama()
  src, dst = str(tmp_path / 'teacher'), str(tmp_path / 'student')
  model.save(src, cfg, params)
  tokenizer.save(_tokenizer(), dst)  # left over from an earlier run
  assert prune.prune_model_dir(src, dst, num_layers=2)['keep'] == [0, 1]
  assert not os.path.exists(os.path.join(dst, 'tokenizer'))
  with open(os.path.join(dst, model.CONFIG_FILE)) as f:
    assert json.load(f)['num_layers'] == 2
  os.symlink(src, tmp_path / 'link')
  for same in (src, str(tmp_path / 'link')):
    with pytest.raises(ValueError, match='in place'):
      prune.prune_model_dir(src, same, num_layers=2)
