"""The pipeline-bubble benchmark's arithmetic (benchmarks/pipeline_bubble.py) on synthetic
step times and hand-worked schedule tables; the measurement itself runs only as the
benchmark."""

import importlib.util
import pathlib

import numpy as np
import pytest

from lmx.parallel.pipeline import make_schedule


@pytest.fixture(scope="module")
def bench():
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_bubble.py"
  spec = importlib.util.spec_from_file_location("pipeline_bubble", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("p", [2, 4])
def test_fit_of_pure_lockstep_times_gives_the_gpipe_formula(bench, p):
  """T(m) = 0.01 s x (m + p - 1): the fit's bubble is (p-1)/(m+p-1) and its ramp p - 1."""
  ms = [4, 8, 16]
  want = {2: [1 / 5, 1 / 9, 1 / 17], 4: [3 / 7, 3 / 11, 3 / 19]}[p]  # by hand
  got = bench.fit_bubble(ms, [0.01 * (m + p - 1) for m in ms])
  np.testing.assert_allclose(got["bubble"], want, rtol=1e-9)
  assert got["ramp_microbatches"] == pytest.approx(p - 1)
  assert got["slope_s"] == pytest.approx(0.01)


def test_fit_counts_a_fixed_overhead_as_ramp(bench):
  """A constant 0.02 s on top of 0.01 s per tick pair at p = 2: ramp 1 + 2 microbatches,
  bubble 1 - m / (m + 3)."""
  ms = [4, 8, 16]
  got = bench.fit_bubble(ms, [0.02 + 0.01 * (m + 1) for m in ms])
  assert got["ramp_microbatches"] == pytest.approx(3.0)
  np.testing.assert_allclose(got["bubble"], [3 / 7, 3 / 11, 3 / 19], rtol=1e-9)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_ops_bubble_on_a_hand_worked_table(bench, kind):
  """p = 2, m = 1: stage 0 runs F then B, stage 1 runs its fused op L in between (1F1B's
  extra ticks are empty). Costs F 1, B 3, L 4 s: busy 4 and 4, lockstep 1 + 4 + 3 = 8 s,
  so the lockstep bubble is 1 - 8/16; a measured 10 s step gives 1 - 8/20."""
  s = make_schedule(kind, 2, 1)
  got = bench.ops_bubble(s.op, {"F": 1.0, "B": 3.0, "L": 4.0}, 10.0)
  assert got["busy_s"] == [4.0, 4.0]
  assert got["lockstep_s"] == 8.0
  assert got["lockstep_bubble"] == pytest.approx(0.5)
  assert got["bubble"] == pytest.approx(0.6)


def test_ops_bubble_charges_every_op_of_a_longer_table(bench):
  """GPipe p = 4, m = 2, costs F 1, B 3, L 5 s. By hand: F(s, i) at tick i + s (s < 3),
  B(s, i) at 5 + i + 3 - s. Ticks 0-3 hold Fs (1 s each), tick 4 is empty, ticks 5 and 6
  hold an L (5 s), ticks 7-9 only Bs (3 s): lockstep 4 + 10 + 9 = 23 s. Busy: 2 F + 2 B =
  8 s on stages 0-2, 2 L = 10 s on the last."""
  s = make_schedule("gpipe", 4, 2)
  got = bench.ops_bubble(s.op, {"F": 1.0, "B": 3.0, "L": 5.0}, 30.0)
  assert got["busy_s"] == [8.0, 8.0, 8.0, 10.0]
  assert got["lockstep_s"] == 23.0
  assert got["lockstep_bubble"] == pytest.approx(1 - 34 / (4 * 23))
  assert got["bubble"] == pytest.approx(1 - 34 / (4 * 30))


def test_trace_idle_pools_the_waits_inside_ppermutes(bench):
  """Two threads: waits of 10 + 30 ns and 50 ns inside ppermutes count; a Rendezvous of
  the final all-reduce and one outside any ppermute do not. p = 2 devices over a 100 ns
  step: 90 / 200."""
  ev = [
      ("t1", "while.14", 1000, 100), ("t1", "ppermute.6", 1030, 12),
      ("t1", "Rendezvous", 1031, 10), ("t1", "ppermute.6", 1060, 35),
      ("t1", "Rendezvous", 1062, 30), ("t1", "all-reduce.1", 1150, 9),
      ("t1", "Rendezvous", 1151, 8),
      ("t2", "collective-permute.2", 1010, 52), ("t2", "Rendezvous", 1011, 50),
      ("t2", "Rendezvous", 1070, 40),
  ]
  got = bench.trace_idle(ev, 2, 100e-9)
  assert got["idle_s"] == pytest.approx(90e-9)
  assert got["bubble"] == pytest.approx(90 / 200)
