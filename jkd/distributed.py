"""Multi-process runs on JAX's own runtime: when and how to call `jax.distributed.initialize`.

One process per host (all its accelerators), every process running the same command. The
`distributed` config keys, or the environment variables launchers set (scripts/gcp/launch.sh,
scripts/slurm/run_jkd.sh), name the coordinator and this process; `distributed.auto=True`
leaves the unset ones to JAX's cluster detection (Cloud TPU, Slurm, Open MPI). Nothing set
means one process, and nothing is initialized. docs/multihost.md has the whole story.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS', 'num_processes': 'JAX_NUM_PROCESSES',
       'process_id': 'JAX_PROCESS_ID', 'local_device_ids': 'JAX_LOCAL_DEVICE_IDS'}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Arguments of jax.distributed.initialize; None = unset (JAX detects it when `auto`)."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None
  auto: bool
  initialization_timeout: int


def _int(value, key: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{key}={value!r}: not an integer') from None


def settings(config, environ=None) -> Settings | None:
  """The config's `distributed` section, each unset key from its environment variable; None
  when this is a single-process run. ValueError naming the key (or variable) when incomplete."""
  d, environ = config.distributed, os.environ if environ is None else environ
  where = {}  # key -> 'distributed.key' or the environment variable it came from

  def pick(key, unset):
    value = d[key]
    where[key] = f'distributed.{key}'
    if value == unset and environ.get(ENV[key], ''):
      value, where[key] = environ[ENV[key]], ENV[key]
    return None if value == unset else value

  address = pick('coordinator_address', '')
  num = pick('num_processes', -1)
  pid = pick('process_id', -1)
  ids = pick('local_device_ids', '')
  num = None if num is None else _int(num, where['num_processes'])
  pid = None if pid is None else _int(pid, where['process_id'])
  if ids is not None:
    ids = tuple(_int(i, where['local_device_ids']) for i in str(ids).split(',') if i.strip())
  if d.initialization_timeout <= 0:
    raise ValueError(f'distributed.initialization_timeout={d.initialization_timeout}: must be '
                     'positive (seconds)')
  if num is not None and num < 1:
    raise ValueError(f'{where["num_processes"]}={num}: must be >= 1')
  if pid is not None and (pid < 0 or (num is not None and pid >= num)):
    raise ValueError(f'{where["process_id"]}={pid}: must be in [0, num_processes={num})')
  if address is not None and ':' not in address:
    raise ValueError(f'{where["coordinator_address"]}={address!r}: expected HOST:PORT')
  s = Settings(address, num, pid, ids, bool(d.auto), int(d.initialization_timeout))
  if d.auto:
    return s
  if address is None and num is None and pid is None:
    return None  # nothing asks for more than one process
  if num == 1 and pid in (None, 0):
    return None  # one process needs no coordinator
  for key, value in (('coordinator_address', address), ('num_processes', num),
                     ('process_id', pid)):
    if value is None:
      raise ValueError(f'distributed.{key} is unset (nor is ${ENV[key]}): a multi-process run '
                       'needs coordinator_address, num_processes and process_id, or '
                       'distributed.auto=True to let JAX detect the cluster')
  return s


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once HOST:PORT accepts a TCP connection (process 0's coordinator is up); a
  ValueError naming the address when nothing answers within `timeout_s`. JAX's own wait ends
  in a fatal abort of the process (a C++ check), which no Python handler can turn into a line."""
  host, port = address.rsplit(':', 1)
  host = host.strip('[]')  # an IPv6 literal
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
        return
    except (OSError, ValueError) as e:
      if time.monotonic() >= deadline:
        raise ValueError(f'coordinator {address}: nothing answered within {timeout_s:g} s '
                         f'({e}); start process 0 there first, or check the address and port '
                         '(distributed.coordinator_address, distributed.initialization_timeout)'
                         ) from None
    time.sleep(0.5)


def initialize(config) -> Settings | None:
  """Calls jax.distributed.initialize when the config or environment asks for several
  processes; must run before anything touches the JAX backend (jax.devices() included)."""
  s = settings(config)
  if s is None:
    return None
  if s.process_id not in (None, 0) and s.coordinator_address is not None:
    wait_for_coordinator(s.coordinator_address, s.initialization_timeout)
  import jax
  try:
    jax.distributed.initialize(
        coordinator_address=s.coordinator_address, num_processes=s.num_processes,
        process_id=s.process_id, local_device_ids=None if s.local_device_ids is None
        else list(s.local_device_ids), initialization_timeout=s.initialization_timeout,
        # Without auto, JAX's cluster detection stays off: inside a Slurm step or an MPI job it
        # would fill the unset local_device_ids with the local rank (one GPU per process).
        cluster_detection_method=None if s.auto else 'deactivate')
  except ValueError as e:  # JAX's detection found no cluster for the unset values
    raise ValueError(f'distributed: jax.distributed.initialize failed ({e})') from None
  return s
