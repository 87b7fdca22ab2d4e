"""Chinchilla Approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022).

The fit follows the paper's recipe exactly:

* parametrize A = exp(a), B = exp(b), E = exp(e) and minimize, over p = (a, b, e, alpha,
  beta), the sum over runs of Huber_delta(r_i) with delta = 1e-3 and the log-space residual

      r_i = logsumexp(a - alpha log N_i, b - beta log D_i, e) - log L_i

* run L-BFGS from every point of the grid alpha, beta in {0, 0.5, ..., 2},
  e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25} (5 * 5 * 5 * 6 * 6 = 4,500 starts) and
  keep the lowest objective.

Speed: one `optax.lbfgs` solve is a `lax.while_loop` with a fixed iteration cap, and
`jax.vmap` runs all starts at once; the whole grid is one jitted call. Bootstrap resamples
are multinomial *weights* on the runs (a resample with replacement is the same objective
with integer counts), so all resamples are also one vmapped call. NOTE: each resample starts
from the `bootstrap_starts` best distinct optima of the full-data grid search rather than the
whole grid -- a resample's optimum sits near a full-data optimum, and this cuts the bootstrap
work by ~1000x. Everything runs in float64 (inside `jax.enable_x64`): with delta = 1e-3 the
Huber gradients are tiny and float32 L-BFGS stalls before the optimum.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

HUBER_DELTA = 1e-3
PARAM_NAMES = ("a", "b", "e", "alpha", "beta")


def full_init_grid() -> np.ndarray:
  """The paper's 4,500 starts as rows (a, b, e, alpha, beta)."""
  return init_grid(np.arange(0, 26, 5.0), np.arange(0, 26, 5.0), np.arange(-1, 1.01, 0.5),
                   np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5))


def init_grid(a, b, e, alpha, beta) -> np.ndarray:
  return np.array(list(itertools.product(a, b, e, alpha, beta)), dtype=np.float64)  # (S, 5)


def objective(p, log_n, log_d, log_l, w, delta=HUBER_DELTA):
  """Weighted sum of Huber(delta) log-space residuals, divided by delta (same minimizer,
  values O(|r|) instead of O(1e-3 |r|), which keeps L-BFGS tolerances sane)."""
  a, b, e, alpha, beta = p[0], p[1], p[2], p[3], p[4]
  terms = jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)])
  r = jax.nn.logsumexp(terms, axis=0) - log_l  # (n,)
  huber = optax.losses.huber_loss(r, delta=delta)
  return jnp.sum(w * huber) / delta


def _lbfgs_solve(p0, log_n, log_d, log_l, w, max_iter, tol, linesearch_steps):
  fn = lambda p: objective(p, log_n, log_d, log_l, w)
  solver = optax.lbfgs(memory_size=10, linesearch=optax.scale_by_zoom_linesearch(
      max_linesearch_steps=linesearch_steps, initial_guess_strategy="one"))
  value_and_grad = optax.value_and_grad_from_state(fn)

  # Stop a start when its objective stops improving (relative change < tol over one step):
  # the Huber objective is piecewise and its gradient need not vanish at the optimum.
  def cond(carry):
    _, _, i, f_prev, f = carry
    return (i < max_iter) & ((i < 2) | (f_prev - f > tol * (1.0 + jnp.abs(f))))

  def body(carry):
    p, state, i, _, f = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=fn)
    p = optax.apply_updates(p, updates)
    return p, state, i + 1, f, optax.tree.get(state, "value")

  state = solver.init(p0)
  inf = jnp.asarray(jnp.inf, p0.dtype)
  p, _, iters, _, _ = jax.lax.while_loop(cond, body, (p0, state, jnp.asarray(0), inf, inf))
  final = fn(p)
  final = jnp.where(jnp.isfinite(final), final, jnp.inf)
  return p, final, iters


@jax.jit(static_argnames=("linesearch_steps",))
def _solve_many(starts, weights, log_n, log_d, log_l, max_iter, tol, linesearch_steps=10):
  """starts (S, 5), weights (S, n) -> params (S, 5), objective (S,), iterations (S,)."""
  solve = lambda p0, w: _lbfgs_solve(p0, log_n, log_d, log_l, w, max_iter, tol,
                                     linesearch_steps)
  return jax.vmap(solve)(starts, weights)


@dataclasses.dataclass
class Approach3Fit:
  params: np.ndarray  # (5,) a, b, e, alpha, beta at the best start
  objective: float
  top_starts: np.ndarray  # (k, 5) best distinct optima (bootstrap starting points)
  bootstrap: np.ndarray | None  # (R, 5) per-resample optima, or None

  def named(self, p: np.ndarray | None = None) -> dict[str, float]:
    a, b, e, alpha, beta = (self.params if p is None else p).tolist()
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
            "alpha": alpha, "beta": beta}


def _distinct_best(params: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
  order = np.argsort(values)
  chosen: list[np.ndarray] = []
  for i in order:
    if not np.isfinite(values[i]) or len(chosen) == k:
      break
    if all(np.max(np.abs(params[i] - c)) > 1e-3 for c in chosen):
      chosen.append(params[i])
  return np.stack(chosen)


def fit_approach3(n, d, loss, *, grid: np.ndarray | None = None, n_bootstrap: int = 0,
                  bootstrap_starts: int = 4, seed: int = 0, screen_iter: int = 25,
                  refine_top: int = 32, max_iter: int = 300, boot_iter: int = 100,
                  tol: float = 1e-9) -> Approach3Fit:
  """Fit E + A/N^alpha + B/D^beta. n, d, loss: 1-D arrays of equal length (>= 5 runs).

  Two stages over the grid (same optimum as running every start to convergence, at a
  fraction of the cost, since vmapped lanes all wait for the slowest): every start runs
  `screen_iter` L-BFGS steps, then the `refine_top` best continue to `max_iter` steps.
  Bootstrap: `n_bootstrap` multinomial resamples of the runs, each solved from the
  `bootstrap_starts` best distinct full-data optima; the best per resample is kept.
  """
  n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
  if len(n) < 5:
    raise ValueError(f"Approach 3 fits 5 parameters and needs at least 5 runs; got {len(n)}.")
  grid = full_init_grid() if grid is None else np.asarray(grid, np.float64)
  # NOTE: optax's L-BFGS mixes int32 counters with int64 aranges under x64, which strict
  # dtype promotion (the test default) rejects; standard promotion is scoped to this fit.
  with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
    data = tuple(jnp.asarray(np.log(x)) for x in (n, d, loss))
    solve = lambda starts, w, iters, ls: tuple(np.asarray(x) for x in _solve_many(
        jnp.asarray(starts), jnp.asarray(w), *data, max_iter=iters, tol=tol,
        linesearch_steps=ls))
    p = grid
    if grid.shape[0] > refine_top:  # small grids (tests) go straight to the full solve
      p, f, _ = solve(grid, np.ones((grid.shape[0], len(n))), screen_iter, 10)
      p = p[np.argsort(np.where(np.isfinite(f), f, np.inf))[:refine_top]]
    p, f, _ = solve(p, np.ones((len(p), len(n))), max_iter, 10)
    best = int(np.argmin(f))
    top = _distinct_best(p, f, bootstrap_starts)
    boot = None
    if n_bootstrap > 0:
      rng = np.random.default_rng(seed)
      counts = rng.multinomial(len(n), np.full(len(n), 1.0 / len(n)), size=n_bootstrap)
      k = top.shape[0]
      starts = np.tile(top, (n_bootstrap, 1))  # (R*k, 5): resample r uses rows r*k..r*k+k-1
      w = np.repeat(counts, k, axis=0).astype(np.float64)  # (R*k, n)
      bp, bf, _ = solve(starts, w, boot_iter, 10)
      bp, bf = bp.reshape(n_bootstrap, k, 5), bf.reshape(n_bootstrap, k)
      boot = bp[np.arange(n_bootstrap), np.argmin(bf, axis=1)]
  return Approach3Fit(params=p[best], objective=float(f[best]), top_starts=top, bootstrap=boot)


def compute_optimal(params: np.ndarray, flops: np.ndarray | float) -> dict[str, np.ndarray]:
  """Closed-form minimizer of L(N, D) subject to 6 N D = C (Hoffmann et al. eq. 4).

  N_opt = G (C/6)^a, D_opt = (C/6)^b / G with a = beta/(alpha+beta), b = alpha/(alpha+beta),
  G = (alpha A / (beta B))^(1/(alpha+beta)). Works on (..., 5) params (bootstrap draws).
  """
  params = np.asarray(params, np.float64)
  a_, b_, e_, alpha, beta = np.moveaxis(params, -1, 0)
  c = np.asarray(flops, np.float64)
  s = alpha + beta
  log_g = (np.log(alpha) + a_ - np.log(beta) - b_) / s
  log_n = log_g + (beta / s) * np.log(c / 6.0)
  log_d = -log_g + (alpha / s) * np.log(c / 6.0)
  loss = np.exp(e_) + np.exp(a_ - alpha * log_n) + np.exp(b_ - beta * log_d)
  return {"a": beta / s, "b": alpha / s, "N_opt": np.exp(log_n), "D_opt": np.exp(log_d),
          "tokens_per_param": np.exp(log_d - log_n), "loss": loss}
