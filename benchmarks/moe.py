"""MoE vs the dense model of equal active parameters (experiments/moe.py) on this machine.

    python benchmarks/moe.py step                 # train-step time, paired rounds
    python benchmarks/moe.py quality --steps 300  # short runs on the embedded corpus

`step` prints one JSON line per model (moe: capacity 1.25, dropless, dense): median
seconds per train step over alternating rounds (so drift on a shared machine hits all
alike), tokens/s, total and active parameters, FLOPs per token (6 N_active convention),
and the ratio to dense. Synthetic batches of the preset's shape (16 x 256 tokens).

`quality` trains `moe`, `nobalance` (aux_loss_coef 0) and `dense` for the same number of
steps (the LR schedule spans exactly those steps) on the embedded stdlib corpus in a
temporary run directory and prints one JSON line each: the final whole-split validation
loss, and for MoE the expert-load coefficient of variation (mean of the last 5 logged
steps) and balance loss. Figures and their reading: docs/moe.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("moe", "dropless", "dense")


def _exp(arg: str, **train):
  import dataclasses
  from lmx.config import from_config_dict
  from lmx.experiment import load_experiment
  exp, _ = load_experiment([f"--config={os.path.join(ROOT, 'experiments', 'moe.py')}:{arg}"])
  if train:
    exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, **train))
  return exp


def step_times(rounds: int, steps: int) -> list[dict]:
  import jax
  import numpy as np
  from flax import nnx
  from lmx.config import MeshConfig
  from lmx.model import Transformer
  from lmx.parallel.mesh import make_mesh, use_mesh
  from lmx.scaling.accounting import count_params, flops_per_token
  from lmx.train.optimizer import make_optimizer
  from lmx.train.state import create_train_state
  from lmx.train.step import jit_train_step, make_train_step

  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  runs = {}
  for arg in VARIANTS:
    exp = _exp(arg)
    b, t, v = exp.data.batch_size, exp.data.seq_len, exp.model.vocab_size
    rng = np.random.default_rng(0)
    toks = rng.integers(0, v, size=(b, t + 1)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}
    with use_mesh(mesh):
      model = Transformer(exp.model, rngs=nnx.Rngs(0))
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      opt = make_optimizer(exp.train)
      state = create_train_state(params, opt, exp.train, 0)
      step = jit_train_step(make_train_step(graphdef, rest, opt, exp.train), state, mesh,
                            exp.train)
      state, m = step(state, batch)  # compile
      jax.block_until_ready(m)
    pc = count_params(exp.model)
    runs[arg] = dict(exp=exp, step=step, state=state, batch=batch, times=[], tokens=b * t,
                     params=pc.params, active_params=pc.active_params,
                     flops_per_token=flops_per_token(exp.model, t))
  for _ in range(rounds):
    for arg, r in runs.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        r["state"], m = r["step"](r["state"], r["batch"])
      jax.block_until_ready(m)
      r["times"].append((time.perf_counter() - t0) / steps)
  dense = statistics.median(runs["dense"]["times"])
  out = []
  for arg, r in runs.items():
    s = statistics.median(r["times"])
    out.append({"bench": "moe_step", "model": arg, "sec_per_step": round(s, 4),
                "tokens_per_s": round(r["tokens"] / s), "vs_dense": round(s / dense, 3),
                "params": r["params"], "active_params": r["active_params"],
                "flops_per_token": r["flops_per_token"], "rounds": rounds,
                "steps_per_round": steps, "devices": 1, "cpus": os.cpu_count()})
  return out


def _tail_mean(path: str, key: str, n: int = 5):
  vals = []
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if key in rec:
        vals.append(rec[key])
  return round(statistics.fmean(vals[-n:]), 4) if vals else None


def quality(steps: int, variants=("moe", "nobalance", "dense"), seed: int = 0) -> list[dict]:
  import dataclasses
  from lmx.train.loop import train
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    for arg in variants:
      exp = _exp(arg, steps=steps, eval_every=steps, warmup_steps=min(100, steps // 5))
      exp = dataclasses.replace(exp, run_dir=os.path.join(tmp, arg), seed=seed,
                                checkpoint=dataclasses.replace(exp.checkpoint, every=steps))
      t0 = time.perf_counter()
      final = train(exp)
      metrics = os.path.join(exp.run_dir, "metrics.jsonl")
      rec = {"bench": "moe_quality", "model": arg, "steps": steps, "seed": seed,
             "tokens": steps * exp.data.batch_size * exp.data.seq_len,
             "val_loss": round(float(final.get("val_loss", final.get("validation_loss", -1))), 4),
             "wall_s": round(time.perf_counter() - t0, 1)}
      if arg != "dense":
        rec.update(load_cv=_tail_mean(metrics, "moe_load_cv"),
                   load_max=_tail_mean(metrics, "moe_load_max"),
                   load_min=_tail_mean(metrics, "moe_load_min"),
                   balance=_tail_mean(metrics, "moe_balance"),
                   dropped=_tail_mean(metrics, "moe_dropped"))
      out.append(rec)
      print(json.dumps(rec), flush=True)
  return out


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("step", "quality"))
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--variants", default="moe,nobalance,dense",
                 help="quality: experiments/moe.py arguments to train, comma-separated")
  p.add_argument("--seed", type=int, default=0, help="quality: model init seed")
  p.add_argument("--steps", type=int, default=None,
                 help="step: steps per round (default 3); quality: training steps (300)")
  args = p.parse_args(argv)
  from lmx.runtime import keep_host_memory
  keep_host_memory()
  if args.what == "step":
    for rec in step_times(args.rounds, args.steps or 3):
      print(json.dumps(rec), flush=True)
  else:
    quality(args.steps or 300, tuple(args.variants.split(",")), args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
