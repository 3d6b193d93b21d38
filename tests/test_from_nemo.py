"""The .nemo importer: every layout x architecture against HF, negative controls, bad input."""

import io
import os
import tarfile

import jax
import numpy as np
import pytest

from jkd import model
from tests import hf_reference as ref
from tests import nemo_fixtures as fx
from third_party.convert import from_nemo

LAYOUTS = {
    'L1': lambda p, a, hf: fx.write_legacy(p, a, hf),
    'L2-tp2': lambda p, a, hf: fx.write_legacy(p, a, hf, tp=2),
    'L2-tp2-pp2': lambda p, a, hf: fx.write_legacy(p, a, hf, tp=2, pp=2),
    'Dz-stacked': lambda p, a, hf: fx.write_zarr(p, a, hf),
    'Dz-per-layer': lambda p, a, hf: fx.write_zarr(p, a, hf, per_layer_keys=True),
    'Dt-stacked': lambda p, a, hf: fx.write_torch_dist(p, a, hf),
    'Dt-stacked-tp2': lambda p, a, hf: fx.write_torch_dist(p, a, hf, tp=2),
    'Dt-per-layer': lambda p, a, hf: fx.write_torch_dist(p, a, hf, per_layer_keys=True),
}
TOKENS = np.random.default_rng(0).integers(0, ref.V, (2, ref.T), dtype=np.int32)


def _hf(arch):
  kwargs = {'padded_vocab': ref.V} if arch == 'llama' else {}
  return ref.ARCHITECTURES[arch](**kwargs)[2]


def _diff(path, hf):
  cfg, params = from_nemo.load_nemo(str(path))
  ours = np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, TOKENS))
  return float(np.abs(ours - ref.hf_logits(hf, TOKENS)).max())


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('arch', sorted(ref.ARCHITECTURES))
def test_every_layout_matches_hf(tmp_path, arch, layout):
  hf = _hf(arch)
  path = tmp_path / ('ckpt' if layout.startswith('D') else 'model.nemo')
  LAYOUTS[layout](path, arch, hf)
  diff = _diff(path, hf)
  print(f'{arch} {layout}: max |jkd - HF| = {diff:.2e}')
  assert diff <= 1e-5


def test_pipeline_stages_of_several_layers_are_renumbered(tmp_path, monkeypatch):
  """With the 2-layer fixtures every stage holds one layer, so a wrong renumbering (pp instead
  of pp * L/PP) passed every layout test: 4 layers over 2 stages tell them apart."""
  monkeypatch.setattr(ref, 'L', 4)
  hf = _hf('llama')
  fx.write_legacy(tmp_path / 'model.nemo', 'llama', hf, tp=2, pp=2)
  assert _diff(tmp_path / 'model.nemo', hf) <= 1e-5


def test_naive_glu_concat_would_be_caught(tmp_path):
  """Negative control: TP2 shards of fc1 concatenated naively ([g0;u0;g1;u1]) are far off."""
  hf = _hf('gpt2b')
  fx.write_legacy(tmp_path / 'naive.nemo', 'gpt2b', hf, tp=2, naive_glu=True)
  assert _diff(tmp_path / 'naive.nemo', hf) > 1e-2


def test_misread_qkv_would_be_caught(tmp_path, monkeypatch):
  """Negative control: reading fused QKV as [Q; K; V] instead of group-major is far off."""
  hf = _hf('llama')
  fx.write_legacy(tmp_path / 'm.nemo', 'llama', hf)

  def blocked(c, w, which):
    sizes = [c.num_attention_heads * c.head_dim, c.num_groups * c.head_dim]
    q, k, v = np.split(w, [sizes[0], sizes[0] + sizes[1]])
    part = {'q': q, 'k': k, 'v': v}[which]
    heads = c.num_attention_heads if which == 'q' else c.num_groups
    return part.reshape(heads, c.head_dim, -1).transpose(2, 0, 1)

  monkeypatch.setattr(from_nemo, '_qkv', blocked)
  assert _diff(tmp_path / 'm.nemo', hf) > 1e-2


def test_swapped_gate_and_up_would_be_caught(tmp_path, monkeypatch):
  """Negative control: GLU fc1 read as [up; gate] instead of [gate; up] is far off."""
  hf = _hf('llama')
  fx.write_legacy(tmp_path / 'm.nemo', 'llama', hf)
  right = from_nemo._fc1
  monkeypatch.setattr(from_nemo, '_fc1', lambda c, w: right(c, w)[..., ::-1, :])
  assert _diff(tmp_path / 'm.nemo', hf) > 1e-2


def test_missing_plus_one_would_be_caught(tmp_path):
  """Negative control: a zero-centred norm (layernorm1p) read as a plain layernorm."""
  hf = _hf('gpt2b')
  assert _diff(_edit_config(tmp_path, 'gpt2b', normalization='layernorm'), hf) > 1e-2


def test_interleaved_rope_would_be_caught(tmp_path, monkeypatch):
  """Negative control: GPT-J style (interleaved pairs) RoPE instead of rotate-half."""
  hf = _hf('nemotron')
  fx.write_legacy(tmp_path / 'm.nemo', 'nemotron', hf)

  def interleaved(x, positions, rotary_dim, base):
    inv_freq = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    ang = positions.astype(np.float32)[..., None, None] * inv_freq  # [B, T, 1, R/2]
    even, odd = x[..., :rotary_dim:2], x[..., 1:rotary_dim:2]
    rot = jax.numpy.stack([even * jax.numpy.cos(ang) - odd * jax.numpy.sin(ang),
                           even * jax.numpy.sin(ang) + odd * jax.numpy.cos(ang)], -1)
    return jax.numpy.concatenate([rot.reshape(*x.shape[:-1], rotary_dim),
                                  x[..., rotary_dim:]], -1)

  monkeypatch.setattr(model, 'apply_rope', interleaved)
  assert _diff(tmp_path / 'm.nemo', hf) > 1e-2


@pytest.mark.parametrize('tp', [1, 2])
def test_non_fast_glu_two_tensors_match_hf(tmp_path, tp):
  """Legacy `swiglu`: gate in dense_h_to_4h, up in dense_h_to_4h_2 (TP shards of each)."""
  hf = _hf('gpt2b')
  fx.write_legacy(tmp_path / 'm.nemo', 'gpt2b', hf, tp=tp, split_glu=True)
  assert _diff(tmp_path / 'm.nemo', hf) <= 1e-5


def test_missing_glu_half_is_a_clear_error(tmp_path):
  """Without dense_h_to_4h_2 half of every fc1 kernel would be uninitialised memory."""
  import torch
  fx.write_legacy(tmp_path / 'm.nemo', 'gpt2b', _hf('gpt2b'), split_glu=True)
  with tarfile.open(tmp_path / 'm.nemo') as tar:
    files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
  state = torch.load(io.BytesIO(files['./model_weights.ckpt']))
  state = {k: v for k, v in state.items() if 'dense_h_to_4h_2' not in k}
  buf = io.BytesIO()
  torch.save(state, buf)
  files['./model_weights.ckpt'] = buf.getvalue()
  _tar_with(tmp_path / 'cut.nemo', [(_info(n, d), d) for n, d in files.items()])
  with pytest.raises(ValueError, match=r'layers\.mlp\.fc1\.kernel is partly missing'):
    from_nemo.load_nemo(str(tmp_path / 'cut.nemo'))


class _Evil:
  """Unpickling this runs `touch marker`: a reader that executes code would create the file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_missing_torch_dist_data_file_is_a_clear_error(tmp_path):
  fx.write_torch_dist(tmp_path / 'd', 'llama', _hf('llama'))
  for f in os.listdir(tmp_path / 'd' / 'model_weights'):
    if f.endswith('.distcp'):
      os.remove(tmp_path / 'd' / 'model_weights' / f)
  with pytest.raises(ValueError, match=r'__0_\d\.distcp: .* data file is missing'):
    from_nemo.load_nemo(str(tmp_path / 'd'))


def test_torch_dist_metadata_of_torch_2_3_is_read(tmp_path):
  """torch <= 2.3 pickled its checkpoint metadata with torch.distributed._shard's
  TensorProperties (the class torch still has): the same allow-listed records, read alike."""
  import pickle

  from torch.distributed._shard.sharded_tensor import metadata as shard_metadata
  hf = _hf('llama')
  fx.write_torch_dist(tmp_path / 'd', 'llama', hf)
  path = tmp_path / 'd' / 'model_weights' / '.metadata'
  with open(path, 'rb') as f:
    meta = pickle.load(f)
  for entry in meta.state_dict_metadata.values():
    if hasattr(entry, 'properties'):
      entry.properties = shard_metadata.TensorProperties(dtype=entry.properties.dtype)
  blob = pickle.dumps(meta)
  assert shard_metadata.__name__.encode() in blob
  path.write_bytes(blob)
  assert _diff(tmp_path / 'd', hf) <= 1e-5


def test_gzip_tar_and_extracted_directory_are_read(tmp_path):
  hf = _hf('nemotron')
  fx.write_legacy(tmp_path / 'm.nemo', 'nemotron', hf)
  with tarfile.open(tmp_path / 'm.nemo') as src, tarfile.open(tmp_path / 'gz.nemo', 'w:gz') as dst:
    for m in src.getmembers():
      dst.addfile(m, src.extractfile(m))
  assert _diff(tmp_path / 'gz.nemo', hf) <= 1e-5
  os.makedirs(tmp_path / 'dir')
  with tarfile.open(tmp_path / 'm.nemo') as src:
    src.extractall(tmp_path / 'dir', filter='data')
  assert _diff(tmp_path / 'dir', hf) <= 1e-5


def _tar_with(path, members):
  with tarfile.open(path, 'w:') as tar:
    for info, data in members:
      tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _info(name, data=b'', **kw):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  for k, v in kw.items():
    setattr(info, k, v)
  return info


@pytest.mark.parametrize('member', ['../evil.txt', '/etc/evil', './a/../../evil'])
def test_path_traversal_tar_is_refused(tmp_path, member):
  _tar_with(tmp_path / 'bad.nemo', [(_info(member, b'x'), b'x')])
  with pytest.raises(ValueError, match='unsafe member path'):
    from_nemo.load_nemo(str(tmp_path / 'bad.nemo'))
  assert not (tmp_path.parent / 'evil.txt').exists()


def test_link_leaving_the_archive_is_refused(tmp_path):
  link = _info('./model_config.yaml', type=tarfile.SYMTYPE, linkname='../../etc/passwd')
  _tar_with(tmp_path / 'bad.nemo', [(link, None)])
  with pytest.raises(ValueError, match='links outside the archive'):
    from_nemo.load_nemo(str(tmp_path / 'bad.nemo'))


def _evil_legacy(tmp_path, marker):
  import torch
  buf = io.BytesIO()
  torch.save({'model.language_model.embedding.word_embeddings.weight': _Evil(marker)}, buf)
  cfg = b'num_layers: 1\nhidden_size: 8\nffn_hidden_size: 8\nnum_attention_heads: 2\n'
  _tar_with(tmp_path / 'evil.nemo', [(_info('./model_config.yaml', cfg), cfg),
                                     (_info('./model_weights.ckpt', buf.getvalue()),
                                      buf.getvalue())])
  return tmp_path / 'evil.nemo', r'evil\.nemo: model_weights\.ckpt: refusing to unpickle posix\.system'


def _evil_torch_dist(tmp_path, marker):
  import pickle
  fx.write_torch_dist(tmp_path / 'd', 'llama', _hf('llama'))
  (tmp_path / 'd' / 'model_weights' / '.metadata').write_bytes(pickle.dumps(_Evil(marker)))
  return tmp_path / 'd', r'model_weights/\.metadata: refusing to unpickle posix\.system'


@pytest.mark.parametrize('write', [_evil_legacy, _evil_torch_dist])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, write):
  marker = tmp_path / 'pwned'
  path, message = write(tmp_path, marker)
  with pytest.raises(ValueError, match=message):
    from_nemo.load_nemo(str(path))
  assert not marker.exists()


def test_tensor_views_outside_their_storage_are_refused(tmp_path):
  """Shape, strides and offset come from the pickle and as_strided checks none of them: a
  negative stride read memory before the buffer (a crafted .nemo segfaulted the converter)
  and a zero stride made 400 bytes a 4 TiB tensor (a MemoryError traceback). A transposed
  view, which real files hold, still loads."""
  import dataclasses
  torch = pytest.importorskip('torch')
  from third_party.convert import torch_pickle
  x = torch.arange(200, dtype=torch.float32).reshape(2, 100)
  torch.save({'w': x, 't': x.t()}, tmp_path / 'w.pt')
  with open(tmp_path / 'w.pt', 'rb') as f:
    tensors = torch_pickle.load(f, 'w.pt')
    np.testing.assert_array_equal(tensors['t'].load(), x.t().numpy())
    w = tensors['w']
    for bad, message in ((dict(stride=(-50, 1)), 'strides'), (dict(offset=-1), 'offset'),
                         (dict(shape=(2**20, 2**20), stride=(0, 0)), 'repeats storage'),
                         (dict(shape=(4, 2), stride=(2, 4)), 'repeats storage'),  # overlaps
                         (dict(stride=(100,)), 'strides')):
      with pytest.raises(ValueError, match=rf'w\.pt: .*data/0: a tensor view .*{message}'):
        dataclasses.replace(w, **bad).load()
    np.testing.assert_array_equal(w.load(), x.numpy())


def test_truncated_tar_is_a_clear_error(tmp_path):
  fx.write_legacy(tmp_path / 'm.nemo', 'gpt3', _hf('gpt3'))
  data = (tmp_path / 'm.nemo').read_bytes()
  (tmp_path / 'cut.nemo').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'cut\.nemo'):
    from_nemo.load_nemo(str(tmp_path / 'cut.nemo'))


def test_damaged_weight_member_is_a_clear_error(tmp_path):
  """A legacy model_weights.ckpt whose tensor member's zip header is damaged: one ValueError
  naming the file and member (zipfile.BadZipFile before)."""
  import tarfile
  fx.write_legacy(tmp_path / 'm.nemo', 'gpt2b', _hf('gpt2b'))
  with tarfile.open(tmp_path / 'm.nemo') as tar:
    tar.extractall(tmp_path / 'd', filter='data')
  ckpt = tmp_path / 'd' / 'model_weights.ckpt'
  data = bytearray(ckpt.read_bytes())
  i = data.rfind(b'PK\x03\x04', 0, data.find(b'data/3') + 1)  # the header of tensor data/3
  data[i:i + 4] = b'XXXX'
  ckpt.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r'model_weights\.ckpt: .*data/3 is unreadable .*damaged'):
    from_nemo.load_nemo(str(tmp_path / 'd'))


def test_missing_config_is_a_clear_error(tmp_path):
  _tar_with(tmp_path / 'm.nemo', [(_info('./model_weights.ckpt', b'x'), b'x')])
  with pytest.raises(ValueError, match=r'm\.nemo: model_config\.yaml is missing'):
    from_nemo.load_nemo(str(tmp_path / 'm.nemo'))


def _edit_config(tmp_path, arch, **changes):
  import yaml
  fx.write_zarr(tmp_path / 'd', arch, _hf(arch))
  path = tmp_path / 'd' / 'model_config.yaml'
  path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}))
  return str(tmp_path / 'd')


def test_unknown_activation_names_the_key(tmp_path):
  with pytest.raises(ValueError, match=r"unsupported setting activation='swish'"):
    from_nemo.load_nemo(_edit_config(tmp_path, 'llama', activation='swish'))


@pytest.mark.parametrize('key, value', [('rotary_interleaved', True), ('window_size', [4096, 0])])
def test_unsupported_setting_names_the_key(tmp_path, key, value):
  with pytest.raises(ValueError, match=rf'unsupported setting {key}={value!r}'.replace('[', r'\[')):
    from_nemo.load_nemo(_edit_config(tmp_path, 'llama', **{key: value}))


@pytest.mark.parametrize('key, value, message', [
    ('layernorm_epsilon', None, 'layernorm_epsilon=None is not a number'),
    ('rotary_percentage', 'half', "rotary_percentage='half' is not a number"),
    ('rotary_base', [10000], r'rotary_base=\[10000\] is not a number'),
    ('tokenizer', 'gpt2', "tokenizer='gpt2' is not a section"),
])
def test_a_malformed_config_value_names_the_key(tmp_path, key, value, message):
  """A null, a word or a list where NeMo has a number or a section: a ValueError naming the
  key (what jkd.main words as one line), not a TypeError."""
  with pytest.raises(ValueError, match=r'd: model_config\.yaml: ' + message):
    from_nemo.load_nemo(_edit_config(tmp_path, 'llama', **{key: value}))


def test_malformed_weights_metadata_and_pickles_are_named(tmp_path):
  """A sharded_backend that is a list, and a legacy model_weights.ckpt that pickles a list or a
  bare tensor instead of a state dict."""
  import io
  import shutil

  import torch
  fx.write_zarr(tmp_path / 'd', 'llama', _hf('llama'))
  (tmp_path / 'd' / 'model_weights' / 'metadata.json').write_text('{"sharded_backend": ["zarr"]}')
  with pytest.raises(ValueError, match=r"metadata\.json: sharded_backend=\['zarr'\] is not "):
    from_nemo.load_nemo(str(tmp_path / 'd'))
  shutil.rmtree(tmp_path / 'd' / 'model_weights')
  for obj, kind in (([torch.zeros(2)], 'list'), (torch.zeros(2), 'tensor')):
    buf = io.BytesIO()
    torch.save(obj, buf)
    (tmp_path / 'd' / 'model_weights.ckpt').write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=rf'model_weights\.ckpt: not a state dict .*: a {kind}'):
      from_nemo.load_nemo(str(tmp_path / 'd'))


@pytest.mark.parametrize('ffn', [48, 1 << 31])
def test_mismatched_tensor_shape_names_the_tensor(tmp_path, ffn):
  """Too small or far too big (a 1 TiB fc1 kernel): refused before any leaf is allocated."""
  with pytest.raises(ValueError, match=r'fc1\.weight \(layer 0\): shape \(96, 64\) does not fit'):
    from_nemo.load_nemo(_edit_config(tmp_path, 'nemotron', ffn_hidden_size=ffn))


def test_missing_tensor_is_a_clear_error(tmp_path):
  import shutil
  fx.write_zarr(tmp_path / 'd', 'gpt3', _hf('gpt3'))
  shutil.rmtree(tmp_path / 'd' / 'model_weights' / 'model.decoder.layers.mlp.linear_fc2.weight')
  with pytest.raises(ValueError, match=r"d: tensors are missing for parameters "
                                       r"\['layers\.mlp\.fc2\.kernel'\]"):
    from_nemo.load_nemo(str(tmp_path / 'd'))


def test_convert_cli_imports_a_nemo(tmp_path):
  import subprocess
  import sys
  hf = _hf('gpt2b')
  fx.write_legacy(tmp_path / 'student.nemo', 'gpt2b', hf, tp=2)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, '-m', 'jkd.main', '--config', 'configs/convert.py',
       f'--config.convert.source={tmp_path}/student.nemo', f'--config.convert.output={tmp_path}/m'],
      cwd=repo, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg, params = model.load(str(tmp_path / 'm'))
  ours = np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, TOKENS))
  assert np.abs(ours - ref.hf_logits(hf, TOKENS)).max() <= 1e-5


def test_zero_centered_rmsnorm_is_refused(tmp_path):
  """Megatron-Core applies 1 + gamma to a zero-centred RMSNorm; jkd has no such norm."""
  with pytest.raises(ValueError, match=r'layernorm_zero_centered_gamma=True with '
                                       r"normalization='rmsnorm'"):
    from_nemo.load_nemo(_edit_config(tmp_path, 'llama', layernorm_zero_centered_gamma=True))


def test_more_stored_layers_than_the_config_names_the_tensor(tmp_path):
  with pytest.raises(ValueError, match=r'\(layer 1\): layer 1 is beyond num_layers=1'):
    from_nemo.load_nemo(_edit_config(tmp_path, 'nemotron', num_layers=1))


def test_a_tensor_its_config_cannot_reshape_names_the_tensor(tmp_path):
  """GQA weights under an MHA config fail in the QKV split; the message names the tensor."""
  with pytest.raises(ValueError, match=r'qkv\.weight \(layer 0\): shape \(\d+, \d+\) does not '
                                       r'fit the model config \(cannot reshape'):
    from_nemo.load_nemo(_edit_config(tmp_path, 'llama', num_query_groups=None))


def test_a_missing_zarr_chunk_is_an_error_not_zeros(tmp_path):
  path = _edit_config(tmp_path, 'nemotron')
  qkv = os.path.join(path, 'model_weights', 'model.decoder.layers.self_attention.linear_qkv.weight')
  for name in os.listdir(qkv):
    if not name.startswith('.'):
      os.remove(os.path.join(qkv, name))
  with pytest.raises(ValueError, match=r'qkv\.weight \(layer 0\): NOT_FOUND: .*is missing'):
    from_nemo.load_nemo(path)


@pytest.mark.parametrize('tp, pp, gone', [(2, 1, 'mp_rank_01'), (1, 2, 'tp_rank_00_pp_rank_001')])
def test_a_missing_last_rank_folder_is_named(tmp_path, tp, pp, gone):
  """Without its last rank folder a TP or PP checkpoint looks like a smaller one: the config's
  parallel sizes tell."""
  fx.write_legacy(tmp_path / 'm.nemo', 'gpt3', _hf('gpt3'), tp=tp, pp=pp)
  with tarfile.open(tmp_path / 'm.nemo') as t:
    files = {m.name[2:]: t.extractfile(m).read() for m in t.getmembers()
             if m.isfile() and not m.name[2:].startswith(gone)}
  fx._pack(tmp_path / 'm.nemo', files)
  key = 'tensor' if tp == 2 else 'pipeline'
  with pytest.raises(ValueError, match=rf'{key}_model_parallel_size=2 but the rank folders found '
                                       'make 1'):
    from_nemo.load_nemo(str(tmp_path / 'm.nemo'))


@pytest.mark.parametrize('changes, tanh', [({}, False), ({'bias_activation_fusion': True}, True),
                                           ({'openai_gelu': True}, True)])
def test_the_gelu_form_is_the_one_nemo_computes(tmp_path, changes, tanh):
  """NeMo's fused bias-GELU (bias_activation_fusion, its default) and openai_gelu are the tanh
  GELU; with both off it is exact. The fixture's weights under each HF GELU: only the right one
  matches."""
  cfg, params = from_nemo.load_nemo(_edit_config(tmp_path, 'gpt3', **changes))
  assert cfg.gelu_tanh == tanh
  ours = np.asarray(jax.jit(lambda p, t: model.forward(cfg, p, t))(params, TOKENS))
  diff = {form: float(np.abs(ours - ref.hf_logits(ref.gpt3(gelu_tanh=form)[2], TOKENS)).max())
          for form in (False, True)}
  assert diff[tanh] <= 2e-6 and diff[not tanh] > 1e-4, diff


def test_gelu_settings_as_nemo_reads_them():
  raw = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
             activation='gelu', bias=True)
  read = lambda **kw: from_nemo.model_config({**raw, **kw}, vocab_size=None,  # noqa: E731
                                             padded_vocab=128, where='m')
  assert read().gelu_tanh  # the key's default is True
  assert read(activation='geglu', bias=False).gelu_tanh  # gated: no bias needed
  assert not read(activation='fast-swiglu', bias=False).gelu_tanh
  with pytest.raises(ValueError, match='bias_activation_fusion=True with activation=gelu and '
                                       'bias=False'):
    read(bias=False)
  assert read(bias=False, openai_gelu=True, bias_activation_fusion=False).gelu_tanh
  with pytest.raises(ValueError, match='bias_activation_fusion=True'):  # openai_gelu or not
    read(bias=False, openai_gelu=True)
  assert read(activation='fast-geglu', openai_gelu=True).gelu_tanh
  assert not read(activation='geglu', bias_activation_fusion=False).gelu_tanh
  with pytest.raises(ValueError, match="openai_gelu=True with activation='squared-relu'"):
    read(activation='squared-relu', openai_gelu=True)


def test_the_learned_position_table_sets_its_own_size(tmp_path):
  """Megatron-Core sizes the table by encoder_seq_length, legacy NeMo by
  max_position_embeddings: a config where they differ reads the size off the stored table."""
  path = _edit_config(tmp_path, 'gpt3', max_position_embeddings=4096, encoder_seq_length=64)
  cfg, _ = from_nemo.load_nemo(path)
  assert cfg.max_position_embeddings == 64


def test_replicated_tensors_of_tensor_parallel_ranks(tmp_path, caplog):
  """Norms are replicated over TP ranks and rank 0's copy is taken: copies that drifted apart by
  rounding (Megatron with sequence parallelism) were refused outright, and are now taken with a
  warning naming the tensor; copies that differ past REPLICA_TOLERANCE (ranks of different
  checkpoints) are refused; a tensor only rank 1 holds was silently dropped."""
  import torch
  fx.write_legacy(tmp_path / 'm.nemo', 'nemotron', _hf('nemotron'), tp=2)
  want = from_nemo.load_nemo(str(tmp_path / 'm.nemo'))[1]
  with tarfile.open(tmp_path / 'm.nemo') as t:
    files = {m.name[2:]: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
  state = torch.load(io.BytesIO(files['mp_rank_01/model_weights.ckpt']), weights_only=True)
  key = next(k for k in state if k.endswith('layers.0.input_layernorm.weight'))

  def load_with(rank_1):
    buf = io.BytesIO()
    torch.save(rank_1, buf)
    fx._pack(tmp_path / 'm.nemo', {**files, 'mp_rank_01/model_weights.ckpt': buf.getvalue()})
    return from_nemo.load_nemo(str(tmp_path / 'm.nemo'))[1]

  got = load_with({**state, key: state[key] + 1e-3})
  jax.tree.map(np.testing.assert_array_equal, got, want)  # rank 0's copy
  assert any('input_norm.weight (layer 0)' in r.getMessage() and 'differ by up to 0.001' in
             r.getMessage() and "rank 0's is taken" in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match=r'input_norm\.weight \(layer 0\): the tensor-parallel '
                                       r'ranks hold different values .*by up to 0\.5'):
    load_with({**state, key: state[key] + 0.5})
  # the tolerance is per value: small biases that differ 9-fold, or a NaN, are no drift
  for a, b in (([1e-3], [9e-3]), ([1.0, 1.0], [1.0, np.nan])):
    with pytest.raises(ValueError, match='ranks hold different values'):
      from_nemo.merge_tp('fc2.bias', [np.array(a, np.float32), np.array(b, np.float32)], False)
  extra = key.replace('input_layernorm.weight', 'mlp.dense_4h_to_h.bias')  # nemotron: no bias
  assert extra not in state
  with pytest.raises(ValueError, match=r'mp_rank_01.*: tensor .*mlp\.dense_4h_to_h\.bias '
                                       r'is not in mp_rank_00'):
    load_with({**state, extra: state[key]})
