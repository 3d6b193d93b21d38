"""jkd.model against Hugging Face on the same weights, plus the model's own invariants."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import model
from tests import hf_reference as ref
from tests import hlo


def _tokens(b=2, t=ref.T, seed=0):
  return np.random.default_rng(seed).integers(0, ref.V, (b, t), dtype=np.int32)


def _forward(cfg, params, tokens, **kw):
  return np.asarray(jax.jit(lambda p, x: model.forward(cfg, p, x, **kw))(params, tokens))


@pytest.mark.parametrize('arch', sorted(ref.ARCHITECTURES))
def test_logits_match_hugging_face_fp32(arch):
  """Protects the forward pass of every supported NeMo architecture (norms, RoPE, MLPs)."""
  cfg, params, hf = ref.ARCHITECTURES[arch]()
  model.check_params(cfg, params)
  tokens = _tokens()
  ours, theirs = _forward(cfg, params, tokens), ref.hf_logits(hf, tokens)
  assert ours.shape == theirs.shape == (2, ref.T, ref.V) and ours.dtype == np.float32
  diff = float(np.abs(ours - theirs).max())
  print(f'{arch}: max |jkd - HF| = {diff:.2e} (max |logit| {np.abs(theirs).max():.2f})')
  assert diff <= 1e-5  # measured: <= 2.3e-6; the tanh GELU form is off by 1.9e-4


def test_negative_control_wrong_norm_convention_is_detected():
  """The parity test has teeth: GPT-2B-001 without the zero-centred +1 is far off."""
  cfg, params, hf = ref.gpt2b()
  wrong = dataclasses.replace(cfg, normalization='layernorm')
  tokens = _tokens()
  assert np.abs(_forward(wrong, params, tokens) - ref.hf_logits(hf, tokens)).max() > 1e-2


def test_padded_vocab_never_reaches_logits():
  """Padded rows (huge garbage values here) are kept in params but sliced from logits."""
  cfg, params, _ = ref.llama(padded_vocab=ref.V + 8)
  assert params['embed'].shape[0] == cfg.padded_vocab == ref.V + 8
  logits = _forward(cfg, params, _tokens())
  assert logits.shape[-1] == ref.V
  tied_cfg, tied_params, hf = ref.llama(padded_vocab=ref.V + 8, tied=True)
  tokens = _tokens()
  assert np.abs(_forward(tied_cfg, tied_params, tokens) - ref.hf_logits(hf, tokens)).max() <= 1e-4


def test_causality_through_gradients():
  """d logits[t] / d embedding(token at s) is zero exactly when s > t."""
  cfg, params, _ = ref.nemotron()
  tokens = np.arange(ref.T, dtype=np.int32)[None] * 3  # distinct ids: one row per position
  t = 7

  def out_at_t(embed):
    return model.forward(cfg, {**params, 'embed': embed}, tokens)[0, t].sum()

  grad = np.asarray(jax.grad(out_at_t)(jnp.asarray(params['embed'])))
  per_position = np.abs(grad[tokens[0]]).sum(-1)
  assert np.all(per_position[t + 1:] == 0.0)
  assert np.all(per_position[:t + 1] > 0.0)


def test_packed_segments_equal_separate_sequences():
  """Segment ids + restarted positions make a packed row equal two separate sequences."""
  for arch in ('llama', 'gpt3'):
    cfg, params, _ = ref.ARCHITECTURES[arch]()
    a, b = _tokens(1, 10, seed=1), _tokens(1, 6, seed=2)
    packed = np.concatenate([a, b], 1)
    segments = np.array([[0] * 10 + [1] * 6], np.int32)
    positions = np.array([list(range(10)) + list(range(6))], np.int32)
    out = _forward(cfg, params, packed, segment_ids_BxT=segments, positions_BxT=positions)
    np.testing.assert_allclose(out[:, :10], _forward(cfg, params, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 10:], _forward(cfg, params, b), atol=1e-5)
    # Without positions they restart at each segment (learned positions, gpt3, would differ).
    np.testing.assert_array_equal(_forward(cfg, params, packed, segment_ids_BxT=segments), out)
  segments = jnp.asarray([[3, 3, 0, 0, 0, 5], [1] * 6])
  np.testing.assert_array_equal(model.segment_positions(segments),
                                [[0, 1, 0, 1, 2, 0], list(range(6))])


def _cudnn_lowered(cfg, params, tokens, **kw):
  """StableHLO of forward + backward lowered for cuda."""
  loss = lambda p: model.forward(cfg, p, tokens, **kw).sum()  # noqa: E731
  return jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=('cuda',)).as_text()


def test_attention_implementation(cudnn_stand_in):
  """'auto' is XLA's attention on CPU (cuDNN only on a GPU backend, in bf16, for head dims it
  takes); 'cudnn' lowers forward and backward to cuDNN's fused attention, a segment mask as
  its bias input, and no [T, T] scores of XLA's own."""
  cfg, params, _ = ref.llama()
  cfg16 = dataclasses.replace(cfg, dtype='bfloat16')
  assert model.attention_implementation(cfg16) == 'xla'  # the CPU backend
  assert model.attention_implementation(dataclasses.replace(cfg16, attention='cudnn')) == 'cudnn'
  # What cuDNN cannot run is refused when the config is made, naming the key.
  with pytest.raises(ValueError, match=r"model\.attention='cudnn': .*needs bfloat16 compute .*"
                                       r'\(dtype float32, head dim 16\)'):
    dataclasses.replace(cfg, attention='cudnn')
  tokens = _tokens(2, 24)
  text = _cudnn_lowered(dataclasses.replace(cfg16, attention='cudnn'), params, tokens)
  assert '__cudnn$fmhaSoftmax(' in text and '__cudnn$fmhaSoftmaxBackward(' in text
  assert 'x24x24x' not in text  # no [B, N, T, T] scores
  segments = np.array([[0] * 14 + [1] * 10] * 2, np.int32)
  text = _cudnn_lowered(dataclasses.replace(cfg16, attention='cudnn'), params, tokens,
                        segment_ids_BxT=segments)
  assert '__cudnn$fmhaScaleBiasSoftmax(' in text
  assert '__cudnn$fmhaSoftmax(' not in _cudnn_lowered(cfg16, params, tokens)  # 'auto', CPU


@pytest.mark.gpu
def test_cudnn_attention_matches_xla_on_gpu():
  """On a GPU 'auto' takes cuDNN for bf16; its logits and gradients match XLA's attention."""
  cfg, params, _ = ref.llama()
  cfg16 = dataclasses.replace(cfg, dtype='bfloat16')
  assert model.attention_implementation(cfg16) == 'cudnn'
  tokens = _tokens(2, 64)
  segments = np.array([[0] * 40 + [1] * 24] * 2, np.int32)
  for kw in (dict(), dict(segment_ids_BxT=segments)):
    got = _forward(cfg16, params, tokens, **kw)
    want = _forward(dataclasses.replace(cfg16, attention='xla'), params, tokens, **kw)
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    grads = [jax.grad(lambda p, c=c: model.forward(c, p, tokens, **kw).mean())(params)
             for c in (cfg16, dataclasses.replace(cfg16, attention='xla'))]
    for a, b in zip(*map(jax.tree.leaves, grads)):
      np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.abs(b).max()) + 1e-6)


def test_bf16_compute_returns_fp32_logits_close_to_fp32():
  cfg, params, _ = ref.gpt2b()
  tokens = _tokens()
  full = _forward(cfg, params, tokens)
  half = _forward(dataclasses.replace(cfg, dtype='bfloat16'), params, tokens)
  assert half.dtype == np.float32
  assert np.abs(half - full).max() < 0.05 * np.abs(full).max()
  assert np.abs(half - full).max() > 0.0  # really computed in bf16


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('policy', ['full', 'dots', 'dots_no_batch'])
def test_remat_policies_keep_values_and_gradients(policy, dtype):
  cfg, params, _ = ref.llama()
  cfg = dataclasses.replace(cfg, dtype=dtype)
  tokens = _tokens()

  def loss(p, c):
    return model.forward(c, p, tokens).std()

  g0 = jax.grad(loss)(params, cfg)
  g1 = jax.grad(loss)(params, dataclasses.replace(cfg, remat_policy=policy))
  for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('activation', ['swiglu', 'geglu', 'reglu'])
def test_gated_activation_backward_matches_autodiff(activation):
  """gated_act's own backward (only u kept, fp32 inside, one output pass) is autodiff's of
  act(gate) * up: equal in fp32, and in bf16 within rounding of the fp32 gradient."""
  act = model.ACTIVATIONS[activation][0]
  r = np.random.default_rng(0)
  u = jnp.asarray(r.standard_normal((3, 5, 2, 7)), jnp.float32)
  g = jnp.asarray(r.standard_normal((3, 5, 7)), jnp.bfloat16).astype(jnp.float32)  # bf16-exact

  def plain(u):
    return act(u[..., 0, :]) * u[..., 1, :]

  def vjp(f, u):
    y, back = jax.vjp(f, u)
    return y, back(g.astype(y.dtype))[0]

  ours = functools.partial(model.gated_act, act)
  y, du = vjp(ours, u)
  y_ref, du_ref = vjp(plain, u)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(du, du_ref, rtol=1e-6, atol=1e-7)
  assert np.abs(du_ref).min() < 0.1 < np.abs(du_ref).max()  # both halves really vary
  u16 = u.astype(jnp.bfloat16)
  y16, du16 = vjp(ours, u16)
  assert du16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y16, plain(u16))
  du16_ref = vjp(plain, u16.astype(jnp.float32))[1]  # fp32 autodiff at the same bf16 inputs
  np.testing.assert_allclose(np.asarray(du16, np.float32), du16_ref, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize('unroll', [0, 2])
def test_scan_unroll_keeps_values_and_gradients(unroll):
  """scan_unroll changes the program (0: no layer loop left), not the parameters, the
  values or the gradients."""
  cfg, params, _ = ref.llama()
  assert cfg.num_layers > 1
  tokens = _tokens()

  def loss(p, c):
    return model.forward(c, p, tokens).std()

  unrolled = dataclasses.replace(cfg, scan_unroll=unroll)
  np.testing.assert_allclose(_forward(unrolled, params, tokens), _forward(cfg, params, tokens),
                             rtol=1e-6, atol=1e-6)
  for x, y in zip(jax.tree.leaves(jax.grad(loss)(params, cfg)),
                  jax.tree.leaves(jax.grad(loss)(params, unrolled))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  loops = [' while(' in jax.jit(lambda p, c=c: model.forward(c, p, tokens)).lower(params)
           .compile().as_text() for c in (cfg, unrolled)]
  assert loops == [True, unroll != 0 and unroll < cfg.num_layers]


@pytest.mark.parametrize('policy,saved', [('dots', True), ('dots_no_batch', True),
                                          ('full', False)])
def test_dots_policies_save_the_cpu_bf16_dense_products(policy, saved, capsys):
  """On CPU a bf16 Dense product is a custom VJP, not a dot_general the dots policies see;
  it is named 'dense' so that they still keep it (here: the MLP's fc1 output of every layer)
  instead of recomputing it."""
  cfg, params, _ = ref.llama()
  cfg = dataclasses.replace(cfg, dtype='bfloat16', remat_policy=policy)
  tokens = _tokens()
  jax.ad_checkpoint.print_saved_residuals(lambda p: model.forward(cfg, p, tokens).std(), params)
  fc1 = f'bf16[{cfg.num_layers},2,{ref.T},2,{cfg.ffn_hidden_size}]'
  assert (fc1 in capsys.readouterr().out) == saved


def _two_dense(dot, x, w1, w2):
  return jnp.sin(dot(jax.nn.silu(dot(x, w1, 1)), w2, 2).astype(jnp.float32)).sum()


def _plain_dot(x, w, n_in):
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                                    ((), ())))


def _two_dense_args():
  """bf16 x [4, 64, 96], w1 [96, 2, 80], w2 [2, 80, 96] (n_in=2), unit-scale products."""
  r = np.random.default_rng(0)
  return [jnp.asarray(r.normal(size=s) / np.sqrt(s[0]), jnp.bfloat16)
          for s in ((4, 64, 96), (96, 2, 80), (2, 80, 96))]


def _two_dense_grad(dot):
  return jax.jit(jax.grad(functools.partial(_two_dense, dot), argnums=(0, 1, 2)))


def test_bf16_dense_products_on_cpu_are_bf16_dots():
  """On CPU a bf16 Dense product and the two of its backward run as bf16 x bf16 -> fp32 dots
  (XLA:CPU runs a bf16 -> bf16 dot as an fp32 one, operands upcast, at about half the speed);
  values and gradients are the plain dot's to bf16 rounding."""
  args = _two_dense_args()
  grad = _two_dense_grad(model.dense_dot)
  dots = hlo.dot_dtypes(grad.lower(*args).compile().as_text())
  assert len(dots) == 6 and all(d == ('bf16', 'bf16', 'f32') for d in dots), dots
  plain_grad = _two_dense_grad(_plain_dot)
  plain_dots = hlo.dot_dtypes(plain_grad.lower(*args).compile().as_text())
  assert ('f32', 'f32', 'f32') in plain_dots  # what the custom VJP avoids
  y = np.asarray(model.dense_dot(args[0], args[1]), np.float32)
  want = np.asarray(_plain_dot(args[0], args[1], 1), np.float32)
  np.testing.assert_allclose(y, want, rtol=2 ** -7, atol=1e-6)
  got = grad(*args)
  want = plain_grad(*args)
  for g, e in zip(got, want):
    g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
    np.testing.assert_allclose(g, e, atol=0.02 * np.abs(e).max())


def test_bf16_dense_products_lower_as_plain_dots_for_cuda():
  """The fp32-accumulating custom VJP is CPU-only: lowered for cuda, forward and backward are
  plain bf16 dot_generals, as before (GPUs accumulate bf16 products in fp32 anyway)."""
  traced = _two_dense_grad(model.dense_dot).trace(*_two_dense_args())
  text = traced.lower(lowering_platforms=('cuda',)).as_text()
  dots = [line for line in text.splitlines() if 'stablehlo.dot_general' in line]
  assert len(dots) == 6 and all(line.rstrip().endswith('bf16>') for line in dots), dots
  cpu = traced.lower(lowering_platforms=('cpu',)).as_text()
  assert any(line.rstrip().endswith('f32>') for line in cpu.splitlines()
             if 'stablehlo.dot_general' in line)


def test_save_load_round_trip(tmp_path):
  cfg, params, _ = ref.gpt3()
  model.save(str(tmp_path / 'm'), cfg, params)
  cfg2, params2 = model.load(str(tmp_path / 'm'))
  assert cfg2 == cfg
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_load_in_the_stored_dtypes(tmp_path):
  """dtype=None keeps what each leaf was saved as (mixed here); the default casts to fp32."""
  cfg, params, _ = ref.gpt3()
  params = {**jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), params),
            'final_norm': params['final_norm']}
  model.save(str(tmp_path / 'm'), cfg, params)
  for dtype, want in ((None, params), (jnp.float32, jax.tree.map(
      lambda x: np.asarray(x, np.float32), params))):
    _, got = model.load(str(tmp_path / 'm'), dtype=dtype)
    assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, want)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want)))
  other = dataclasses.replace(cfg, position_embedding_type='rope')  # no pos_embed
  (tmp_path / 'm' / model.CONFIG_FILE).write_text(json.dumps(other.to_dict()))
  for dtype in (None, jnp.float32):  # the default dtype was orbax's error, naming no file
    with pytest.raises(ValueError, match=r"m/params \(its model_config\.json\): parameters do "
                                         r"not match the model config: unexpected \['pos_embed'\]"):
      model.load(str(tmp_path / 'm'), dtype=dtype)
  (tmp_path / 'm' / model.CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), 'num_layers': 3}))
  with pytest.raises(ValueError, match=r"\['layers'\]\['attn'\]\['o'\]\['bias'\]: shape "
                                       r"\(2, 64\) != expected \(3, 64\)"):
    model.load(str(tmp_path / 'm'))


def test_save_over_a_killed_partial_write(tmp_path):
  """A conversion killed mid-write leaves orbax's params.partial_save; the next save starts
  clean (no 'replacement' error, no stale leaves) and the directory reads back."""
  from orbax.checkpoint import v1 as ocp
  cfg, params, _ = ref.gpt3()
  ocp.partial.save(str(tmp_path / 'm' / 'params'), {'embed': np.zeros((3, 3), np.float32)})
  model.save(str(tmp_path / 'm'), cfg, params)
  _, params2 = model.load(str(tmp_path / 'm'))
  np.testing.assert_array_equal(np.asarray(params2['embed']), params['embed'])


def test_load_rejects_a_directory_that_is_not_a_model(tmp_path):
  with pytest.raises(FileNotFoundError, match='model_config.json'):
    model.load(str(tmp_path))
  (tmp_path / 'model_config.json').write_text('{"num_layers": 2')
  with pytest.raises(ValueError, match='invalid JSON'):
    model.load(str(tmp_path))


def test_rows_longer_than_the_learned_position_table_are_refused():
  """jnp.take fills past its table with NaN, and attention spreads it to every position of
  the row: a longer row is refused when traced instead (rope models have no table)."""
  cfg, params, _ = ref.gpt3()  # learned positions, a table of 64
  tokens = np.zeros((1, cfg.max_position_embeddings + 1), np.int32)
  with pytest.raises(ValueError, match=r'rows of 65 tokens: .*max_position_embeddings=64'):
    model.forward(cfg, params, tokens)
  assert np.isfinite(model.forward(cfg, params, tokens[:, :-1])).all()


def test_check_params_names_the_mismatching_path():
  cfg, params, _ = ref.nemotron()
  params = {**params, 'lm_head': params['lm_head'][:, :10]}
  with pytest.raises(ValueError, match=r"\['lm_head'\]: shape"):
    model.check_params(cfg, params)


_GOOD = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
             vocab_size=100)


@pytest.mark.parametrize('override, key', [
    (dict(num_attention_heads=5), 'num_attention_heads'),
    (dict(num_query_groups=3), 'num_query_groups'),
    (dict(activation='swish'), 'activation'),
    (dict(normalization='batchnorm'), 'normalization'),
    (dict(position_embedding_type='alibi'), 'position_embedding_type'),
    (dict(padded_vocab_size=50), 'padded_vocab_size'),
    (dict(dtype='float16'), 'dtype'),
    (dict(remat_policy='sometimes'), 'remat_policy'),
    (dict(attention='flash'), 'attention'),
    (dict(scan_unroll=-1), 'scan_unroll'),
    (dict(num_layers=0), 'num_layers'),
    (dict(position_embedding_type='rope', rotary_percentage=0.0), 'rotary_percentage'),
    (dict(kv_channels=0), 'kv_channels'),  # not taken as 'unset'
    (dict(kv_channels=-8), 'kv_channels'),
    (dict(num_query_groups=0), 'num_query_groups'),
    (dict(padded_vocab_size=0), 'padded_vocab_size'),
    (dict(position_embedding_type='rope', rotary_base=-1.0), 'rotary_base'),
    (dict(bias='false'), 'bias'),  # of the wrong type, however the config is built
    (dict(num_layers=True), 'num_layers'),
    (dict(layernorm_epsilon='1e-5'), 'layernorm_epsilon'),
])
def test_bad_config_values_raise_naming_the_key(override, key):
  with pytest.raises(ValueError, match=rf'model\.{key}='):
    model.ModelConfig(**{**_GOOD, **override})


def test_unknown_config_key_is_rejected():
  with pytest.raises(ValueError, match='unknown keys'):
    model.ModelConfig.from_dict({**_GOOD, 'hiden_size': 3})


@pytest.mark.parametrize('key, value, message', [
    ('gelu_tanh', 'false', 'must be true or false'),  # a non-empty string was true
    ('bias', 0, 'must be true or false'),
    ('num_layers', True, 'must be an integer'),  # was 1 layer, then orbax's shape error
    ('layernorm_epsilon', '1e-5', 'must be a number'),
    ('scan_unroll', 1.5, 'must be an integer'),  # a TypeError traceback at the forward
    ('kv_channels', 16.0, 'must be an integer or null'),
    ('rotary_base', False, 'must be a number'),
])
def test_saved_config_values_of_the_wrong_type_name_the_key(tmp_path, key, value, message):
  """model_config.json values are checked against their fields' types, on one line naming the
  file and key; a saved file must name every architecture setting (SAVED_KEYS)."""
  cfg = model.ModelConfig(**_GOOD)
  (tmp_path / model.CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), key: value}))
  with pytest.raises(ValueError, match=rf'model_config\.json: model\.{key}=.*: {message}$'):
    model.load_config(str(tmp_path))


def test_a_saved_config_names_every_architecture_setting(tmp_path):
  """A model_config.json must name every setting that changes the forward pass (one left out
  took its default silently); the run-time settings may be left out."""
  cfg = dataclasses.replace(model.ModelConfig(**_GOOD), position_embedding_type='rope',
                            rotary_base=5000.0)
  saved = cfg.to_dict()
  for key in ('init_method_std', 'dtype', 'remat_policy', 'attention', 'scan_unroll'):
    del saved[key]  # how it runs: defaults
  (tmp_path / model.CONFIG_FILE).write_text(json.dumps(saved))
  assert model.load_config(str(tmp_path)) == cfg
  del saved['rotary_base']  # took 10000 silently
  (tmp_path / model.CONFIG_FILE).write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=r"model_config\.json: model config: missing keys "
                                       r"\['rotary_base'\]"):
    model.load_config(str(tmp_path))
  saved = {k: v for k, v in cfg.to_dict().items() if k != 'gelu_tanh'}
  (tmp_path / model.CONFIG_FILE).write_text(json.dumps({**saved, 'activation': 'swiglu'}))
  assert model.load_config(str(tmp_path)).activation == 'swiglu'  # no GELU: not needed
  (tmp_path / model.CONFIG_FILE).write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=r"missing keys \['gelu_tanh'\] .*add \"gelu_tanh\": false"):
    model.load_config(str(tmp_path))
  (tmp_path / model.CONFIG_FILE).write_text('[]')
  with pytest.raises(ValueError, match='holds a JSON list, not an object'):
    model.load_config(str(tmp_path))
