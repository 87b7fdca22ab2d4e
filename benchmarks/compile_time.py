"""Compile time of the jitted train step against depth: the scanned layer stack vs unrolled.

    python benchmarks/compile_time.py                         # n_layers 4, 16, 32; scan, unrolled
    python benchmarks/compile_time.py --layers 4,16 --modes scan
    PYTHONPATH=/tmp/before python benchmarks/compile_time.py  # an older checkout (see below)

Prints one JSON line per (mode, n_layers): seconds to trace + lower (`jit(...).lower`) and
to compile (`.compile()`) the real train step (`lmx.train.step.make_train_step`, AdamW,
global-norm clipping, fp32, one device) of a small model (d_model 64, 4 heads, vocab 512,
batch 4 x 64), each in a fresh subprocess so no cache is shared between points.

mode 'scan' is model.scan_layers=True (one jax.lax.scan over the stacked layers), 'unrolled'
is scan_layers=False (same stacked parameters, scan fully unrolled). Run against a checkout
from before the layer stack (a `git worktree` of that commit on PYTHONPATH), the script
finds no `scan_layers` field and times that code's own per-block Python loop as mode
'loop'. Timings are wall-clock; the machine is in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time


def measure(n_layers: int, mode: str) -> dict:
  """One point, in this process: build, lower and compile the train step once."""
  import jax
  import numpy as np

  import lmx
  from lmx.config import MeshConfig, ModelConfig, TrainConfig
  from lmx.model import Transformer
  from lmx.parallel.mesh import make_mesh, use_mesh
  from lmx.train.optimizer import make_optimizer
  from lmx.train.state import init_train_state
  from lmx.train.step import jit_train_step, make_train_step

  kw = dict(vocab_size=512, d_model=64, n_layers=n_layers, n_heads=4, max_seq_len=64)
  if mode != "loop":
    kw["scan_layers"] = mode == "scan"
  model = ModelConfig(**kw).validate()
  train = TrainConfig(steps=100, warmup_steps=10)
  b, t = 4, 64
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  opt = make_optimizer(train)
  with use_mesh(mesh):
    graphdef, rest, state = init_train_state(lambda rngs: Transformer(model, rngs=rngs), opt,
                                             train, 0, mesh)
    step = jit_train_step(make_train_step(graphdef, rest, opt, train), state, mesh)
    toks = np.zeros((b, t), np.int32)
    batch = {"inputs": toks, "targets": toks, "loss_mask": np.ones((b, t), np.float32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "segment_ids": np.ones((b, t), np.int32)}
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
  src = os.path.dirname(os.path.dirname(os.path.abspath(lmx.__file__)))
  rev = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  return {"mode": mode, "n_layers": n_layers, "lower_s": round(t1 - t0, 3),
          "compile_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3), "lmx_source": src,
          "commit": rev}


def has_scan_layers() -> bool:
  from lmx.config import ModelConfig
  return "scan_layers" in {f.name for f in dataclasses.fields(ModelConfig)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", default="4,16,32", help="comma list of n_layers")
  p.add_argument("--modes", default="", help="comma list of scan, unrolled (default: both; "
                 "'loop' on a checkout without the layer stack)")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # 'mode:n' = child process
  args = p.parse_args(argv)
  if args.one:
    mode, n = args.one.split(":")
    print(json.dumps(measure(int(n), mode)), flush=True)
    return 0
  modes = args.modes.split(",") if args.modes else (
      ["scan", "unrolled"] if has_scan_layers() else ["loop"])
  machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
             "python": platform.python_version()}
  for mode in modes:
    for n in [int(x) for x in args.layers.split(",")]:
      out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={mode}:{n}"],
                           capture_output=True, text=True, check=True).stdout
      res = json.loads(out.strip().splitlines()[-1])
      print(json.dumps({**res, "machine": machine}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
