"""Peak memory of .nemo conversion vs the checkpoint's stored size (target: below 1.3x).

    .venv/bin/python scripts/bench_convert.py [--layers 8] [--workdir /tmp/jkd-bench-convert]

Writes a synthetic GPT-2B-shaped bf16 checkpoint of >= 1 GB (8 layers of D=2048, F=5440
SwiGLU, 32000-row untied vocabulary: 1.07 GB) in three layouts: legacy single file (L1, as
GPT-2B-001 ships), Megatron-Core torch_dist (Dt, as NeMo writes today) and zarr (Dz, as the
Nemotron-3 8B teacher ships, bf16 chunks of one layer), converts each with
`python -m jkd.main --config configs/convert.py` in a child process and prints the child's
peak RSS (ru_maxrss from wait4) next to the stored size. Also prints the RSS of a child that
only imports the converter (the interpreter + jax + orbax baseline), and checks that one
converted tensor equals its source. Needs torch (to write the synthetic checkpoints).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, F, N, P = 2048, 5440, 16, 32000


def _config(layers: int) -> dict:
  return dict(num_layers=layers, hidden_size=D, ffn_hidden_size=F, num_attention_heads=N,
              normalization='layernorm1p', activation='fast-swiglu', bias=False,
              position_embedding_type='rope', rotary_percentage=0.5,
              share_embeddings_and_output_weights=False, max_position_embeddings=4096,
              precision='bf16')


def _tensors(layers: int, rng):
  """(legacy key, mcore key, layer, torch bf16 tensor) for a GPT-2B-shaped model."""
  import torch

  def rand(*shape):
    return torch.from_numpy(rng.standard_normal(shape, np.float32) * 0.02).to(torch.bfloat16)
  per_layer = {
      'input_layernorm.weight': ('self_attention.linear_qkv.layer_norm_weight', (D,)),
      'input_layernorm.bias': ('self_attention.linear_qkv.layer_norm_bias', (D,)),
      'self_attention.query_key_value.weight': ('self_attention.linear_qkv.weight', (3 * D, D)),
      'self_attention.dense.weight': ('self_attention.linear_proj.weight', (D, D)),
      'post_attention_layernorm.weight': ('mlp.linear_fc1.layer_norm_weight', (D,)),
      'post_attention_layernorm.bias': ('mlp.linear_fc1.layer_norm_bias', (D,)),
      'mlp.dense_h_to_4h.weight': ('mlp.linear_fc1.weight', (2 * F, D)),
      'mlp.dense_4h_to_h.weight': ('mlp.linear_fc2.weight', (D, F)),
  }
  yield ('model.language_model.embedding.word_embeddings.weight',
         'model.embedding.word_embeddings.weight', None, rand(P, D))
  for i in range(layers):
    for legacy, (mcore, shape) in per_layer.items():
      yield (f'model.language_model.encoder.layers.{i}.{legacy}',
             f'model.decoder.layers.{mcore}', i, rand(*shape))
  yield ('model.language_model.encoder.final_layernorm.weight',
         'model.decoder.final_layernorm.weight', None, rand(D))
  yield ('model.language_model.encoder.final_layernorm.bias',
         'model.decoder.final_layernorm.bias', None, rand(D))
  yield ('model.language_model.output_layer.weight', 'model.output_layer.weight', None,
         rand(P, D))


def write_checkpoints(workdir: str, layers: int) -> None:
  import torch
  import yaml
  from torch.distributed import checkpoint as dcp
  os.makedirs(workdir, exist_ok=True)
  legacy, stacked = {}, {}
  for key, mcore, layer, t in _tensors(layers, np.random.default_rng(0)):
    legacy[key] = t
    if layer is None:
      stacked[mcore] = t
    else:
      stacked.setdefault(mcore, [None] * layers)[layer] = t
  raw = yaml.safe_dump(_config(layers))
  l1 = os.path.join(workdir, 'l1')
  os.makedirs(l1)
  with open(os.path.join(l1, 'model_config.yaml'), 'w') as f:
    f.write(yaml.safe_dump({**_config(layers), 'mcore_gpt': False}))
  torch.save(legacy, os.path.join(l1, 'model_weights.ckpt'))
  del legacy
  dt = os.path.join(workdir, 'dt')
  os.makedirs(dt)
  with open(os.path.join(dt, 'model_config.yaml'), 'w') as f:
    f.write(yaml.safe_dump({**_config(layers), 'mcore_gpt': True,
                            'dist_ckpt_format': 'torch_dist'}))
  stacked = {k: torch.stack(v) if isinstance(v, list) else v for k, v in stacked.items()}
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)
    dcp.save(stacked, storage_writer=dcp.FileSystemWriter(os.path.join(dt, 'model_weights')),
             no_dist=True)
  with open(os.path.join(dt, 'model_weights', 'metadata.json'), 'w') as f:
    f.write('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
  dz = os.path.join(workdir, 'dz')
  os.makedirs(os.path.join(dz, 'model_weights'))
  with open(os.path.join(dz, 'model_config.yaml'), 'w') as f:
    f.write(yaml.safe_dump({**_config(layers), 'mcore_gpt': True, 'dist_ckpt_format': 'zarr'}))
  with open(os.path.join(dz, 'model_weights', 'metadata.json'), 'w') as f:
    f.write('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
  import tensorstore as ts
  for key, t in stacked.items():  # one chunk per layer, as MCore's zarr strategy wrote them
    a = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    chunks = [1] + list(a.shape[1:]) if key.startswith('model.decoder.layers.') else list(a.shape)
    ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file',
                                           'path': os.path.join(dz, 'model_weights', key)},
             'metadata': {'dtype': 'bfloat16', 'shape': list(a.shape), 'chunks': chunks,
                          'compressor': None}, 'create': True}).result().write(a).result()
  del raw, stacked
  l1_tar = os.path.join(workdir, 'l1.nemo')
  with tarfile.open(l1_tar, 'w:') as tar:
    tar.add(l1, arcname='.')
  shutil.rmtree(l1)



def _peak_rss(cmd: list[str]) -> tuple[int, float, int]:
  """(peak RSS bytes, seconds, return code) of a child process."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    sys.stderr.write(proc.stderr.read().decode()[-3000:])
  return usage.ru_maxrss * 1024, time.perf_counter() - t0, proc.returncode


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _spot_check(output: str, layers: int) -> float:
  """max |converted - source| of the last layer's fc2 kernel (the source is regenerated)."""
  import jax
  from jkd import model
  _, params = model.load(output)
  want = [t for _, mc, layer, t in _tensors(layers, np.random.default_rng(0))
          if mc.endswith('linear_fc2.weight') and layer == layers - 1][0]
  got = np.asarray(jax.device_get(params['layers']['mlp']['fc2']['kernel'][layers - 1]))
  return float(np.abs(got - want.float().numpy().T).max())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--workdir', default='/tmp/jkd-bench-convert')
  parser.add_argument('--write-only', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.write_only:
    shutil.rmtree(args.workdir, ignore_errors=True)
  if args.write_only:
    write_checkpoints(args.workdir, args.layers)
    return
  # Children inherit the parent's peak RSS at fork, so this process stays small: the
  # checkpoints are written by a child, and every measured child starts from here.
  t0 = time.perf_counter()
  subprocess.run([sys.executable, __file__, '--write-only', f'--layers={args.layers}',
                  f'--workdir={args.workdir}'], check=True)
  sources = {'L1 (legacy .nemo tar)': os.path.join(args.workdir, 'l1.nemo'),
             'Dt (torch_dist directory)': os.path.join(args.workdir, 'dt'),
             'Dz (zarr directory)': os.path.join(args.workdir, 'dz')}
  print(f'wrote synthetic checkpoints in {time.perf_counter() - t0:.0f}s')
  env_py = [sys.executable]
  base, _, _ = _peak_rss(env_py + ['-c', 'import jax, tensorstore; from orbax.checkpoint import v1; '
                                   'import jkd.convert, third_party.convert.from_nemo; '
                                   'jax.devices()'])
  print(f'baseline (interpreter + jax + orbax + converter imports): {base / 2**20:8.0f} MiB')
  print(f'{"layout":28s} {"stored":>9s} {"peak RSS":>9s} {"ratio":>6s} {"(peak-base)":>11s} '
        f'{"time":>6s}')
  outputs = []
  for name, src in sources.items():
    out = os.path.join(args.workdir, 'out-' + name.split()[0])
    stored = _size(src)
    peak, secs, rc = _peak_rss(env_py + ['-m', 'jkd.main', '--config', 'configs/convert.py',
                                         f'--config.convert.source={src}',
                                         f'--config.convert.output={out}'])
    if rc:
      print(f'{name:28s} conversion failed (exit {rc})')
      continue
    print(f'{name:28s} {stored / 2**20:7.0f}Mi {peak / 2**20:7.0f}Mi {peak / stored:6.2f} '
          f'{(peak - base) / stored:10.2f}x {secs:5.0f}s', flush=True)
    outputs.append(out)
  for out in outputs:  # after all measurements: loading here would raise later children's peak
    print(f'check {os.path.basename(out)}: last layer fc2 kernel max |converted - source| = '
          f'{_spot_check(out, args.layers):.1e}')
  shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == '__main__':
  sys.path.insert(0, REPO)
  main()
