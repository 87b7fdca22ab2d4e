"""Real multi-process training: two OS processes, one CPU device each, joined by
jax.distributed (gloo collectives over 127.0.0.1), started by launch/local_multiprocess.sh.

The reference is ONE process with 2 CPU devices fed the same global batch. NOTE: that batch
is not the plain 1-host batch: each host packs ITS documents (i, i+n, ...) into rows, so
the 2-host global batch is [host 0 rows; host 1 rows] = the concatenation of
make_dataset(..., 0, 2) and make_dataset(..., 1, 2). The reference script below feeds
exactly that, so every number must agree (per-device data and computation are identical;
a 2-way all-reduce is order-free).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

# Real multi-process runs: several OS processes, each training through jax.distributed.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6

# The reference: one process, 2 devices, the 2-host global batch built in-process.
REFERENCE = r'''
import json, sys
import numpy as np
from lmx.data import pipeline
from lmx.experiment import load_experiment
from lmx.train import loop

class TwoHostIterator:
  def __init__(self, its):
    self.its = its
  def __iter__(self):
    return self
  def __next__(self):
    parts = [next(it) for it in self.its]  # StopIteration ends the (validation) split
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  def get_state(self):
    return [it.get_state() for it in self.its]
  def set_state(self, state):
    for it, s in zip(self.its, state):
      it.set_state(s)

class TwoHostDataset:
  def __init__(self, exp, tok, split):
    self.parts = [pipeline.make_dataset(exp, tok, split, i, 2) for i in range(2)]
  def __iter__(self):
    return TwoHostIterator([iter(p) for p in self.parts])

from lmx.train import sources  # the loop reads its data through lmx.train.sources
loop.make_dataset = sources.make_dataset = (
    lambda exp, tok, split, i, n: TwoHostDataset(exp, tok, split))
exp, _ = load_experiment(sys.argv[1:])
print("REFERENCE " + json.dumps(loop.train(exp)))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _args(cache: pathlib.Path, run_dir: pathlib.Path) -> list[str]:
  return ["--config=" + str(ROOT / "experiments/default.py"),
          "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
          "--config.model.n_kv_heads=2", "--config.model.vocab_size=512",
          "--config.model.max_seq_len=32", "--config.data.max_docs=60",
          "--config.data.seq_len=32", "--config.data.batch_size=8",
          "--config.data.tokenizer_sample_mb=1", f"--config.data.cache_dir={cache}",
          f"--config.train.steps={STEPS}", "--config.train.warmup_steps=2",
          "--config.train.eval_every=3", "--config.train.eval_batches=2",
          "--config.train.log_every=1", "--config.train.progress_bar=False",
          "--config.checkpoint.every=3", "--config.checkpoint.keep=2",
          "--config.mesh.data=-1", f"--config.run_dir={run_dir}"]


def _env(**extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("LMX_", "SLURM_", "JAX_COORDINATOR"))}
  # conftest forces 8 devices in this process; the children choose their own.
  env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             PATH=str(pathlib.Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
  env.update(extra)
  return env


def _launch(args: list[str], logs: pathlib.Path) -> list[dict]:
  """launch/local_multiprocess.sh 2 train ...; returns each process's final JSON line."""
  # A persistent XLA cache next to the logs' folder, shared by the launches (not by the
  # one-process reference): process 0 of the resumed run loads what process 0 of the first
  # compiled (~9 s of CPU; JAX writes entries from process 0 only).
  env = _env(LMX_PORT=str(_free_port()), LMX_LOG_DIR=str(logs),
             LMX_BIN=str(pathlib.Path(sys.executable).parent / "lmx"),
             JAX_COMPILATION_CACHE_DIR=str(logs.parent / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  p = subprocess.run(["bash", str(ROOT / "launch/local_multiprocess.sh"), "2", "train", *args],
                     env=env, capture_output=True, text=True, timeout=300)
  texts = [(logs / f"lmx_process_{i}.log").read_text() for i in range(2)]
  assert p.returncode == 0, f"launcher rc={p.returncode}\n{p.stdout}\n{p.stderr}\n" + \
      "\n".join(t[-3000:] for t in texts)
  return [json.loads([ln for ln in t.splitlines() if ln.startswith("{")][-1]) for t in texts]


def _records(path: pathlib.Path, kind: str, key: str) -> dict[int, float]:
  out = {}
  for line in path.read_text().splitlines():  # later records (a resumed run) overwrite
    r = json.loads(line)
    if r["kind"] == kind:
      out[r["step"]] = r[key]
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  cache, run2 = tmp / "cache", tmp / "run2"
  # (b) first, on an empty cache: process 0 trains the tokenizer and builds the shards.
  two = _launch(_args(cache, run2), tmp / "logs")
  script = tmp / "reference.py"
  script.write_text(REFERENCE)
  ref = subprocess.run(
      [sys.executable, str(script), *_args(cache, tmp / "run1")], capture_output=True,
      text=True, timeout=300, cwd=ROOT,
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert ref.returncode == 0, ref.stderr[-3000:]
  line = [ln for ln in ref.stdout.splitlines() if ln.startswith("REFERENCE ")][-1]
  return {"tmp": tmp, "cache": cache, "run2": run2, "two": two,
          "ref": json.loads(line[len("REFERENCE "):]), "ref_dir": tmp / "run1"}


def test_processes_form_one_job(runs):
  assert [(r["process_index"], r["process_count"]) for r in runs["two"]] == [(0, 2), (1, 2)]
  assert runs["ref"]["process_count"] == 1
  assert all(r["step"] == STEPS for r in runs["two"])


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
  ref_dir, run2 = runs["ref_dir"], runs["run2"]
  ref_train = _records(ref_dir / "metrics.jsonl", "train", "loss")
  assert sorted(ref_train) == list(range(1, STEPS + 1))
  # Process 0 writes run_dir/metrics.jsonl, process 1 its own copy under process_1/.
  for path in (run2 / "metrics.jsonl", run2 / "process_1" / "metrics.jsonl"):
    train = _records(path, "train", "loss")
    assert sorted(train) == sorted(ref_train)
    np.testing.assert_allclose([train[s] for s in ref_train], list(ref_train.values()),
                               rtol=1e-6, atol=0)
    evals = _records(path, "eval", "val_loss")
    ref_evals = _records(ref_dir / "metrics.jsonl", "eval", "val_loss")
    assert sorted(evals) == sorted(ref_evals) == [3, 6]
    np.testing.assert_allclose([evals[s] for s in ref_evals], list(ref_evals.values()),
                               rtol=1e-6)
  for r in runs["two"]:  # whole-split figures, gathered over both hosts
    for key in ("val_loss", "val_tokens", "unigram_ppl", "train_loss"):
      np.testing.assert_allclose(r[key], runs["ref"][key], rtol=1e-6, err_msg=key)


def test_each_process_read_its_own_slice(runs):
  """The hosts' batches are different data: had both read slice 0 (or the whole stream),
  the losses above could not match. Check directly that the two slices differ and that the
  reference's global batch is their concatenation, not the 1-host batch."""
  from lmx.data.pipeline import make_dataset
  from lmx.data.tokenizer import load_or_train_tokenizer
  from lmx.experiment import load_experiment
  exp, _ = load_experiment(_args(runs["cache"], runs["tmp"] / "unused"))
  tok = load_or_train_tokenizer(exp)  # cached by the runs
  h0, h1 = (next(iter(make_dataset(exp, tok, "train", i, 2))) for i in range(2))
  assert h0["inputs"].shape == h1["inputs"].shape == (4, 32)
  assert not np.array_equal(h0["inputs"], h1["inputs"])
  # Every target of the first global batch counts once: 8 full rows of 32 tokens.
  assert float(h0["loss_mask"].sum() + h1["loss_mask"].sum()) == 8 * 32


def test_two_process_checkpoint_resumes(runs):
  """Drop the final checkpoint and rerun: both processes resume from step 3 (model,
  optimizer and each host's data position) and repeat steps 4..6 exactly."""
  import shutil
  run2 = runs["run2"]
  first = _records(run2 / "metrics.jsonl", "train", "loss")
  shutil.rmtree(run2 / "checkpoints" / str(STEPS))
  assert sorted(int(p.name) for p in (run2 / "checkpoints").iterdir()
                if p.name.isdigit()) == [3]
  again = _launch(_args(runs["cache"], run2), runs["tmp"] / "logs_resume")
  assert [r["resumed_from"] for r in again] == [3, 3]
  assert [r["process_count"] for r in again] == [2, 2]
  lines = [json.loads(ln) for ln in (run2 / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in lines if r["kind"] == "train"]
  # Steps 4..6 were logged again after their first records were dropped: each step once.
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in train[3:]], [first[s] for s in (4, 5, 6)],
                             rtol=1e-6, atol=0)
  assert (run2 / "checkpoints" / str(STEPS)).is_dir()  # saved again at the end
