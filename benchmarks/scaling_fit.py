"""Time the Approach 3 fit: the full 4,500-start grid + 1,000 bootstrap resamples.

    python benchmarks/scaling_fit.py [--bootstrap 1000] [--repeats 2]

Synthetic data: Hoffmann et al.'s law (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28) on
6 IsoFLOP budgets (1e17..1e21) x 9 sizes, 0.5% multiplicative noise. Prints one JSON line:
the first call's time (includes XLA compilation), the later calls' times, and the fit.
"""

import argparse
import json
import os
import time

import numpy as np

from lmx.scaling import chinchilla


def synthetic(seed: int = 0):
  rng = np.random.default_rng(seed)
  n, d = [], []
  for c in np.logspace(17, 21, 6):
    for size in np.logspace(np.log10(c / 6) / 2 - 1, np.log10(c / 6) / 2 + 1, 9):
      n.append(size)
      d.append(c / 6 / size)
  n, d = np.array(n), np.array(d)
  loss = (1.69 + 406.4 / n**0.34 + 410.7 / d**0.28) * np.exp(rng.normal(0, 0.005, len(n)))
  return n, d, loss


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--bootstrap", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args()
  n, d, loss = synthetic()
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    fit = chinchilla.fit_approach3(n, d, loss, n_bootstrap=args.bootstrap)
    times.append(time.perf_counter() - t)
  ci = np.percentile(fit.bootstrap, [2.5, 97.5], axis=0) if args.bootstrap else None
  named = fit.named()
  print(json.dumps({
      "benchmark": "approach3_fit", "starts": int(chinchilla.full_init_grid().shape[0]),
      "bootstrap": args.bootstrap, "rows": int(len(n)), "cpu_count": os.cpu_count(),
      "first_call_s": round(times[0], 2), "later_calls_s": [round(t, 2) for t in times[1:]],
      "fit": {k: round(v, 4) for k, v in named.items()},
      "alpha_ci": None if ci is None else [round(float(x), 4) for x in ci[:, 3]],
      "beta_ci": None if ci is None else [round(float(x), 4) for x in ci[:, 4]]}))


if __name__ == "__main__":
  main()
