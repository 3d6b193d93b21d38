"""Entry point: python -m jkd.main --config configs/X.py[:arg] [--config.a.b=value ...]

Parses flags, joins the other processes of a multi-process run (jkd.distributed, before the
backend starts), logs the process and its devices, validates the config and dispatches on
`config.mode`. Expected errors (bad config, bad input files) end with one line naming the
key or file and a non-zero exit; set JKD_TRACEBACK=1 to see the full traceback instead. So
does Ctrl-C (after a clean stop of training or extraction, its line says where it stopped).
"""

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jkd import config as jkd_config
from jkd import distributed

# Expected failures (bad config, bad input files, a full disk): one line, exit 2, no traceback.
# FileNotFoundError and PermissionError are OSErrors; UnicodeDecodeError is a ValueError.
ERRORS = (ValueError, OSError, ImportError, FloatingPointError)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)

# `--config.KEY=None` overrides (split_none), applied after parsing (set_none).
_NONE_KEYS: list[str] = []

# mode -> module with run(config)
_MODES = {'pipeline': 'jkd.pipeline', 'convert': 'jkd.convert', 'extract': 'jkd.extract',
          'train': 'jkd.train_loop', 'eval': 'jkd.evaluate', 'export': 'jkd.export'}


def _fail(message: str):
  print(error_line(ValueError(message)), file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {" ".join(argv[1:])} (settings go in as --config.KEY=VALUE)')
  if not flags.FLAGS['verbosity'].present:  # orbax logs every file at INFO
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    _fail('--config is required, e.g. --config configs/smoke.py')
  set_none(config, _NONE_KEYS)
  try:
    jkd_config.check_keys(config)  # a config lacking `distributed` fails here, not below
    jkd_config.check_processes(config)  # a one-process mode not joined as several first
    distributed.initialize(config)  # before anything starts the backend (validate does)
    jkd_config.validate(config)
    import jax
    print(f'[jkd] mode={config.mode} process {jax.process_index()}/{jax.process_count()}, '
          f'{jax.device_count()} {jax.devices()[0].platform} devices')
    importlib.import_module(_MODES[config.mode]).run(config)
  except ERRORS as e:
    if os.environ.get('JKD_TRACEBACK'):
      raise
    print(error_line(e), file=sys.stderr)
    sys.exit(2)


def error_line(e: BaseException) -> str:
  """'jkd: error: <file>: <problem>' on one line (an OSError of the system names its file)."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    files = e.filename if e.filename2 is None else f'{e.filename} -> {e.filename2}'
    msg = f'{files}: {e.strerror}'
  else:
    msg = str(e)
  return 'jkd: error: ' + ' '.join(msg.splitlines())


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag or a config file that fails to load (a syntax error,
  an exception in get_config) as one line and exit 2, not absl's two lines or a traceback."""
  for i, arg in enumerate(argv):  # a missing config file, before ml_collections words it
    path = arg.partition('=')[2] if arg.startswith('--config=') else (
        argv[i + 1] if arg == '--config' and i + 1 < len(argv) else '')
    if path and not os.path.isfile(path.split(':')[0]):
      _fail(f'{path.split(":")[0]}: no such config file (--config)')
    folder = os.path.dirname(os.path.abspath(path.split(':')[0])) if path else ''
    if os.path.basename(folder) == 'configs' and os.path.isfile(os.path.join(folder, 'base.py')):
      sys.path.insert(0, os.path.dirname(folder))  # its `import configs.base`, from anywhere
    elif path and os.path.isfile(jkd_config.BASE_CONFIG):  # a file of the user's own: jkd's
      sys.path.append(os.path.dirname(os.path.dirname(jkd_config.BASE_CONFIG)))  # configs
  given = argv
  argv, none_keys = split_none(argv)
  _NONE_KEYS.extend(none_keys)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flags.Error, or what loading the config file raised
    if os.environ.get('JKD_TRACEBACK'):
      raise
    while e.args and isinstance(e.args[0], BaseException):  # ConfigDict wraps its KeyError
      e = e.args[0]
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # KeyError str is a repr
    if isinstance(e, KeyError):  # an override of a key the config lacks: name the flag
      name = str(msg).splitlines()[0].strip("'\"")
      flag = [a.partition('=')[0] for a in given if a.startswith('--config.')
              and name in a.partition('=')[0].split('.')]
      msg = f'{flag[0] if flag else "--config"}: unknown key {msg}'
    head, tb, rest = msg.partition('Traceback (most recent call last):')
    if tb:  # config_flags quotes the config file's traceback: keep its last line
      msg = f'{head.strip()} {rest.strip().splitlines()[-1]}'
    print(error_line(ValueError(msg if isinstance(e, (flags.Error, KeyError))
                                else f'--config: {msg}')), file=sys.stderr)
    sys.exit(2)


def split_none(argv: list[str]) -> tuple[list[str], list[str]]:
  """argv without its `--config.KEY=None` overrides, and the keys they reset (in order; one
  that a later override of the same key replaces is dropped). ml_collections would parse 'None'
  as the key's type: an int placeholder fails, a str one becomes 'None'."""
  keys, rest = [], []
  for i, arg in enumerate(argv):
    key, eq, value = arg.removeprefix('--config.').partition('=')
    if not (arg.startswith('--config.') and eq and value == 'None'):
      rest.append(arg)
    elif key not in [a.removeprefix('--config.').partition('=')[0] for a in argv[i + 1:]]:
      keys.append(key)
  return rest, keys


def set_none(config, keys: list[str]) -> None:
  """Sets each dotted key of `keys` to None (check_keys then refuses it unless the key is a
  placeholder); the keys exist: ml_collections read their names off argv."""
  for key in keys:
    *parents, name = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[name] = None


def _excepthook(kind, value, tb):
  """Ctrl-C (KeyboardInterrupt) ends the CLI with one line instead of a traceback; Python then
  ends the process by SIGINT, as on any Ctrl-C, so that a calling shell script stops too."""
  if not issubclass(kind, KeyboardInterrupt) or os.environ.get('JKD_TRACEBACK'):
    sys.__excepthook__(kind, value, tb)
  elif value.args != (distributed.STOPPED,):  # a clean stop has said where it stopped
    print('jkd: interrupted (Ctrl-C)', file=sys.stderr)


if __name__ == '__main__':
  sys.excepthook = _excepthook
  app.run(main, flags_parser=_parse_flags)
