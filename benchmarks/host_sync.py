"""What a per-step host read of the train state costs: the default experiment's jitted step
driven as the loop drives it (host batch -> put_batch -> step), reading
`state.consecutive_bad_steps` every step vs only every `log_every` steps, in alternating
rounds in one process. Prints one JSON line.

    .venv/bin/python benchmarks/host_sync.py [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def main() -> None:
  from lmx.experiment import load_experiment
  from lmx.model import Transformer
  from lmx.parallel.mesh import make_mesh, make_rules, use_mesh
  from lmx.runtime import keep_host_memory
  from lmx.train.optimizer import make_optimizer
  from lmx.train.state import init_train_state
  from lmx.train.step import jit_train_step, make_train_step, put_batch

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  keep_host_memory()
  exp, _ = load_experiment(["--config=experiments/default.py"])
  mesh = make_mesh(exp.mesh)
  opt = make_optimizer(exp.train)
  b, t, v = exp.data.batch_size, exp.data.seq_len, exp.model.vocab_size
  rng = np.random.default_rng(0)
  toks = rng.integers(0, v, size=(b, t + 1)).astype(np.int32)
  host = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}
  with use_mesh(mesh, make_rules(exp.mesh)):
    graphdef, rest, state = init_train_state(lambda r: Transformer(exp.model, rngs=r), opt,
                                             exp.train, 0, mesh)
    step = jit_train_step(make_train_step(graphdef, rest, opt, exp.train), state, mesh,
                          exp.train)
    state, m = step(state, put_batch(host, mesh))
    jax.block_until_ready(m["loss"])
    res = {"every_step": [], "every_log": []}
    for _ in range(args.rounds):
      for mode in res:
        t0 = time.perf_counter()
        for i in range(1, args.steps + 1):
          state, m = step(state, put_batch(dict(host), mesh))
          if mode == "every_step" or i % exp.train.log_every == 0:
            int(state.consecutive_bad_steps)
        jax.block_until_ready(m["loss"])
        res[mode].append(args.steps / (time.perf_counter() - t0))
  out = {k: round(float(np.median(v)), 3) for k, v in res.items()}
  out["unit"] = "steps/s (median of rounds)"
  out["ratio_every_log_over_every_step"] = round(out["every_log"] / out["every_step"], 4)
  out["log_every"] = exp.train.log_every
  print(json.dumps(out))


if __name__ == "__main__":
  main()
