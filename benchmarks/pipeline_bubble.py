"""The pipeline bubble measured from step times and profiler traces, against (p-1)/(m+p-1)
and the schedule table's idle share, as JSON lines (one per schedule, stage count p and
microbatch count m). The executor is lmx's own (`pipeline_value_and_grad`), forward and
backward of one batch, no optimizer.

    .venv/bin/python benchmarks/pipeline_bubble.py [--stages 2,4] [--microbatches 4,8,16]
    .venv/bin/python benchmarks/pipeline_bubble.py --sleep_ms 1   # stage ops that sleep

Each stage count runs in its own process with p fake CPU devices
(`--xla_force_host_platform_device_count=p`); every device runs its program on a thread
of its own, so with p <= cores step time is real time. NOTE: ops inside a program still
use the shared intra-op pool (`--xla_cpu_multi_thread_eigen=false` did not stop a single
device's matmuls from running on 2 threads in jaxlib 0.10.2), so a stage alone in the ramp
can borrow an idle stage's core. The microbatch size is fixed and m varies: the work per
microbatch is constant and only the ramp and drain change. Three measured bubbles:

  fit: T(m) = a + b m over the m values of one (schedule, p). In lockstep every extra
    microbatch adds one F-tick and one B-tick, so the slope b is one microbatch's time
    per stage in the steady state and bubble = 1 - b m / T(m): the ramp and drain only,
    the quantity (p-1)/(m+p-1) describes (exactly it when T = b (m + p - 1)). The
    intercept in microbatches (a / b, `ramp_microbatches`) is p - 1 plus whatever does
    not scale with m.
  trace: the steps under `jax.profiler`; a stage waiting for a neighbour sits in a
    `Rendezvous` inside its ppermute, so bubble = waited device-seconds / (p T). This is
    all per-stage idle time, including the steady-state idle of an unbalanced stage:
    compare it with `table_idle_measured_costs`, the table's lockstep idle share with the
    measured op times.
  ops: F, B (recomputed forward + backward) and the last stage's fused op L timed alone
    on one device; bubble = 1 - sum of the table's op times / (p T). Counts as idle all
    that is not stage compute (per-tick buffer updates, ppermutes), and runs high when a
    lone op gets more cores than it does inside the pipeline.

--sleep_ms S makes every layer sleep S ms (its backward 2S) on its device's thread
instead of computing: op times that no CPU contention stretches, so the executor's
lockstep timing shows on a loaded machine and at p > cores.

Rounds interleave every (schedule, m) and the single ops, so a change in load hits all of
them alike; figures are medians over rounds. `cpu_share` is the process's CPU seconds per
wall second per device: near 1 - bubble on an idle machine (waiting stages sleep in the
Rendezvous), far below it when other work holds the cores (then step times are not the
pipeline's either). With p > cores the stages share cores: a stage idle in the ramp lends
its core to a busy one and a busy stage waits for a core, so neither measure is the
device bubble.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# jax reads XLA_FLAGS when its backend starts (in the worker), not on import.
from lmx.parallel.pipeline import BWD, FWD, make_schedule


def fit_bubble(ms, step_s) -> dict:
  """Least-squares T(m) = a + b m; per m the bubble 1 - b m / T(m) (T measured), and the
  intercept in microbatch units a / b (the ramp: p - 1 in pure lockstep)."""
  ms, t = np.asarray(ms, float), np.asarray(step_s, float)
  b, a = np.polyfit(ms, t, 1)
  return {"slope_s": float(b), "intercept_s": float(a), "ramp_microbatches": float(a / b),
          "bubble": [float(1.0 - b * m / tm) for m, tm in zip(ms, t)]}


def ops_bubble(op: np.ndarray, cost: dict, step_s: float) -> dict:
  """Per-stage busy time from the table `op` (ticks, p) with measured op seconds
  cost = {'F', 'B', 'L'} (L: the last stage's fused op, which runs where the table says
  BWD on stage p-1); bubble = 1 - sum busy / (p step_s). `lockstep_s` is the table's own
  prediction with these costs: each tick as long as its slowest op."""
  p = op.shape[1]
  c = np.where(op == FWD, cost["F"], np.where(op == BWD, cost["B"], 0.0))
  c[:, p - 1] = np.where(op[:, p - 1] == BWD, cost["L"], c[:, p - 1])
  busy = c.sum(axis=0)
  lockstep = c.max(axis=1).sum()
  return {"busy_s": [float(x) for x in busy], "lockstep_s": float(lockstep),
          "lockstep_bubble": float(1.0 - busy.sum() / (p * lockstep)),
          "bubble": float(1.0 - busy.sum() / (p * step_s))}


def trace_idle(events, p: int, wall_s: float) -> dict:
  """Device idle share from profiler events (line, name, start_ns, duration_ns) of steps
  that took wall_s seconds in all: a stage waiting for a neighbour sits in a `Rendezvous`
  inside a ppermute. NOTE: a device's program does not stay on one thread (XLA:CPU resumes
  it on whichever thread finished a collective), so waits are pooled over threads, not
  told apart by device. bubble = waited device-seconds / (p wall_s)."""
  by_line: dict = {}
  for line, name, start, dur in events:
    by_line.setdefault(line, []).append((start, dur, name))
  waited = 0.0
  for evs in by_line.values():
    perms = [(s, s + d) for s, d, n in evs if n.startswith(("ppermute", "collective-permute"))]
    waited += sum(d for s, d, n in evs
                  if n == "Rendezvous" and any(lo <= s < hi for lo, hi in perms))
  return {"idle_s": waited / 1e9, "bubble": waited / 1e9 / (p * wall_s)}


def sleeping_block_graphdef(cfg, seconds: float):
  """The graphdef of a Block with the same parameters whose forward sleeps `seconds` (its
  backward 2x) instead of computing: stage ops whose length no CPU contention stretches,
  so the executor's lockstep timing shows on any machine and at any p."""
  import jax
  from flax import nnx

  from jax.experimental import io_callback

  from lmx.model.stack import Block

  def nap(x, s):  # sleep on the device's thread, return x; the GIL is free while asleep
    # io_callback, not pure_callback: a backward's recomputed forward has no residuals
    # to keep, and XLA would drop a pure call whose output is unused.
    return io_callback(lambda a: (time.sleep(s), a)[1],
                       jax.ShapeDtypeStruct(x.shape, x.dtype), x)

  @jax.custom_vjp
  def op(x):
    return nap(x, seconds)

  op.defvjp(lambda x: (op(x), None), lambda _, g: (nap(g, 2 * seconds),))

  class SleepingBlock(Block):
    def forward(self, x, positions, segment_ids, key=None):
      return op(x), {}

  return nnx.split(nnx.eval_shape(lambda: SleepingBlock(cfg, rngs=nnx.Rngs(0))))[0]


def worker(args) -> None:
  """One process with p devices: compile every (schedule, m), then time them and the
  single ops in interleaved rounds; print the JSON lines."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from lmx.config import MeshConfig, ModelConfig, TrainConfig
  from lmx.model import Transformer
  from lmx.model.stack import run_layers
  from lmx.model.transformer import head_logits
  from lmx.parallel.mesh import active_mesh, make_mesh, use_mesh
  from lmx.parallel.pipeline import pipeline_parts, pipeline_value_and_grad
  from lmx.train.loss import lm_loss
  from lmx.train.optimizer import make_optimizer
  from lmx.train.state import plan_train_state

  p = args.worker
  kinds = args.schedules.split(",")
  ms = [int(x) for x in args.microbatches.split(",")]
  cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                    n_heads=4, max_seq_len=args.seq)
  mesh = make_mesh(MeshConfig(data=1, pipeline=p))
  train = TrainConfig(steps=10, warmup_steps=1)
  rng = np.random.default_rng(0)

  def batch(rows):
    toks = rng.integers(0, cfg.vocab_size, size=(rows, args.seq + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32),
                                         (rows, args.seq)).copy(),
            "segment_ids": np.ones((rows, args.seq), np.int32),
            "loss_mask": np.ones((rows, args.seq), np.float32)}

  with use_mesh(mesh):
    graphdef, _, _, init = plan_train_state(lambda r: Transformer(cfg, rngs=r),
                                            make_optimizer(train), train, 0, mesh)
    state, rest = init()
    _, rules = active_mesh()
  # The executor on a mesh of the pipeline axis alone: the shard_map is then manual over
  # every axis whatever lmx's executor leaves to the partitioner, which host callbacks
  # (--sleep_ms) need; a size-1 axis changes nothing else.
  pmesh = Mesh(np.array(jax.devices()), ("pipeline",))
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: jax.device_put(v, NamedSharding(pmesh, P(
          "pipeline" if str(getattr(path[0], "key", "")) == "layers" else None))),
      state.params)
  parts = pipeline_parts(graphdef, rest, params)
  if args.sleep_ms:
    parts = (*parts[:2], sleeping_block_graphdef(cfg, args.sleep_ms / 1e3), *parts[3:])
  steps, data = {}, {}
  t0 = time.perf_counter()
  for kind in kinds:
    for m in ms:
      fn = jax.jit(lambda prm, b, kind=kind, m=m: pipeline_value_and_grad(
          parts, prm, b, jnp.float32(1.0 / (m * args.mb_rows * args.seq)), kind=kind,
          microbatches=m, mesh=pmesh, rules=rules, z_loss=0.0, chunk_tokens=0))
      data[(kind, m)] = batch(m * args.mb_rows)
      jax.block_until_ready(fn(params, data[(kind, m)]))  # compile + warm up
      steps[(kind, m)] = fn
  compile_s = time.perf_counter() - t0

  # The stage ops alone on one device (the same functions the executor runs per tick).
  dev = jax.devices()[0]
  full = nnx.merge(graphdef, params, rest) if rest is not None else nnx.merge(graphdef, params)
  _, _, block_gd, norm_gd, remat = parts
  n = cfg.n_layers // p
  lp = jax.device_put(jax.tree.map(lambda v: np.asarray(v)[:n], params["layers"]["block"]), dev)
  hw = jax.device_put(np.asarray(full.head_weight()), dev)
  ns = jax.device_put(jax.tree.map(np.asarray, nnx.state(full.final_norm)), dev)
  b1 = jax.device_put(batch(args.mb_rows), dev)
  x = jax.device_put(np.asarray(rng.standard_normal((args.mb_rows, args.seq, cfg.d_model)),
                                np.float32), dev)

  def fwd(lp, x, b):
    return run_layers(block_gd, lp, x, b["positions"], b["segment_ids"], remat=remat)

  def bwd(lp, x, b, g):  # a middle stage's B: recompute the stage forward, then backward
    return jax.vjp(lambda l, z: fwd(l, z, b), lp, x)[1](g)

  def last(lp, ns, hw, x, b):  # the last stage's fused forward + norm + head + loss + B
    def loss(lp, ns, hw, x):
      h = nnx.merge(norm_gd, ns)(fwd(lp, x, b))
      _, s = lm_loss(head_logits(h, hw), b["targets"], b["loss_mask"], 0.0)
      return s["ce_sum"]
    return jax.grad(loss, argnums=(0, 1, 2, 3))(lp, ns, hw, x)

  ops = {"F": (jax.jit(fwd), (lp, x, b1)), "B": (jax.jit(bwd), (lp, x, b1, x)),
         "L": (jax.jit(last), (lp, ns, hw, x, b1))}
  for f, a in ops.values():
    jax.block_until_ready(f(*a))

  def timed(f, *a):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(f(*a))
    return time.perf_counter() - w0, time.process_time() - c0

  wall = {k: [] for k in steps}
  cpu = {k: [] for k in steps}
  op_s = {k: [] for k in ops}
  for _ in range(args.rounds):
    for k, fn in steps.items():
      w, c = timed(fn, params, data[k])
      wall[k].append(w)
      cpu[k].append(c)
    for k, (f, a) in ops.items():
      op_s[k].append(min(timed(f, *a)[0] for _ in range(3)))
  cost = {k: float(np.median(v)) for k, v in op_s.items()}
  # The same steps under the profiler: each device's waits at the ppermutes.
  opts = jax.profiler.ProfileOptions()
  opts.python_tracer_level = 0
  traced = {}
  for k, fn in steps.items():
    with tempfile.TemporaryDirectory() as d:
      wall_s = 0.0
      with jax.profiler.trace(d, profiler_options=opts):
        for _ in range(args.trace_steps):
          wall_s += timed(fn, params, data[k])[0]
      (pb,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
      prof = jax.profiler.ProfileData.from_file(pb)
      traced[k] = trace_idle([(line.name, e.name, e.start_ns, e.duration_ns)
                              for plane in prof.planes for line in plane.lines
                              for e in line.events], p, wall_s)
  print(json.dumps({"stages": p, "devices": jax.device_count(), "cpu_cores": os.cpu_count(),
                    "stage_op": f"sleep {args.sleep_ms} ms/layer" if args.sleep_ms else "compute",
                    "compile_s": round(compile_s, 1),
                    "op_s": {k: round(v, 6) for k, v in cost.items()},
                    "load_1min": round(os.getloadavg()[0], 2)}), flush=True)
  for kind in kinds:
    t = [float(np.median(wall[(kind, m)])) for m in ms]
    fit = fit_bubble(ms, t)
    fit_min = fit_bubble(ms, [float(np.min(wall[(kind, m)])) for m in ms])  # under load
    for m, tm, fb, fbm in zip(ms, t, fit["bubble"], fit_min["bubble"]):
      s = make_schedule(kind, p, m)
      ob = ops_bubble(s.op, cost, tm)
      tr = traced[(kind, m)]
      print(json.dumps({
          "schedule": kind, "stages": p, "microbatches": m, "devices": jax.device_count(),
          "stage_op": "sleep" if args.sleep_ms else "compute",
          "cpu_cores": os.cpu_count(), "ticks": s.ticks, "step_s": round(tm, 5),
          "step_s_min": round(float(np.min(wall[(kind, m)])), 5),
          "bubble_fit": round(fb, 4), "bubble_fit_of_min": round(fbm, 4),
          "bubble_ops": round(ob["bubble"], 4),
          "bubble_trace": round(tr["bubble"], 4),
          "formula": round((p - 1) / (m + p - 1), 4), "table_idle": round(s.bubble(), 4),
          "table_idle_measured_costs": round(ob["lockstep_bubble"], 4),
          "lockstep_pred_s": round(ob["lockstep_s"], 5),
          "ramp_microbatches": round(fit["ramp_microbatches"], 3),
          "cpu_share": round(float(np.sum(cpu[(kind, m)]) / np.sum(wall[(kind, m)]) / p), 3),
          "method": "fit: 1 - slope*m/T(m); ops: 1 - sum(stage busy)/(p*T(m)); "
                    "trace: waits at the ppermutes / (p*T)",
          "load_1min": round(os.getloadavg()[0], 2)}), flush=True)


def markdown(paths: list[str], fit: str = "bubble_fit") -> str:
  """The docs/parallelism.md table rows from this script's JSON lines (compute run first,
  a --sleep_ms run optionally second); `fit` picks the fit of the median or
  ('bubble_fit_of_min') the fastest step of each m."""
  runs = []
  for path in paths:
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.startswith("{")]
    runs.append({(r["schedule"], r["stages"], r["microbatches"]): r
                 for r in rows if "schedule" in r})
  out = []
  for key, r in runs[0].items():
    kind, p, m = key
    f3 = lambda x: f"{x:.3f}"
    cells = [kind, p, m, r["ticks"], f3(r["table_idle"]), f3(r["formula"]), f3(r[fit]),
             f3(r["bubble_trace"]), f3(r["table_idle_measured_costs"]),
             f"{r['step_s'] * 1e3:.0f}"]
    if len(runs) > 1 and key in runs[1]:
      z = runs[1][key]
      cells += [f3(z[fit]), f3(z["bubble_trace"]), f3(z["table_idle_measured_costs"])]
    cells.append(make_schedule(kind, p, m).slots)
    out.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(out)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--stages", default="2,4")
  ap.add_argument("--schedules", default="gpipe,1f1b")
  ap.add_argument("--microbatches", default="4,8,16")
  ap.add_argument("--mb_rows", type=int, default=2, help="rows per microbatch (fixed)")
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--d_model", type=int, default=128)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--trace_steps", type=int, default=2, help="profiled steps per setting")
  ap.add_argument("--sleep_ms", type=float, default=0.0,
                  help="> 0: every layer sleeps this long (its backward 2x) instead of computing")
  ap.add_argument("--markdown", nargs="+", default=None, metavar="JSONL",
                  help="print the docs table from saved output (compute run, then sleep run)")
  ap.add_argument("--fit", choices=("median", "min"), default="median",
                  help="--markdown: fit the median step (quiet machine) or the fastest (loaded)")
  ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    worker(args)
    return
  if args.markdown:
    print(markdown(args.markdown, "bubble_fit_of_min" if args.fit == "min" else "bubble_fit"))
    return
  print(json.dumps({"model": {"d_model": args.d_model, "layers": args.layers,
                              "vocab": args.vocab, "seq": args.seq, "mb_rows": args.mb_rows},
                    "cpu_cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}),
        flush=True)
  for p in (int(x) for x in args.stages.split(",")):
    # XLA_FLAGS only take effect before JAX starts: a fresh process per device count.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        f"--xla_force_host_platform_device_count={p} --xla_cpu_multi_thread_eigen=false"))
    argv = [a for a in sys.argv[1:]]
    subprocess.run([sys.executable, __file__, *argv, "--worker", str(p)], env=env, check=True)


if __name__ == "__main__":
  main()
