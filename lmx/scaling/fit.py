"""One entry point for every scaling-law fit: `fit_runs(runs, approach) -> (summary, fit)`.

The summary is JSON-ready: fitted parameters at top level, `ci` with 95% bootstrap percentile
intervals for every fitted and derived quantity, `compute_optimal` at the user's budget (N_opt,
D_opt, tokens per parameter; predicted loss for Approach 3), and the bad-row report. The
fitting itself lives in `chinchilla.py` (Approach 3), `isoflop.py` (Approach 2) and
`powerlaw.py` (Approach 1, Kaplan).
"""

from __future__ import annotations

import numpy as np

from lmx.scaling import chinchilla, isoflop, powerlaw
from lmx.scaling.results import Runs, group_budgets

APPROACHES = ("1", "2", "3", "kaplan")


def percentile_ci(draws: np.ndarray | None, level: float = 0.95) -> list[float] | None:
  if draws is None:
    return None
  draws = np.asarray(draws, np.float64)
  draws = draws[np.isfinite(draws)]
  if len(draws) < 2:
    return None
  lo = 100 * (1 - level) / 2
  return [float(np.percentile(draws, lo)), float(np.percentile(draws, 100 - lo))]


def _allocation(a, log_kn, b, log_kd, c) -> dict[str, np.ndarray]:
  n = np.exp(log_kn + a * np.log(c))
  d = np.exp(log_kd + b * np.log(c))
  return {"N_opt": n, "D_opt": d, "tokens_per_param": d / n}


def _power_summary(fit, budget: float) -> dict:
  out = {"a": fit.a, "b": fit.b, "k_N": float(np.exp(fit.log_kn)),
         "k_D": float(np.exp(fit.log_kd))}
  opt = _allocation(fit.a, fit.log_kn, fit.b, fit.log_kd, budget)
  ci: dict = {}
  if fit.bootstrap is not None and len(fit.bootstrap):
    bs = fit.bootstrap
    ci = {"a": percentile_ci(bs[:, 0]), "b": percentile_ci(bs[:, 2]),
          "k_N": percentile_ci(np.exp(bs[:, 1])), "k_D": percentile_ci(np.exp(bs[:, 3]))}
    bopt = _allocation(bs[:, 0], bs[:, 1], bs[:, 2], bs[:, 3], budget)
    ci.update({k: percentile_ci(v) for k, v in bopt.items()})
    out["n_bootstrap_valid"] = int(len(bs))
  out["ci"] = ci
  out["compute_optimal"] = {"budget": budget, **{k: float(v) for k, v in opt.items()}}
  return out


def fit_runs(runs: Runs, approach: str, *, n_bootstrap: int = 0, budget: float | None = None,
             seed: int = 0, grid: np.ndarray | None = None):
  """Fit `approach` ('1', '2', '3' or 'kaplan') to clean runs; returns (summary, fit)."""
  approach = str(approach)
  if approach not in APPROACHES:
    raise ValueError(f"approach is {approach!r}; it must be one of {', '.join(APPROACHES)}")
  if len(runs) == 0:
    raise ValueError("no usable rows in the runs file after dropping bad rows "
                     f"({runs.report}).")
  budget = float(budget) if budget else float(runs.flops.max())
  if approach == "3":
    f = chinchilla.fit_approach3(runs.params, runs.tokens, runs.loss, grid=grid,
                                 n_bootstrap=n_bootstrap, seed=seed)
    out = dict(f.named())
    opt = chinchilla.compute_optimal(f.params, budget)
    out.update(a=float(opt["a"]), b=float(opt["b"]), objective=f.objective)
    ci: dict = {}
    if f.bootstrap is not None:
      bs = f.bootstrap
      for name, v in zip(chinchilla.PARAM_NAMES, bs.T):
        key = {"a": "A", "b": "B", "e": "E"}.get(name, name)
        ci[key] = percentile_ci(np.exp(v) if name in "abe" else v)
      bopt = chinchilla.compute_optimal(bs, budget)
      ci.update({k: percentile_ci(v) for k, v in bopt.items()})
    out["ci"] = ci
    out["compute_optimal"] = {"budget": budget, **{k: float(opt[k]) for k in
                                                   ("N_opt", "D_opt", "tokens_per_param",
                                                    "loss")}}
  elif approach == "2":
    budgets = group_budgets(runs.flops, runs.budget)
    f = isoflop.fit_approach2(runs.params, budgets, runs.loss, n_bootstrap=n_bootstrap,
                              seed=seed)
    out = _power_summary(f, budget)
    out["budgets"] = f.budgets.tolist()
    out["skipped_budgets"] = f.skipped_budgets
    out["extrapolated_budgets"] = f.extrapolated_budgets  # N_opt outside the sizes trained
  elif approach == "1":
    f = powerlaw.fit_approach1(runs.params, runs.flops, runs.loss, runs.run,
                               n_bootstrap=n_bootstrap, seed=seed)
    out = _power_summary(f, budget)
  else:
    f = {}
    out = {"form": "L(X) = (X_c / X)^alpha_X on the loss frontier", "ci": {}}
    for key, x in (("N", runs.params), ("D", runs.tokens), ("C", runs.flops)):
      r = powerlaw.fit_kaplan_one(x, runs.loss, n_bootstrap=n_bootstrap, seed=seed)
      f[key] = r
      out[f"alpha_{key}"], out[f"{key}_c"] = r["alpha"], r["X_c"]
      if r["bootstrap"] is not None:
        out["ci"][f"alpha_{key}"] = percentile_ci(r["bootstrap"][:, 0])
        out["ci"][f"{key}_c"] = percentile_ci(r["bootstrap"][:, 1])
    out["compute_optimal"] = {"budget": budget,
                              "loss": float((out["C_c"] / budget) ** out["alpha_C"])}
  out = {"approach": approach, **out, "n_bootstrap": n_bootstrap, "rows": runs.report}
  return out, f
