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
process. See docs/multihost.md.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np

T = TypeVar("T")

_done = False


def _env_int(name: str) -> int:
  raw = os.environ.get(name)
  try:
    return int(raw)  # type: ignore[arg-type]
  except (TypeError, ValueError):
    raise ValueError(f"{name}={raw!r} must be set to an integer when LMX_COORDINATOR is "
                     "set") from None


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
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i,
                               cluster_detection_method="deactivate")
    _done = True
  elif os.environ.get("LMX_DISTRIBUTED_AUTO") == "1":  # TPU pods / SLURM: JAX discovers all.
    jax.distributed.initialize()
    _done = True
  return jax.process_index(), jax.process_count()


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


def allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order (the same list on every process).

  For small host-local states (a data iterator position) that must be saved by process 0.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  # process_allgather needs one shape everywhere: gather the lengths, then padded bytes.
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))  # (n, max_len)
  return [json.loads(rows[i, :n].tobytes()) for i, n in enumerate(lengths)]
