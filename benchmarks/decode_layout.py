"""The decode layouts paired in one process: `model.decode_layers` scan vs unrolled, same
weights, alternating rounds (drift hits both alike), greedy, 32-token prompts, 128 new
tokens. Prints one JSON line per batch size with tokens/s of each and their ratio.

    .venv/bin/python benchmarks/decode_layout.py [b58|default] [1,8] [rounds]

Figures: docs/decoding.md.
"""
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import SHAPES  # noqa: E402
from lmx.infer.engine import SamplingOptions, decode  # noqa: E402
from lmx.model.transformer import Transformer  # noqa: E402


def main(argv: list[str]) -> int:
  shape = argv[1] if len(argv) > 1 else "b58"
  batches = [int(x) for x in (argv[2] if len(argv) > 2 else "1,8").split(",")]
  rounds = int(argv[3]) if len(argv) > 3 else 3
  new = 128
  base = SHAPES[shape]
  m0 = Transformer(base, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(m0)
  models = {}
  for lay in ("scan", "unrolled"):
    cfg = dataclasses.replace(base, decode_layers=lay)
    m = Transformer(cfg, rngs=nnx.Rngs(params=0))
    nnx.update(m, state)
    models[lay] = m
  opts = SamplingOptions(temperature=0.0, stop_ids=())
  rng = np.random.default_rng(0)
  for b in batches:
    prompts = rng.integers(4, base.vocab_size, (b, 32)).tolist()
    outs = {lay: decode(m, prompts, new, opts) for lay, m in models.items()}
    same = outs["scan"].tokens == outs["unrolled"].tokens
    ts = {lay: [] for lay in models}
    for r in range(rounds):
      for lay, m in models.items():
        t = time.perf_counter()
        decode(m, prompts, new, opts)
        ts[lay].append(time.perf_counter() - t)
    rec = {"shape": shape, "batch": b, "same_tokens": same,
           **{f"{lay}_tok_s": round(b * new / statistics.median(v), 1) for lay, v in ts.items()}}
    rec["unrolled/scan"] = round(rec["unrolled_tok_s"] / rec["scan_tok_s"], 3)
    print(json.dumps(rec), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
