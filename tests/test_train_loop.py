"""End-to-end runs of lmx.train.loop on a tiny model and a 40-document corpus."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import lmx.train.loop as loop
from lmx.config import base_config, from_config_dict
from lmx.eval import perplexity
from lmx.experiment import load_experiment, load_run_config
from lmx.train.metrics import read_metrics

# End-to-end training runs of the real loop (one of them a subprocess), seconds each.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {  # dotted overrides shared by the in-process runs and the CLI subprocess
    "model.vocab_size": 512, "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
    "model.n_kv_heads": 0, "model.max_seq_len": 32,
    "data.seq_len": 32, "data.batch_size": 8, "data.max_docs": 40,
    "data.tokenizer_sample_mb": 1, "data.validation_fraction": 0.1,
    "train.warmup_steps": 2, "train.learning_rate": 3e-3, "train.log_every": 1,
    "train.eval_every": 0, "train.eval_batches": 2, "train.progress_bar": False,
    "checkpoint.every": 0, "checkpoint.async_save": False, "mesh.data": -1, "mesh.fsdp": 2,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("lmx_cache"))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Each train() call re-jits the same programs; a persistent cache makes reruns cheap."""
  import jax
  path = str(tmp_path_factory.mktemp("jax_cache"))
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (path, 0.0, 0)):
    jax.config.update(k, v)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # shared with the CLI subprocess
  yield path
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  for k, v in old.items():
    jax.config.update(k, v)


def make_exp(run_dir, cache_dir, **over):
  c = base_config()
  for k, v in {**TINY, "data.cache_dir": cache_dir, "train.steps": 8, **over}.items():
    sec, f = k.split(".")
    c[sec][f] = v
  c.run_dir = str(run_dir)
  return from_config_dict(c)


def test_resume_is_bitwise_identical(tmp_path, cache_dir):
  full = loop.train(make_exp(tmp_path / "a", cache_dir))
  assert full["step"] == 8 and full["resumed_from"] is None
  first = loop.train(make_exp(tmp_path / "b", cache_dir), stop_after=4)
  assert first["step"] == 4
  # As if steps 5-6 were logged and the process then died before the next checkpoint.
  with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
    for step in (5, 6):
      f.write(json.dumps({"step": step, "kind": "train", "loss": 123.0}) + "\n")
    f.write('{"step": 7, "kind": "tr')  # a line cut by the kill
  second = loop.train(make_exp(tmp_path / "b", cache_dir))
  assert second["resumed_from"] == 4 and second["step"] == 8
  a = [l for _, l in full["losses"]]
  b = [l for _, l in first["losses"] + second["losses"]]
  assert len(a) == 8 and a == b  # exact equality, not allclose
  assert full["val_loss"] == second["val_loss"]
  # The resumed run's metrics.jsonl has each step once: the records after the checkpoint
  # it resumed from were dropped and logged again.
  train_b = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
  train_a = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "a") if r["kind"] == "train"]
  assert [st for st, _ in train_b] == list(range(1, 9))
  assert train_b == train_a
  assert a[-1] < a[0]
  # The run directory has the artifacts.
  for f in ("metrics.jsonl", "loss_curve.png", "tensorboard"):
    assert (tmp_path / "a" / f).exists(), f
  assert full["val_ppl"] == pytest.approx(np.exp(full["val_loss"]))
  assert full["val_ppl"] < full["unigram_ppl"] * 10  # sane, not a quality claim at 8 steps


def test_logged_train_loss_is_the_mean_over_the_log_interval(tmp_path, cache_dir):
  """With log_every=3 each train record's loss is the mean of the 3 per-step losses (taken
  from the same deterministic run logged every step), not the last step's alone."""
  each = loop.train(make_exp(tmp_path / "each", cache_dir, **{"train.steps": 6}))
  per_step = dict(each["losses"])
  assert sorted(per_step) == [1, 2, 3, 4, 5, 6]
  every3 = loop.train(make_exp(tmp_path / "every3", cache_dir,
                               **{"train.steps": 6, "train.log_every": 3}))
  recs = [r for r in read_metrics(tmp_path / "every3") if r["kind"] == "train"]
  assert [r["step"] for r in recs] == [3, 6]
  for r in recs:
    window = [per_step[s] for s in range(r["step"] - 2, r["step"] + 1)]
    assert r["loss"] == pytest.approx(np.mean(window), rel=1e-6)
    assert r["loss_step"] == pytest.approx(per_step[r["step"]], rel=1e-6)
    assert r["loss_steps"] == 3
  assert len(set(window)) == 3  # the steps differ, so the mean is not any one of them
  assert every3["train_loss"] == pytest.approx(np.mean(window), rel=1e-6)


def test_consecutive_bad_steps_stop_the_run(tmp_path, cache_dir, monkeypatch):
  calls = {"n": 0}
  real = loop.put_batch

  def poisoned(batch, mesh, *spec):  # from the 4th step on, an inf in the loss mask
    calls["n"] += 1
    if calls["n"] >= 4:
      batch = dict(batch, loss_mask=batch["loss_mask"] * np.float32(np.inf))
    return real(batch, mesh, *spec)

  monkeypatch.setattr(loop, "put_batch", poisoned)
  exp = make_exp(tmp_path, cache_dir, **{"train.max_bad_steps": 3, "checkpoint.every": 2,
                                         "train.steps": 20})
  r = loop.train(exp)
  assert r["stopped_by_bad_steps"] and r["step"] == 3 + 3
  assert r["last_good_checkpoint"] == 2 and "checkpoints/2" in r["message"]
  assert r["total_bad_steps"] == 3
  assert not (tmp_path / "checkpoints" / "6").exists()


def test_early_stopping_on_stalled_validation(tmp_path, cache_dir, monkeypatch):
  seq = iter([3.0, 2.0, 2.5, 2.5, 2.5, 2.5])

  def fake_validation(eval_fn, params, batches, max_batches=None):
    v = next(seq)
    return {"val_loss": v, "val_ppl": float(np.exp(v)), "val_tokens": 1.0}

  monkeypatch.setattr(loop, "validation_loss", fake_validation)
  exp = make_exp(tmp_path, cache_dir, **{"train.eval_every": 2,
                                         "train.early_stopping_patience": 2,
                                         "train.steps": 20})
  r = loop.train(exp)
  # evals at 2 (3.0 best), 4 (2.0 best), 6 (no), 8 (no -> patience 2 reached)
  assert r["early_stopped"] and r["step"] == 8
  assert r["best_subset_val_loss"] == 2.0 and r["best_step"] == 4
  assert r["subset_val_batches"] == exp.train.eval_batches
  assert sorted(os.listdir(tmp_path / "best")) == ["4"]
  evals = [x for x in read_metrics(tmp_path) if x["kind"] == "eval"]
  assert [e["val_loss"] for e in evals][:4] == [3.0, 2.0, 2.5, 2.5]


def test_sigterm_saves_and_rerun_resumes(tmp_path, cache_dir, capsys):
  run_dir = tmp_path / "run"
  args = [sys.executable, "-m", "lmx.cli", "train", "--config=experiments/default.py",
          f"--config.run_dir={run_dir}", f"--config.data.cache_dir={cache_dir}",
          "--config.train.steps=100000", "--config.train.warmup_steps=2"]
  args += [f"--config.{k}={v}" for k, v in TINY.items() if k != "train.warmup_steps"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # keeps conftest's 8 fake devices
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and len(read_metrics(run_dir)) < 3:
      assert proc.poll() is None, proc.communicate()[1][-2000:]
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-2000:]
  res = json.loads(out.strip().splitlines()[-1])
  assert res["stopped_by_signal"] and 3 <= res["step"] < 100000
  saved = res["step"]
  assert (run_dir / "checkpoints" / str(saved)).is_dir()
  # The CLI recorded the experiment it ran (experiment file + overrides) as config.json.
  cli_exp = load_experiment([f"--config={REPO}/experiments/default.py", *args[5:]])[0]
  assert load_run_config(run_dir) == cli_exp
  # A rerun resumes at the saved step (the same model and data, a few more steps); its
  # experiment is built otherwise (base_config, not default.py), so the rerun names the
  # settings that changed and records its own.
  exp = make_exp(run_dir, cache_dir, **{"train.steps": 100000, "train.warmup_steps": 2})
  capsys.readouterr()
  r = loop.train(exp, max_steps=saved + 2)
  assert "sample.prompt: 'import os\\n' -> 'def '" in capsys.readouterr().err
  assert load_run_config(run_dir) == exp
  assert r["resumed_from"] == saved and r["step"] == saved + 2
  assert [s for s, _ in r["losses"]] == [saved + 1, saved + 2]
  # `lmx evaluate --run` restores the latest checkpoint (no best/: eval_every=0) with the
  # recorded experiment and reports.
  assert perplexity.cli_main(["--run", str(run_dir)]) == 0
  ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert ev["step"] == saved + 2
  assert ev["val_loss"] == pytest.approx(r["val_loss"], rel=1e-5)
  assert 1.0 < ev["val_ppl"] < ev["unigram_ppl"] * 10
  assert ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"]), rel=1e-6)


def test_distillation_from_a_run_directory_loads_that_teacher(tmp_path, cache_dir, capsys):
  """distill.teacher_run alone: the teacher's model comes from the run's config.json and its
  weights from its checkpoint. Property: a student initialized from the same run, trained
  on the soft term only (alpha 1), starts at KL(teacher || student) = 0 -- which holds only
  if the teacher loaded is exactly that run's model (measured: a freshly initialized teacher
  gives 0.013)."""
  teacher = tmp_path / "teacher"
  loop.train(make_exp(teacher, cache_dir, **{"train.steps": 4}))
  over = {"train.steps": 2, "train.objective": "distill", "train.init_from": str(teacher),
          "distill.teacher_run": str(teacher), "distill.alpha": 1.0}
  res = loop.train(make_exp(tmp_path / "student", cache_dir, **over))
  assert f"distilling from the teacher {teacher}" in capsys.readouterr().err
  first = res["losses"][0][1]
  assert abs(first) < 1e-5, res["losses"]
  # A run directory that records no experiment: one sentence naming the field.
  (tmp_path / "bare").mkdir()
  over["distill.teacher_run"] = str(tmp_path / "bare")
  with pytest.raises(ValueError, match=r"`distill.teacher_run` is .*records no experiment"):
    loop.train(make_exp(tmp_path / "student2", cache_dir, **over))
