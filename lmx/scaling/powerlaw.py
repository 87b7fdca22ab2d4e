"""Chinchilla Approach 1 (training-curve envelope) and Kaplan-style power laws.

Approach 1: every run contributes its whole validation curve (loss at tokens-so-far D_t,
FLOPs 6 N D_t). On `n_grid` log-spaced FLOP values the lower envelope over runs is taken
(each run's loss linearly interpolated in log C, only inside the FLOPs it covered); the run
that attains it gives N_opt(C), and D_opt(C) = C / (6 N_opt). FLOP values where the
smallest or largest model attains the envelope are left out: there the true optimum may lie
outside the sizes trained, and keeping them flattens the fitted slope. Then log N_opt = a log C +
const and log D_opt = b log C + const by least squares. Bootstrap resamples *runs*.

Kaplan et al. 2020, form without an offset: L(X) = (X_c / X)^alpha_X for X in N, D, C,
fitted by least squares of log L on log X over the Pareto frontier of the table (rows that
no row with smaller-or-equal X beats), i.e. the best loss reachable with at most X. NOTE:
Kaplan's N is the non-embedding count; pass that column (`--params_col`) to match them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lmx.scaling.isoflop import weighted_lines


@dataclasses.dataclass
class Approach1Fit:
  flops: np.ndarray  # (G,) envelope FLOP grid points with a defined envelope
  n_opt: np.ndarray  # (G,)
  d_opt: np.ndarray  # (G,)
  envelope_loss: np.ndarray  # (G,)
  a: float
  log_kn: float
  b: float
  log_kd: float
  bootstrap: np.ndarray | None  # (R', 4): a, log_kn, b, log_kd


def _curve_matrix(params, flops, loss, run, grid):
  """Per-run loss interpolated on the FLOP grid: (R, G), +inf outside a run's range."""
  runs = np.unique(run)
  sizes = np.empty(len(runs))
  mat = np.full((len(runs), len(grid)), np.inf)
  for i, r in enumerate(runs):
    idx = np.nonzero(run == r)[0]
    sizes[i] = np.median(params[idx])
    order = np.argsort(flops[idx])
    lc, lv = np.log(flops[idx][order]), loss[idx][order]
    inside = (grid >= lc[0]) & (grid <= lc[-1])
    mat[i, inside] = np.interp(grid[inside], lc, lv)
  return runs, sizes, mat


def fit_approach1(params, flops, loss, run, *, n_grid: int = 100, n_bootstrap: int = 0,
                  seed: int = 0) -> Approach1Fit:
  """params, flops, loss, run: (n,) rows of training curves (several rows per run)."""
  params, flops, loss = (np.asarray(v, np.float64) for v in (params, flops, loss))
  run = np.asarray(run)
  lc = np.log(flops)
  grid = np.linspace(lc.min(), lc.max(), n_grid)
  runs, sizes, mat = _curve_matrix(params, flops, loss, run, grid)
  if len(runs) < 2:
    raise ValueError(f"Approach 1 needs training curves of at least 2 runs of different "
                     f"sizes; got {len(runs)} run(s) (set --run_col to the run id column).")

  def envelope(weights):  # weights (B, R) -> log N_opt (B, G) with NaN where undefined
    m = np.where(weights[:, :, None] > 0, mat[None], np.inf)  # (B, R, G)
    best = np.argmin(m, axis=1)  # (B, G)
    ok = np.isfinite(np.min(m, axis=1))
    present = np.where(weights > 0, sizes[None], np.nan)  # (B, R)
    lo, hi = np.nanmin(present, axis=1), np.nanmax(present, axis=1)
    n_best = sizes[best]
    ok &= (n_best > lo[:, None]) & (n_best < hi[:, None])  # interior sizes only
    return np.where(ok, np.log(sizes)[best], np.nan), np.min(m, axis=1)

  log_n, env = envelope(np.ones((1, len(runs))))
  log_n, env = log_n[0], env[0]
  ok = np.isfinite(log_n)
  if len(np.unique(log_n[ok])) < 2:
    raise ValueError("Approach 1 is under-determined: fewer than 2 model sizes (other than "
                     "the smallest and largest) attain the loss envelope; add runs of other "
                     "sizes.")
  x = grid[None]
  a, log_kn = (v[0] for v in weighted_lines(x, log_n[None]))
  b, log_kd = (v[0] for v in weighted_lines(x, (grid - np.log(6) - log_n)[None]))
  boot = None
  if n_bootstrap > 0:
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(runs), np.full(len(runs), 1 / len(runs)), size=n_bootstrap)
    bl, _ = envelope(w)
    xs = np.broadcast_to(grid, bl.shape)
    ba, bkn = weighted_lines(xs, bl)
    bb, bkd = weighted_lines(xs, xs - np.log(6) - bl)
    distinct = np.array([len(np.unique(r[np.isfinite(r)])) >= 2 for r in bl])
    boot = np.stack([ba, bkn, bb, bkd], axis=-1)[distinct]
  return Approach1Fit(flops=np.exp(grid[ok]), n_opt=np.exp(log_n[ok]),
                      d_opt=np.exp(grid[ok] - np.log(6) - log_n[ok]), envelope_loss=env[ok],
                      a=float(a), log_kn=float(log_kn), b=float(b), log_kd=float(log_kd),
                      bootstrap=boot)


def pareto_frontier(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
  """Indices of rows whose loss beats every row with smaller x (ties in x: best only)."""
  order = np.lexsort((loss, x))
  keep, best = [], np.inf
  for i in order:
    if loss[i] < best:
      keep.append(i)
      best = loss[i]
  return np.asarray(keep, dtype=int)


def fit_kaplan_one(x, loss, *, n_bootstrap: int = 0, seed: int = 0) -> dict:
  """L = (X_c / X)^alpha on the Pareto frontier; returns alpha, X_c and bootstrap draws."""
  x, loss = np.asarray(x, np.float64), np.asarray(loss, np.float64)

  def fit(xs, ls):
    f = pareto_frontier(xs, ls)
    if len(f) < 2:
      return np.nan, np.nan
    s, t = weighted_lines(np.log(xs[f])[None], np.log(ls[f])[None])
    alpha = -s[0]
    return alpha, np.exp(t[0] / alpha) if alpha != 0 else np.nan  # t = alpha log X_c

  alpha, xc = fit(x, loss)
  if not np.isfinite(alpha):
    raise ValueError("Kaplan fit needs at least 2 distinct values on the loss frontier.")
  draws = None
  if n_bootstrap > 0:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_bootstrap, len(x)))
    draws = np.array([fit(x[i], loss[i]) for i in idx])
    draws = draws[np.all(np.isfinite(draws), axis=1)]
  return {"alpha": float(alpha), "X_c": float(xc), "bootstrap": draws}
