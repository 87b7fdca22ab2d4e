"""Shape rule, sweep planning (tokens = C / 6N), resume, job emission, results plumbing."""

import importlib.util
import json
import os

import numpy as np
import pytest

from lmx.config import ConfigError, ModelConfig
from lmx.scaling import sweep
from lmx.scaling.accounting import count_params
from lmx.scaling.results import load_runs
from lmx.scaling.shapes import shape_for_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("target", [2e4, 1e5, 1e6, 1.2e8, 7e9])
def test_shape_rule_hits_target(target):
  s = shape_for_params(target, vocab_size=1024)
  cfg = ModelConfig(**{k: s[k] for k in ("d_model", "n_layers", "n_heads", "head_dim",
                                         "vocab_size")}).validate()
  n = count_params(cfg).non_embedding_params
  assert n == s["non_embedding_params"]
  assert abs(n - target) / target <= 0.1
  assert s["d_model"] % s["head_dim"] == 0 and s["head_dim"] in (16, 32, 64)


def test_shape_rule_prefers_aspect_ratio():
  s = shape_for_params(1.2e8, vocab_size=1024, aspect_ratio=64)
  assert 32 <= s["d_model"] / s["n_layers"] <= 128


def _sweep_config(tmp_path):
  spec = importlib.util.spec_from_file_location("isoflop", f"{ROOT}/experiments/isoflop.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  sc = mod.get_config()
  sc.sweep_dir = str(tmp_path / "sw")
  return sc


def test_plan_tokens_equal_c_over_6n(tmp_path):
  sc = _sweep_config(tmp_path)
  entries = sweep.plan_sweep(sc)
  assert len(entries) == sum(len(s) for s in sc.sizes)
  bt = sc.base.data.batch_size * sc.base.data.seq_len
  for e in entries:
    n = count_params(ModelConfig(**e["config"]["model"])).params
    assert e["params"] == n
    steps = e["config"]["train"]["steps"]
    assert steps == round(e["budget"] / (6 * n) / bt)
    assert abs(e["tokens"] - e["budget"] / (6 * n)) <= bt / 2  # one step of rounding
    assert e["tokens"] == steps * bt
  assert len(os.listdir(tmp_path / "sw" / "plan")) == len(entries)


def test_plan_rejects_too_few_steps(tmp_path):
  sc = _sweep_config(tmp_path)
  sc.budgets = [1e9, 2e9, 3e9]
  with pytest.raises(ConfigError, match="min_steps"):
    sweep.plan_sweep(sc)


class FakeTrain:
  """Stands in for lmx.train.loop.train: loss from a known law, writes metrics.jsonl."""

  def __init__(self, fail_on=None):
    self.calls = []
    self.fail_on = fail_on

  def __call__(self, exp):
    self.calls.append(exp.name)
    if exp.name == self.fail_on:  # SIGTERM mid-run: the trainer checkpoints and returns
      return {"val_loss": 9.0, "step": 3, "stopped_by_signal": True}
    os.makedirs(exp.run_dir, exist_ok=True)
    n = count_params(exp.model).params
    bt = exp.data.batch_size * exp.data.seq_len
    with open(os.path.join(exp.run_dir, "metrics.jsonl"), "w") as f:
      for s in range(exp.train.eval_every, exp.train.steps + 1, exp.train.eval_every):
        f.write(json.dumps({"step": s, "kind": "eval", "val_loss": 2 + 50 / n**0.3
                            + 60 / (s * bt)**0.3}) + "\n")
    return {"val_loss": 2 + 50 / n**0.3 + 60 / (exp.train.steps * bt)**0.3,
            "step": exp.train.steps}


def test_run_resumes_without_redoing_finished_runs(tmp_path):
  sc = _sweep_config(tmp_path)
  entries = sweep.plan_sweep(sc)
  names = [e["name"] for e in sweep.load_plan(sc.sweep_dir)]
  stop_at = names[5]
  fake = FakeTrain(fail_on=stop_at)
  with pytest.raises(sweep.SweepInterrupted):
    sweep.run_sweep(sc.sweep_dir, train_fn=fake)
  assert fake.calls == names[:6]
  assert sweep.finished_runs(sc.sweep_dir) == set(names[:5])
  fake2 = FakeTrain()
  summary = sweep.run_sweep(sc.sweep_dir, train_fn=fake2)
  assert fake2.calls == names[5:]  # the five finished runs are not trained again
  assert summary == {"planned": len(entries), "skipped_finished": 5,
                     "ran": len(entries) - 5, "failed": 0}
  assert sweep.run_sweep(sc.sweep_dir, train_fn=FakeTrain())["ran"] == 0

  final = load_runs(f"{sc.sweep_dir}/results.jsonl", kind="final")
  assert len(final) == len(entries) and final.report["dropped"] == 0
  by_name = {e["name"]: e for e in entries}
  for run, n, d, c in zip(final.run, final.params, final.tokens, final.flops):
    assert n == by_name[run]["params"] and d == by_name[run]["tokens"]
    assert c == pytest.approx(6 * n * d)
  evals = load_runs(f"{sc.sweep_dir}/results.jsonl", kind="eval")
  assert len(evals) == sum(e["config"]["train"]["steps"] // e["config"]["train"]["eval_every"]
                           for e in entries)
  assert np.all(np.isfinite(evals.loss))


def test_emit_slurm_job_list(tmp_path, capsys):
  sc = _sweep_config(tmp_path)
  n = len(sweep.plan_sweep(sc))
  path = sweep.emit_jobs(sc.sweep_dir, "slurm")
  lines = open(path).read().splitlines()
  assert len(lines) == n and lines[-1].endswith(f"--index={n - 1}")
  assert f"--array=0-{n - 1}" in capsys.readouterr().out
  assert os.path.exists(f"{ROOT}/launch/sweep_slurm.sh")
  assert os.path.exists(f"{ROOT}/launch/sweep_tpu.sh")


def test_cli_plan_with_override(tmp_path):
  rc = sweep.cli_main(["plan", f"--config={ROOT}/experiments/isoflop.py",
                       f"--config.sweep_dir={tmp_path}/p"])
  n_runs = sum(len(s) for s in _sweep_config(tmp_path).sizes)
  assert rc == 0 and len(os.listdir(tmp_path / "p" / "plan")) == n_runs


def test_failed_run_is_reported_not_recorded(tmp_path):
  sc = _sweep_config(tmp_path)
  sweep.plan_sweep(sc)
  names = [e["name"] for e in sweep.load_plan(sc.sweep_dir)]

  def broken(exp):
    if exp.name == names[0]:
      raise RuntimeError("diverged")
    return FakeTrain()(exp)

  summary = sweep.run_sweep(sc.sweep_dir, train_fn=broken)
  assert summary["failed"] == 1 and names[0] not in sweep.finished_runs(sc.sweep_dir)


def test_fits_read_sweep_results(tmp_path, capsys):
  from lmx.scaling import cli
  sc = _sweep_config(tmp_path)
  sweep.plan_sweep(sc)
  sweep.run_sweep(sc.sweep_dir, train_fn=FakeTrain())
  rc = cli.cli_main(["fit", f"--runs={sc.sweep_dir}/results.jsonl", "--approach=2",
                     "--bootstrap=20"])
  s = json.loads(capsys.readouterr().out)
  # FakeTrain's law has alpha = beta = 0.3, so N_opt ~ C^0.5 (sizes are 2x apart: coarse).
  assert rc == 0 and s["a"] == pytest.approx(0.5, abs=0.1)
  assert s["budgets"] == sorted(sc.budgets)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_process_pool_runs_every_planned_run(tmp_path):
  sc = _sweep_config(tmp_path)
  sc.sizes = [s[:2] for s in sc.sizes]  # 6 runs keep the spawned workers' work small
  entries = sweep.plan_sweep(sc)
  summary = sweep.run_sweep(sc.sweep_dir, workers=2, train_fn=FakeTrain())
  assert summary["ran"] == len(entries) and summary["failed"] == 0
  assert sweep.finished_runs(sc.sweep_dir) == {e["name"] for e in entries}
