"""`lmx scaling fit --out` writes real PNG plots next to the fit JSON."""

import json

import numpy as np

from lmx.scaling import cli


def test_fit_writes_png_plots(tmp_path, capsys):
  rng = np.random.default_rng(0)
  rows = []
  for c in (1e17, 1e18, 1e19):
    for n in np.geomspace(1e7, 1e9, 7):
      d = c / (6 * n)
      loss = 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28
      rows.append({"params": float(n), "tokens": float(d),
                   "loss": float(loss * np.exp(rng.normal(0, 0.005)))})
  runs = tmp_path / "runs.jsonl"
  runs.write_text("\n".join(json.dumps(r) for r in rows))
  out = tmp_path / "fits"
  assert cli.cli_main(["fit", f"--runs={runs}", "--approach=2", "--bootstrap=20", f"--out={out}"]) == 0
  fit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0.3 < fit["a"] < 0.6  # Chinchilla law used above has a = beta/(alpha+beta) ~ 0.45
  for name in ("approach2_isoflop.png", "approach2_frontier.png", "approach2_allocation.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
