"""Chat JSONL for training: OpenAssistant trees as NeMo-Aligner prepares them, and chatterbot.

`convert_trees` is NeMo-Aligner's `examples/nlp/data/steerlm/preprocess_openassistant_data.py`
(at af2b3bd9; spec §5.1) on the file users download, `2023-04-12_oasst_all.trees.jsonl.gz`:
trees shuffled with `random.seed(10)`, the first int(0.95 n) trees to train.jsonl and the rest
to val.jsonl; every root-to-leaf path of a tree (depth first, replies in file order) with more
than one turn is a record

  {"conversations": [{"value", "from": "User"|"Assistant", "label"}...], "system": SYSTEM_PROMPT,
   "mask": "User", "type": "VALUE_TO_TEXT"}

written with `json.dumps(ensure_ascii=False)`. Kept as NeMo has them: User turns get
`"label": null`; an Assistant message with no `labels` has no "label" key (so no attribute
line in the template); one whose labels hold none of the four attributes gets `""`; values
scale by 4 and round half to even (Python's `round`: 0.625 -> 2, 0.875 -> 4).

`convert_chatterbot` writes the same schema from `chatterbot-corpus` YAML (the demo's data):
each conversation alternates User, Assistant, ...; the corpus has no attribute labels, so every
turn gets `"label": null` and the template has no `<extra_id_2>` line (NeMo renders null as
nothing); one-line conversations are dropped, as single-turn OASST paths are, and so are exact
repeats and malformed entries (with a warning). Conversations are shuffled with the same seed
and cut the same way.

  python -m jkd.data.oasst 2023-04-12_oasst_all.trees.jsonl.gz OUT_DIR
  python -m jkd.data.oasst path/to/chatterbot_corpus/data/english OUT_DIR
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import logging
import os
import random
import sys
import zlib

import yaml

from jkd.data import chat

# examples/nlp/data/steerlm/common.py
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
OPEN_ASSISTANT_ATTRIBUTES = ('quality', 'toxicity', 'humor', 'creativity')
LIKERT_SCALE = 5
ROLES = {'prompter': 'User', 'assistant': 'Assistant'}
_log = logging.getLogger(__name__)


def encode_labels(labels: dict) -> str:
  """'quality:3,toxicity:0,...' over the attributes present (NeMo-Aligner's encode_labels)."""
  if not isinstance(labels, dict):
    raise ValueError(f'labels: expected an object, got {type(labels).__name__}')
  items = []
  for key in OPEN_ASSISTANT_ATTRIBUTES:
    if key in labels:
      value = labels[key].get('value') if isinstance(labels[key], dict) else None
      if not isinstance(value, (int, float)):
        raise ValueError(f'labels.{key}.value: expected a number, got {value!r}')
      items.append(f'{key}:{round(value * (LIKERT_SCALE - 1))}')
  return ','.join(items)


def parse_conversations(node: dict) -> list[list[dict]]:
  """Every path from `node` (a tree or a message) to a leaf, as lists of turns."""
  message = node['prompt'] if 'prompt' in node else node
  if not isinstance(message, dict) or 'text' not in message or 'role' not in message:
    return [[]]  # no message: an empty path, dropped later
  if message['role'] not in ROLES:
    raise ValueError(f'message {message.get("message_id")}: unknown role {message["role"]!r}')
  turn = {'value': message['text'], 'from': ROLES[message['role']]}
  if 'labels' in message:
    turn['label'] = encode_labels(message['labels'])
  threads = [t for reply in message.get('replies') or () for t in parse_conversations(reply)]
  # The same turn dict is shared by all its paths, as in NeMo-Aligner; nothing mutates it
  # after records_from_trees nulls User labels.
  return [[turn] + t for t in threads] if threads else [[turn]]


def records_from_trees(trees: list[dict], mask_role: str = 'User',
                       gtype: str = 'VALUE_TO_TEXT') -> list[dict]:
  """NeMo-Aligner's get_data_records: the multi-turn paths of each tree, in order."""
  out = []
  for tree in trees:
    for conv in parse_conversations(tree):
      if len(conv) <= 1:
        continue
      for turn in conv:
        if turn['from'] == 'User':
          turn['label'] = None
      out.append({'conversations': conv, 'system': SYSTEM_PROMPT, 'mask': mask_role,
                  'type': gtype})
  return out


@contextlib.contextmanager
def _named_read_errors(path: str):
  """A file that is not UTF-8, or a cut or corrupt gzip (an interrupted download), as one
  ValueError naming it."""
  try:
    yield
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e})') from None
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f'{path}: a cut or corrupt gzip file ({e}); download it again') from None


def read_trees(path: str) -> list[tuple[int, dict]]:
  """(line number, tree object) of a .jsonl or .jsonl.gz file, in file order."""
  opener = gzip.open if path.endswith('.gz') else open
  trees = []
  with _named_read_errors(path), opener(path, 'rt', encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        tree = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{lineno}: invalid JSON: {e}') from None
      if not isinstance(tree, dict):
        raise ValueError(f'{path}:{lineno}: expected a message tree object')
      trees.append((lineno, tree))
  return trees


def write_jsonl(path: str, records: list[dict]) -> None:
  """One `json.dumps(ensure_ascii=False)` line per record; replaced atomically (a failed write
  leaves neither the file nor its `.part`)."""
  try:
    with open(path + '.part', 'w', encoding='utf-8') as f:
      for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + '\n')
  except BaseException:
    if os.path.exists(path + '.part'):
      os.remove(path + '.part')
    raise
  os.replace(path + '.part', path)


def _split_write(items: list, to_records, out_dir: str, seed: int, train_fraction: float,
                 nothing: str) -> tuple[int, int]:
  """Shuffle items with `seed` (as random.seed(seed); random.shuffle), cut, expand, write;
  `nothing`: the error when no item gives a record (written files would fail only later)."""
  if not 0.0 <= train_fraction <= 1.0:
    raise ValueError(f'train_fraction={train_fraction}: must be in [0, 1]')
  items = list(items)
  random.Random(seed).shuffle(items)
  cut = int(len(items) * train_fraction)
  train, val = to_records(items[:cut]), to_records(items[cut:])
  if not train and not val:
    raise ValueError(nothing)
  os.makedirs(out_dir, exist_ok=True)
  write_jsonl(os.path.join(out_dir, 'train.jsonl'), train)
  write_jsonl(os.path.join(out_dir, 'val.jsonl'), val)
  return len(train), len(val)


def convert_trees(trees_path: str, out_dir: str, *, seed: int = 10,
                  train_fraction: float = 0.95) -> tuple[int, int]:
  """OASST trees file -> out_dir/{train,val}.jsonl; returns the record counts."""
  trees = read_trees(trees_path)

  def to_records(items):
    out = []
    for lineno, tree in items:
      try:
        chat.check_text(tree)
        out.extend(records_from_trees([tree]))
      except ValueError as e:
        raise ValueError(f'{trees_path}:{lineno}: {e}') from None
    return out

  return _split_write(trees, to_records, out_dir, seed, train_fraction,
                      f'{trees_path}: no message tree with a reply, so no conversation (is it '
                      'the *.trees.jsonl(.gz) file? the messages file has no trees)')


def _paths(yaml_dir_or_files) -> list[str]:
  """A path or paths, as a list."""
  if isinstance(yaml_dir_or_files, str):
    return [yaml_dir_or_files]
  return list(yaml_dir_or_files)


def read_chatterbot(yaml_dir_or_files) -> list[list[str]]:
  """Conversations (lists of lines) of chatterbot-corpus YAML files, files in sorted order.

  Scalars are read as written (YAML's BaseLoader), so a reply 'Yes' stays 'Yes', not True.
  Entries that are not lists of strings (1.3.3's english/trivia.yml has a bare string) are
  skipped with one warning per file; a file that is not a conversations mapping is an error.
  """
  yaml_dir_or_files = _paths(yaml_dir_or_files)
  files = []
  for p in yaml_dir_or_files:
    if os.path.isdir(p):
      files += sorted(glob.glob(os.path.join(p, '**', '*.yml'), recursive=True)
                      + glob.glob(os.path.join(p, '**', '*.yaml'), recursive=True))
    elif os.path.isfile(p):
      files.append(p)
    else:
      raise FileNotFoundError(f'{p}: no such file or directory')
  if not files:
    raise ValueError(f'{", ".join(yaml_dir_or_files)}: no .yml files')
  convs = []
  for path in files:
    with _named_read_errors(path), open(path, encoding='utf-8') as f:
      try:
        data = yaml.load(f, Loader=yaml.BaseLoader)
      except yaml.YAMLError as e:
        raise ValueError(f'{path}: invalid YAML: ' + ' '.join(str(e).split())) from None
    if not isinstance(data, dict) or not isinstance(data.get('conversations'), list):
      raise ValueError(f'{path}: expected a mapping with a conversations list')
    bad = []
    for i, conv in enumerate(data['conversations']):
      if isinstance(conv, list) and all(isinstance(s, str) for s in conv):
        try:
          chat.check_text(conv)  # YAML's "\ud83d" escape reads as a lone surrogate too
        except ValueError as e:
          raise ValueError(f'{path}: conversations[{i}]: {e}') from None
        convs.append(conv)
      else:
        bad.append(i)
    if bad:
      _log.warning('%s: skipped %d conversation(s) that are not lists of strings (first: '
                   'conversations[%d])', path, len(bad), bad[0])
  return convs


def chatterbot_record(lines: list[str], system: str = SYSTEM_PROMPT) -> dict:
  """One chat record: User, Assistant, User, ... with null labels."""
  turns = [{'value': text, 'from': ('User', 'Assistant')[i % 2], 'label': None}
           for i, text in enumerate(lines)]
  return {'conversations': turns, 'system': system, 'mask': 'User', 'type': 'VALUE_TO_TEXT'}


def convert_chatterbot(yaml_dir_or_files, out_dir: str, seed: int = 10,
                       train_fraction: float = 0.95, *, system: str = SYSTEM_PROMPT
                       ) -> tuple[int, int]:
  """chatterbot-corpus YAML -> out_dir/{train,val}.jsonl in the OASST schema; record counts.

  `system` is every record's system turn ('' = none in format chatml). Exact repeats (lines
  compared stripped; 1.3.3's tech_support.yml is 1050 copies of 10 conversations) are dropped
  before the split, first occurrences kept, so no conversation is in both splits.
  """
  convs, seen = [], set()
  for conv in read_chatterbot(yaml_dir_or_files):
    key = tuple(line.strip() for line in conv)
    if key not in seen:
      seen.add(key)
      convs.append(conv)
  return _split_write(
      convs, lambda items: [chatterbot_record(c, system) for c in items if len(c) > 1], out_dir,
      seed, train_fraction,
      f'{", ".join(_paths(yaml_dir_or_files))}: no conversation of two or more lines')


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  usage = 'usage: python -m jkd.data.oasst TREES.jsonl[.gz]|CHATTERBOT_DIR|FILE.yml OUT_DIR'
  if argv in (['-h'], ['--help']):
    print(usage + '\n\n' + __doc__.split('\n\n')[0])
    return 0
  if len(argv) != 2:
    print(usage, file=sys.stderr)
    return 2
  src, out = argv
  try:
    if src.endswith(('.jsonl', '.jsonl.gz')):
      n_train, n_val = convert_trees(src, out)
    else:
      n_train, n_val = convert_chatterbot(src, out)
  except (ValueError, OSError) as e:
    from jkd.main import error_line  # an OSError names its file, not as "[Errno 2] ...: 'x'"
    print(error_line(e), file=sys.stderr)
    return 2
  print(f'{out}/train.jsonl: {n_train} records, {out}/val.jsonl: {n_val} records')
  return 0


if __name__ == '__main__':
  sys.exit(main())
