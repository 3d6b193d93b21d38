"""mode=export: a jkd model directory -> `.nemo` (Megatron-Core, torch_dist) and/or Hugging Face.

    python -m jkd.main --config configs/export.py --config.export.source=DIR \
        --config.export.nemo=student.nemo --config.export.hf=student_hf

Each exporter lives in third_party/convert/ (to_nemo.py, to_hf.py); the tokenizer saved in the
model directory travels with the weights (a `nemo:` artifact, or files beside the safetensors).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from jkd import files, model, tokenizer

# Texts on which transformers' reading of an exported tokenizer must give the model's own ids.
_PROBES = ('Hello world', 'two  spaces', ' leading space', 'line\nbreak\n', 'ünïcödé ½ 中文',
           'x = f(1, 2)  # note')


def hf_marker(hf: str) -> str:
  """The file whose presence makes directory `hf` a Hugging Face model: its config.json,
  written last by the exporter (a killed export has none, and is written over)."""
  from third_party.convert import to_hf
  return os.path.join(hf, to_hf.CONFIG_FILE)


def check_targets(cfg: model.ModelConfig, *, nemo: str = '', hf: str = '',
                  where: str = '', own: tuple[str, ...] = ()) -> None:
  """What would fail only after the weights are loaded (or a training run is over), or
  destroy a model: a .nemo path already taken, an HF path that cannot be a directory or holds a
  model (the export replaces its config, weights and tokenizer files), a model with no Hugging
  Face class. `own`: the paths the caller may write over (its own earlier export). `where`
  names the config."""
  if nemo and nemo not in own and os.path.exists(nemo):
    raise FileExistsError(f'{nemo}: already exists; remove it or choose another path')
  if hf:
    blocker = files.existing_ancestor(hf)
    if not os.path.isdir(blocker):
      raise FileExistsError(f'{blocker}: exists and is not a directory (the Hugging Face export '
                            f'{hf}{" of " + where if where else ""} is written as one); remove '
                            'it or choose another path')
    if hf not in own and os.path.exists(hf_marker(hf)):
      raise FileExistsError(f'{hf}: holds a Hugging Face model ({hf_marker(hf)}), which the '
                            'export would replace; remove it or choose another path')
    from third_party.convert import to_hf
    try:
      to_hf.architecture(cfg)
    except ValueError as e:
      raise ValueError(f'{hf}: {where + ": " if where else ""}{e}') from None


def export(source: str, *, nemo: str = '', hf: str = '', dtype: str = 'bfloat16') -> list[str]:
  """Writes the requested exports of model directory `source`; returns their paths."""
  if not nemo and not hf:
    raise ValueError('export.nemo and export.hf are both empty: set at least one')
  check_targets(model.load_config(source), nemo=nemo, hf=hf,
                where=os.path.join(source, model.CONFIG_FILE))
  cfg, params = model.load(source, dtype=None)  # as stored: the writers cast tensor by tensor
  return export_params(cfg, params, tokenizer.load_if_saved(source), nemo=nemo, hf=hf, dtype=dtype,
                       source=source)


def export_params(cfg: model.ModelConfig, params: model.Params, tok, *, nemo: str = '',
                  hf: str = '', dtype: str = 'bfloat16', source: str = 'the model') -> list[str]:
  """Writes the requested exports of a model in memory (`tok`: its tokenizer, or None;
  `source` names the model in messages)."""
  # No device_get of the whole tree: the HF writer takes each tensor to the host as it converts
  # it (a numpy view on CPU); the .nemo writer takes the tree, in its stored dtypes.
  if tok is None:
    print(f'[export] note: {source} has no tokenizer; the export will have none')
  written = []
  if nemo:
    from third_party.convert import to_nemo
    files, section = to_nemo.tokenizer_artifacts(tok) if tok else (None, None)
    written.append(to_nemo.export_nemo(cfg, params, nemo, dtype=dtype, tokenizer_files=files,
                                       tokenizer_section=section))
  if hf:
    from third_party.convert import to_hf
    with tempfile.TemporaryDirectory() as tmp:
      tok_dir = None
      if tok is not None:
        tok_dir = os.path.join(tmp, 'tok')
        os.makedirs(tok_dir)
        config = json.dumps(_hf_tokenizer_config(tok)).encode()
        files = {**tok.files, 'tokenizer_config.json': config}
        for name, data in files.items():
          path = os.path.join(tok_dir, name)
          try:
            with open(path, 'wb') as f:
              f.write(data)
          except OSError as e:  # a failed write (a full disk) does not name its file
            raise OSError(e.errno, e.strerror, path) from None
      written.append(to_hf.export_hf(cfg, params, hf, dtype=dtype, tokenizer_dir=tok_dir,
                                     bos_token_id=tok.bos_id if tok else None,
                                     eos_token_id=tok.eos_id if tok else None))
    if tok is not None:
      _check_hf_tokenizer(tok, hf)
  return written


def _hf_tokenizer_config(tok) -> dict:
  """tokenizer_config.json with the model's special tokens. A SentencePiece model: transformers'
  Llama tokenizer (legacy prefix handling), adding no BOS/EOS (as jkd encodes). A tokenizer.json:
  the generic fast class, which runs the file as it is; without a class transformers picks one
  by the config's model_type, and its Llama class cannot encode without an `<unk>` token."""
  if tok.library == 'sentencepiece':
    config = {'tokenizer_class': 'LlamaTokenizer', 'legacy': True, 'add_bos_token': False,
              'add_eos_token': False}
  else:
    config = {'tokenizer_class': 'PreTrainedTokenizerFast'}
  for key, i in (('bos_token', tok.bos_id), ('eos_token', tok.eos_id), ('pad_token', tok.pad_id)):
    if i is not None:
      config[key] = tok.id_to_token(i)
  return config


def _cannot(hf_dir: str, what: str, e: Exception) -> None:
  first = str(e).splitlines()[0] if str(e) else ''
  print(f'[export] warning: {hf_dir}: transformers cannot {what} ({type(e).__name__}: {first})')


def _check_hf_tokenizer(tok, hf_dir: str) -> None:
  """Warns when transformers (if installed) reads the exported tokenizer into other ids than
  the model's own on a few probe texts: its SentencePiece conversion ignores some of a model's
  normalisation settings."""
  try:
    from transformers import AutoTokenizer
  except ImportError:
    return
  try:
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
  except Exception as e:  # noqa: BLE001 - any failure is worth a warning, not a failed export
    return _cannot(hf_dir, 'load the tokenizer', e)
  for text in _PROBES:
    want = tok.encode(text)
    try:
      got = list(hf_tok(text, add_special_tokens=False)['input_ids'])
    except Exception as e:  # noqa: BLE001 - as above
      return _cannot(hf_dir, 'encode with the tokenizer', e)
    if got != want:
      exact = ('sentencepiece and tokenizer.model' if tok.library == 'sentencepiece'
               else 'tokenizers and tokenizer.json')
      print(f'[export] warning: {hf_dir}: transformers encodes {text!r} as {got}, the model\'s '
            f'tokenizer as {want}; for the ids the model was trained on, encode with {exact}')
      return


def run(config) -> list[str]:
  c = config.export
  t0 = time.perf_counter()
  paths = export(c.source, nemo=c.nemo, hf=c.hf, dtype=c.dtype)
  print(f'[export] {c.source} -> {", ".join(paths)} in {time.perf_counter() - t0:.1f}s')
  return paths
