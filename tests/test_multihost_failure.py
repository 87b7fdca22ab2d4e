"""A process that dies mid-training must not leave the others hanging.

Two real `lmx train` processes (one CPU device each, jax.distributed + gloo over 127.0.0.1)
are started here directly, not through launch/local_multiprocess.sh: that script kills the
survivors itself, and the point is that a survivor stops on its own (a real cluster has no
such launcher). After the first step one process is killed (SIGKILL) or frozen (SIGSTOP: a
hung host, no TCP reset); the survivor must exit non-zero within 60 s, naming the lost
process. Plus the opposite: a process finishing long before its peer is not a lost process.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOUND_S = 60  # the promise: a survivor exits within this long after its peer died


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _args(cache: pathlib.Path, run_dir: pathlib.Path, steps: int) -> list[str]:
  return ["--config=" + str(ROOT / "experiments/default.py"),
          "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
          "--config.model.n_kv_heads=2", "--config.model.vocab_size=512",
          "--config.model.max_seq_len=32", "--config.data.max_docs=60",
          "--config.data.seq_len=32", "--config.data.batch_size=8",
          "--config.data.tokenizer_sample_mb=1", f"--config.data.cache_dir={cache}",
          f"--config.train.steps={steps}", "--config.train.warmup_steps=1",
          "--config.train.eval_every=100000", "--config.train.eval_batches=1",
          "--config.train.log_every=1", "--config.train.progress_bar=False",
          "--config.checkpoint.every=100000", "--config.mesh.data=-1",
          f"--config.run_dir={run_dir}"]


# `lmx train`, then (LMX_TEST_LINGER_S) host-only work after training, as a process that
# writes plots or uploads results would do.
LINGERING_LMX = r'''
import os, sys, time
from lmx.cli import main
if os.environ.get("LMX_TEST_RAISE_AT"):  # this process fails with an exception at step N
  import lmx.train.loop as loop
  real, calls = loop.put_batch, [0]
  def failing(batch, mesh, *spec):
    calls[0] += 1
    if calls[0] >= int(os.environ["LMX_TEST_RAISE_AT"]):
      raise RuntimeError("injected failure")
    return real(batch, mesh, *spec)
  loop.put_batch = failing
rc = main(sys.argv[1:])
time.sleep(float(os.environ.get("LMX_TEST_LINGER_S", "0")))
sys.exit(rc)
'''


def _start(tmp: pathlib.Path, name: str, steps: int, extra_args: tuple = (), log: str = "",
           **env_extra) -> tuple[list, pathlib.Path]:
  """Two `lmx train` processes (logs in <name><log>_<i>.log); returns them and the run
  directory."""
  run_dir, port = tmp / name, _free_port()
  script = tmp / "lingering_lmx.py"
  script.write_text(LINGERING_LMX)
  procs = []
  for i in range(2):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LMX_", "SLURM_", "JAX_COORDINATOR"))}
    env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               LMX_COORDINATOR=f"127.0.0.1:{port}", LMX_NUM_PROCESSES="2",
               LMX_PROCESS_ID=str(i))
    env.update({k: v[i] if isinstance(v, tuple) else v for k, v in env_extra.items()})
    with open(tmp / f"{name}{log}_{i}.log", "w") as f:
      procs.append(subprocess.Popen(
          [sys.executable, str(script), "train", *_args(tmp / "cache", run_dir, steps),
           *extra_args], env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT))
  return procs, run_dir


def _stop_all(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()  # SIGKILL ends a SIGSTOPped process too
      p.wait()


def _wait_for_first_step(procs, run_dir: pathlib.Path, timeout: float = 300) -> None:
  metrics = run_dir / "metrics.jsonl"  # process 0 appends a "train" record per step
  deadline = time.monotonic() + timeout
  while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
    assert all(p.poll() is None for p in procs), "a process ended before the first step"
    assert time.monotonic() < deadline, "no training step within the timeout"
    time.sleep(0.2)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("multihost_failure")  # one data cache for all the runs


def test_heartbeat_timeout_setting(monkeypatch):
  from lmx.parallel import distributed
  monkeypatch.delenv("LMX_HEARTBEAT_TIMEOUT_S", raising=False)
  assert distributed.heartbeat_timeout_s() == 30
  # JAX's own heartbeat is the backstop, 3x later so the lmx watchdog reports first.
  assert distributed._jax_heartbeat_kwargs(30) == {"heartbeat_timeout_seconds": 90}
  monkeypatch.setenv("LMX_HEARTBEAT_TIMEOUT_S", "0")  # off: JAX's defaults apply
  assert distributed.heartbeat_timeout_s() == 0
  assert distributed._jax_heartbeat_kwargs(0) == {}
  for bad in ("-1", "30s", ""):
    monkeypatch.setenv("LMX_HEARTBEAT_TIMEOUT_S", bad)
    with pytest.raises(ValueError, match="LMX_HEARTBEAT_TIMEOUT_S"):
      distributed.heartbeat_timeout_s()


@pytest.mark.slow
@pytest.mark.parametrize("victim,sig,timeout_s,expected", [
    # A worker is killed: the coordinator's watchdog sees its heartbeats stop (10 s here;
    # the 30 s default is test_heartbeat_timeout_setting's).
    (1, signal.SIGKILL, "10", "lmx: process 1 of 2 stopped responding (no heartbeat for"),
    # The coordinator's host hangs (no TCP reset): the key-value store stops answering.
    (0, signal.SIGSTOP, "10", "lmx: process 1 of 2 lost the coordinator (process 0 at"),
    # The coordinator process is killed: its sockets close and JAX itself aborts the others
    # within about a second, before any watchdog could speak (see lmx/parallel/distributed.py).
    (0, signal.SIGKILL, "10", "Either the leader task was preempted/died"),
], ids=["worker-killed", "coordinator-hangs", "coordinator-killed"])
def test_survivor_exits_when_its_peer_dies(tmp, victim, sig, timeout_s, expected):
  env = {} if timeout_s is None else {"LMX_HEARTBEAT_TIMEOUT_S": timeout_s}
  name = f"run_{victim}_{sig.name}"
  procs, run_dir = _start(tmp, name, steps=100000, **env)
  survivor = procs[1 - victim]
  try:
    _wait_for_first_step(procs, run_dir)
    procs[victim].send_signal(sig)
    killed_at = time.monotonic()
    try:
      rc = survivor.wait(timeout=BOUND_S + 30)
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {1 - victim} still running {BOUND_S + 30} s after process "
                  f"{victim} got {sig.name}")
    elapsed = time.monotonic() - killed_at
  finally:
    _stop_all(procs)
  log = (tmp / f"{name}_{1 - victim}.log").read_text()
  print(f"{name}: survivor rc={rc} after {elapsed:.1f} s")
  assert rc != 0, log[-3000:]
  assert elapsed < BOUND_S, log[-3000:]
  assert expected in log, log[-3000:]
  if expected.startswith("lmx:"):  # the watchdog's own exit: status 1, its line comes last
    assert rc == 1, log[-3000:]
    assert log.rstrip().splitlines()[-1].startswith(expected), log[-3000:]


@pytest.mark.slow
def test_a_process_that_finishes_first_is_not_lost(tmp):
  """Process 0 ends (and stops beating) while process 1 keeps working for 3x the timeout:
  nobody may call that a lost process."""
  procs, _ = _start(tmp, "clean", steps=2, LMX_HEARTBEAT_TIMEOUT_S="4",
                    LMX_TEST_LINGER_S=("0", "12"))
  try:
    rcs = [p.wait(timeout=300) for p in procs]
  finally:
    _stop_all(procs)
  logs = [(tmp / f"clean_{i}.log").read_text() for i in range(2)]
  assert rcs == [0, 0], "\n".join(log[-3000:] for log in logs)
  assert not any("lmx: process" in log for log in logs)


@pytest.mark.slow
def test_an_exception_in_one_process_stops_the_other_at_once(tmp):
  """Process 1 raises mid-training: it posts its failure before exiting, so process 0
  leaves within a few heartbeat intervals instead of waiting in the next all-reduce (and
  then at JAX's shutdown barrier) for minutes."""
  procs, run_dir = _start(tmp, "raise", steps=100000, LMX_HEARTBEAT_TIMEOUT_S="10",
                          LMX_TEST_RAISE_AT=("", "4"))
  try:
    rc1 = procs[1].wait(timeout=240)
    failed_at = time.monotonic()
    rc0 = procs[0].wait(timeout=BOUND_S + 30)
    elapsed = time.monotonic() - failed_at
  finally:
    _stop_all(procs)
  logs = [(tmp / f"raise_{i}.log").read_text() for i in range(2)]
  verdict = "lmx: process 1 of 2 failed (RuntimeError: injected failure); exiting."
  assert rc1 == 1 and "RuntimeError: injected failure" in logs[1], logs[1][-3000:]
  assert logs[1].rstrip().splitlines()[-1] == verdict, logs[1][-3000:]
  # Process 0 leaves with status 1 and an lmx line: the posted verdict, or its own failed
  # all-reduce (the peer's sockets closed) reported the same way.
  print(f"raise: process 0 rc={rc0} {elapsed:.1f} s after process 1 exited")
  assert rc0 == 1 and elapsed < BOUND_S, logs[0][-3000:]
  assert logs[0].rstrip().splitlines()[-1].startswith("lmx: process "), logs[0][-3000:]


def _result(log: str) -> dict:
  return json.loads([line for line in log.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_at_one_step(tmp):
  """SIGTERM to process 1 only (a preempted host, a Ctrl-C in one terminal): both processes
  stop after the same step (the next log step, where they agree), save one checkpoint,
  exit 0, and a rerun resumes from it. A process leaving on its own would leave its peer
  in the next all-reduce until the watchdog ended the run with an error."""
  every = 3  # log steps: where the processes agree on a stop
  args = (f"--config.train.log_every={every}",)
  procs, run_dir = _start(tmp, "sigterm", steps=100000, extra_args=args,
                          LMX_HEARTBEAT_TIMEOUT_S="10")
  try:
    _wait_for_first_step(procs, run_dir)
    procs[1].send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    rcs = [p.wait(timeout=BOUND_S + 30) for p in procs]
    elapsed = time.monotonic() - sent_at
  finally:
    _stop_all(procs)
  logs = [(tmp / f"sigterm_{i}.log").read_text() for i in range(2)]
  assert rcs == [0, 0], "\n".join(log[-3000:] for log in logs)
  print(f"sigterm: both processes exited 0 {elapsed:.1f} s after the signal")
  assert elapsed < BOUND_S
  results = [_result(log) for log in logs]
  steps = {r["step"] for r in results}
  assert len(steps) == 1 and all(r["stopped_by_signal"] for r in results), results
  saved = steps.pop()
  assert saved % every == 0 and saved >= every
  assert sorted(os.listdir(run_dir / "checkpoints")) == [str(saved)]
  # Both rerun the same command for two more steps: they resume from the saved step.
  procs, _ = _start(tmp, "sigterm", steps=saved + 2, extra_args=args, log="_resume")
  try:
    rcs = [p.wait(timeout=300) for p in procs]
  finally:
    _stop_all(procs)
  logs = [(tmp / f"sigterm_resume_{i}.log").read_text() for i in range(2)]
  assert rcs == [0, 0], "\n".join(log[-3000:] for log in logs)
  for log in logs:
    r = _result(log)
    assert r["resumed_from"] == saved and r["step"] == saved + 2, r
