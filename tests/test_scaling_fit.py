"""Scaling-law fits recover known parameters from synthetic data; bad input is handled."""

import json

import numpy as np
import pytest
import scipy.optimize

from lmx.scaling import chinchilla, cli, isoflop, powerlaw
from lmx.scaling.fit import fit_runs
from lmx.scaling.results import load_runs

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s fit
A_TRUE = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N_opt ~ C^a
B_TRUE = 1 - A_TRUE


def law(n, d):
  return TRUE["E"] + TRUE["A"] / n**TRUE["alpha"] + TRUE["B"] / d**TRUE["beta"]


def n_opt_true(c):  # closed form, written out independently of chinchilla.compute_optimal
  al, be = TRUE["alpha"], TRUE["beta"]
  g = (al * TRUE["A"] / (be * TRUE["B"]))**(1 / (al + be))
  return g * (c / 6)**(be / (al + be))


def isoflop_data(noise=0.0, seed=0, budgets=(1e18, 1e19, 1e20, 1e21), sizes=9, span=(-0.8, 0.8)):
  rng = np.random.default_rng(seed)
  rows = []
  for c in budgets:
    for n in n_opt_true(c) * np.logspace(*span, sizes):
      d = c / (6 * n)
      rows.append((n, d, c, law(n, d) * np.exp(rng.normal(0, noise))))
  return np.array(rows)  # (R, 4) params, tokens, flops, loss


# 32 starts (a subset of the paper's grid values): one full-length solve, no screening stage.
SMALL_GRID = chinchilla.init_grid([0.0, 5.0], [0.0, 5.0], [0.0, 0.5], [0.5, 1.0], [0.5, 1.0])


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_approach3_recovers_parameters():
  n, d, _, loss = isoflop_data(noise=0.002).T
  f = chinchilla.fit_approach3(n, d, loss, grid=SMALL_GRID, n_bootstrap=40)
  got = f.named()
  assert got["alpha"] == pytest.approx(TRUE["alpha"], abs=0.03)
  assert got["beta"] == pytest.approx(TRUE["beta"], abs=0.03)
  assert got["E"] == pytest.approx(TRUE["E"], rel=0.03)
  # A and B are poorly identified on their own; the fitted law must still match the data.
  np.testing.assert_allclose(
      got["E"] + got["A"] / n**got["alpha"] + got["B"] / d**got["beta"], law(n, d), rtol=0.01)
  lo, hi = np.percentile(f.bootstrap[:, 3], [2.5, 97.5])
  assert lo <= got["alpha"] <= hi and hi - lo < 0.2


def test_approach3_optimum_matches_scipy():
  n, d, _, loss = isoflop_data(noise=0.005, seed=1).T
  f = chinchilla.fit_approach3(n, d, loss, grid=SMALL_GRID)
  logs = [np.log(x) for x in (n, d, loss)]

  def obj(p):  # plain numpy Huber(1e-3) on log residuals, divided by delta like the fit
    r = np.logaddexp(np.logaddexp(p[0] - p[3] * logs[0], p[1] - p[4] * logs[1]), p[2]) - logs[2]
    h = np.where(np.abs(r) <= 1e-3, 0.5 * r * r, 1e-3 * (np.abs(r) - 0.5e-3))
    return h.sum() / 1e-3

  assert f.objective == pytest.approx(obj(f.params), rel=1e-6)
  res = scipy.optimize.minimize(obj, f.params, method="Nelder-Mead",
                                options=dict(xatol=1e-10, fatol=1e-12, maxiter=20000))
  assert f.objective <= res.fun * (1 + 1e-4) + 1e-9


def test_compute_optimal_closed_form():
  p = np.log([TRUE["A"], TRUE["B"], TRUE["E"]]).tolist() + [TRUE["alpha"], TRUE["beta"]]
  c = 1e21
  opt = chinchilla.compute_optimal(np.array(p), c)
  assert opt["N_opt"] == pytest.approx(n_opt_true(c), rel=1e-9)
  # It is the constrained minimum: nearby sizes on the same budget give higher loss.
  for s in (0.9, 1.1):
    n = opt["N_opt"] * s
    assert law(n, c / (6 * n)) > opt["loss"]


def test_approach2_recovers_exponents():
  n, _, c, loss = isoflop_data(noise=0.001).T
  f = isoflop.fit_approach2(n, c, loss, n_bootstrap=100)
  assert f.a == pytest.approx(A_TRUE, abs=0.03)
  assert f.b == pytest.approx(B_TRUE, abs=0.03)
  np.testing.assert_allclose(f.n_opt, n_opt_true(f.budgets), rtol=0.25)
  lo, hi = np.percentile(f.bootstrap[:, 0], [2.5, 97.5])
  assert lo < f.a < hi
  assert f.extrapolated_budgets == []


def test_approach2_flags_optimum_outside_sizes():
  n, _, c, loss = isoflop_data(span=(0.3, 1.2), sizes=5).T  # every size above the optimum
  f = isoflop.fit_approach2(n, c, loss)
  assert f.extrapolated_budgets == sorted(set(c.tolist()))


def test_approach2_single_budget_is_clear_error():
  n, _, c, loss = isoflop_data(budgets=(1e19,)).T
  with pytest.raises(ValueError, match="at least 2 FLOP budgets"):
    isoflop.fit_approach2(n, c, loss)


def test_parabola_matches_polyfit():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=12), rng.normal(size=12)
  got = isoflop.weighted_parabolas(x, y, np.ones((1, 12)))[0]
  np.testing.assert_allclose(got, np.polyfit(x, y, 2), rtol=1e-8, atol=1e-10)


def curves(sizes=np.logspace(6, 9, 40), steps=60):
  rows = []
  for i, n in enumerate(sizes):
    for d in np.logspace(7, 12, steps):
      rows.append((f"r{i}", n, d, 6 * n * d, law(n, d)))
  return rows


def test_approach1_recovers_exponents():
  run, n, d, c, loss = (np.array(v) for v in zip(*curves()))
  f = powerlaw.fit_approach1(n.astype(float), c.astype(float), loss.astype(float), run)
  assert f.a == pytest.approx(A_TRUE, abs=0.03)
  assert f.b == pytest.approx(B_TRUE, abs=0.03)


def test_approach1_one_run_is_clear_error():
  run, n, d, c, loss = (np.array(v) for v in zip(*curves(sizes=[1e7])))
  with pytest.raises(ValueError, match="at least 2 runs"):
    powerlaw.fit_approach1(n.astype(float), c.astype(float), loss.astype(float), run)


def test_kaplan_recovers_pure_power_law():
  x = np.logspace(5, 9, 20)
  loss = (8.8e13 / x)**0.076  # Kaplan's L(N)
  r = powerlaw.fit_kaplan_one(x, loss)
  assert r["alpha"] == pytest.approx(0.076, rel=1e-6)
  assert r["X_c"] == pytest.approx(8.8e13, rel=1e-4)


def _write(tmp_path, name, rows, cols):
  p = tmp_path / name
  if name.endswith(".csv"):
    p.write_text(",".join(cols) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
  else:
    p.write_text("\n".join(json.dumps(dict(zip(cols, r))) for r in rows) + "\n")
  return str(p)


def test_bad_rows_reported_and_dropped_csv_and_jsonl(tmp_path):
  good = [tuple(r) for r in isoflop_data()[:, [0, 1, 3]]]
  bad = [(float("nan"), 1e9, 3.0), (1e7, -5.0, 3.0), (1e7, 1e9, 0.0), good[0], good[1]]
  for name in ("runs.csv", "runs.jsonl"):
    path = _write(tmp_path, name, good + bad, ["params", "tokens", "loss"])
    runs = load_runs(path)
    assert len(runs) == len(good)
    assert runs.report == {"read": len(good) + 5, "unparsable": 0, "nan": 1,
                           "non_positive": 2, "duplicate": 2, "used": len(good),
                           "dropped": 5}
    np.testing.assert_allclose(runs.flops, 6 * runs.params * runs.tokens)


def test_flops_only_derives_tokens_and_malformed_json(tmp_path):
  data = isoflop_data()
  path = _write(tmp_path, "f.jsonl", data[:, [0, 2, 3]].tolist(), ["N", "C", "L"])
  with open(path, "a") as f:
    f.write("{not json\n")
  runs = load_runs(path, params_col="N", flops_col="C", loss_col="L")
  np.testing.assert_allclose(runs.tokens, data[:, 2] / (6 * data[:, 0]))
  assert runs.report["unparsable"] == 1


def test_cli_prints_one_json_line(tmp_path, capsys):
  path = _write(tmp_path, "r.csv", isoflop_data(noise=0.001).tolist(),
                ["params", "tokens", "flops", "loss"])
  out = tmp_path / "plots"
  rc = cli.cli_main(["fit", f"--runs={path}", "--approach=2", "--bootstrap=50",
                     "--budget=1e22", f"--out={out}"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert rc == 0 and len(lines) == 1
  s = json.loads(lines[0])
  assert s["a"] == pytest.approx(A_TRUE, abs=0.03) and len(s["ci"]["a"]) == 2
  co = s["compute_optimal"]
  assert co["tokens_per_param"] == pytest.approx(co["D_opt"] / co["N_opt"])
  assert co["N_opt"] * co["D_opt"] * 6 == pytest.approx(1e22, rel=1e-6)
  assert len(s["plots"]) == 3 and all((out / p.split("/")[-1]).exists() for p in s["plots"])


def test_cli_single_budget_error(tmp_path, capsys):
  path = _write(tmp_path, "r.csv", isoflop_data(budgets=(1e19,)).tolist(),
                ["params", "tokens", "flops", "loss"])
  assert cli.cli_main(["fit", f"--runs={path}", "--approach=2", "--bootstrap=0"]) == 2
  assert "at least 2 FLOP budgets" in capsys.readouterr().err


def test_fit_runs_approach3_and_kaplan_summaries(tmp_path):
  path = _write(tmp_path, "r.csv", isoflop_data(noise=0.002).tolist(),
                ["params", "tokens", "flops", "loss"])
  runs = load_runs(path)
  s, _ = fit_runs(runs, "3", n_bootstrap=40, grid=SMALL_GRID, budget=1e21)
  assert set(TRUE) <= set(s) and set(TRUE) <= set(s["ci"])
  assert s["compute_optimal"]["N_opt"] == pytest.approx(n_opt_true(1e21), rel=0.3)
  k, _ = fit_runs(runs, "kaplan", n_bootstrap=20)
  assert k["alpha_C"] > 0 and len(k["ci"]["alpha_C"]) == 2
  with pytest.raises(ValueError, match="needs at least 5 runs"):
    chinchilla.fit_approach3(runs.params[:4], runs.tokens[:4], runs.loss[:4])
