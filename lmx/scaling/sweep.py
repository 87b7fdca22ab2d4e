"""IsoFLOP sweeps: `lmx sweep plan | run`.

    lmx sweep plan --config=experiments/isoflop.py [--config.sweep_dir=DIR ...]
    lmx sweep run  --config=experiments/isoflop.py [--workers=1]   # plan + run + fit, resumable
    lmx sweep run  --sweep_dir=DIR --emit=slurm|tpu                 # write job files instead
    lmx sweep run  --sweep_dir=DIR --index=I                        # one run (array task I)

`plan` turns the sweep config (budgets, model sizes per budget, base experiment, LR rule)
into one JSON file per run under SWEEP_DIR/plan/: the model shape from
`shapes.shape_for_params`, N = total parameters (`accounting.count_params`; with tied
embeddings 6N is exactly the dense FLOPs per token), tokens = C / (6 N), steps = tokens /
(batch * seq_len) rounded to a whole step, and the full experiment config.

`run` trains every planned run that has no `final` row in SWEEP_DIR/results.jsonl yet
(resume), through `lmx.train.loop.train` (which itself resumes an interrupted run from its
checkpoint), in a process pool. Each finished run appends to results.jsonl one `eval` row
per validation in its metrics.jsonl and one `final` row: run, budget, step, params,
non_embedding_params, tokens, flops (= 6 N D), flops_accounting (with attention), loss.
When every run is done it fits Approaches 1, 2 and 3 and writes plots to SWEEP_DIR/fits/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
from typing import Any, Callable

from lmx.config import ConfigError, ModelConfig, from_config_dict
from lmx.scaling.accounting import count_params, flops_per_token
from lmx.scaling.shapes import MODEL_FIELDS, shape_for_params

RESULTS = "results.jsonl"


def plan_sweep(sc, sweep_dir: str | None = None) -> list[dict]:
  """Sweep ConfigDict -> run entries; writes SWEEP_DIR/plan/NAME.json (idempotent)."""
  sweep_dir = sweep_dir or sc.sweep_dir
  budgets, sizes = list(sc.budgets), [list(s) for s in sc.sizes]
  if not budgets or any(not (isinstance(c, (int, float)) and c > 0) for c in budgets):
    raise ConfigError(f"Invalid config: `budgets` is {budgets!r}; it must be a non-empty "
                      "list of FLOP budgets > 0.")
  if len(sizes) != len(budgets):
    raise ConfigError(f"Invalid config: `sizes` has {len(sizes)} lists; it must have one "
                      f"list of model sizes per budget ({len(budgets)}).")
  base = sc.base.to_dict()
  base_model = ModelConfig(**base["model"])
  seq, batch = base["data"]["seq_len"], base["data"]["batch_size"]
  entries = []
  for c, targets in zip(budgets, sizes):
    for target in targets:
      shape = shape_for_params(int(target), aspect_ratio=sc.aspect_ratio,
                               vocab_size=base_model.vocab_size, base=base_model)
      cfg = dict(base)
      cfg["model"] = {**base["model"], **{k: shape[k] for k in MODEL_FIELDS}}
      model = ModelConfig(**cfg["model"]).validate()
      n = count_params(model).params
      steps = round(c / (6 * n) / (batch * seq))
      if steps < sc.min_steps:
        raise ConfigError(f"Invalid config: budget {c:.3g} with model size {target} gives "
                          f"{steps} steps; it must give >= min_steps={sc.min_steps} (raise "
                          "the budget or drop the size).")
      name = f"C{c:.2e}_N{int(target)}".replace("+", "")
      lr = sc.learning_rate * (sc.lr_ref_width / shape["d_model"]) ** sc.lr_width_exponent
      cfg["train"] = {**base["train"], "steps": steps, "learning_rate": lr,
                      "warmup_steps": max(1, int(sc.warmup_fraction * steps)),
                      "eval_every": max(1, steps // sc.evals_per_run)}
      cfg["name"], cfg["run_dir"] = name, os.path.join(sweep_dir, "runs", name)
      from_config_dict(cfg)  # validate now, not hours later on a cluster
      tokens = steps * batch * seq
      entries.append({"name": name, "budget": float(c), "target_non_embedding": int(target),
                      "params": n, "non_embedding_params": shape["non_embedding_params"],
                      "tokens": tokens, "flops": 6.0 * n * tokens,
                      "flops_accounting": float(flops_per_token(model, seq)) * tokens,
                      "batch_tokens": batch * seq, "config": cfg})
  os.makedirs(os.path.join(sweep_dir, "plan"), exist_ok=True)
  for e in entries:
    with open(os.path.join(sweep_dir, "plan", f"{e['name']}.json"), "w") as f:
      json.dump(e, f, indent=1)
  return entries


def load_plan(sweep_dir: str) -> list[dict]:
  d = os.path.join(sweep_dir, "plan")
  if not os.path.isdir(d):
    raise FileNotFoundError(f"no plan in {sweep_dir!r}; run `lmx sweep plan` first")
  out = []
  for fn in sorted(os.listdir(d)):
    if fn.endswith(".json"):
      with open(os.path.join(d, fn)) as f:
        out.append(json.load(f))
  return out


def _jsonl_records(path: str):
  """Dict records of a JSONL file (none if it is missing); lines cut by an interruption
  are skipped."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(r, dict):
        yield r


def finished_runs(sweep_dir: str) -> set[str]:
  return {r.get("run") for r in _jsonl_records(os.path.join(sweep_dir, RESULTS))
          if r.get("kind") == "final"}


def _eval_history(run_dir: str) -> list[tuple[int, float]]:
  """(step, val_loss) of every validation the trainer logged, last record per step."""
  hist: dict[int, float] = {}
  for r in _jsonl_records(os.path.join(run_dir, "metrics.jsonl")):
    if r.get("kind") == "eval" and "val_loss" in r:
      hist[int(r["step"])] = float(r["val_loss"])
  return sorted(hist.items())


class SweepInterrupted(Exception):
  """A run stopped on SIGTERM/SIGINT: it is not recorded, and the sweep stops; re-running
  resumes it from its checkpoint and skips the finished runs."""


def default_train(exp) -> dict:
  from lmx.train.loop import train  # the trainer is heavy: import only in the worker
  return train(exp)


def execute_run(entry: dict, train_fn: Callable[[Any], dict] = default_train) -> list[dict]:
  """Train one planned run; returns its results rows (eval rows, then the final row)."""
  exp = from_config_dict(entry["config"])
  metrics = train_fn(exp)
  if metrics.get("stopped_by_signal"):
    raise SweepInterrupted(f"run {entry['name']} was interrupted at step "
                           f"{metrics.get('step')}; re-run to resume")
  loss = metrics.get("val_loss")
  if loss is None:
    raise RuntimeError(f"run {entry['name']} returned no val_loss (metrics: {sorted(metrics)})")
  common = {k: entry[k] for k in ("budget", "params", "non_embedding_params")}
  bt = entry["batch_tokens"]
  rows = [{"kind": "eval", "run": entry["name"], **common, "step": s, "tokens": s * bt,
           "flops": 6.0 * entry["params"] * s * bt, "loss": v}
          for s, v in _eval_history(exp.run_dir)]
  step = int(metrics.get("step", exp.train.steps))
  rows.append({"kind": "final", "run": entry["name"], **common, "step": step,
               "tokens": step * bt, "flops": 6.0 * entry["params"] * step * bt,
               "flops_accounting": entry["flops_accounting"] * step / exp.train.steps,
               "loss": float(loss)})
  return rows


def _append(sweep_dir: str, rows: list[dict]) -> None:
  with open(os.path.join(sweep_dir, RESULTS), "a") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))


def run_sweep(sweep_dir: str, *, workers: int = 1, train_fn=default_train,
              only: list[str] | None = None) -> dict:
  """Run every unfinished planned run; returns counts. Rows are written by this process only,
  as each run finishes, so an interruption loses at most the runs in flight."""
  if workers < 1:
    raise ValueError(f"--workers is {workers}; it must be >= 1")
  plan = [e for e in load_plan(sweep_dir) if only is None or e["name"] in only]
  done = finished_runs(sweep_dir)
  todo = [e for e in plan if e["name"] not in done]
  failed = []
  if workers == 1:
    for e in todo:
      try:
        _append(sweep_dir, execute_run(e, train_fn))
      except SweepInterrupted:
        raise
      except Exception as err:  # one bad run must not stop the sweep
        failed.append((e["name"], repr(err)))
  else:  # spawn: JAX must not be forked after initialising
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      futs = {pool.submit(execute_run, e, train_fn): e["name"] for e in todo}
      for fut in concurrent.futures.as_completed(futs):
        try:
          _append(sweep_dir, fut.result())
        except SweepInterrupted:
          pool.shutdown(cancel_futures=True)
          raise
        except Exception as err:
          failed.append((futs[fut], repr(err)))
  for name, err in failed:
    print(f"lmx sweep: run {name} failed: {err}", file=sys.stderr)
  return {"planned": len(plan), "skipped_finished": len(plan) - len(todo),
          "ran": len(todo) - len(failed), "failed": len(failed)}


def emit_jobs(sweep_dir: str, kind: str) -> str:
  """Write SWEEP_DIR/jobs.txt (one `lmx sweep run --index=I` per line) for launch/."""
  plan = load_plan(sweep_dir)
  path = os.path.join(sweep_dir, "jobs.txt")
  with open(path, "w") as f:
    for i, _ in enumerate(plan):
      f.write(f"lmx sweep run --sweep_dir={sweep_dir} --index={i}\n")
  script = {"slurm": "launch/sweep_slurm.sh", "tpu": "launch/sweep_tpu.sh"}[kind]
  if kind == "slurm":
    print(f"sbatch --array=0-{len(plan) - 1} {script} {sweep_dir}")
  else:
    print(f"bash {script} {sweep_dir}   # one job per line of {path}")
  return path


def fit_sweep(sweep_dir: str, n_bootstrap: int = 200) -> dict:
  from lmx.scaling.cli import _parser, run_fit_command
  out = {}
  for approach in ("1", "2", "3"):
    args = _parser().parse_args([f"--runs={os.path.join(sweep_dir, RESULTS)}",
                                 f"--approach={approach}", f"--bootstrap={n_bootstrap}",
                                 f"--out={os.path.join(sweep_dir, 'fits')}"])
    try:
      out[approach] = run_fit_command(args)
    except ValueError as e:
      out[approach] = {"error": str(e)}
    print(json.dumps({"approach": approach, **out[approach]}))
  return out


def cli_main(argv: list[str]) -> int:
  from lmx.experiment import load_config_dict, split_config_args
  if not argv or argv[0] not in ("plan", "run"):
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2
  cfg_args, rest = split_config_args(argv[1:])
  p = argparse.ArgumentParser(prog=f"lmx sweep {argv[0]}")
  p.add_argument("--sweep_dir", default="")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--emit", choices=("slurm", "tpu"), default=None)
  p.add_argument("--index", type=int, default=None, help="run only plan entry I (array jobs)")
  p.add_argument("--bootstrap", type=int, default=200, help="resamples for the final fits")
  p.add_argument("--no_fit", action="store_true")
  args = p.parse_args(rest)
  sweep_dir = args.sweep_dir
  if cfg_args:
    sc = load_config_dict(cfg_args)
    sweep_dir = sweep_dir or sc.sweep_dir
    entries = plan_sweep(sc, sweep_dir)
    print(f"lmx sweep: planned {len(entries)} runs in {sweep_dir}/plan", file=sys.stderr)
  elif not sweep_dir:
    raise ConfigError("Missing `--config=experiments/isoflop.py` or `--sweep_dir=DIR`.")
  if argv[0] == "plan":
    return 0
  if args.emit:
    emit_jobs(sweep_dir, args.emit)
    return 0
  plan = load_plan(sweep_dir)
  only = None
  if args.index is not None:
    if not 0 <= args.index < len(plan):
      raise ConfigError(f"Invalid --index {args.index}; it must be in [0, {len(plan) - 1}].")
    only = [plan[args.index]["name"]]
  try:
    summary = run_sweep(sweep_dir, workers=args.workers, only=only)
  except SweepInterrupted as e:
    print(f"lmx sweep: {e}", file=sys.stderr)
    return 130
  print(json.dumps(summary))
  if only is None and not args.no_fit and len(finished_runs(sweep_dir)) == len(plan):
    fit_sweep(sweep_dir, args.bootstrap)
  return 1 if summary["failed"] else 0
