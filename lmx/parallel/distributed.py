"""Multi-host start-up through `jax.distributed`.

One code path for every kind of cluster; only the environment differs:

* Cloud TPU pods: `jax.distributed.initialize()` with no arguments discovers the
  coordinator and the process index from the TPU metadata (launch/tpu_pod.sh).
* SLURM GPU clusters: JAX reads SLURM_* variables itself (launch/slurm.sh).
* Anything else, including several local CPU processes in tests
  (launch/local_multiprocess.sh): set LMX_COORDINATOR=host:port, LMX_NUM_PROCESSES and
  LMX_PROCESS_ID.

Call `initialize_from_env()` once, before any other JAX call; it is a no-op for a single
process.
"""

from __future__ import annotations

import os

import jax

_done = False


def initialize_from_env() -> tuple[int, int]:
  """Start jax.distributed when the environment asks for it; returns (process_index, count)."""
  global _done
  if _done:
    return jax.process_index(), jax.process_count()
  coordinator = os.environ.get("LMX_COORDINATOR")
  if coordinator:
    n = int(os.environ["LMX_NUM_PROCESSES"])
    i = int(os.environ["LMX_PROCESS_ID"])
    if not 0 <= i < n:
      raise ValueError(f"LMX_PROCESS_ID={i} must be in [0, LMX_NUM_PROCESSES={n}).")
    if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
      # CPU collectives across processes go through gloo.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i)
    _done = True
  elif os.environ.get("LMX_DISTRIBUTED_AUTO") == "1":  # TPU pods / SLURM: JAX discovers all.
    jax.distributed.initialize()
    _done = True
  return jax.process_index(), jax.process_count()
