"""OASST trees and chatterbot YAML -> NeMo chat JSONL (jkd.data.oasst), on hand-made files."""

import gzip
import json
import logging
import random

import pytest

from jkd import assets
from jkd import tokenizer as jt
from jkd.data import chat, oasst
from tests.test_data_chat import char_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def labels(**values) -> dict:
  """OASST's per-message label averages: {name: {value, count}}."""
  return {k: {'value': v, 'count': 3} for k, v in values.items()}


def message(mid, role, text, replies=(), lab=None) -> dict:
  """A message node with the fields of the real export (oasst_data ExportMessageNode)."""
  node = {'message_id': mid, 'parent_id': None, 'user_id': 'u-' + mid, 'created_date':
          '2023-02-05T14:23:50.983374+00:00', 'text': text, 'role': role, 'lang': 'en',
          'review_count': 3, 'review_result': True, 'deleted': False, 'rank': 0,
          'synthetic': False, 'model_name': None, 'detoxify': None,
          'emojis': {'+1': 2}, 'replies': list(replies)}
  for r in node['replies']:
    r['parent_id'] = mid
  if lab is not None:
    node['labels'] = lab
  return node


def tree(prompt) -> dict:
  return {'message_tree_id': prompt['message_id'], 'tree_state': 'ready_for_export',
          'prompt': prompt, 'origin': None}


def branching_tree() -> dict:
  """P1 -> A1 -> {P2 -> {A2, A3}, P3}, P1 -> A4: four root-to-leaf paths, one ending on User."""
  a2 = message('a2', 'assistant', 'A2', lab=labels(quality=0.5, spam=0.0))
  a3 = message('a3', 'assistant', 'A3')  # no labels at all
  p2 = message('p2', 'prompter', 'P2', [a2, a3], lab=labels(spam=0.0))
  p3 = message('p3', 'prompter', 'P3 Grüße 😀')
  # 0.125*4 = 0.5 and 0.625*4 = 2.5 round half to even; 0.375*4 = 1.5 rounds up to 2.
  a1 = message('a1', 'assistant', 'A1', [p2, p3],
               lab=labels(creativity=0.375, humor=0.625, toxicity=0.125, quality=0.75,
                          violence=0.9))
  a4 = message('a4', 'assistant', 'A4', lab=labels(spam=0.0, lang_mismatch=0.0))
  return tree(message('p1', 'prompter', 'P1', [a1, a4], lab=labels(quality=1.0)))


def write_trees(path, trees):
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wt', encoding='utf-8') as f:
    for t in trees:
      f.write(json.dumps(t) + '\n')


def read(path) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_branching_tree_paths_roles_and_labels():
  """Every root-to-leaf path in depth-first order; User labels null; SteerLM label strings."""
  records = oasst.records_from_trees([branching_tree()])
  convs = [[(t['from'], t['value'], t.get('label', 'ABSENT')) for t in r['conversations']]
           for r in records]
  u1 = ('User', 'P1', None)
  a1 = ('Assistant', 'A1', 'quality:3,toxicity:0,humor:2,creativity:2')
  assert convs == [
      [u1, a1, ('User', 'P2', None), ('Assistant', 'A2', 'quality:2')],
      [u1, a1, ('User', 'P2', None), ('Assistant', 'A3', 'ABSENT')],
      [u1, a1, ('User', 'P3 Grüße 😀', None)],
      [u1, ('Assistant', 'A4', '')]]
  assert all(r['system'] == SYSTEM and r['mask'] == 'User' and r['type'] == 'VALUE_TO_TEXT'
             for r in records)


def test_single_turn_trees_are_dropped():
  """Paths of one turn (a prompt nobody answered) give no record."""
  lone = tree(message('q', 'prompter', 'alone'))
  pair = tree(message('q2', 'prompter', 'Q', [message('a', 'assistant', 'A')]))
  assert oasst.records_from_trees([lone]) == []
  assert [len(r['conversations']) for r in oasst.records_from_trees([lone, pair])] == [2]


def test_convert_trees_exact_lines(tmp_path):
  """Key order, json.dumps spacing and ensure_ascii=False as NeMo-Aligner writes them."""
  src = tmp_path / '2023-04-12_oasst_all.trees.jsonl.gz'
  write_trees(src, [branching_tree()])
  assert oasst.convert_trees(str(src), str(tmp_path / 'out'), train_fraction=1.0) == (4, 0)
  lines = (tmp_path / 'out' / 'train.jsonl').read_text(encoding='utf-8').splitlines()
  assert (tmp_path / 'out' / 'val.jsonl').read_text() == ''
  sys_json = json.dumps(SYSTEM)
  assert lines[2] == (
      '{"conversations": [{"value": "P1", "from": "User", "label": null}, '
      '{"value": "A1", "from": "Assistant", "label": "quality:3,toxicity:0,humor:2,creativity:2"}, '
      '{"value": "P3 Grüße 😀", "from": "User", "label": null}], '
      f'"system": {sys_json}, "mask": "User", "type": "VALUE_TO_TEXT"}}')
  assert '{"value": "A3", "from": "Assistant"}]' in lines[1]


def test_split_is_seed_10_shuffle_of_trees(tmp_path):
  """Trees (not paths) are shuffled as random.seed(10); random.shuffle and cut at int(0.95 n);
  all paths of a tree stay in one split."""
  trees = [tree(message(f'q{i}', 'prompter', f'q{i}', [message(f'a{i}', 'assistant', 'A')]))
           for i in range(40)]
  trees[7] = branching_tree()  # 4 paths
  src = tmp_path / 'trees.jsonl'
  write_trees(src, trees)
  n_train, n_val = oasst.convert_trees(str(src), str(tmp_path))
  order = list(range(40))
  random.seed(10)
  random.shuffle(order)
  firsts = ['P1' if i == 7 else f'q{i}' for i in order]
  got = [r['conversations'][0]['value'] for r in read(tmp_path / 'train.jsonl')]
  want_train = [f for f in firsts[:38] for _ in range(4 if f == 'P1' else 1)]
  assert got == want_train
  assert [r['conversations'][0]['value'] for r in read(tmp_path / 'val.jsonl')] == firsts[38:]
  assert (n_train, n_val) == (len(want_train), 2) == (41, 2)


def test_records_encode_with_chat_template():
  """A converted record goes through encode_chat: the label line is masked, answers trained."""
  tok = char_tokenizer()
  rec = oasst.records_from_trees([branching_tree()])[0]
  ids, mask = chat.encode_chat(rec, tok)
  assert '<extra_id_2>quality:3,toxicity:0,humor:2,creativity:2\nA1\n' in tok.decode(ids)
  runs = tok.decode(ids[mask])
  assert runs == 'A1\n<extra_id_1>A2\n<extra_id_1>'


def test_bad_trees_file_names_the_line(tmp_path):
  """Broken JSON or a label without a value: an error naming file and line."""
  src = tmp_path / 't.jsonl'
  src.write_text(json.dumps(branching_tree()) + '\n{oops\n')
  with pytest.raises(ValueError, match=r't\.jsonl:2: invalid JSON'):
    oasst.convert_trees(str(src), str(tmp_path / 'o'))
  bad = branching_tree()
  bad['prompt']['replies'][0]['labels']['quality'] = {'value': None, 'count': 0}
  src.write_text('\n' + json.dumps(bad) + '\n')
  with pytest.raises(ValueError, match=r't\.jsonl:2: labels\.quality\.value'):
    oasst.convert_trees(str(src), str(tmp_path / 'o'))



def test_trees_that_are_not_text_or_give_nothing_are_refused(tmp_path):
  """A lone surrogate escape ("\\ud83d", valid JSON: half an emoji a tool cut) failed at the
  write with no file named, after train.jsonl was written, leaving val.jsonl.part; a file of
  flat messages (the *.messages.jsonl of the same release) wrote two empty files and exit 0."""
  bad = branching_tree()
  bad['prompt']['replies'][1]['text'] = 'x\ud83dy'
  src = tmp_path / 't.jsonl'
  src.write_text(json.dumps(branching_tree()) + '\n' + json.dumps(bad) + '\n')
  assert '\\ud83d' in src.read_text()
  with pytest.raises(ValueError, match=r"t\.jsonl:2: a lone surrogate \\ud83d after '.*x'"):
    oasst.convert_trees(str(src), str(tmp_path / 'o'))
  assert not (tmp_path / 'o').exists()
  flat = tmp_path / 'messages.jsonl'
  flat.write_text(''.join(json.dumps({k: v for k, v in message(f'm{i}', 'prompter', 'hi').items()
                                      if k != 'replies'}) + '\n' for i in range(3)))
  with pytest.raises(ValueError, match=r'messages\.jsonl: no message tree with a reply'):
    oasst.convert_trees(str(flat), str(tmp_path / 'o'))
  assert oasst.main([str(flat), str(tmp_path / 'o')]) == 2 and not (tmp_path / 'o').exists()
  with pytest.raises(ValueError, match='no conversation of two or more lines'):
    (tmp_path / 'one.yml').write_text('conversations:\n- - Lonely line\n')
    oasst.convert_chatterbot(str(tmp_path / 'one.yml'), str(tmp_path / 'o'))
  (tmp_path / 'cut.yml').write_text('conversations:\n- - Hi\n  - There\n- - "x\\ud83dy"\n  - ok\n')
  with pytest.raises(ValueError, match=r"cut\.yml: conversations\[1\]: a lone surrogate \\ud83d"):
    oasst.convert_chatterbot(str(tmp_path / 'cut.yml'), str(tmp_path / 'o'))
  assert not (tmp_path / 'o').exists()


def test_a_failed_write_leaves_no_part_file(tmp_path):
  """A write that fails halfway removes its .part (it was left beside the outputs)."""
  with pytest.raises(TypeError):
    oasst.write_jsonl(str(tmp_path / 'x.jsonl'), [{'a': 1}, {'b': object()}])
  assert list(tmp_path.iterdir()) == []


def test_unreadable_files_are_one_error_naming_the_file(tmp_path, capsys):
  """A cut download, a .gz that is not gzip and non-UTF-8 text (trees or chatterbot YAML):
  one ValueError naming the file, and exit 2 from the command line."""
  whole = tmp_path / 'trees.jsonl.gz'
  write_trees(whole, [branching_tree()] * 50)
  cut = tmp_path / 'cut.jsonl.gz'
  cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
  with pytest.raises(ValueError, match=r'cut\.jsonl\.gz: a cut or corrupt gzip file'):
    oasst.read_trees(str(cut))
  fake = tmp_path / 'fake.jsonl.gz'
  fake.write_text('{}\n')
  with pytest.raises(ValueError, match=r'fake\.jsonl\.gz: a cut or corrupt gzip file'):
    oasst.read_trees(str(fake))
  latin = tmp_path / 'latin.jsonl'
  latin.write_bytes(b'{"caf\xe9": 1}\n')
  with pytest.raises(ValueError, match=r'latin\.jsonl: not UTF-8 text'):
    oasst.read_trees(str(latin))
  yml = tmp_path / 'latin.yml'
  yml.write_bytes(b'conversations:\n- - caf\xe9\n  - ok\n')
  with pytest.raises(ValueError, match=r'latin\.yml: not UTF-8 text'):
    oasst.read_chatterbot(str(yml))
  assert oasst.main([str(cut), str(tmp_path / 'out')]) == 2
  capsys.readouterr()
  assert oasst.main([str(tmp_path / 'absent.jsonl'), str(tmp_path / 'out')]) == 2
  assert capsys.readouterr().err == (f'jkd: error: {tmp_path}/absent.jsonl: No such file or '
                                     'directory\n')  # was "[Errno 2] No such file ...: '...'"
  (tmp_path / 'bad.yml').write_text('conversations: [\n - a: b\n')
  assert oasst.main([str(tmp_path / 'bad.yml'), str(tmp_path / 'out')]) == 2
  assert len(capsys.readouterr().err.splitlines()) == 1  # YAML's error is three lines
  assert oasst.main(['--help']) == 0 and 'usage:' in capsys.readouterr().out


CHATTERBOT = """categories:
- greetings
conversations:
- - Hello
  - Hi
- - Are you a robot?
  - Yes
  - Cool.
- - Lonely line
"""


def test_convert_chatterbot(tmp_path):
  """User/Assistant alternate, labels null, strings kept as written, one-line ones dropped,
  conversations shuffled with seed 10 and cut at int(0.95 n)."""
  corpus = tmp_path / 'corpus' / 'english'
  corpus.mkdir(parents=True)
  (corpus / 'a.yml').write_text(CHATTERBOT)
  more = '\n'.join(f'- - question {i}\n  - answer {i}' for i in range(37))
  (corpus / 'b.yml').write_text('categories:\n- x\nconversations:\n' + more + '\n')
  n_train, n_val = oasst.convert_chatterbot(str(tmp_path / 'corpus'), str(tmp_path / 'out'))
  convs = oasst.read_chatterbot([str(corpus / 'a.yml'), str(corpus / 'b.yml')])
  assert len(convs) == 40 and convs[1] == ['Are you a robot?', 'Yes', 'Cool.']
  order = list(range(40))
  random.Random(10).shuffle(order)
  keep = lambda idx: [i for i in idx if len(convs[i]) > 1]  # noqa: E731
  assert (n_train, n_val) == (len(keep(order[:38])), len(keep(order[38:])))
  train = read(tmp_path / 'out' / 'train.jsonl') + read(tmp_path / 'out' / 'val.jsonl')
  assert [r['conversations'][0]['value'] for r in train] == [convs[i][0] for i in
                                                             keep(order)]
  robot = next(r for r in train if r['conversations'][0]['value'] == 'Are you a robot?')
  assert robot == {'conversations': [
      {'value': 'Are you a robot?', 'from': 'User', 'label': None},
      {'value': 'Yes', 'from': 'Assistant', 'label': None},
      {'value': 'Cool.', 'from': 'User', 'label': None}],
      'system': SYSTEM, 'mask': 'User', 'type': 'VALUE_TO_TEXT'}
  assert '<extra_id_2>' not in chat.render(robot).text


def test_real_chatterbot_file_and_main(tmp_path, capsys):
  """The real corpus file parses, every record encodes, and `python -m jkd.data.oasst` works."""
  path = assets.fetch_wheel_member('chatterbot-corpus==1.3.3',
                                   'chatterbot_corpus/data/english/conversations.yml',
                                   verbose=False)
  assert oasst.main([path, str(tmp_path)]) == 0
  assert 'train.jsonl' in capsys.readouterr().out
  records = read(tmp_path / 'train.jsonl') + read(tmp_path / 'val.jsonl')
  assert len(records) > 10
  with open(assets.mistral_sentencepiece(verbose=False), 'rb') as f:
    tok = jt.Tokenizer('sentencepiece', {'tokenizer.model': f.read()}, bos_id=1, eos_id=2,
                       pad_id=None)
  for r in records:
    ids, mask = chat.encode_chat(r, tok)
    assert mask.any() and tok.decode(ids).startswith('<extra_id_0>System\n')
  assert oasst.main([str(tmp_path / 'missing.yml'), str(tmp_path)]) == 2


def test_chatterbot_skips_malformed_entries_with_one_warning(tmp_path, caplog):
  """Entries that are not lists of strings (as in the real trivia.yml) are skipped with one
  warning naming the file, count and first index; a file without a conversations list still
  raises."""
  path = tmp_path / 'trivia.yml'
  path.write_text(CHATTERBOT + '- A bare string - 22\n- - ok\n  - fine\n- {a: b}\n')
  with caplog.at_level(logging.WARNING, logger='jkd.data.oasst'):
    convs = oasst.read_chatterbot(str(path))
  assert convs == [['Hello', 'Hi'], ['Are you a robot?', 'Yes', 'Cool.'], ['Lonely line'],
                   ['ok', 'fine']]
  (warning,) = [r for r in caplog.records if r.name == 'jkd.data.oasst']
  assert 'trivia.yml: skipped 2 conversation(s)' in warning.getMessage()
  assert 'conversations[3]' in warning.getMessage()
  path.write_text('conversations: 3\n')
  with pytest.raises(ValueError, match='trivia.yml: expected a mapping with a conversations'):
    oasst.read_chatterbot(str(path))


def test_chatterbot_drops_repeats_before_the_split(tmp_path):
  """Conversations repeated (up to whitespace around lines) are written once, first occurrence
  kept, so train and val never share one; counts are of unique multi-line conversations."""
  unique = [[f'question {i}', f'answer {i}'] for i in range(30)]
  repeats = [[f' question {i}', f'answer {i}  '] for i in range(0, 30, 3)] * 3
  body = '\n'.join(f'- - {json.dumps(a)}\n  - {json.dumps(b)}' for a, b in unique + repeats)
  (tmp_path / 'tech_support.yml').write_text('conversations:\n' + body + '\n')
  n_train, n_val = oasst.convert_chatterbot(str(tmp_path / 'tech_support.yml'),
                                            str(tmp_path / 'out'), train_fraction=0.8,
                                            system='Be brief.')
  assert (n_train, n_val) == (24, 6)
  train, val = (read(tmp_path / 'out' / f'{s}.jsonl') for s in ('train', 'val'))
  assert {r['system'] for r in train + val} == {'Be brief.'}
  key = lambda r: tuple(t['value'].strip() for t in r['conversations'])  # noqa: E731
  assert sorted(map(key, train + val)) == sorted(map(tuple, unique))
  assert not set(map(key, train)) & set(map(key, val))
  assert all(r['conversations'][0]['value'] == r['conversations'][0]['value'].strip()
             for r in train + val)  # the first occurrences, not the padded repeats


def test_real_chatterbot_english_corpus(tmp_path):
  """The whole real English corpus converts (one malformed trivia entry skipped, tech_support's
  repeats dropped) into disjoint splits of unique conversations."""
  n_train, n_val = oasst.convert_chatterbot(assets.chatterbot_english(verbose=False),
                                            str(tmp_path))
  train, val = (read(tmp_path / f'{s}.jsonl') for s in ('train', 'val'))
  assert (len(train), len(val)) == (n_train, n_val) and n_train > 10 * n_val > 0
  key = lambda r: tuple(t['value'].strip() for t in r['conversations'])  # noqa: E731
  keys = [key(r) for r in train + val]
  assert len(set(keys)) == len(keys)
  assert all(len(r['conversations']) > 1 for r in train + val)
