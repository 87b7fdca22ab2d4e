"""Chinchilla Approach 2: IsoFLOP parabolas, then power laws N_opt ~ C^a, D_opt ~ C^b.

For every FLOP budget C the final losses of runs of different sizes N are fitted by a
parabola in log N, L = c2 (log N)^2 + c1 log N + c0; its vertex is N_opt(C) = exp(-c1/(2 c2))
and D_opt(C) = C / (6 N_opt). Then log N_opt = a log C + log k_N and log D_opt = b log C +
log k_D by least squares (so b = 1 - a up to nothing: both are reported). Bootstrap:
resample runs with replacement *within each budget*, refit everything; all resamples are
solved at once as batched weighted least squares.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Approach2Fit:
  budgets: np.ndarray  # (K,) FLOP budgets used
  parabolas: np.ndarray  # (K, 3) c2, c1, c0 per budget (loss vs log N)
  n_opt: np.ndarray  # (K,)
  d_opt: np.ndarray  # (K,)
  a: float
  log_kn: float  # N_opt = exp(log_kn) * C^a
  b: float
  log_kd: float  # D_opt = exp(log_kd) * C^b
  skipped_budgets: list  # budgets with < 3 distinct sizes or no interior minimum
  extrapolated_budgets: list  # budgets whose N_opt lies outside the sizes trained
  bootstrap: np.ndarray | None  # (R', 4): a, log_kn, b, log_kd per valid resample
  failed_resamples: int = 0


def weighted_parabolas(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Least-squares y ~ c2 x^2 + c1 x + c0 for each weight row. x, y (n,), w (R, n) -> (R, 3).
  Rows whose normal equations are singular (< 3 distinct points) give NaN."""
  xc = x - x.mean()  # centring keeps the 3x3 system well conditioned
  design = np.stack([xc**2, xc, np.ones_like(xc)], axis=-1)  # (n, 3)
  gram = np.einsum("rn,ni,nj->rij", w, design, design)  # (R, 3, 3)
  rhs = np.einsum("rn,ni,n->ri", w, design, y)  # (R, 3)
  ok = np.linalg.cond(gram) < 1e12
  sol = np.full(rhs.shape, np.nan)
  if ok.any():
    sol[ok] = np.linalg.solve(gram[ok], rhs[ok][..., None])[..., 0]
  c2, c1, c0 = sol[:, 0], sol[:, 1], sol[:, 2]
  m = x.mean()  # undo the centring
  return np.stack([c2, c1 - 2 * c2 * m, c0 - c1 * m + c2 * m * m], axis=-1)


def weighted_lines(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Least-squares y ~ s x + t per row; x, y (R, K) (NaN entries ignored) -> s, t (R,)."""
  ok = np.isfinite(x) & np.isfinite(y)
  cnt = ok.sum(-1)
  xm = np.where(ok, x, 0).sum(-1) / np.maximum(cnt, 1)
  ym = np.where(ok, y, 0).sum(-1) / np.maximum(cnt, 1)
  dx = np.where(ok, x - xm[:, None], 0)
  dy = np.where(ok, y - ym[:, None], 0)
  sxx = (dx * dx).sum(-1)
  s = np.where((cnt >= 2) & (sxx > 0), (dx * dy).sum(-1) / np.where(sxx > 0, sxx, 1), np.nan)
  return s, ym - s * xm


def _vertices(coef: np.ndarray, log_n: np.ndarray) -> np.ndarray:
  """log N at each parabola's minimum; NaN if it opens downward."""
  c2, c1 = coef[..., 0], coef[..., 1]
  v = np.where(c2 > 0, -c1 / (2 * np.where(c2 > 0, c2, 1)), np.nan)
  return v


def fit_approach2(params, flops_budget, loss, *, n_bootstrap: int = 0,
                  seed: int = 0) -> Approach2Fit:
  """params, flops_budget (nominal budget per run), loss: (n,) arrays of final runs."""
  n, c, l = (np.asarray(v, np.float64) for v in (params, flops_budget, loss))
  budgets = np.unique(c)
  groups, skipped = [], []
  for bc in budgets:
    idx = np.nonzero(c == bc)[0]
    if len(np.unique(n[idx])) < 3:
      skipped.append(float(bc))
      continue
    coef = weighted_parabolas(np.log(n[idx]), l[idx], np.ones((1, len(idx))))[0]
    if not np.isfinite(_vertices(coef, np.log(n[idx]))):
      skipped.append(float(bc))
      continue
    groups.append((bc, idx, coef))
  if len(groups) < 2:
    raise ValueError(f"Approach 2 needs at least 2 FLOP budgets with >= 3 distinct model "
                     f"sizes and a convex IsoFLOP curve; got {len(groups)} usable of "
                     f"{len(budgets)} budgets.")
  bud = np.array([g[0] for g in groups])
  coefs = np.stack([g[2] for g in groups])
  log_nopt = _vertices(coefs, None)
  log_dopt = np.log(bud / 6.0) - log_nopt
  a, log_kn = (v[0] for v in weighted_lines(np.log(bud)[None], log_nopt[None]))
  b, log_kd = (v[0] for v in weighted_lines(np.log(bud)[None], log_dopt[None]))
  extrapolated = [float(bc) for (bc, idx, _), ln in zip(groups, log_nopt)
                  if not np.log(n[idx]).min() <= ln <= np.log(n[idx]).max()]
  boot, failed = None, 0
  if n_bootstrap > 0:
    rng = np.random.default_rng(seed)
    lno = np.empty((n_bootstrap, len(groups)))
    for k, (_, idx, _) in enumerate(groups):
      w = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=n_bootstrap)
      cf = weighted_parabolas(np.log(n[idx]), l[idx], w.astype(np.float64))
      lno[:, k] = _vertices(cf, None)
    x = np.broadcast_to(np.log(bud), lno.shape)
    ba, bkn = weighted_lines(x, lno)
    bb, bkd = weighted_lines(x, np.log(bud / 6.0)[None] - lno)
    boot = np.stack([ba, bkn, bb, bkd], axis=-1)
    valid = np.all(np.isfinite(lno), axis=1)  # a resample must keep every budget usable
    failed = int((~valid).sum())
    boot = boot[valid]
  return Approach2Fit(budgets=bud, parabolas=coefs, n_opt=np.exp(log_nopt),
                      d_opt=np.exp(log_dopt), a=float(a), log_kn=float(log_kn), b=float(b),
                      log_kd=float(log_kd), skipped_budgets=skipped,
                      extrapolated_budgets=extrapolated, bootstrap=boot,
                      failed_resamples=failed)
