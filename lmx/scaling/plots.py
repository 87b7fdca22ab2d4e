"""PNG plots of scaling fits (matplotlib, Agg backend, no display needed).

* `isoflop.png`: final loss vs N per FLOP budget with the fitted parabolas (Approach 2).
* `frontier.png`: loss vs compute for every run, the fitted compute-optimal loss law and its
  95% bootstrap band (Approach 3: L(N_opt(C), D_opt(C)); Kaplan: (C_c/C)^alpha_C;
  Approach 1: the measured envelope).
* `allocation.png`: N_opt and D_opt vs C, points from the data and the fitted power laws.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from matplotlib.ticker import NullFormatter  # noqa: E402

from lmx.scaling import chinchilla  # noqa: E402
from lmx.scaling.results import Runs, group_budgets  # noqa: E402



def _finish(fig, ax, path: str) -> str:
  """Legend, readable log ticks, save as PNG, free the figure."""
  ax.legend(fontsize=7)
  ax.xaxis.set_minor_formatter(NullFormatter())  # minor log-tick labels overlap
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path

def _cgrid(runs: Runs, budget: float) -> np.ndarray:
  lo, hi = np.log10(runs.flops.min()), np.log10(max(runs.flops.max(), budget))
  return np.logspace(lo - 0.2, hi + 0.2, 100)


def plot_isoflop(runs: Runs, fit, path: str) -> str:
  fig, ax = plt.subplots(figsize=(6, 4))
  budgets = group_budgets(runs.flops, runs.budget)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(fit.budgets)))
  for color, bc, coef, n_opt in zip(colors, fit.budgets, fit.parabolas, fit.n_opt):
    idx = budgets == bc
    ax.scatter(runs.params[idx], runs.loss[idx], color=color, s=14, label=f"C={bc:.2g}")
    x = np.linspace(np.log(runs.params[idx].min()) - 0.3, np.log(runs.params[idx].max()) + 0.3)
    ax.plot(np.exp(x), np.polyval(coef, x), color=color, lw=1)
    ax.axvline(n_opt, color=color, ls=":", lw=0.8)
  ax.set(xscale="log", xlabel="parameters N", ylabel="final loss", title="IsoFLOP curves")
  return _finish(fig, ax, path)


def plot_frontier(runs: Runs, approach: str, fit, summary: dict, path: str) -> str:
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.scatter(runs.flops, runs.loss, s=8, color="0.6", label="runs")
  c = _cgrid(runs, summary["compute_optimal"]["budget"])
  band = None
  if approach == "3":
    ax.plot(c, chinchilla.compute_optimal(fit.params, c)["loss"], color="C0",
            label="L(N_opt(C), D_opt(C))")
    if fit.bootstrap is not None:
      band = chinchilla.compute_optimal(fit.bootstrap[:, None, :], c[None])["loss"]
  elif approach == "kaplan":
    r = fit["C"]
    ax.plot(c, (r["X_c"] / c) ** r["alpha"], color="C0", label="(C_c/C)^alpha_C")
    if r["bootstrap"] is not None and len(r["bootstrap"]):
      bs = r["bootstrap"]
      band = (bs[:, 1:2] / c[None]) ** bs[:, 0:1]
  elif approach == "1":
    ax.plot(fit.flops, fit.envelope_loss, color="C0", label="lower envelope")
  if band is not None:
    lo, hi = np.nanpercentile(band, [2.5, 97.5], axis=0)
    ax.fill_between(c, lo, hi, color="C0", alpha=0.25, label="95% bootstrap band")
  ax.set(xscale="log", xlabel="training FLOPs C", ylabel="loss",
         title=f"loss vs compute (approach {approach})")
  return _finish(fig, ax, path)


def plot_allocation(runs: Runs, approach: str, fit, path: str) -> str:
  fig, ax = plt.subplots(figsize=(6, 4))
  c = _cgrid(runs, runs.flops.max())
  if approach == "3":
    opt = chinchilla.compute_optimal(fit.params, c)
    n_fit, d_fit = opt["N_opt"], opt["D_opt"]
  else:
    n_fit = np.exp(fit.log_kn) * c**fit.a
    d_fit = np.exp(fit.log_kd) * c**fit.b
    pts_c = fit.budgets if approach == "2" else fit.flops
    ax.scatter(pts_c, fit.n_opt, color="C0", s=14)
    ax.scatter(pts_c, fit.d_opt, color="C1", s=14)
  ax.plot(c, n_fit, color="C0", label="N_opt(C)")
  ax.plot(c, d_fit, color="C1", label="D_opt(C)")
  ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="N or D",
         title=f"compute-optimal allocation (approach {approach})")
  return _finish(fig, ax, path)


def write_plots(runs: Runs, approach: str, fit, summary: dict, out_dir: str) -> list[str]:
  """Every plot that makes sense for `approach`; returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  p = lambda name: os.path.join(out_dir, f"approach{approach}_{name}.png")
  paths = [plot_frontier(runs, approach, fit, summary, p("frontier"))]
  if approach == "2":
    paths.append(plot_isoflop(runs, fit, p("isoflop")))
  if approach in ("1", "2", "3"):
    paths.append(plot_allocation(runs, approach, fit, p("allocation")))
  return paths
