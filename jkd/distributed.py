"""Multi-process runs on JAX's own runtime: when and how to call `jax.distributed.initialize`.

One process per host (all its accelerators), every process running the same command. The
`distributed` config keys, or the environment variables launchers set (scripts/gcp/launch.sh,
scripts/slurm/run_jkd.sh), name the coordinator and this process; `distributed.auto=True`
leaves the unset ones to JAX's cluster detection (Cloud TPU, Slurm, Open MPI). Nothing set
means one process, and nothing is initialized. docs/multihost.md has the whole story.

`Preemption` turns SIGTERM (a Spot VM's preemption, Slurm's warning before a time limit, `kill`)
and a first Ctrl-C into a clean stop of the training and extraction loops: they finish the
step or batch in hand, commit it and exit with `STOPPED_EXIT` (after Ctrl-C, as Python ends on
Ctrl-C: KeyboardInterrupt) (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
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
  when this is a single-process run on all of the host's devices (one process with
  `local_device_ids`: `num_processes=1`, no coordinator). ValueError naming the key (or
  variable) when incomplete."""
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
  port = address.rsplit(':', 1)[1] if address is not None and ':' in address else ''
  if address is not None and not (port.isdigit() and 0 < int(port) < 65536):
    raise ValueError(f'{where["coordinator_address"]}={address!r}: expected HOST:PORT, a port '
                     'in 1..65535')
  s = Settings(address, num, pid, ids, bool(d.auto), int(d.initialization_timeout))
  if d.auto:
    return s
  if (address is None and num is None and pid is None) or (num == 1 and pid in (None, 0)):
    # One process needs no coordinator; its devices, when named, are still applied.
    return None if ids is None else dataclasses.replace(s, coordinator_address=None,
                                                        num_processes=1, process_id=0)
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


STOPPABLE_MODES = ('train', 'extract')  # the modes whose loops stop cleanly on SIGTERM
STOPPED_EXIT = 128 + signal.SIGTERM  # a run stopped by SIGTERM, its work committed: exit 143
STOPPED = 'stopped cleanly'  # KeyboardInterrupt's message when a Ctrl-C's stop is complete


def initialize(config) -> Settings | None:
  """Calls jax.distributed.initialize when the config or environment asks for several
  processes; must run before anything touches the JAX backend (jax.devices() included).
  JAX's preemption service, which takes SIGTERM over, runs only for the STOPPABLE_MODES: in
  the others SIGTERM ends the process as usual."""
  s = settings(config)
  if s is None:
    return None
  import jax
  if s.num_processes == 1 and not s.auto:
    # jax.distributed.initialize applies local_device_ids this way; one process skips it.
    ids = ','.join(map(str, s.local_device_ids))
    jax.config.update('jax_cuda_visible_devices', ids)
    jax.config.update('jax_rocm_visible_devices', ids)
    return s
  if s.process_id not in (None, 0) and s.coordinator_address is not None:
    wait_for_coordinator(s.coordinator_address, s.initialization_timeout)
  jax.config.update('jax_enable_preemption_service', config.mode in STOPPABLE_MODES)
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


class Preemption:
  """SIGTERM, or a first Ctrl-C, as a request to stop at the next step all processes reach, the
  loop's work up to it committed. Inside the `with` block, call `reached()` once per step (every
  process at the same steps): True at the step to stop after (`stopping` stays True); after
  the block, `stop(what)`.

  Several processes: JAX's preemption service (jax.distributed.initialize starts it; it takes
  SIGTERM) passes one process's notice to all and picks the first step every one of them has
  still to reach (`multihost_utils.reached_preemption_sync_point`); a Ctrl-C is handed to it as
  a SIGTERM of its own process. One process: handlers note the signals, and the next step
  checked is the one. A second Ctrl-C raises KeyboardInterrupt at once, as Python does (a
  SIGINT that Python's handler does not take, e.g. ignored in a background job, is left alone).

  `children=True` (the loop spawns Grain workers): the block's thread also blocks SIGTERM and
  SIGINT, as Python does for its resource tracker (bpo-33613): the threads it starts and the
  processes they spawn inherit the block, through exec, so a worker is safe from a signal sent
  to the whole process group (Slurm, a VM's shutdown, Ctrl-C in a terminal) from its first
  instruction, before its own handling (`loader.make_loader(workers_ignore_signals=True)`)
  takes over. The resource tracker is started first: starting it unblocks the signals in the
  thread that does. Threads started before the block still take the signals for the process;
  one left pending is noted too. A first Ctrl-C unblocks SIGINT again, so that a second one
  reaches this thread as it would without the block.

  Leaving the block gives the signals back their former actions, and one that came after the
  last check has that action then, as if no handler had been there (a Ctrl-C of one of several
  processes ends it at once, as SIGTERM does); not while an exception leaves the block, which
  ends the run with its own message. Several processes agree on it through one more sync point
  (`_late_notice`), so that all of them end or none."""

  def __init__(self, children: bool = False):
    self._children = children
    self._noted = self._interrupted = self.stopping = False
    self._steps = 0  # reached() calls: the same count on every process
    self._installed, self._previous = False, None  # (one process) the SIGTERM handler replaced
    self._interrupt_installed = False
    self._mask = None  # the thread's signal mask before the block (children=True)

  def __enter__(self):
    import jax
    self._multi = jax.process_count() > 1
    if threading.current_thread() is not threading.main_thread():  # handlers need it
      return self
    try:  # the block first: a Ctrl-C in here then finds it set (and __exit__ undoes it)
      if self._children:
        from multiprocessing import resource_tracker
        resource_tracker.ensure_running()
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
      if not self._multi:
        self._previous = signal.signal(signal.SIGTERM, self._note)
        self._installed = True
      if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, self._interrupt)
        self._interrupt_installed = True
    except BaseException:
      self.__exit__(*sys.exc_info())
      raise
    return self

  def _note(self, signum, frame):
    self._noted = True

  def _interrupt(self, signum, frame):
    """The first Ctrl-C: a stop request (to JAX's service as a SIGTERM with several processes);
    the next one is Python's KeyboardInterrupt."""
    self._interrupted = True
    signal.signal(signal.SIGINT, signal.default_int_handler)
    self._interrupt_installed = False
    if self._mask is not None:
      signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)
    _say(b'\n[jkd] Ctrl-C: stopping after the step in hand, once it is committed; Ctrl-C again '
         b'stops at once, losing it')

  def reached(self) -> bool:
    self._steps += 1
    if self._children and self._interrupt_installed and signal.SIGINT in signal.sigpending():
      signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # runs _interrupt now
    if self._multi:
      from jax.experimental import multihost_utils
      self.stopping = multihost_utils.reached_preemption_sync_point(self._steps)
    else:
      self._noted = self._noted or signal.SIGTERM in signal.sigpending()
      self.stopping = self._noted or self._interrupted
    return self.stopping

  def __exit__(self, exc_type, exc, tb):
    if threading.current_thread() is not threading.main_thread():
      return
    if self._mask is not None:  # a pending signal arrives now, at these handlers or JAX's
      signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
    if self._interrupt_installed:
      signal.signal(signal.SIGINT, signal.default_int_handler)
    ending = exc_type is None and not self.stopping  # a signal now came after the last check
    if self._installed:  # (None: a handler not set from Python; the default then)
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
      late = ending and (self._noted or self._interrupted)
    elif self._multi:  # JAX's handler would go on swallowing it
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      late = ending and self._late_notice()
    else:
      return
    if not late:
      if ending and self._interrupted:  # (several processes) the others had gone on
        _say(b'[jkd] Ctrl-C: it came as the loop ended, too late to stop the other processes '
             b'with this one; the run goes on (Ctrl-C again stops this one at once)')
    elif not self._interrupted:
      os.kill(os.getpid(), signal.SIGTERM)
    elif not self._multi:  # Ctrl-C's own action
      raise KeyboardInterrupt
    else:  # its action without Python's teardown, which would wait for the peers it ends
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGINT)

  def _late_notice(self) -> bool:
    """(several processes) Whether a notice came after the loop's last check, the same answer
    on every process: one more sync point, which JAX's service puts past every process's count
    when some process had passed it as the notice came (then no process stops here). A Ctrl-C
    of this process first waits a few seconds for its notice to be recorded."""
    from jax.experimental import multihost_utils
    deadline = time.monotonic() + 10
    while self._interrupted and not _preemption_notice() and time.monotonic() < deadline:
      time.sleep(0.05)
    self._steps += 1
    return multihost_utils.reached_preemption_sync_point(self._steps)

  def stop(self, what: str):
    """After the block, when `reached` chose a step: says so and exits STOPPED_EXIT, or, when
    this process's Ctrl-C asked for the stop, raises KeyboardInterrupt(STOPPED): Python then
    ends the process as on any Ctrl-C, by SIGINT, so that a calling shell script stops too."""
    name = 'Ctrl-C' if self._interrupted else 'SIGTERM'
    _say(f'[jkd] {name}: stopped {what}; run the same command again to resume'.encode())
    if self._interrupted:
      raise KeyboardInterrupt(STOPPED)
    raise SystemExit(STOPPED_EXIT)


def sync(name: str) -> None:
  """Every process waits here until all have come (nothing to wait for with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def whole_on_process_0(tree):
  """`tree`'s arrays whole, as numpy, on process 0 (None on the others): gathered leaf by
  leaf, a collective every process calls, so that the other processes hold one leaf at a
  time. With one process, `tree` itself (the writers take each leaf to the host in turn)."""
  import jax
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  keep = jax.process_index() == 0
  return jax.tree.map(
      lambda x: (lambda whole: whole if keep else None)(
          multihost_utils.process_allgather(x, tiled=True)), tree)


def progress_file():
  """sys.stderr for a stoppable loop's progress bar. A signal to the process group (Ctrl-C in
  a terminal, SIGTERM to a job) also ends a pipe's reader (`... 2>&1 | tee run.log`); the bar's
  next write would then fail and end the run before its stop is committed. Instead, at the
  first write that finds its reader gone, this process's stdout and stderr pipes without a
  reader are sent to /dev/null, and the run goes on to its stop."""
  return _ReaderMayGo(sys.stderr)


class _ReaderMayGo:
  def __init__(self, stream):
    self._stream = stream

  def __getattr__(self, name):  # encoding, fileno, ... as the stream's
    return getattr(self._stream, name)

  def write(self, text):
    try:
      return self._stream.write(text)
    except BrokenPipeError:
      _silence_readerless_pipes()
      return len(text)

  def flush(self):
    try:
      self._stream.flush()
    except BrokenPipeError:
      _silence_readerless_pipes()
      self._stream.flush()  # what it held now goes to /dev/null


def _silence_readerless_pipes() -> None:
  """stdout and stderr, where they are pipes whose reader is gone, to /dev/null."""
  import select
  import stat
  for fd in (1, 2):
    try:
      if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        continue
      poll = select.poll()
      poll.register(fd, select.POLLOUT)
      if not any(events & select.POLLERR for _, events in poll.poll(0)):
        continue
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, fd)
      os.close(devnull)
    except OSError:
      pass


def _say(line: bytes) -> None:
  """A line straight to stderr's file, as a signal handler may write: the handler may have
  interrupted a print to sys.stderr, and a pipe's reader may be gone (ended by the same
  Ctrl-C), which must not keep the run from stopping as it should."""
  try:
    os.write(sys.stderr.fileno(), line + b'\n')
  except (OSError, ValueError):
    pass


def _preemption_notice() -> bool:
  """Whether JAX's preemption service recorded a SIGTERM of any process: the coordination
  service key its sync manager writes (no public API says so; jaxlib is pinned, and
  tests/test_multihost.py checks it)."""
  import jax
  from jax._src import distributed as jax_distributed
  try:
    return jax_distributed.global_state.client.key_value_try_get(
        'RECEIVED_PREEMPTION_NOTICE') is not None
  except jax.errors.JaxRuntimeError:  # NOT_FOUND: no notice
    return False
