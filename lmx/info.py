"""`lmx info`: parameter, FLOP and per-device memory accounting for an experiment, as one
JSON line (`--table` adds a human table of the memory plan for ZeRO stages 0-3).

Needs no devices and allocates nothing. Counts and FLOPs follow from the config through
`lmx.scaling.accounting` (flops_per_token = 6 * (active_non_embedding_params + d_model *
vocab) + 6 * n_layers * seq_len * n_heads * head_dim, causal attention at half; active =
total except for MoE, where a token passes through top_k of the experts). Memory comes from
the planner `lmx.scaling.memory`: the train state laid out by the runtime's own shardings
on an AbstractMesh of `--devices` devices, plus gradients, batch and an activation estimate.

Memory fields (bytes per device):
  param_bytes_per_device, optimizer_bytes_per_device: fp32 params and Adam moments (exact);
  memory_bytes_per_device: their sum, the train state between steps (memory_gib_* in GiB);
  grad_bytes_per_device, batch_bytes_per_device, activation_bytes_per_device;
  step_bytes_per_device: the planned peak of one train step (step_gib_* in GiB);
  zero_paper_bytes_per_device / zero_lmx_bytes_per_device: params + grads + optimizer by the
  ZeRO paper's formula and by lmx's fp32 variant for this stage (lmx.scaling.memory).
"""

from __future__ import annotations

import argparse
import json
import math

from lmx.config import MESH_AXES
from lmx.experiment import load_experiment, split_config_args
from lmx.scaling import accounting, memory


def default_devices(exp) -> int:
  """The devices the mesh names: the product of its sizes, a -1 axis counted as 1."""
  ici = [max(getattr(exp.mesh, a), 1) for a in MESH_AXES]
  return math.prod(ici) * math.prod(getattr(exp.mesh, f"dcn_{a}") for a in MESH_AXES)


def experiment_info(exp, n_devices: int | None = None) -> dict:
  m = exp.model
  pc = accounting.count_params(m)
  n_devices = n_devices or default_devices(exp)
  plan = memory.plan_memory(exp, n_devices)
  fpt = accounting.flops_per_token(m, exp.data.seq_len)
  tokens = exp.train.steps * exp.data.batch_size * exp.data.seq_len
  return {
      "name": exp.name,
      "params": pc.params,
      "non_embedding_params": pc.non_embedding_params,
      "embedding_params": pc.embedding_params,
      "active_params": pc.active_params,  # per token; < params only for MoE
      "active_non_embedding_params": pc.active_non_embedding_params,
      "flops_per_token": fpt,
      "seq_len": exp.data.seq_len,
      "train_tokens": tokens,
      "train_flops": float(fpt) * tokens,
      "train_pf_days": accounting.pf_days(float(fpt) * tokens),
      "devices": n_devices,
      "mesh": plan.mesh,
      "zero_stage": plan.zero_stage,
      "optimizer_memory": plan.optimizer_memory or "device",
      "param_bytes_per_device": plan.param_bytes,
      "optimizer_bytes_per_device": plan.optimizer_bytes,
      "memory_bytes_per_device": plan.state_bytes,
      "memory_gib_per_device": round(plan.state_bytes / 2**30, 4),
      "grad_bytes_per_device": plan.grad_bytes + plan.grad_accum_bytes,
      "batch_bytes_per_device": plan.batch_bytes,
      "activation_bytes_per_device": plan.activation_bytes,
      "rows_per_device": plan.rows_per_device,
      "step_bytes_per_device": plan.total_bytes,
      "step_gib_per_device": round(plan.total_bytes / 2**30, 4),
      "zero_paper_bytes_per_device": round(plan.zero_paper_bytes),
      "zero_lmx_bytes_per_device": round(plan.zero_lmx_bytes),
      **_trainable(exp),
  }


def _trainable(exp) -> dict:
  """PEFT / partial training: how much of the model trains (lmx.peft.peft_counts)."""
  if not (exp.peft.method or exp.train.trainable):
    return {}
  from lmx.peft import peft_counts
  return peft_counts(exp)


def plan_table(exp, n_devices: int | None = None) -> str:
  """The memory plan as a human table: ZeRO stages 0-3 over `data` on the experiment's mesh
  (one column when the data axis is 1, where the stages shard nothing more)."""
  n_devices = n_devices or default_devices(exp)
  first = memory.plan_memory(exp, n_devices)
  stages = range(4) if first.mesh["data"] > 1 else [exp.train.zero_stage]
  plans = [first if s == first.zero_stage else memory.plan_memory(exp, n_devices, s)
           for s in stages]
  mesh = " x ".join(f"{a}={s}" for a, s in first.mesh.items() if s > 1) or "one device"
  lines = [f"{exp.name}: {first.params:,} params on {n_devices} devices ({mesh}); "
           f"{first.rows_per_device} rows x {exp.data.seq_len} tokens per device and "
           f"microbatch; precision {exp.train.precision}, remat {exp.model.remat}",
           memory.format_table(plans, marked=exp.train.zero_stage),
           "* the configured train.zero_stage. Exact: params, grads, optimizer, batch, counters "
           "(from the runtime's shardings); activations are an estimate (lmx/scaling/memory.py)."]
  if first.mesh["data"] == 1:
    lines.append("data axis is 1: ZeRO stages 1-3 shard nothing more than stage 0.")
  if first.mesh["pipeline"] > 1:
    lines.append(f"pipeline: {exp.train.grad_accum_steps} microbatches of "
                 f"{first.rows_per_device} rows on the {exp.train.pipeline_schedule} schedule; "
                 "activations are its stage-input slots plus one stage's residuals "
                 "(lmx.parallel.pipeline).")
  if first.optimizer_memory:
    lines.append(f"optimizer state lives in {first.optimizer_memory} memory between steps; "
                 "the update brings it to the device, so the step total still counts it.")
  return "\n".join(lines)


def cli_main(argv: list[str]) -> int:
  cfg_args, rest = split_config_args(argv)
  p = argparse.ArgumentParser(prog="lmx info", description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=None,
                 help="devices to plan for (the -1 mesh axis takes the rest); default: the "
                      "product of the mesh sizes")
  p.add_argument("--table", action="store_true",
                 help="after the JSON line, print the memory plan as a table (ZeRO 0-3)")
  args = p.parse_args(rest)
  exp, _ = load_experiment(cfg_args)
  print(json.dumps(experiment_info(exp, args.devices)))
  if args.table:
    print(plan_table(exp, args.devices))
  return 0
