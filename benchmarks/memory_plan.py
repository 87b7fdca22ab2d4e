"""The memory planner against XLA: planned vs compiled per-device bytes of the train step.

    python benchmarks/memory_plan.py                      # ~110M model, 8 fake CPU devices
    python benchmarks/memory_plan.py --config=experiments/llama.py:tiny --layouts data:0,fsdp:0
    python benchmarks/memory_plan.py --config.model.remat=full --config.train.precision=bfloat16

For each layout (`data:S` = data=8 with ZeRO stage S, `fsdp:0` = fsdp=8, `data_tensor:S` =
data=4 x tensor=2, `fsdp_tensor:0` = fsdp=4 x tensor=2, `data_pipeline:S` = data=4 x
pipeline=2 and `fsdp_pipeline:0` = fsdp=4 x pipeline=2 over --microbatches) the step is
built as the trainer builds it, lowered with abstract inputs and compiled -- never run, so
no state is allocated -- and `memory_analysis()` (argument + output - alias + temp) is set
beside `lmx.scaling.memory.plan_memory`. Prints one JSON line per layout and a last line with
the machine. Takes ~30 s of compile per layout at the default shape on 2 cores.

Default shape (~110M, LLaMA form, fp32, no remat): d_model 768, 12 layers, 12 heads, vocab
32000 tied, 16 sequences of 512 tokens (2 per device), loss chunks of 512 tokens.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from lmx.config import base_config, from_config_dict  # noqa: E402
from lmx.experiment import load_config_dict, split_config_args  # noqa: E402
from lmx.parallel.mesh import make_mesh  # noqa: E402
from lmx.scaling import memory  # noqa: E402

LAYOUTS = {  # name -> mesh sizes on 8 devices
    "data": dict(data=8), "fsdp": dict(data=1, fsdp=8),
    "data_tensor": dict(data=4, tensor=2), "fsdp_tensor": dict(data=1, fsdp=4, tensor=2),
    "data_pipeline": dict(data=4, pipeline=2), "fsdp_pipeline": dict(data=1, fsdp=4, pipeline=2),
}


def default_config():
  c = base_config()
  c.name = "memory_plan_110m"
  c.model.update(dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, max_seq_len=512,
                      tie_embeddings=True, mlp="swiglu", position="rope", remat="none"))
  c.data.update(dict(batch_size=16, seq_len=512))
  return c


def compare(c, layout: str, microbatches: int) -> dict:
  name, stage = layout.split(":")
  c = c.copy_and_resolve_references()
  c.mesh.update(LAYOUTS[name])
  c.train.zero_stage = int(stage)
  if "pipeline" in name:  # the microbatches that flow through the stages
    c.train.grad_accum_steps = microbatches
  exp = from_config_dict(c)
  t = time.perf_counter()
  plan = memory.plan_memory(exp, 8)
  plan_s = time.perf_counter() - t
  t = time.perf_counter()
  xla = memory.compiled_step_memory(exp, make_mesh(exp.mesh))
  compile_s = time.perf_counter() - t
  mib = lambda b: round(b / 2**20, 2)  # noqa: E731
  return {
      "layout": layout, "params": plan.params, "mesh": {a: s for a, s in plan.mesh.items()
                                                        if s > 1},
      "planned_mib": {
          "params": mib(plan.param_bytes), "optimizer": mib(plan.optimizer_bytes),
          "grads": mib(plan.grad_bytes), "batch": mib(plan.batch_bytes),
          "saved_activations": mib(plan.saved_activation_bytes),
          "weight_residuals": mib(plan.weight_residual_bytes),
          "layer_working": mib(plan.working_bytes),
          "total": mib(plan.total_bytes)},
      "compiled_mib": {k: mib(v) for k, v in xla.items()},
      "state_equal": (plan.param_bytes + plan.optimizer_bytes + plan.counter_bytes ==
                      xla["state_arguments"] == xla["argument"] - xla["batch_arguments"]),
      "total_error": round(plan.total_bytes / xla["total"] - 1, 4),
      "plan_s": round(plan_s, 2), "compile_s": round(compile_s, 1),
  }


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def main(argv: list[str]) -> int:
  cfg_args, rest = split_config_args(argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layouts", default="data:0,data:1,data:2,data:3,fsdp:0",
                 help="comma-separated NAME:ZERO_STAGE, NAME one of " + ", ".join(LAYOUTS))
  p.add_argument("--microbatches", type=int, default=4,
                 help="train.grad_accum_steps of the pipeline layouts (schedule: "
                      "train.pipeline_schedule)")
  args = p.parse_args(rest)
  if any(a.startswith("--config=") for a in cfg_args):
    c = load_config_dict(cfg_args)
  else:  # the default shape, with any --config.x.y=v overrides applied on top
    c = default_config()
    for a in cfg_args:
      key, value = a[len("--config."):].split("=", 1)
      *path, last = key.split(".")
      node = c
      for part in path:
        node = node[part]
      old = node[last]
      node[last] = (value.lower() == "true") if isinstance(old, bool) else type(old)(value)
  for layout in args.layouts.split(","):
    print(json.dumps(compare(c, layout, args.microbatches)), flush=True)
  print(json.dumps({"machine": cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
