"""`lmx info`: parameter, FLOP and memory accounting for an experiment, as one JSON line.

Needs no devices and allocates nothing: everything follows from the config through
`lmx.scaling.accounting` (whose docstring states the FLOP convention:
flops_per_token = 6 * (non_embedding_params + d_model * vocab)
                + 6 * n_layers * seq_len * n_heads * head_dim, causal attention at half).
"""

from __future__ import annotations

import argparse
import json

from lmx.experiment import load_experiment, split_config_args
from lmx.scaling import accounting


def experiment_info(exp, n_devices: int | None = None) -> dict:
  m = exp.model
  pc = accounting.count_params(m)
  if n_devices is None:
    n_devices = 1
    sizes = [getattr(exp.mesh, a) for a in ("data", "fsdp", "tensor", "pipeline", "expert")]
    if -1 not in sizes:
      n_devices = 1
      for s in sizes:
        n_devices *= s
  mem = accounting.memory_per_device_bytes(m, exp.mesh, n_devices)
  fpt = accounting.flops_per_token(m, exp.data.seq_len)
  tokens = exp.train.steps * exp.data.batch_size * exp.data.seq_len
  return {
      "name": exp.name,
      "params": pc.params,
      "non_embedding_params": pc.non_embedding_params,
      "embedding_params": pc.embedding_params,
      "flops_per_token": fpt,
      "seq_len": exp.data.seq_len,
      "train_tokens": tokens,
      "train_flops": float(fpt) * tokens,
      "train_pf_days": accounting.pf_days(float(fpt) * tokens),
      "devices": n_devices,
      "param_bytes_per_device": mem["param_bytes"],
      "optimizer_bytes_per_device": mem["optimizer_bytes"],
      "memory_bytes_per_device": mem["total_bytes"],
      "memory_gib_per_device": round(mem["total_bytes"] / 2**30, 4),
  }


def cli_main(argv: list[str]) -> int:
  cfg_args, rest = split_config_args(argv)
  p = argparse.ArgumentParser(prog="lmx info", description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=None,
                 help="device count for the memory estimate when the mesh has a -1 axis")
  args = p.parse_args(rest)
  exp, _ = load_experiment(cfg_args)
  print(json.dumps(experiment_info(exp, args.devices)))
  return 0
