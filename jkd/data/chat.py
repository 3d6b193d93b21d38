"""SFT examples: NeMo's chat template and loss mask, ChatML, NeMo's plain format, collate.

Transcribed from NeMo at 19668e53 (the commit NeMo-Aligner pins; spec §1.2, §5.2):
`gpt_sft_chat_dataset.py` (`_get_header_conversation_type_mask_role`, `_add_speaker_and_signal`,
`preprocess`, `_mask_targets`, `collate_fn`) and `gpt_sft_dataset.py` (`_separate_template`,
`_multiple_truncation`, `_process_example`). The teacher is scored on exactly these tokens, so
the quirks that decide token boundaries are kept:

- The conversation string is tokenised once; the turn spans inside it are not found there but
  placed by summing per-turn lengths from the end of the header. Each turn's ids come from
  tokenising '\\x00' + turn and dropping the ids of '\\x00' (NeMo's PREFIX_STR hack against
  SentencePiece's dummy prefix). If a tokenizer merges across a turn boundary the spans shift;
  NeMo only logs a warning ("a sentence mismatches ..."), and so do we.
- The name prefix length is tokenised the same way ('\\x00' + turn_start + name + end_of_name),
  and `num_turn_start_tokens` (what user turns i > 1 keep trained) is len('\\x00' + turn_start)
  minus len('\\x00'): with a SentencePiece model lacking `<extra_id_1>` it is 7 pieces.
- VALUE_TO_TEXT: the label span runs to the first `end_of_name` ids after the name. If none
  is found (a tokenizer merged the newline into a neighbour), the whole turn is masked and the
  cursor is not advanced, so every later span is shifted back by that turn's length.
- Turn 0 is fully masked whatever its role; a masked-role turn at i == 1 is fully masked; at
  i > 1 its leading turn_start ids stay trained (the end-of-answer signal); an unmasked last
  turn gets one more turn_start appended, which is trained.
- Labels: a str label adds `label_start + label + end_of_name`, None adds nothing, a turn with
  no 'label' key adds nothing; with no 'type' the labels are ignored.

`encode_chatml` (data.format 'chatml') reads the same records for students and teachers
trained on the ChatML template (SmolLM2, Qwen): '<|im_start|>{role}\\n{content}<|im_end|>\\n'
per message, ids equal to HF's `apply_chat_template`; it trains each answer and its
`<|im_end|>` and nothing else (none of NeMo's quirks above apply to it).

Not reproduced: `contexts`/`answers`/`metadata` (the teacher records drop them); NeMo's chat
collate pads to ceil8(max(len(tokens), len(context))), one more than the tokens when the last
token is masked, where `collate` pads to ceil8(len(tokens)) (padding only, never content); the
plain format's `unicode_escape` of the prompt template (our configs are Python, not CLI text).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import numpy as np

PREFIX = '\x00'  # NeMo's PREFIX_STR
SYSTEM_NAME = 'System'
TYPES = ('VALUE_TO_TEXT', 'TEXT_TO_VALUE')  # NeMo's TYPE_INSTRUCTION keys (both add no text)
CHATML_START, CHATML_END = '<|im_start|>', '<|im_end|>'
FORMATS = ('chat', 'chatml', 'plain')  # read_jsonl's fmt, config's data.format
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChatTokens:
  """NeMo's `chat_prompt_tokens` (defaults of `GPTSFTDataset` and the teacher YAML)."""
  system_turn_start: str = '<extra_id_0>'
  turn_start: str = '<extra_id_1>'
  label_start: str = '<extra_id_2>'
  end_of_turn: str = '\n'
  end_of_name: str = '\n'


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A chat record as text: header, one string per turn, and the whole conversation."""
  header: str
  turns: list[str]
  text: str
  speakers: list[str]
  gtype: str | None
  mask_role: str


def _label_text(turn: dict, tokens: ChatTokens, where: str) -> str:
  label = turn.get('label')
  if label is None:
    return ''
  if not isinstance(label, str):
    raise ValueError(f'{where}.label: expected a string or null, got {type(label).__name__}')
  return tokens.label_start + label + tokens.end_of_name


def _check_record(record) -> tuple[str, list[dict], str | None, str]:
  """(system, conversations, type, mask role) of a chat record, or a one-line ValueError."""
  if not isinstance(record, dict):
    raise ValueError(f'chat record: expected an object, got {type(record).__name__}')
  if 'message_tree_id' in record:
    raise ValueError('an OpenAssistant message tree, not a chat record: convert the trees file '
                     'first (python -m jkd.data.oasst TREES.jsonl.gz OUT_DIR)')
  for key in ('system', 'conversations'):
    if key not in record:
      raise ValueError(f'chat record has no {key!r}')
  system, convs = record['system'], record['conversations']
  if not isinstance(system, str):
    raise ValueError("chat record: 'system' must be a string")
  if not isinstance(convs, list) or not convs:
    raise ValueError("chat record: 'conversations' must be a non-empty list")
  gtype = record.get('type')
  if gtype is not None and gtype not in TYPES:
    raise ValueError(f'chat record: type {gtype!r} is not one of {", ".join(TYPES)} or null')
  for i, turn in enumerate(convs):
    if not isinstance(turn, dict) or not isinstance(turn.get('from'), str) or not isinstance(
        turn.get('value'), str):
      raise ValueError(f"conversations[{i}]: needs string 'from' and 'value'")
  return system, convs, gtype, record.get('mask', 'User')


def check_text(obj) -> None:
  """Refuses a record whose strings are not Unicode text: a lone surrogate escape such as
  "\\ud83d" (half an emoji that a tool cut, still valid JSON) made every tokenizer fail with a
  traceback, and a UTF-8 writer with an error naming no file."""
  try:
    json.dumps(obj, ensure_ascii=False).encode('utf-8')
  except UnicodeEncodeError as e:
    raise ValueError(f'a lone surrogate \\u{ord(e.object[e.start]):04x} after '
                     f'{e.object[max(0, e.start - 24):e.start]!r}: not Unicode text (half of a '
                     'character cut in two?)') from None


def render(record: dict, tokens: ChatTokens = ChatTokens()) -> Rendered:
  """The strings NeMo builds from a chat record (no tokenisation)."""
  system, convs, gtype, mask_role = _check_record(record)
  header = (tokens.system_turn_start + SYSTEM_NAME + tokens.end_of_name + system
            + tokens.end_of_turn)
  turns, speakers = [], []
  for i, turn in enumerate(convs):
    name = tokens.turn_start + turn['from'] + tokens.end_of_name
    label = _label_text(turn, tokens, f'conversations[{i}]') if gtype is not None else ''
    if gtype == 'TEXT_TO_VALUE':
      turns.append(name + turn['value'] + tokens.end_of_turn + label)
    else:
      turns.append(name + label + turn['value'] + tokens.end_of_turn)
    speakers.append(turn['from'])
  text = header + ''.join(turns)
  if speakers[-1] != mask_role:  # the next turn's start closes the answer and is trained
    text += tokens.turn_start
  return Rendered(header, turns, text, speakers, gtype, mask_role)


def _tail_ids(tok, text: str) -> list[int]:
  """Ids of `text` as NeMo counts them mid-string: tokenised after '\\x00', those ids dropped."""
  return tok.encode(PREFIX + text)[len(tok.encode(PREFIX)):]


def _find(sub: list[int], seq: list[int]) -> int:
  """First index of `sub` in `seq`, or -1 (NeMo's identify_start_index_of_subsequence)."""
  n = len(sub)
  for i in range(len(seq) - n + 1):
    if seq[i:i + n] == sub:
      return i
  return -1


def encode_chat(record: dict, tok, *, tokens: ChatTokens = ChatTokens(), where: str = 'chat record'
                ) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids int32 [S], mask bool [S]) of a chat record; mask marks trained positions;
  `where` names it in the log (its file and line).

  Exactly NeMo's `preprocess` + `_mask_targets` (see the module docstring for the quirks).
  No BOS/EOS is added, as in NeMo's chat path.
  """
  r = render(record, tokens)
  ids = tok.encode(r.text)
  header_ids = tok.encode(r.header)
  if ids[:len(header_ids)] != header_ids:
    raise ValueError("chat record: the header tokenises differently inside the conversation: "
                     "this tokenizer merges across NeMo's template (data.format='chat'); "
                     "ChatML tokenizers such as SmolLM2's take data.format='chatml'")
  if r.mask_role not in r.speakers:
    raise ValueError(f'chat record: mask role {r.mask_role!r} is not a speaker')
  keep = np.ones(len(ids), bool)
  keep[:len(header_ids)] = False
  label_ids = _tail_ids(tok, tokens.label_start)
  name_end_ids = _tail_ids(tok, tokens.end_of_name)
  n_turn_start = len(_tail_ids(tok, tokens.turn_start))
  cur = len(header_ids)
  for i, (turn, speaker) in enumerate(zip(r.turns, r.speakers)):
    s_id = _tail_ids(tok, turn)
    length = len(s_id)
    skip = len(_tail_ids(tok, tokens.turn_start + speaker + tokens.end_of_name))
    loc = _find(label_ids, s_id)
    if loc >= 0 and r.gtype == 'VALUE_TO_TEXT':
      if loc != skip:  # NeMo asserts this
        raise ValueError(f'conversations[{i}]: label_start found at token {loc}, not right '
                         f'after the {skip}-token name')
      newline = _find(name_end_ids, s_id[skip:])
      if newline < 0:
        keep[cur:cur + length] = False
        continue  # NeMo's quirk: the cursor stays, later spans shift back
      skip += newline + len(name_end_ids)
    elif loc >= 0 and r.gtype == 'TEXT_TO_VALUE':
      skip = loc + len(label_ids)
    if cur >= len(ids):
      break
    if cur + length < len(ids) and ids[cur + 1:cur + length] != s_id[1:]:
      _log.warning('%s: turn %d tokenises differently inside the conversation than alone (NeMo '
                   "warns 'a sentence mismatches the corresponding piece'); its mask is NeMo's",
                   where, i)
    if i == 0 and r.gtype != 'TEXT_TO_VALUE':
      keep[cur:cur + length] = False  # context for the rest
    elif speaker == r.mask_role and (i > 1 or (i == 1 and r.gtype == 'TEXT_TO_VALUE')):
      keep[cur + n_turn_start:cur + length] = False  # its turn_start ends the previous answer
    elif speaker == r.mask_role:
      keep[cur:cur + length] = False
    else:
      keep[cur:cur + skip] = False  # name (and label) prefix
    cur += length
  if not keep.any():
    raise ValueError('chat record: no token is trained (NeMo: "mask is empty")')
  return np.asarray(ids, np.int32), keep


def _special_id(tok, piece: str) -> int:
  """The id of a special token that `tok.encode` keeps whole, or a ValueError."""
  i = tok.token_to_id(piece)
  if i is None or tok.encode(piece) != [i]:
    raise ValueError(f'chatml: the tokenizer has no special token {piece!r} (format chatml '
                     f'needs a ChatML vocabulary such as SmolLM2\'s or Qwen\'s)')
  return i


def encode_chatml(record: dict, tok) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids int32 [S], mask bool [S]) of a chat record in the ChatML template.

  The ids are what Hugging Face's `apply_chat_template` gives for SmolLM2/Qwen-style models
  with the messages [system (if non-empty), then each turn with role `from`.lower()]:
  '<|im_start|>{role}\\n{content}<|im_end|>\\n' per message. An empty `system` emits no system
  block (SmolLM2's own template would then insert its default system prompt: put it in the
  record to get it). Trained: the content and `<|im_end|>` of every turn whose `from` is not
  the record's `mask` role; never the headers, the newline after `<|im_end|>` or the system
  block. `type` and `label` are ignored (they are NeMo's SteerLM attribute line).

  Special tokens are atomic, so each text between them is encoded on its own, as HF does. If
  the header's newline merges with the content (a content starting with a newline or two
  spaces, with SmolLM2's BPE), a warning is logged and the merged token stays masked.
  """
  system, convs, _, mask_role = _check_record(record)
  if mask_role not in [t['from'] for t in convs]:
    raise ValueError(f'chat record: mask role {mask_role!r} is not a speaker')
  start, end = _special_id(tok, CHATML_START), _special_id(tok, CHATML_END)
  newline = tok.encode('\n')
  messages = [('system', system, False)] if system else []
  messages += [(t['from'].lower(), t['value'], t['from'] != mask_role) for t in convs]
  ids, keep = [], []
  for role, content, trained in messages:
    header = role + '\n'
    header_ids, body = tok.encode(header), tok.encode(header + content)
    n_header = len(header_ids)
    if body[:n_header] != header_ids:
      _log.warning('chatml: the %r header merges with its content into one token; that token '
                   'is not trained', role)
      # The fewest ids that cover the whole header (partial UTF-8 at the tail decodes to U+FFFD).
      n_header = next((n for n in range(1, len(body) + 1)
                       if tok.decode(body[:n]).startswith(header)), len(body))
    ids += [start] + body + [end] + newline
    keep += [False] * (1 + n_header) + [trained] * (len(body) - n_header + 1) + [False] * len(
        newline)
  if not any(keep):
    raise ValueError('chat record: no token is trained')
  return np.asarray(ids, np.int32), np.asarray(keep, bool)


def generation_prompt(record: dict, tok, *, fmt: str) -> list[int]:
  """Ids asking for the assistant's reply to `record` (a conversation that ends with the user):
  its template up to and including the assistant turn's header."""
  if fmt == 'chatml':  # the header ids of an empty assistant turn, less its <|im_end|>\n
    ids, _ = encode_chatml(dict(record, conversations=[
        *record['conversations'], {'from': 'Assistant', 'value': ''}]), tok)
    return [int(i) for i in ids[:len(ids) - 1 - len(tok.encode('\n'))]]
  if fmt == 'chat':  # NeMo's inference prompt: ... <extra_id_1>Assistant\n
    t = ChatTokens()
    return tok.encode(render(record).text.removesuffix(t.turn_start) + t.turn_start
                      + 'Assistant' + t.end_of_name)
  raise ValueError(f'generation_prompt: format {fmt!r} has no chat turns')


def end_of_turn_id(tok, *, fmt: str) -> int | None:
  """The id that ends a generated reply: <|im_end|> (chatml), NeMo's next-turn token
  <extra_id_1> (chat, when the tokenizer has it as one token mid-string, where replies meet it:
  a SentencePiece model would prefix a leading '▁' at the start of a string) or else EOS."""
  if fmt == 'chatml':
    return _special_id(tok, CHATML_END)
  if fmt == 'chat':
    ids = _tail_ids(tok, ChatTokens().turn_start)
    if len(ids) == 1:
      return ids[0]
  return tok.eos_id


def _truncate(ids: list[int], keep: int, method: str) -> list[int]:
  if keep == 0:
    return []
  return ids[-keep:] if method == 'left' else ids[:keep]


def encode_plain(record: dict, tok, *, input_key: str = 'input', output_key: str = 'output',
                 prompt_template: str = '{input} {output}', add_bos: bool = False,
                 add_eos: bool = True, add_sep: bool = False, sep_id: int | None = None,
                 max_seq_length: int | None = None, truncation: str = 'right'
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids int32, mask bool) of NeMo's non-chat `GPTSFTDataset` format.

  `output_key` is NeMo's `label_key` (it must close the template), `input_key` its
  `truncation_field`: when the example exceeds `max_seq_length` that field loses the excess
  (`truncation` 'right' cuts its end), then whole template pieces from the end ('right') or
  start ('left'). The mask covers the answer and EOS (NeMo's answer_only_loss).
  """
  if truncation not in ('right', 'left'):
    raise ValueError(f'truncation={truncation!r}: expected right or left')
  keys = re.findall(r'{(.*?)}', prompt_template)
  if not prompt_template.endswith('{' + output_key + '}'):
    raise ValueError(f'prompt_template {prompt_template!r} must end with {{{output_key}}}')
  if input_key not in keys:
    raise ValueError(f'prompt_template {prompt_template!r} has no {{{input_key}}}')
  if add_sep and sep_id is None:
    raise ValueError('add_sep needs sep_id')
  if not isinstance(record, dict):
    raise ValueError(f'plain record: expected an object, got {type(record).__name__}')
  values = {}
  for k in keys:
    if not isinstance(record.get(k), str):
      raise ValueError(f'plain record: {k!r} must be a string')
    values['{' + k + '}'] = record[k].strip(' ')
  # NeMo's _separate_template: split before placeholders (with their leading spaces); a
  # tokenizer that is not space sensitive ('x y' == 'x' + 'y', e.g. SentencePiece) drops one.
  pieces = [s for s in re.split('( *?{.+?})', prompt_template) if s]
  space_sensitive = tok.encode('x y') != tok.encode('x') + tok.encode('y')
  template_ids, fields = [], []
  for s in pieces:
    if not space_sensitive and s[0] == ' ':
      s = s[1:]
    ph = s.lstrip(' ')
    template_ids.append(tok.encode(s[:len(s) - len(ph)] + values.get(ph, ph)))
    fields.append(ph[1:-1] if ph in values else None)
  extra = add_bos + add_sep + add_eos
  excess = sum(map(len, template_ids)) + extra - (max_seq_length or 0)
  if max_seq_length is not None and excess > 0:
    i = fields.index(input_key)
    cut = min(excess, len(template_ids[i]))
    template_ids[i] = _truncate(template_ids[i], len(template_ids[i]) - cut, truncation)
    excess -= cut
    order = range(len(template_ids)) if truncation == 'left' else reversed(
        range(len(template_ids)))
    for j in order:
      if excess <= 0:
        break
      cut = min(excess, len(template_ids[j]))
      template_ids[j] = _truncate(template_ids[j], len(template_ids[j]) - cut, truncation)
      excess -= cut
  context = [t for ids in template_ids[:-1] for t in ids]
  if add_bos:
    context = [tok.bos_id] + context
  if add_sep:
    context = context + [sep_id]
  ids = context + template_ids[-1] + ([tok.eos_id] if add_eos else [])
  if None in ids:
    raise ValueError('plain record: the tokenizer has no bos/eos id for add_bos/add_eos')
  return np.asarray(ids, np.int32), np.arange(len(ids)) >= len(context)


def to_example(input_ids, mask, max_seq_length: int | None, truncation: str = 'right'
               ) -> dict[str, np.ndarray]:
  """NeMo's collate for one example, unpadded: tokens/labels shifted by one, int32."""
  if truncation not in ('right', 'left'):
    raise ValueError(f'truncation={truncation!r}: expected right or left')
  ids = np.asarray(input_ids, np.int32)
  m = np.asarray(mask).astype(np.int32)
  out = {'tokens': ids[:-1], 'labels': ids[1:], 'loss_mask': m[1:]}
  if max_seq_length is not None and len(out['tokens']) > max_seq_length:
    part = (slice(None, max_seq_length) if truncation == 'right'
            else slice(len(out['tokens']) - max_seq_length, None))
    out = {k: v[part] for k, v in out.items()}
  return out


def collate(examples: list[dict], pad_id: int, multiple: int = 8,
            max_seq_length: int | None = None) -> dict[str, np.ndarray]:
  """[B, L] int32 tokens/labels (padded with `pad_id`, NeMo uses eos) and loss_mask (0);
  L = min(max_seq_length, the batch's longest rounded up to `multiple`), longer rows cut."""
  if not examples:
    raise ValueError('collate: no examples')
  if pad_id is None:
    raise ValueError('collate: pad_id is None (the tokenizer has no eos id)')
  longest = max(len(e['tokens']) for e in examples)
  length = -(-longest // multiple) * multiple
  if max_seq_length is not None:
    length = min(length, max_seq_length)
  out = {k: np.full((len(examples), length), pad, np.int32)
         for k, pad in (('tokens', pad_id), ('labels', pad_id), ('loss_mask', 0))}
  for b, e in enumerate(examples):
    for k, v in out.items():
      row = np.asarray(e[k])[:length]
      v[b, :len(row)] = row
  return out


def read_jsonl(path: str, tok, *, fmt: str = 'chat', max_seq_length: int | None,
               chat_tokens: ChatTokens = ChatTokens(), **plain_kwargs) -> list[dict]:
  """Examples (tokens, labels, loss_mask, index) of a chat, chatml or plain JSONL file, in file
  order; `index` counts records (blank lines are skipped). `plain_kwargs` go to `encode_plain`.

  Examples longer than `max_seq_length` are cut on the right, as NeMo's collate cuts them
  (the plain format first cuts its truncation field, as NeMo's dataset does). A record that
  cannot be read (not UTF-8, not JSON, not the format) and a file without records are errors
  naming the file and line.
  """
  if fmt not in FORMATS:
    raise ValueError(f'format {fmt!r}: expected one of {", ".join(FORMATS)}')
  examples = []
  with open(path, 'rb') as f:
    if f.peek(2)[:2] == b'\x1f\x8b':  # read as text: "can't decode byte 0x8b in position 1"
      raise ValueError(f'{path}: a gzip file, not JSONL: decompress it (OpenAssistant trees: '
                       'python -m jkd.data.oasst converts them)')
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode('utf-8')
        if not line.strip():
          continue
        record = json.loads(line)
        check_text(record)
        if fmt == 'chat':
          ids, mask = encode_chat(record, tok, tokens=chat_tokens, where=f'{path}:{lineno}')
        elif fmt == 'chatml':
          ids, mask = encode_chatml(record, tok)
        else:
          ids, mask = encode_plain(record, tok, max_seq_length=max_seq_length, **plain_kwargs)
      except json.JSONDecodeError as e:  # its own line and column count from this line
        raise ValueError(f'{path}:{lineno}: not a JSON record ({e.msg} at column {e.pos + 1})'
                         ) from None
      except ValueError as e:  # UnicodeDecodeError is one too
        raise ValueError(f'{path}:{lineno}: {e}') from None
      example = to_example(ids, mask, max_seq_length)
      example['index'] = len(examples)
      examples.append(example)
  if not examples:
    raise ValueError(f'{path}: no records (an empty data file)')
  return examples
