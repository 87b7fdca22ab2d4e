"""`lmx scaling fit --runs=FILE --approach=1|2|3|kaplan [...]`: fit and print one JSON line.

    lmx scaling fit --runs=runs/isoflop/results.jsonl --approach=3 --bootstrap=1000 \
        --budget=1e21 --out=runs/isoflop/fits

Columns default to params, tokens, flops, loss (and run, budget, kind for sweep tables);
rename with --params_col etc. Approach 1 reads the per-eval rows of a sweep table
(kind=eval), the others the final rows (kind=final); tables without `kind` are used whole.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from lmx.scaling.fit import APPROACHES, fit_runs
from lmx.scaling.results import load_runs


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="lmx scaling fit", description=__doc__.splitlines()[0])
  p.add_argument("--runs", required=True, help="CSV (.csv) or JSONL results table")
  p.add_argument("--approach", required=True, choices=APPROACHES)
  p.add_argument("--params_col", default="params")
  p.add_argument("--tokens_col", default="tokens")
  p.add_argument("--flops_col", default="flops")
  p.add_argument("--loss_col", default="loss")
  p.add_argument("--run_col", default="run", help="run id column (Approach 1 curves)")
  p.add_argument("--budget_col", default="budget", help="nominal FLOP budget column")
  p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples; 0 = none")
  p.add_argument("--budget", type=float, default=0.0,
                 help="FLOP budget for the compute-optimal prediction (default: max in data)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="folder for PNG plots and fit.json ('' = none)")
  return p


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def run_fit_command(args: argparse.Namespace) -> dict:
  if args.bootstrap < 0:
    raise ValueError(f"--bootstrap is {args.bootstrap}; it must be >= 0")
  if args.budget < 0:
    raise ValueError(f"--budget is {args.budget}; it must be > 0 (or 0 for the default)")
  kind = "eval" if args.approach == "1" else "final"
  runs = load_runs(args.runs, params_col=args.params_col, tokens_col=args.tokens_col,
                   flops_col=args.flops_col, loss_col=args.loss_col, run_col=args.run_col,
                   budget_col=args.budget_col, kind=kind)
  summary, fit = fit_runs(runs, args.approach, n_bootstrap=args.bootstrap,
                          budget=args.budget or None, seed=args.seed)
  if args.out:
    from lmx.scaling.plots import write_plots  # matplotlib only when plots are asked for
    summary["plots"] = write_plots(runs, args.approach, fit, summary, args.out)
    with open(f"{args.out}/approach{args.approach}_fit.json", "w") as f:
      json.dump(_json_safe(summary), f, indent=1)
  return _json_safe(summary)


def cli_main(argv: list[str]) -> int:
  if not argv or argv[0] != "fit":
    print("usage: lmx scaling fit --runs=FILE --approach=1|2|3|kaplan [options]",
          file=sys.stderr)
    return 2
  args = _parser().parse_args(argv[1:])
  try:
    summary = run_fit_command(args)
  except ValueError as e:
    print(f"lmx scaling fit: {e}", file=sys.stderr)
    return 2
  dropped = summary["rows"]["dropped"]
  if dropped:
    print(f"lmx scaling fit: dropped {dropped} bad rows: {summary['rows']}", file=sys.stderr)
  print(json.dumps(summary))
  return 0
