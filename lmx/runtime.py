"""Process-level settings that must be made before JAX starts its CPU threads.

`keep_host_memory()` tells glibc's malloc to keep freed memory inside the process rather than
handing it back to the kernel. Why: XLA:CPU allocates every intermediate buffer of a step
afresh, from its worker threads. By default glibc serves such large requests with fresh
mappings (per-thread heaps or mmap) and unmaps them on free, so each step's buffers are
zero-filled by the kernel again, a 4 KiB page fault at a time. Measured on the default
experiment (2-core EPYC, `benchmarks/train_throughput.py`): 145k page faults and ~270 ms of
system time per 570 ms train step; with the settings below ~10k faults and ~410 ms per step.
At the 124M shape: 0 faults per step, 9.4 s instead of 12 s (glibc defaults).

The settings (all standard `mallopt(3)` parameters):
  M_ARENA_MAX=1       one heap for all threads (so freed buffers are reused by any thread);
  M_MMAP_MAX=0        large blocks come from that heap too, never from a fresh mapping;
  M_TRIM_THRESHOLD=-1 the heap is never shrunk when its top is freed (glibc reads the value
                      as a size_t, so -1 is "never"; the largest positive int, 2 GiB,
                      still let a 124M model's 3 GiB per-step XLA buffer be handed back and
                      faulted in again every step: 781k faults, 5.6 s system time per step).
The cost: the process keeps its peak heap until it exits, which is what a training or
serving process does anyway; `release_free_memory()` hands back what is free at a moment of
choice (the trainer calls it once its set-up -- tokenizer training, sharding -- is done). `lmx` applies this at start-up (before JAX's threads exist);
set LMX_HOST_MALLOC=system to leave glibc's defaults alone. Other C libraries: no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameter numbers from <malloc.h> (glibc).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))

_applied: bool | None = None


def _libc() -> ctypes.CDLL:
  return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_host_memory() -> bool:
  """Apply the malloc settings above once per process; True if they are in effect."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get("LMX_HOST_MALLOC", "keep") == "system" or not sys.platform.startswith("linux"):
    return False
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION"):  # raises or is empty off glibc
      return False
    mallopt = _libc().mallopt
  except (ValueError, OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  _applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
  return _applied


def release_free_memory() -> None:
  """malloc_trim(0): return the heap's free pages to the kernel (kept ones included).
  A no-op unless keep_host_memory() is in effect."""
  if not _applied:
    return
  _libc().malloc_trim(0)
