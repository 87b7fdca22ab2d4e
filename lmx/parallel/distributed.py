"""Multi-host start-up through `jax.distributed`.

One code path for every kind of cluster; only the environment differs:

* Cloud TPU pods: `jax.distributed.initialize()` with no arguments discovers the
  coordinator and the process index from the TPU metadata (launch/tpu_pod.sh sets
  LMX_DISTRIBUTED_AUTO=1).
* SLURM GPU clusters: JAX reads the SLURM_* variables itself (launch/slurm.sh, also
  LMX_DISTRIBUTED_AUTO=1).
* Anything else, including several local CPU processes (launch/local_multiprocess.sh,
  tests/test_multiprocess.py): LMX_COORDINATOR=host:port, LMX_NUM_PROCESSES, LMX_PROCESS_ID.

`lmx.cli` calls `initialize_from_env()` before any other JAX use; it is a no-op for a single
process. With several processes it also starts a peer watchdog: a process whose peer dies
exits with a message naming it instead of waiting in a collective (LMX_HEARTBEAT_TIMEOUT_S,
see docs/multihost.md "When a process dies").
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from typing import Any, Callable, TypeVar

import jax
# NOTE: private, for the client and ids jax.distributed.initialize created (jax is pinned;
# tests/test_multihost_failure.py fails if this changes).
from jax._src import distributed as jax_distributed
import numpy as np

T = TypeVar("T")

_done = False

# A peer is declared lost after this many seconds without a heartbeat (0: no lmx watchdog,
# JAX's own 100 s heartbeat timeout applies).
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
# Exit status of a process that stops because a peer was lost.
LOST_PEER_EXIT_CODE = 1
_WATCH_DIR = "lmx_watchdog/"  # keys: "<dir><i>" beats, "<dir>done<i>" finished, "<dir>lost"


def _env_int(name: str) -> int:
  raw = os.environ.get(name)
  try:
    return int(raw)  # type: ignore[arg-type]
  except (TypeError, ValueError):
    raise ValueError(f"{name}={raw!r} must be set to an integer when LMX_COORDINATOR is "
                     "set") from None


def heartbeat_timeout_s() -> int:
  """LMX_HEARTBEAT_TIMEOUT_S (default 30): seconds without a heartbeat before a peer is lost."""
  raw = os.environ.get("LMX_HEARTBEAT_TIMEOUT_S", str(DEFAULT_HEARTBEAT_TIMEOUT_S))
  try:
    value = int(raw)
  except ValueError:
    value = -1
  if value < 0:
    raise ValueError(f"LMX_HEARTBEAT_TIMEOUT_S={raw!r} must be an integer >= 0 (seconds; 0 "
                     "turns the lmx watchdog off).")
  return value


def _jax_heartbeat_kwargs(timeout: int) -> dict[str, int]:
  # JAX's own heartbeats (sent by a C++ thread, so they never wait for the GIL) are the
  # backstop. A JAX client beats every heartbeat_timeout/2 s and the service declares it dead
  # heartbeat_timeout s after its last beat, i.e. 0.5x to 1x heartbeat_timeout after it died
  # (measured); then JAX aborts every other process (LOG(FATAL) "Terminating process because
  # the JAX distributed service detected fatal errors ...", SIGABRT, C++ stack trace). At 3x
  # the lmx timeout that is >= 1.5x, after the watchdog's <= 1.3x, so the watchdog speaks
  # first, and a process whose Python is wedged (no watchdog) is still stopped.
  return {"heartbeat_timeout_seconds": 3 * timeout} if timeout else {}


def initialize_from_env() -> tuple[int, int]:
  """Start jax.distributed when the environment asks for it; returns (process_index, count).

  Must run before anything touches a JAX backend (jax.devices(), an array, a jit):
  jax.distributed.initialize refuses to run once the backends exist.
  """
  global _done
  if _done:
    return jax.process_index(), jax.process_count()
  coordinator = os.environ.get("LMX_COORDINATOR")
  if coordinator:
    n, i = _env_int("LMX_NUM_PROCESSES"), _env_int("LMX_PROCESS_ID")
    if n < 1:
      raise ValueError(f"LMX_NUM_PROCESSES={n} must be >= 1.")
    if not 0 <= i < n:
      raise ValueError(f"LMX_PROCESS_ID={i} must be in [0, LMX_NUM_PROCESSES={n}).")
    if ":" not in coordinator:
      raise ValueError(f"LMX_COORDINATOR={coordinator!r} must be host:port.")
    # CPU collectives across processes go through gloo over TCP (the default in jax 0.10;
    # said explicitly so a changed default cannot silently leave CPU processes unable to
    # all-reduce). Only read when the CPU client is created; harmless on TPU/GPU.
    # NOTE: no jax.default_backend() here -- it would create the backends, after which
    # jax.distributed.initialize raises.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = heartbeat_timeout_s()
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i,
                               cluster_detection_method="deactivate",
                               **_jax_heartbeat_kwargs(timeout))
    _done = True
    _start_watchdog(timeout)
  elif os.environ.get("LMX_DISTRIBUTED_AUTO") == "1":  # TPU pods / SLURM: JAX discovers all.
    timeout = heartbeat_timeout_s()
    jax.distributed.initialize(**_jax_heartbeat_kwargs(timeout))
    _done = True
    _start_watchdog(timeout)
  return jax.process_index(), jax.process_count()


# --- Peer watchdog ---------------------------------------------------------------------------
# Why: a dead peer leaves the survivors in a gloo all-reduce (or barrier, or host code) that
# only JAX's heartbeat ends, by aborting them with a C++ stack trace. Instead every process
# writes a counter to the coordination service's key-value store every timeout/10 s and reads
# everyone's; a counter that stops changing for `timeout` s means that process is gone, and no
# reply from the store for `timeout` s means the coordinator (process 0, which hosts it) is:
# print one line naming it and os._exit (a plain exit would run atexit handlers that wait at
# JAX's shutdown barrier for the dead peer).
# NOTE: when process 0's *process* dies (host still up) the watchdog cannot speak first: its
# sockets close and JAX aborts every other process within about a second with "Terminating
# process because the JAX distributed service detected fatal errors ... Failed to send RPC to
# coordination service. Either the leader task was preempted/died/restarted unexpectedly ...".
# jaxlib 0.10.2 cannot route that to Python: a Python missed_heartbeat_callback fails with
# std::bad_cast (absl::Status has no Python caster).
# NOTE: the counter is written by a Python thread, so a peer that held the GIL for `timeout`
# seconds would be taken for dead. No lmx code path does: XLA compiles, runs and collectives,
# and SentencePiece training, all release it.


def _exit_lost(message: str) -> None:
  # os.write, not print: another thread may hold sys.stderr's lock at the moment we exit.
  os.write(2, (message.rstrip() + "\n").encode(errors="replace"))
  os._exit(LOST_PEER_EXIT_CODE)


class _Watchdog:
  """Two daemon threads: `beat` talks to the key-value store, `judge` decides.

  Split because a call to a hung coordinator (host frozen or cut off: no reset, no reply)
  blocks without a deadline; the judge must still see the silence and act on it.
  """

  def __init__(self, client: Any, i: int, n: int, timeout: float, interval: float,
               coordinator: str):
    self.client, self.i, self.n, self.coordinator = client, i, n, coordinator
    self.timeout, self.interval = timeout, interval
    self.reply_at = time.monotonic()  # when the store last answered
    self.entries: dict[str, str] = {}  # its last answer: key -> value
    self.stopped = threading.Event()
    self.threads: list[threading.Thread] = []

  def start(self) -> None:
    for name, target in (("beat", self._beat), ("judge", self._judge)):
      self.threads.append(threading.Thread(target=target, name=f"lmx-watchdog-{name}",
                                           daemon=True))
      self.threads[-1].start()
    atexit.register(self.finish)  # runs before JAX's own shutdown (registered at import)

  def finish(self) -> None:
    """At exit: say this process is done (the others' judges stop expecting its beats),
    then stop and join both threads before JAX's shutdown barrier and the interpreter's
    finalization. NOTE: a daemon thread still inside a client call when the interpreter
    finalizes dies by forced unwinding through C++ frames and aborts the process ("FATAL:
    exception not rethrown", exit -6): seen on a process that finished last."""
    try:
      self.client.key_value_set(f"{_WATCH_DIR}done{self.i}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass
    self.stopped.set()
    for t in self.threads:
      t.join(timeout=2 * self.interval + 1)  # a call to a hung coordinator may not return

  def _running(self) -> bool:
    # The client is None once JAX shut down.
    return not self.stopped.is_set() and jax_distributed.global_state.client is not None

  def _beat(self) -> None:
    count = 0
    while self._running():
      try:
        count += 1
        self.client.key_value_set(f"{_WATCH_DIR}{self.i}", str(count), allow_overwrite=True)
        self.entries = dict(self.client.key_value_dir_get(_WATCH_DIR))
        self.reply_at = time.monotonic()
      except Exception:  # pylint: disable=broad-except
        pass  # the judge notices the silence
      self.stopped.wait(self.interval)

  def _judge(self) -> None:
    i, n = self.i, self.n
    seen: dict[int, str] = {}
    changed = {j: time.monotonic() for j in range(n) if j != i}  # j's counter last changed
    while self._running():
      self.stopped.wait(self.interval)
      now, entries = time.monotonic(), self.entries
      if not self._running():
        return
      if now - self.reply_at > self.timeout and self._running():
        who = (f"process {i} of {n} lost the coordinator (process 0 at {self.coordinator})"
               if i else f"the coordination service in process 0 of {n} hung")
        _exit_lost(f"lmx: {who}: no reply for {now - self.reply_at:.0f} s; exiting.")
      if verdict := entries.get(_WATCH_DIR + "lost"):  # another process saw a peer die first
        _exit_lost(verdict)
      for j in changed:
        if entries.get(f"{_WATCH_DIR}done{j}"):  # j finished: it waits at JAX's shutdown
          continue
        value = entries.get(f"{_WATCH_DIR}{j}", "")
        if value != seen.get(j):
          seen[j], changed[j] = value, now
        elif now - changed[j] > self.timeout:
          self._lost(f"lmx: process {j} of {n} stopped responding (no heartbeat for "
                     f"{now - changed[j]:.0f} s); exiting.")

  def _lost(self, message: str) -> None:
    if self.n > 2:  # let the processes that have not noticed yet exit with the same message
      try:
        self.client.key_value_set(_WATCH_DIR + "lost", message, allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except
        pass
      if self.i == 0:  # the coordinator leaves last: once it exits, JAX aborts the others
        time.sleep(2 * self.interval)
    _exit_lost(message)


def fail_fast(exc: BaseException) -> None:
  """Called for an uncaught exception in a multi-process run: post a verdict the other
  processes' watchdogs read (they exit with it within one beat interval instead of waiting
  in the next collective until JAX's shutdown timeout), then leave at once."""
  state = jax_distributed.global_state
  if state.client is None or state.num_processes < 2:
    return
  timeout = heartbeat_timeout_s()
  if isinstance(exc, (jax.errors.JaxRuntimeError, CollectiveError)) and timeout:
    # A failed collective usually means a peer died (its sockets closed). Give the watchdog
    # the time it needs to name that peer (or to read a peer's own posted verdict); it
    # exits the process itself. Only if every peer is alive is the failure our own.
    time.sleep(timeout + 3 * max(0.5, timeout / 10))
  message = (f"lmx: process {state.process_id} of {state.num_processes} failed "
             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); exiting.")
  try:
    state.client.key_value_set(_WATCH_DIR + "lost", message, allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except
    pass
  import traceback
  traceback.print_exception(exc)
  _exit_lost(message)


def _start_watchdog(timeout: int) -> None:
  state = jax_distributed.global_state  # the ids, for the explicit and auto-detected start
  if not timeout or state.client is None or state.num_processes < 2:
    return
  # A process that finishes posts "<dir>done<i>" at exit and stops its threads (`finish`);
  # it then waits at JAX's shutdown barrier without beating, and the others skip it.
  _Watchdog(state.client, state.process_id, state.num_processes, timeout,
            interval=max(0.5, timeout / 10), coordinator=str(state.coordinator_address)).start()


def is_primary() -> bool:
  """True on the process that writes shared files (logs, plots, caches): process 0."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process reaches the barrier `name`; a no-op for one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def primary_first(fn: Callable[[], T], name: str) -> T:
  """Run `fn` on process 0, then on the others once it is done.

  For work that fills a shared cache (tokenizer training, shard building): process 0 builds
  it, everyone waits at a barrier, then the others find it cached. Without this every host
  would build it at once, and a non-deterministic build (SentencePiece trains on several
  threads) could leave the hosts with different tokenizers.
  """
  out = fn() if is_primary() else None
  barrier(name)
  return out if is_primary() else fn()  # type: ignore[return-value]


class CollectiveError(RuntimeError):
  """A host-level collective across processes failed -- usually because a peer died in it.
  `fail_fast` then waits for the watchdog to name that peer, as for a failed XLA collective."""


def _allgather(x):
  from jax.experimental import multihost_utils
  try:
    return np.asarray(multihost_utils.process_allgather(x))
  except Exception as e:  # pylint: disable=broad-except
    # NOTE: a peer killed just before this point makes it fail in several ways (a gloo error,
    # or a ValueError from mismatched shapes); which one is a race, so all are one error.
    raise CollectiveError(f"process_allgather across {jax.process_count()} processes failed "
                          f"({type(e).__name__}: {e})") from e


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any: a decision all processes take at the
  same step (a collective: every process must call it at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(_allgather(np.int32(flag)).max())


def allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order (the same list on every process).

  For small host-local states (a data iterator position) that must be saved by process 0.
  """
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  # process_allgather needs one shape everywhere: gather the lengths, then padded bytes.
  lengths = _allgather(np.int32(data.size)).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = _allgather(padded)  # (n, max_len)
  return [json.loads(rows[i, :n].tobytes()) for i, n in enumerate(lengths)]
