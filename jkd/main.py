"""Entry point: python -m jkd.main --config configs/X.py[:arg] [--config.a.b=value ...]

Parses flags, joins the other processes of a multi-process run (jkd.distributed, before the
backend starts), logs the process and its devices, validates the config and dispatches on
`config.mode`. Expected errors (bad config, bad input files) end with one line naming the
key or file and a non-zero exit; set JKD_TRACEBACK=1 to see the full traceback instead.
"""

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jkd import config as jkd_config
from jkd import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)

# mode -> module with run(config)
_MODES = {'pipeline': 'jkd.pipeline', 'convert': 'jkd.convert', 'extract': 'jkd.extract',
          'train': 'jkd.train_loop', 'export': 'jkd.export'}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # orbax logs every file at INFO
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config configs/smoke.py')
  try:
    distributed.initialize(config)  # before anything starts the backend (validate does)
    jkd_config.validate(config)
    import jax
    print(f'[jkd] mode={config.mode} process {jax.process_index()}/{jax.process_count()}, '
          f'{jax.device_count()} {jax.devices()[0].platform} devices')
    importlib.import_module(_MODES[config.mode]).run(config)
  except (ValueError, FileNotFoundError, PermissionError, OSError, ImportError,
          FloatingPointError) as e:
    if os.environ.get('JKD_TRACEBACK'):
      raise
    print(f'jkd: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
