"""A peer killed just before a host-level collective (the signal agreement, a data-iterator
all-gather) can make `process_allgather` fail in the survivor with any error -- a
ValueError was seen -- before the watchdog names the dead peer. Such failures become one
`CollectiveError`, and `fail_fast` gives the watchdog its time to speak, as for a failed
XLA collective, instead of exiting at once with a message that names nobody."""

from __future__ import annotations

import types

import jax
import pytest
from jax.experimental import multihost_utils

from lmx.parallel import distributed


@pytest.fixture
def two_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)

  def broken(x):
    raise ValueError("all input arrays must have the same shape")

  monkeypatch.setattr(multihost_utils, "process_allgather", broken)


def test_a_failed_host_allgather_is_a_collective_error(two_processes):
  with pytest.raises(distributed.CollectiveError, match="ValueError.*same shape"):
    distributed.any_process(True)
  with pytest.raises(distributed.CollectiveError, match="across 2 processes"):
    distributed.allgather_json({"step": 3})


@pytest.mark.parametrize("exc, waits", [
    (distributed.CollectiveError("process_allgather across 2 processes failed"), True),
    (KeyError("a bug of this process"), False),
])
def test_fail_fast_waits_for_the_watchdog_only_after_a_collective_failed(monkeypatch, exc,
                                                                         waits):
  posted, slept = [], []
  client = types.SimpleNamespace(key_value_set=lambda k, v, **kw: posted.append(v))
  state = types.SimpleNamespace(client=client, num_processes=2, process_id=1)
  monkeypatch.setattr(distributed.jax_distributed, "global_state", state)
  monkeypatch.setenv("LMX_HEARTBEAT_TIMEOUT_S", "20")
  monkeypatch.setattr(distributed.time, "sleep", slept.append)

  def exit_lost(message):
    raise SystemExit(message)

  monkeypatch.setattr(distributed, "_exit_lost", exit_lost)
  with pytest.raises(SystemExit, match=f"process 1 of 2 failed \\({type(exc).__name__}"):
    distributed.fail_fast(exc)
  # Waiting: the watchdog's timeout plus three beats, during which it would name the peer.
  assert slept == ([20 + 3 * 2.0] if waits else [])
  assert len(posted) == 1
