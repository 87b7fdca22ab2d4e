"""Step time and per-device memory of every parallel layout on 8 fake CPU devices, and the
pipeline schedules' bubble and activation memory, as JSON lines.

    .venv/bin/python benchmarks/parallel.py [--steps 5] [--d_model 128] [--layers 4]

NOTE: the 8 "devices" are threads of one CPU process sharing its cores, so step times show
each layout's extra work (collectives, the pipeline's ticks), not a parallel speed-up.
Memory figures are the compiled step's own (`memory_analysis()`, per device).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmx.config import MeshConfig, ModelConfig, TrainConfig  # noqa: E402
from lmx.model import Transformer  # noqa: E402
from lmx.parallel.mesh import make_mesh, use_mesh  # noqa: E402
from lmx.parallel.pipeline import make_schedule  # noqa: E402
from lmx.train.optimizer import make_optimizer  # noqa: E402
from lmx.train.state import plan_train_state  # noqa: E402
from lmx.train.step import jit_train_step, make_train_step  # noqa: E402

# name -> (mesh, train overrides)
LAYOUTS = {
    "data8": (MeshConfig(data=8), {}),
    "fsdp8": (MeshConfig(data=1, fsdp=8), {}),
    "data4_tensor2": (MeshConfig(data=4, tensor=2), {}),
    "fsdp4_tensor2": (MeshConfig(data=1, fsdp=4, tensor=2), {}),
    "zero1_data8": (MeshConfig(data=8), {"zero_stage": 1}),
    "zero2_data8": (MeshConfig(data=8), {"zero_stage": 2}),
    "zero3_data8": (MeshConfig(data=8), {"zero_stage": 3}),
    "pipe2_gpipe": (MeshConfig(data=4, pipeline=2), {"pipeline_schedule": "gpipe"}),
    "pipe2_1f1b": (MeshConfig(data=4, pipeline=2), {"pipeline_schedule": "1f1b"}),
    "pipe4_gpipe": (MeshConfig(data=2, pipeline=4), {"pipeline_schedule": "gpipe"}),
    "pipe4_1f1b": (MeshConfig(data=2, pipeline=4), {"pipeline_schedule": "1f1b"}),
}


def batch(rng, b, t, vocab):
  toks = rng.integers(0, vocab, size=(b, t + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}


def measure(model: ModelConfig, train: TrainConfig, mesh_cfg: MeshConfig, b: int, t: int,
            steps: int) -> dict:
  mesh = make_mesh(mesh_cfg)
  opt = make_optimizer(train)
  with use_mesh(mesh):
    graphdef, abstract, _, init = plan_train_state(lambda r: Transformer(model, rngs=r), opt,
                                                   train, 0, mesh)
    state, rest = init()
    step = jit_train_step(make_train_step(graphdef, rest, opt, train), abstract[0], mesh, train)
    data = batch(np.random.default_rng(0), b, t, model.vocab_size)
    t0 = time.perf_counter()
    compiled = step.lower(abstract[0], jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = step(state, data)  # warm-up
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = step(state, data)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
  state_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
  return {"compile_s": round(compile_s, 2), "step_s": round(float(np.median(times)), 4),
          "loss": float(m["loss"]), "state_bytes_per_device": int(state_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--microbatches", type=int, default=8)
  p.add_argument("--only", default="", help="comma-separated layout names")
  args = p.parse_args()
  model = ModelConfig(vocab_size=4096, d_model=args.d_model, n_layers=args.layers, n_heads=4,
                      n_kv_heads=2, max_seq_len=args.seq)
  base = TrainConfig(steps=100, warmup_steps=2)
  machine = {"devices": jax.device_count(), "cpu_cores": os.cpu_count(),
             "note": "fake CPU devices share the cores: times are work, not speed-up"}
  print(json.dumps({"machine": machine, "model": dataclasses.asdict(model),
                    "batch": args.batch, "seq": args.seq}))
  names = [n for n in LAYOUTS if not args.only or n in args.only.split(",")]
  for name in names:
    mesh_cfg, over = LAYOUTS[name]
    pipelined = mesh_cfg.pipeline > 1
    train = dataclasses.replace(base, grad_accum_steps=args.microbatches if pipelined else 1,
                                **over)
    out = measure(model, train, mesh_cfg, args.batch, args.seq, args.steps)
    print(json.dumps({"layout": name, "microbatches": train.grad_accum_steps, **out}),
          flush=True)
  # The schedules: lockstep idle share of the executed table vs (p-1)/(m+p-1), and the
  # microbatch inputs a stage holds (activation memory in units of one microbatch input).
  for kind in ("gpipe", "1f1b"):
    for stages in (2, 4):
      for m in (4, 8, 16):
        s = make_schedule(kind, stages, m)
        print(json.dumps({"schedule": kind, "stages": stages, "microbatches": m,
                          "ticks": s.ticks, "bubble": round(s.bubble(), 4),
                          "gpipe_formula": round((stages - 1) / (m + stages - 1), 4),
                          "input_slots": s.slots}))


if __name__ == "__main__":
  main()
