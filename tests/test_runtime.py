"""lmx.runtime.keep_host_memory: glibc keeps freed XLA buffers, so repeated steps stop
faulting fresh pages in (the page-fault count is the property, not a timing)."""

import os
import subprocess
import sys

import pytest

_PROBE = r"""
import resource, sys
if sys.argv[1] == "keep":
  from lmx.runtime import keep_host_memory
  assert keep_host_memory() is True
  assert keep_host_memory() is True  # idempotent
import jax, jax.numpy as jnp
f = jax.jit(lambda a: a @ a.T)  # a fresh 64 MiB output per call, freed by the next
x = jnp.ones((4096, 64), jnp.float32)
for _ in range(30):  # reach the steady state (the heap grows to its peak, plus fragmentation)
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="mallopt settings apply to glibc on Linux only")


def _faults(mode: str, **env) -> int:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
  assert out.returncode == 0, out.stderr
  return int(out.stdout.strip().splitlines()[-1])


@glibc_linux
def test_kept_memory_is_reused_instead_of_refaulted():
  system = _faults("system")
  kept = _faults("keep")
  # 20 x 64 MiB of fresh 4 KiB pages is ~330k faults. Kept memory is reused: at most an
  # occasional late heap extension (16k faults each, seen under load when thread timing
  # fragments the single heap), never one per call.
  assert system > 200_000, system
  assert kept < system / 5, (kept, system)


def test_opt_out_leaves_malloc_alone():
  out = subprocess.run(
      [sys.executable, "-c", "from lmx.runtime import keep_host_memory; print(keep_host_memory())"],
      capture_output=True, text=True, env={**os.environ, "LMX_HOST_MALLOC": "system"}, timeout=120)
  assert out.stdout.strip() == "False", out.stderr
