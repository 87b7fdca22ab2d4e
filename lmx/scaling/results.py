"""Read and clean scaling-run tables (CSV or JSONL).

Rows need a parameter count and a loss, plus tokens and/or FLOPs: tokens = flops / (6 N)
when only FLOPs are given, flops = 6 N D when only tokens are. Malformed rows are counted and
dropped, never fatal: unparsable JSON lines, missing or NaN/inf values, non-positive values,
and exact duplicates (the same run, size, tokens and loss twice, e.g. a resumed sweep that
appended a row again).

Sweep tables (`lmx sweep run`) hold a `kind` column: `eval` rows are the validation loss at
every evaluation and one `final` row per run. `load_runs(..., kind=...)` keeps one of them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import numpy as np


@dataclasses.dataclass
class Runs:
  """Clean columns, all float64 arrays of equal length (run ids are strings)."""

  params: np.ndarray
  tokens: np.ndarray
  flops: np.ndarray
  loss: np.ndarray
  run: np.ndarray  # (n,) str; row index when the table has no run column
  budget: np.ndarray  # (n,) nominal FLOP budget, or NaN when the table has none
  report: dict  # counts of read and dropped rows

  def __len__(self) -> int:
    return len(self.loss)


def read_rows(path: str) -> tuple[list[dict], int]:
  """CSV (by extension .csv) or JSONL rows as dicts, and the number of unparsable lines."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"runs file {path!r} does not exist")
  bad = 0
  rows: list[dict] = []
  with open(path, encoding="utf-8", errors="replace") as f:
    if path.endswith(".csv"):
      rows = [dict(r) for r in csv.DictReader(f)]
    else:
      for line in f:
        if not line.strip():
          continue
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          bad += 1
          continue
        if isinstance(r, dict):
          rows.append(r)
        else:
          bad += 1
  return rows, bad


def _num(v) -> float:
  if v is None or v == "" or isinstance(v, bool):
    return math.nan
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


def load_runs(path: str, *, params_col: str = "params", tokens_col: str = "tokens",
              flops_col: str = "flops", loss_col: str = "loss", run_col: str = "run",
              budget_col: str = "budget", kind: str | None = None) -> Runs:
  rows, unparsable = read_rows(path)
  if rows and params_col not in rows[0] and not any(params_col in r for r in rows):
    raise ValueError(f"runs file {path!r} has no column {params_col!r} (set --params_col); "
                     f"columns are {', '.join(sorted(rows[0]))}")
  if rows and not any(tokens_col in r or flops_col in r for r in rows):
    raise ValueError(f"runs file {path!r} has neither {tokens_col!r} nor {flops_col!r} "
                     "(set --tokens_col or --flops_col)")
  if kind is not None and any("kind" in r for r in rows):
    rows = [r for r in rows if r.get("kind") == kind]
  report = {"read": len(rows) + unparsable, "unparsable": unparsable, "nan": 0,
            "non_positive": 0, "duplicate": 0}
  out, seen = [], set()
  for i, r in enumerate(rows):
    n, d, c, l = (_num(r.get(k)) for k in (params_col, tokens_col, flops_col, loss_col))
    if math.isnan(d) and not math.isnan(c) and n > 0:
      d = c / (6.0 * n)
    if math.isnan(c) and not math.isnan(d):
      c = 6.0 * n * d
    vals = (n, d, c, l)
    if any(math.isnan(v) or math.isinf(v) for v in vals):
      report["nan"] += 1
      continue
    if any(v <= 0 for v in vals):
      report["non_positive"] += 1
      continue
    run = str(r.get(run_col, i))
    key = (run if run_col in r else "", n, d, l)
    if key in seen:
      report["duplicate"] += 1
      continue
    seen.add(key)
    out.append((n, d, c, l, run, _num(r.get(budget_col))))
  report["used"] = len(out)
  report["dropped"] = report["read"] - len(out)
  cols = list(zip(*out)) if out else [()] * 6
  f64 = lambda x: np.asarray(x, np.float64)
  return Runs(params=f64(cols[0]), tokens=f64(cols[1]), flops=f64(cols[2]), loss=f64(cols[3]),
              run=np.asarray(cols[4], dtype=str), budget=f64(cols[5]), report=report)


def group_budgets(flops: np.ndarray, budget: np.ndarray, rel_tol: float = 0.05) -> np.ndarray:
  """A nominal budget per row: the `budget` column where given, else FLOPs clustered so that
  rows within `rel_tol` (relative, in sorted order) share a budget (their geometric mean)."""
  if len(budget) and np.all(np.isfinite(budget) & (budget > 0)):
    return budget.copy()
  order = np.argsort(flops)
  out = np.empty_like(flops)
  start = 0
  log_c = np.log(flops[order])
  for i in range(1, len(order) + 1):
    if i == len(order) or log_c[i] - log_c[i - 1] > np.log1p(rel_tol):
      out[order[start:i]] = np.exp(log_c[start:i].mean())
      start = i
  return out
