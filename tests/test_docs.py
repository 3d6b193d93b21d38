"""The command lines the docs show parse: every `python -m jkd.main ...` line in the README,
docs/, scripts/README.md and the docstrings of configs/ and jkd/ loads its config file (with its
`:arg`) and applies its overrides as jkd.main does, and the result has every key of
configs/base.py with its declared type (jkd.config.check_keys). What a line does past parsing
(its paths, a device count) is the modes' own tests' business."""

import os
import re
import shlex
import subprocess

import pytest
from absl import flags
from ml_collections import config_flags

from jkd import config as jkd_config
from jkd import main

# ml_collections loads a config file with importlib's load_module, as the CLI does.
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The files that show commands to a reader (the tests' own command lines are run by them).
_SOURCES = ('README.md', 'docs/*.md', 'scripts/README.md', 'configs/*.py', 'jkd/*.py',
            'jkd/*/*.py')


def _commands():
  """(file:line, jkd.main's arguments) of each command: continuation lines joined, a trailing
  `# comment` dropped, a command inside backquotes cut at the closing one."""
  files = subprocess.run(['git', 'ls-files', '--', *_SOURCES], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split()
  found = []
  for path in files:
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      lines = f.read().splitlines()
    for n, line in enumerate(lines):
      start = line.find('python -m jkd.main --config')
      if start < 0:
        continue
      text, more = line[start:], n
      while text.rstrip().endswith('\\'):
        more += 1
        text = text.rstrip()[:-1] + ' ' + lines[more].strip()
      argv = shlex.split(text.split('`')[0].split(' # ')[0])[3:]  # after `python -m jkd.main`
      if re.fullmatch(r'configs/[a-z0-9_]+\.py(:\w+)?', argv[1]):  # no placeholder (configs/X.py)
        found.append((f'{path}:{n + 1}', argv))
  return found


COMMANDS = _commands()


def test_the_docs_show_commands():
  """The collector finds what it should: the README's lines and the tutorial config's."""
  where = [w.split(':')[0] for w, _ in COMMANDS]
  assert where.count('README.md') >= 8 and 'configs/nemotron8b_gpt2b.py' in where, where


@pytest.mark.parametrize('argv', [a for _, a in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(argv, monkeypatch):
  monkeypatch.chdir(REPO)  # the docs' config paths are relative to the repository root
  rest, none_keys = main.split_none(argv)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                  sys_argv=['jkd', *rest])
  values(['jkd', *rest])
  config = values['config'].value
  main.set_none(config, none_keys)
  jkd_config.check_keys(config)
  assert config.mode in main._MODES or config.mode == '...', config.mode


def test_none_overrides_split_as_the_cli_applies_them():
  rest, keys = main.split_none(['--config', 'c.py', '--config.distill.top_k=None',
                                '--config.a=None', '--config.a=3', '--config.b=x'])
  assert rest == ['--config', 'c.py', '--config.a=3', '--config.b=x']
  assert keys == ['distill.top_k']  # a's later override wins
