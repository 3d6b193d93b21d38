"""NeMo's chat template, ChatML, plain format and collate (jkd.data.chat) vs hand-built ids and
Hugging Face's apply_chat_template."""

import json
import logging
import os
import string

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models

from jkd import assets
from jkd import tokenizer as jt
from jkd.data import chat

SPECIAL = ['<extra_id_0>', '<extra_id_1>', '<extra_id_2>', '</s>']
RECORD = {
    'system': 'Be brief.',
    'conversations': [
        {'value': 'Hi! What is 2+2?', 'from': 'User', 'label': None},
        {'value': 'It is 4.', 'from': 'Assistant', 'label': 'quality:4,toxicity:0'},
        {'value': 'And 3+3?', 'from': 'User', 'label': None},
        {'value': 'Six.', 'from': 'Assistant', 'label': 'quality:3'}],
    'mask': 'User', 'type': 'VALUE_TO_TEXT'}
TEXT = ('<extra_id_0>System\nBe brief.\n'
        '<extra_id_1>User\nHi! What is 2+2?\n'
        '<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0\nIt is 4.\n'
        '<extra_id_1>User\nAnd 3+3?\n'
        '<extra_id_1>Assistant\n<extra_id_2>quality:3\nSix.\n'
        '<extra_id_1>')
# Mistral-7B v0.1's SentencePiece ids of TEXT. `<extra_id_N>` is not a piece there: it is
# 7 pieces, '▁<' first in the string and '<' (28789) after a newline byte (<0x0A> = 13).
EXTRA = [28789, 13539, 28730, 313, 28730]  # '<' 'extra' '_' 'id' '_'
ID0, ID1, ID2 = ([28734, 28767], [28740, 28767], [28750, 28767])  # '0' '>', '1' '>', '2' '>'
SP_IDS = (
    [523] + EXTRA[1:] + ID0 + [3099, 13]  # ▁< extra _ id _ 0 > System \n
    + [3574, 6817, 28723, 13]  # Be ▁brief . \n
    + EXTRA + ID1 + [730, 13] + [23809, 28808, 1824, 349, 28705, 28750, 28806, 28750, 28804, 13]
    + EXTRA + ID1 + [7226, 11143, 13]  # Ass istant \n
    + EXTRA + ID2 + [14817, 28747, 28781, 28725, 532, 14443, 472, 28747, 28734, 13]
    + [1313, 349, 28705, 28781, 28723, 13]  # It ▁is ▁ 4 . \n
    + EXTRA + ID1 + [730, 13] + [2467, 28705, 28770, 28806, 28770, 28804, 13]
    + EXTRA + ID1 + [7226, 11143, 13]
    + EXTRA + ID2 + [14817, 28747, 28770, 13]  # quality : 3 \n
    + [28735, 833, 28723, 13]  # S ix . \n
    + EXTRA + ID1)
# Trained [start, end): the first answer's 'It is 4.\n' (59..64) and the next user turn's
# 7 turn_start pieces (65..71); 'Six.\n' (102..105) and the appended '<extra_id_1>' (106..112).
# Masked: header (0..12), turn 0 (13..31), each name + label prefix, user text after its tag.
SP_TRAINED = [(59, 72), (102, 113)]


def runs(mask) -> list[tuple[int, int]]:
  """[start, end) of each run of ones."""
  m = np.concatenate([[0], np.asarray(mask, np.int8), [0]])
  edges = np.flatnonzero(np.diff(m))
  return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def trained_text(tok, ids, mask) -> list[str]:
  return [tok.decode(ids[a:b]) for a, b in runs(mask)]


@pytest.fixture(scope='module')
def mistral():
  with open(assets.mistral_sentencepiece(verbose=False), 'rb') as f:
    return jt.Tokenizer('sentencepiece', {'tokenizer.model': f.read()}, bos_id=1, eos_id=2,
                        pad_id=None)


def char_tokenizer(merges=(), special=SPECIAL) -> jt.Tokenizer:
  """A character-level `tokenizers` BPE (plus `merges`) with the chat tags (`special`) as added
  tokens: one id per character, so expected spans are character counts."""
  chars = sorted(set(string.printable) | {'\x00'})
  vocab = {c: i for i, c in enumerate(chars)}
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tok = tokenizers.Tokenizer(models.BPE(vocab, list(merges)))
  tok.decoder = decoders.Fuse()  # decode = concatenation
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in special])
  return jt.Tokenizer('huggingface', {'tokenizer.json': tok.to_str().encode()}, bos_id=None,
                      eos_id=tok.token_to_id('</s>'), pad_id=None)


def test_render_builds_nemo_template():
  """The string NeMo's _add_speaker_and_signal builds (spec §5.2), trailing tag included."""
  assert chat.render(RECORD).text == TEXT
  assert RECORD['conversations'][0]['value'] == 'Hi! What is 2+2?'  # NeMo mutates; we don't


def test_golden_mistral_sentencepiece(mistral):
  """Exact ids and trained spans with a real pretrained SentencePiece model."""
  assert mistral.encode(TEXT) == SP_IDS  # the hand-built string tokenises as written above
  ids, mask = chat.encode_chat(RECORD, mistral)
  assert ids.dtype == np.int32 and mask.dtype == bool
  assert ids.tolist() == SP_IDS
  assert runs(mask) == SP_TRAINED
  assert trained_text(mistral, ids, mask) == ['It is 4.\n<extra_id_1>', 'Six.\n<extra_id_1>']


def test_mask_spans_with_hf_tokenizer():
  """Same template through a `tokenizers` BPE where the tags are single added tokens."""
  tok = char_tokenizer()
  ids, mask = chat.encode_chat(RECORD, tok)
  assert ids.tolist() == tok.encode(TEXT)
  start = len(tok.encode(TEXT.split('It is 4.')[0]))
  assert runs(mask)[0] == (start, start + len('It is 4.\n') + 1)  # one turn_start token
  assert trained_text(tok, ids, mask) == ['It is 4.\n<extra_id_1>', 'Six.\n<extra_id_1>']
  assert ids[-1] == tok.token_to_id('<extra_id_1>') and mask[-1]


def test_last_user_turn_gets_no_trailing_tag(mistral):
  """A conversation ending on the masked role: no appended tag; its own tag stays trained."""
  record = dict(RECORD, conversations=RECORD['conversations'][:3])
  assert chat.render(record).text == TEXT[:TEXT.index('<extra_id_1>Assistant\n<extra_id_2>q'
                                                      'uality:3')]
  ids, mask = chat.encode_chat(record, mistral)
  assert ids.tolist() == SP_IDS[:81]
  assert runs(mask) == [(59, 72)]


def test_type_variants():
  """TEXT_TO_VALUE trains the label (after the answer); no type drops labels and trains answers."""
  tok = char_tokenizer()
  t2v = dict(RECORD, type='TEXT_TO_VALUE')
  assert '\nIt is 4.\n<extra_id_2>quality:4,toxicity:0\n<extra_id_1>User' in chat.render(t2v).text
  assert trained_text(tok, *chat.encode_chat(t2v, tok)) == [
      'quality:4,toxicity:0\n<extra_id_1>', 'quality:3\n<extra_id_1>']
  untyped = {k: v for k, v in RECORD.items() if k != 'type'}
  assert '<extra_id_2>' not in chat.render(untyped).text
  assert trained_text(tok, *chat.encode_chat(untyped, tok)) == [
      'It is 4.\n<extra_id_1>', 'Six.\n<extra_id_1>']
  no_label = dict(RECORD, conversations=[dict(c, label=None) for c in RECORD['conversations']])
  assert trained_text(tok, *chat.encode_chat(no_label, tok)) == [
      'It is 4.\n<extra_id_1>', 'Six.\n<extra_id_1>']


def test_first_turn_masked_whatever_its_role():
  """Turn 0 is context even when it is the Assistant; a masked role at i == 1 is all masked."""
  tok = char_tokenizer()
  record = dict(RECORD, conversations=[
      {'value': 'Hello.', 'from': 'Assistant', 'label': None},
      {'value': 'Hi.', 'from': 'User', 'label': None},
      {'value': 'Ok.', 'from': 'Assistant', 'label': None}])
  assert trained_text(tok, *chat.encode_chat(record, tok)) == ['Ok.\n<extra_id_1>']


def test_label_newline_merged_shifts_later_spans():
  """NeMo's quirk: when the label's newline is merged away ('3\\n' one token) the turn is fully
  masked and the cursor does not advance, so later turns' masks land one turn too early."""
  tok = char_tokenizer(merges=[('3', '\n')])
  record = dict(RECORD, conversations=[
      {'value': 'Rate it.', 'from': 'User', 'label': None},
      {'value': 'I say 3', 'from': 'Assistant', 'label': 'quality:3'},  # '3\n' twice, no '\n'
      {'value': 'Why?', 'from': 'User', 'label': None},
      {'value': 'Because.', 'from': 'Assistant', 'label': None}])
  ids, mask = chat.encode_chat(record, tok)
  # header 18 = <extra_id_0> System \n 'Be brief.' \n; turns 15, 28 ('quality:3\n' is 9 + 1),
  # 11, 20 tokens; 1 trailing tag. Turn 1 is masked at [33, 61); the cursor stays at 33, so
  # turn 2 masks [34, 44) and turn 3 its name [44, 55), all inside turn 1: everything after
  # turn 1, the user's 'Why?' included, is trained.
  assert len(ids) == 18 + 15 + 28 + 11 + 20 + 1
  assert runs(mask) == [(61, 93)]
  assert trained_text(tok, ids, mask) == [
      '<extra_id_1>User\nWhy?\n<extra_id_1>Assistant\nBecause.\n<extra_id_1>']
  # Without the merge the same record trains the answers where they are.
  plain = char_tokenizer()
  assert trained_text(plain, *chat.encode_chat(record, plain)) == [
      'I say 3\n<extra_id_1>', 'Because.\n<extra_id_1>']


def test_a_header_merged_into_the_first_turn_names_the_formats():
  """A tokenizer without NeMo's tags as special tokens can merge the header's last newline into
  the first turn's tag (SmolLM2's does): NeMo's masks would then be misplaced, so the record is
  refused, naming data.format and the ChatML alternative."""
  with pytest.raises(ValueError, match=r"data\.format='chat'.*data\.format='chatml'"):
    chat.encode_chat(RECORD, char_tokenizer(merges=[('\n', '<')], special=()))
  chat.encode_chat(RECORD, char_tokenizer(special=()))  # the same without the merge


def test_custom_chat_tokens():
  """ChatTokens replace every tag; `mask` picks the masked role."""
  tok = char_tokenizer()
  tokens = chat.ChatTokens(system_turn_start='#S ', turn_start='## ', label_start='@',
                           end_of_turn='|\n', end_of_name=':')
  record = {'system': 'sys', 'mask': 'Q', 'type': 'VALUE_TO_TEXT', 'conversations': [
      {'from': 'Q', 'value': 'a?'}, {'from': 'A', 'value': 'b', 'label': 'L'},
      {'from': 'Q', 'value': 'c?'}, {'from': 'A', 'value': 'd'}]}
  text = chat.render(record, tokens).text
  assert text == '#S System:sys|\n## Q:a?|\n## A:@L:b|\n## Q:c?|\n## A:d|\n## '
  assert trained_text(tok, *chat.encode_chat(record, tok, tokens=tokens)) == [
      'b|\n## ', 'd|\n## ']


@pytest.mark.parametrize('record, match', [
    ({'conversations': []}, "no 'system'"),
    ({'system': 's', 'conversations': []}, 'non-empty list'),
    ({'system': 's', 'type': 'X', 'conversations': [{'from': 'User', 'value': 'a'}]}, 'type'),
    ({'system': 's', 'conversations': [{'from': 'User'}]}, r"conversations\[0\]"),
    ({'system': 's', 'conversations': [{'from': 'Assistant', 'value': 'a'}]}, 'mask role'),
    ({'system': 's', 'conversations': [{'from': 'User', 'value': 'a'}]}, 'no token is trained'),
    ({'system': 's', 'type': 'VALUE_TO_TEXT', 'conversations': [
        {'from': 'User', 'value': 'a'}, {'from': 'Assistant', 'value': 'b', 'label': 3}]},
     'label'),
])
def test_bad_records_raise(record, match):
  """What NeMo asserts on (or crashes on) is a one-line ValueError."""
  with pytest.raises(ValueError, match=match):
    chat.encode_chat(record, char_tokenizer())


def test_plain_format_mistral(mistral):
  """GPTSFTDataset: SentencePiece is not space sensitive, so ' {output}' loses its space;
  values are stripped of spaces; EOS is added and trained with the answer."""
  ids, mask = chat.encode_plain({'input': ' What is 2+2? ', 'output': '4'}, mistral)
  # ▁What ▁is ▁ 2 + 2 ? | ▁ 4 | </s>   (' 4' would be '▁▁' 259, '4')
  assert ids.tolist() == [1824, 349, 28705, 28750, 28806, 28750, 28804, 28705, 28781, 2]
  assert mask.tolist() == [False] * 7 + [True] * 3
  ids, mask = chat.encode_plain({'input': 'a', 'output': 'b'}, mistral, add_bos=True,
                                add_eos=False, add_sep=True, sep_id=5)
  assert ids.tolist() == [1, 264, 5, 287] and mask.tolist() == [False] * 3 + [True]


def test_plain_format_truncation():
  """NeMo's _multiple_truncation: the input field loses the excess first, then whole pieces
  from the end (right truncation), the answer included."""
  tok = char_tokenizer()  # space sensitive: ' {output}' keeps its space
  record = {'input': 'abcdefghij', 'output': 'xyz'}
  ids, mask = chat.encode_plain(record, tok)
  assert tok.decode(ids) == 'abcdefghij xyz</s>' and int(mask.sum()) == 5
  ids, mask = chat.encode_plain(record, tok, max_seq_length=10)
  assert tok.decode(ids) == 'abcde xyz</s>' and mask.tolist() == [False] * 5 + [True] * 5
  ids, _ = chat.encode_plain(record, tok, max_seq_length=10, truncation='left')
  assert tok.decode(ids) == 'fghij xyz</s>'
  ids, mask = chat.encode_plain(record, tok, max_seq_length=3)
  assert tok.decode(ids) == ' x</s>' and mask.all()
  with pytest.raises(ValueError, match='must end with'):
    chat.encode_plain(record, tok, prompt_template='{output} {input}')


def test_to_example_shifts_and_truncates():
  """NeMo's collate per example: inputs [:-1], labels [1:], mask [1:], cut on the right."""
  ids, mask = np.arange(10, 20), np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1], bool)
  ex = chat.to_example(ids, mask, max_seq_length=None)
  assert ex['tokens'].tolist() == list(range(10, 19))
  assert ex['labels'].tolist() == list(range(11, 20))
  assert ex['loss_mask'].tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1]
  assert all(v.dtype == np.int32 for v in ex.values())
  ex = chat.to_example(ids, mask, max_seq_length=4)
  assert ex['tokens'].tolist() == [10, 11, 12, 13] and ex['labels'].tolist() == [11, 12, 13, 14]
  assert ex['loss_mask'].tolist() == [0, 0, 1, 1]
  assert chat.to_example(ids, mask, 4, truncation='left')['tokens'].tolist() == [15, 16, 17, 18]


def test_collate_pads_like_nemo():
  """eos-padded tokens/labels, 0-padded mask, L = min(max_seq_length, ceil8(longest))."""
  a = chat.to_example(np.arange(1, 7), np.ones(6, bool), None)  # 5 tokens
  b = chat.to_example(np.arange(1, 13), np.ones(12, bool), None)  # 11 tokens
  batch = chat.collate([a, b], pad_id=2)
  assert {k: v.shape for k, v in batch.items()} == {k: (2, 16) for k in
                                                    ('tokens', 'labels', 'loss_mask')}
  assert batch['tokens'][0].tolist() == [1, 2, 3, 4, 5] + [2] * 11
  assert batch['labels'][1].tolist() == list(range(2, 13)) + [2] * 5
  assert batch['loss_mask'][0].tolist() == [1] * 5 + [0] * 11
  assert chat.collate([a, b], pad_id=0, max_seq_length=12)['tokens'].shape == (2, 12)
  assert chat.collate([a, b], pad_id=0, max_seq_length=9)['tokens'][1].tolist() == list(
      range(1, 10))
  assert chat.collate([a], pad_id=0, multiple=16)['tokens'].shape == (1, 16)


def test_read_jsonl(tmp_path, mistral):
  """Examples in file order with their index; a bad record names the file and line."""
  path = tmp_path / 'train.jsonl'
  short = dict(RECORD, conversations=RECORD['conversations'][:2])
  path.write_text(json.dumps(RECORD) + '\n\n' + json.dumps(short) + '\n')
  examples = chat.read_jsonl(str(path), mistral, max_seq_length=64)
  assert [e['index'] for e in examples] == [0, 1]
  assert examples[0]['tokens'].tolist() == SP_IDS[:64]
  assert examples[0]['labels'].tolist() == SP_IDS[1:65]
  ex1 = chat.to_example(*chat.encode_chat(short, mistral), 64)
  assert all(np.array_equal(examples[1][k], ex1[k]) for k in ex1)
  path.write_text(json.dumps(RECORD) + '\n' + json.dumps({'system': 's'}) + '\n')
  with pytest.raises(ValueError, match=r'train\.jsonl:2: .*conversations'):
    chat.read_jsonl(str(path), mistral, max_seq_length=64)
  path.write_text('{"input": "a", "output": "b"}\n{not json\n')
  with pytest.raises(ValueError, match=r'train\.jsonl:2: '):
    chat.read_jsonl(str(path), mistral, fmt='plain', max_seq_length=64)
  path.write_text('{"input": "a", "output": "b"}\n["a list"]\n')
  with pytest.raises(ValueError, match=r'train\.jsonl:2: plain record: expected an object'):
    chat.read_jsonl(str(path), mistral, fmt='plain', max_seq_length=64)
  # A lone surrogate escape (valid JSON, half an emoji) was a tokenizer traceback naming no line
  bad = dict(RECORD, conversations=[*RECORD['conversations'][:1],
                                    {'from': 'Assistant', 'value': 'x\ud800y'}])
  plain = {'input': 'a', 'output': 'b'}
  for fmt, good, record in (('chat', RECORD, bad), ('plain', plain, dict(plain, input='a\udfff'))):
    path.write_text(json.dumps(good) + '\n' + json.dumps(record) + '\n')
    with pytest.raises(ValueError, match=r'train\.jsonl:2: a lone surrogate \\ud[8f]'):
      chat.read_jsonl(str(path), mistral, fmt=fmt, max_seq_length=64)
  # OpenAssistant's trees file, given as data: gzip, then unzipped (a "no 'system'" before)
  import gzip
  tree = {'message_tree_id': 'x', 'prompt': {'text': 'hi', 'role': 'prompter', 'replies': []}}
  path.write_bytes(gzip.compress((json.dumps(tree) + '\n').encode()))
  with pytest.raises(ValueError, match=r'train\.jsonl: a gzip file, not JSONL: .*jkd\.data\.oasst'):
    chat.read_jsonl(str(path), mistral, max_seq_length=64)
  path.write_text(json.dumps(tree) + '\n')
  with pytest.raises(ValueError, match=r'train\.jsonl:1: an OpenAssistant message tree, not a '
                     r'chat record: convert .*jkd\.data\.oasst'):
    chat.read_jsonl(str(path), mistral, max_seq_length=64)
  path.write_text(json.dumps(RECORD) + '\n{"system": "s" "conversations": []}\n')
  with pytest.raises(ValueError, match=r"train\.jsonl:2: not a JSON record \(Expecting ',' "
                     r'delimiter at column 16\)$'):  # json's own "line 2 column 1" was its end
    chat.read_jsonl(str(path), mistral, max_seq_length=64)
  path.write_text('{"input": "a", "output": "b"}\n')
  (ex,) = chat.read_jsonl(str(path), mistral, fmt='plain', max_seq_length=64)
  assert ex['tokens'].tolist() == [264, 287] and ex['loss_mask'].tolist() == [1, 1]


CHATML = ['<|im_start|>', '<|im_end|>', '<|endoftext|>']
SMOLLM_SYSTEM = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'


def chatml_record(system, *turns, mask='User') -> dict:
  return {'system': system, 'mask': mask, 'type': 'VALUE_TO_TEXT', 'conversations': [
      {'from': f, 'value': v, 'label': None} for f, v in turns]}


def test_chatml_template_and_mask_by_hand():
  """The ChatML string, one id per character; only answers and their <|im_end|> are trained."""
  tok = char_tokenizer(special=CHATML)
  record = chatml_record('Be brief.', ('User', 'Hi?'), ('Assistant', 'Yo.'), ('User', 'Bye'),
                         ('Assistant', 'Ok'))
  ids, mask = chat.encode_chatml(record, tok)
  text = ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n'
          '<|im_start|>assistant\nYo.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n'
          '<|im_start|>assistant\nOk<|im_end|>\n')
  assert ids.dtype == np.int32 and mask.dtype == bool
  assert ids.tolist() == tok.encode(text) and tok.decode(ids) == text
  first = len(tok.encode(text.split('Yo.')[0]))
  assert runs(mask) == [(first, first + 4), (len(ids) - 4, len(ids) - 1)]  # 'Yo.' + im_end
  assert trained_text(tok, ids, mask) == ['Yo.<|im_end|>', 'Ok<|im_end|>']
  # An empty system emits no system block; `mask` picks the masked role, `from` is lowercased.
  ids, mask = chat.encode_chatml(chatml_record('', ('Q', 'a'), ('Bot', 'b'), mask='Q'), tok)
  assert tok.decode(ids) == ('<|im_start|>q\na<|im_end|>\n<|im_start|>bot\nb<|im_end|>\n')
  assert trained_text(tok, ids, mask) == ['b<|im_end|>']


def test_chatml_header_merge_warns_and_masks_the_merged_token(caplog):
  """A content starting with a newline merges with the header's: warned, that token masked."""
  tok = char_tokenizer(merges=[('\n', '\n')], special=CHATML)
  record = chatml_record('', ('User', 'Hi'), ('Assistant', '\nfoo\n\n'))
  with caplog.at_level(logging.WARNING, logger='jkd.data.chat'):
    ids, mask = chat.encode_chatml(record, tok)
  assert "'assistant' header merges" in caplog.text
  assert tok.decode(ids).endswith('<|im_start|>assistant\n\nfoo\n\n<|im_end|>\n')
  assert trained_text(tok, ids, mask) == ['foo\n\n<|im_end|>']


@pytest.mark.parametrize('record, match', [
    ({'system': 's'}, "no 'conversations'"),
    ({'system': 's', 'conversations': []}, 'non-empty list'),
    ({'system': 's', 'conversations': [{'from': 'User', 'value': 1}]}, r"conversations\[0\]"),
    ({'system': 's', 'conversations': [{'from': 'Assistant', 'value': 'a'}]}, 'mask role'),
    ({'system': 's', 'conversations': [{'from': 'User', 'value': 'a'}]}, 'no token is trained'),
])
def test_chatml_bad_records_raise(record, match):
  """The same record validation as the NeMo template: one-line ValueErrors."""
  with pytest.raises(ValueError, match=match):
    chat.encode_chatml(record, char_tokenizer(special=CHATML))


def test_chatml_needs_the_special_tokens(mistral):
  """A vocabulary without atomic <|im_start|>/<|im_end|> is a clear error, not split text."""
  record = chatml_record('', ('User', 'a'), ('Assistant', 'b'))
  for tok in (char_tokenizer(), mistral):
    with pytest.raises(ValueError, match=r"no special token '<\|im_start\|>'"):
      chat.encode_chatml(record, tok)


def test_read_jsonl_chatml(tmp_path):
  """fmt='chatml' gives encode_chatml's ids through to_example; errors name file and line."""
  tok = char_tokenizer(special=CHATML)
  record = chatml_record('s', ('User', 'q'), ('Assistant', 'a'))
  path = tmp_path / 'val.jsonl'
  path.write_text(json.dumps(record) + '\n')
  (ex,) = chat.read_jsonl(str(path), tok, fmt='chatml', max_seq_length=None)
  want = chat.to_example(*chat.encode_chatml(record, tok), None)
  assert all(np.array_equal(ex[k], want[k]) for k in want) and ex['index'] == 0
  assert tok.decode(ex['labels'][ex['loss_mask'] == 1]) == 'a<|im_end|>'
  path.write_text(json.dumps(record) + '\n' + json.dumps({'system': 's'}) + '\n')
  with pytest.raises(ValueError, match=r"val\.jsonl:2: chat record has no 'conversations'"):
    chat.read_jsonl(str(path), tok, fmt='chatml', max_seq_length=None)
  with pytest.raises(ValueError, match='expected one of chat, chatml, plain'):
    chat.read_jsonl(str(path), tok, fmt='ChatML', max_seq_length=None)


@pytest.fixture(scope='module')
def smollm2_chatml():
  """Our SmolLM2 GGUF tokenizer and transformers' tokenizer of the same file, the latter with
  the digit split of SmolLM2's tokenizer.json restored (transformers' GGUF loader drops it;
  tests/test_tokenizer.py shows both)."""
  from tokenizers import pre_tokenizers
  from transformers import AutoTokenizer
  path = assets.smollm2_gguf(verbose=False)
  ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  return jt.from_gguf(path), ref


CHATML_CONVERSATIONS = [
    [('User', 'Hi! What is 2+2?'), ('Assistant', 'It is 4.'), ('User', 'And 3+3?'),
     ('Assistant', 'Six.')],
    [('User', ' one leading space'), ('Assistant', '\nleading newline'),
     ('User', '\n\n  newlines, spaces'), ('Assistant', '  Grüße 😀 naïve café — “quotes”\n')],
    [('User', 'x ½ y² 7 12345\t'), ('Assistant', ''), ('User', '<b>tag</b>'),
     ('Assistant', 'for (int i = 0; i < n; ++i) {}\n\n')],
    [('Assistant', 'Hello, I start.'), ('User', 'ok'), ('Assistant', '日本語のテキスト。')],
]


@pytest.mark.slow
@pytest.mark.parametrize('system', [SMOLLM_SYSTEM, 'Be brief.\n'])
@pytest.mark.parametrize('turns', CHATML_CONVERSATIONS)
def test_chatml_matches_apply_chat_template_smollm2(smollm2_chatml, system, turns, caplog):
  """Ids equal HF's apply_chat_template on the real SmolLM2 vocabulary; trained tokens decode
  to each answer + <|im_end|> (less a leading whitespace token merged into the header, which
  is warned about). The GGUF's template has no {% generation %} tags, so HF cannot give the
  assistant mask: it is checked by construction."""
  tok, ref = smollm2_chatml
  assert '{% generation %}' not in ref.chat_template
  messages = [{'role': 'system', 'content': system}] + [
      {'role': f.lower(), 'content': v} for f, v in turns]
  want = ref.apply_chat_template(messages, tokenize=True)['input_ids']
  with caplog.at_level(logging.WARNING, logger='jkd.data.chat'):
    ids, mask = chat.encode_chatml(chatml_record(system, *turns), tok)
  assert ids.tolist() == list(want)
  answers = [v + '<|im_end|>' for f, v in turns if f == 'Assistant']
  got = trained_text(tok, ids, mask)
  assert len(got) == len(answers)
  for run, answer in zip(got, answers):
    if run != answer:  # only a merged header newline may cut the answer's leading whitespace
      assert answer.endswith(run) and not answer[:len(answer) - len(run)].strip()
      assert "'assistant' header merges" in caplog.text
  assert tok.decode(ids[~mask]).count('<|im_end|>') == len(turns) + 1 - len(answers)


@pytest.mark.slow
@pytest.mark.parametrize('turns', [[('User', 'Hi! What is 2+2?')],
                                   [('User', 'a'), ('Assistant', 'b'), ('User', 'c ½')]])
def test_chatml_generation_prompt_matches_hf(smollm2_chatml, turns):
  tok, ref = smollm2_chatml
  messages = [{'role': 'system', 'content': SMOLLM_SYSTEM}] + [
      {'role': f.lower(), 'content': v} for f, v in turns]
  want = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  got = chat.generation_prompt(chatml_record(SMOLLM_SYSTEM, *turns), tok, fmt='chatml')
  assert got == list(want['input_ids'])
  assert chat.end_of_turn_id(tok, fmt='chatml') == tok.token_to_id('<|im_end|>')


def test_nemo_generation_prompt_ends_with_the_assistant_header(mistral):
  record = {'system': 'S', 'mask': 'User', 'conversations': [{'from': 'User', 'value': 'hi'}]}
  ids = chat.generation_prompt(record, mistral, fmt='chat')
  assert mistral.decode(ids).endswith('hi\n<extra_id_1>Assistant\n')
  with pytest.raises(ValueError, match="format 'plain' has no chat turns"):
    chat.generation_prompt(record, mistral, fmt='plain')


def test_end_of_turn_is_the_single_turn_start_piece_of_a_sentencepiece_model():
  """NeMo's SentencePiece vocabularies hold <extra_id_1> as one piece; encoded alone it gets a
  leading '▁' piece, mid-string (where a reply meets it) it is that one id."""
  import io

  import sentencepiece as spm
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(['the assistant answers the user', 'hello world'] * 50),
      model_writer=out, vocab_size=300, model_type='bpe', byte_fallback=True,
      user_defined_symbols=SPECIAL[:3], minloglevel=2)
  tok = jt._sentencepiece(out.getvalue())
  turn_start = tok.token_to_id('<extra_id_1>')
  assert len(tok.encode('<extra_id_1>')) == 2  # '▁', '<extra_id_1>': what the lookup must skip
  assert chat.end_of_turn_id(tok, fmt='chat') == turn_start != tok.eos_id
  ids, keep = chat.encode_chat({'system': 's', 'mask': 'User', 'conversations': [
      {'from': 'User', 'value': 'hello'}, {'from': 'Assistant', 'value': 'world'}]}, tok)
  assert ids[-1] == turn_start and keep[-1]  # the trained token that closes an answer
  no_turn_piece = char_tokenizer(special=[t for t in SPECIAL if t != '<extra_id_1>'])
  assert chat.end_of_turn_id(no_turn_piece, fmt='chat') == no_turn_piece.eos_id
