"""Training throughput (tokens/s) and MFU of lmx, next to Hugging Face LlamaForCausalLM.

    python benchmarks/train_throughput.py                       # default + 124m shapes
    python benchmarks/train_throughput.py --shapes default --steps 20
    python benchmarks/train_throughput.py --config=experiments/llama.py:tiny --shapes config \
        --config.data.batch_size=8

Prints one JSON line per shape. MFU is measured against the dense-matmul peak of *this*
machine, measured in the same run (the best FLOP/s of a jitted square fp32/bf16 matmul).
The peer is what a user would pick instead: transformers' LlamaForCausalLM on PyTorch
(CPU here), same shape, AdamW, same batch and sequence length, same thread count.
Synthetic token batches (one document per row) isolate the model + optimizer step from
data loading, which benchmarks/data_throughput.py measures. The two frameworks alternate in
rounds and each reports its median round, so drift on a shared machine hits both alike.

Like the `lmx` command, this applies lmx.runtime.keep_host_memory() first; the peer runs in
the same process and so gets the same allocator. LMX_HOST_MALLOC=system runs both with
glibc's defaults instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.config import ModelConfig, TrainConfig
from lmx.experiment import load_experiment, split_config_args
from lmx.model.transformer import Transformer
from lmx.parallel.mesh import make_mesh, use_mesh
from lmx.runtime import keep_host_memory
from lmx.config import MeshConfig
from lmx.scaling.accounting import count_params, flops_per_token, mfu
from lmx.train.optimizer import make_optimizer
from lmx.train.state import create_train_state
from lmx.train.step import jit_train_step, make_train_step, put_batch

# A GPT-2-small-sized model in LLaMA form (RoPE, RMSNorm, SwiGLU, MHA, tied).
SHAPE_124M = dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=0,
                  mlp="swiglu", norm="rmsnorm", position="rope", tie_embeddings=True)


def measure_matmul_peak(dtype=jnp.float32, sizes=(1024, 2048), reps=8) -> float:
  """Best FLOP/s of a jitted n x n matmul on the default device (fastest single call, so
  a moment of interference on a shared machine does not lower the peak)."""
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    for _ in range(reps):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      best = max(best, 2 * n**3 / (time.perf_counter() - t0))
  return best


def synthetic_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict:
  toks = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
          "loss_mask": np.ones((batch, seq), np.float32)}


class LmxRunner:
  """lmx's jitted, donated train step on synthetic batches; `run(n)` times n steps."""

  def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, batch: int, seq: int):
    self.mesh = make_mesh(MeshConfig())
    model = Transformer(mcfg, rngs=nnx.Rngs(0))
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    opt = make_optimizer(tcfg)
    self.state = create_train_state(params, opt, tcfg, seed=0)
    rng = np.random.default_rng(0)
    with use_mesh(self.mesh):
      self.step = jit_train_step(make_train_step(graphdef, rest[0] if rest else None, opt,
                                                 tcfg), self.state, self.mesh)
      self.batches = [put_batch(synthetic_batch(rng, batch, seq, mcfg.vocab_size), self.mesh)
                      for _ in range(2)]
    self.i, self.loss = 0, math.nan
    self.first_step_s = self.run(1)  # compiles

  def run(self, n: int) -> float:
    with use_mesh(self.mesh):
      t0 = time.perf_counter()
      for _ in range(n):
        self.state, m = self.step(self.state, self.batches[self.i % 2])
        self.i += 1
      jax.block_until_ready(m)
    self.loss = float(m["loss"])
    return time.perf_counter() - t0

  def info(self) -> dict:
    return {"first_step_s": self.first_step_s, "final_loss": self.loss}


class HfLlamaRunner:
  """transformers' LlamaForCausalLM + torch AdamW + grad clipping, same shape and batch."""

  def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, batch: int, seq: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    self.torch = torch
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.d_model,
                     intermediate_size=mcfg.ff_dim, num_hidden_layers=mcfg.n_layers,
                     num_attention_heads=mcfg.n_heads, num_key_value_heads=mcfg.kv_heads,
                     head_dim=mcfg.dim_per_head, max_position_embeddings=max(seq, 128),
                     rms_norm_eps=mcfg.norm_eps, rope_theta=mcfg.rope_theta,
                     tie_word_embeddings=mcfg.tie_embeddings, attention_bias=False,
                     mlp_bias=False)
    self.model = LlamaForCausalLM(hf)
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=tcfg.learning_rate,
                                 betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps,
                                 weight_decay=tcfg.weight_decay)
    self.clip = tcfg.grad_clip
    rng = np.random.default_rng(0)
    self.data = [torch.from_numpy(rng.integers(0, mcfg.vocab_size, (batch, seq),
                                               dtype=np.int64)) for _ in range(2)]
    self.i, self.loss = 0, math.nan
    self.run(1)

  def run(self, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
      x = self.data[self.i % 2]
      out = self.model(input_ids=x, labels=x)
      out.loss.backward()
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
      self.i += 1
    self.loss = float(out.loss)
    return time.perf_counter() - t0

  def info(self) -> dict:
    return {"final_loss": self.loss, "params": sum(p.numel() for p in self.model.parameters()),
            "torch": self.torch.__version__, "threads": self.torch.get_num_threads()}


def measure(runners: dict, steps: int, warmup: int, rounds: int) -> dict:
  """Alternate the runners for `rounds` rounds of `steps` steps each (after `warmup`
  untimed steps), so drift on a shared machine hits both alike; report the median round."""
  for r in runners.values():
    r.run(warmup)
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, r in runners.items():
      times[name].append(r.run(steps) / steps)
  return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main(argv=None) -> int:
  # As the `lmx` command does, before JAX starts its threads. The peer runs in this same
  # process, so it gets the same allocator (LMX_HOST_MALLOC=system: glibc defaults for both).
  host_malloc = "keep" if keep_host_memory() else "system"
  argv = list(sys.argv[1:] if argv is None else argv)
  cfg_args, rest = split_config_args(argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="default,124m",
                 help="comma list of: default (experiments/default.py), 124m, config "
                      "(the --config given)")
  p.add_argument("--steps", type=int, default=10, help="timed steps per round and framework")
  p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  p.add_argument("--batch", type=int, default=0, help="override batch (0: config's)")
  p.add_argument("--seq", type=int, default=0, help="override seq_len (0: config's)")
  p.add_argument("--no-peer", action="store_true", help="skip the Hugging Face peer")
  args = p.parse_args(rest)

  default_exp, _ = load_experiment(["--config=experiments/default.py"])
  peak = measure_matmul_peak()
  machine = {"platform": platform.platform(), "processor": platform.processor(),
             "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
             "devices": [str(d) for d in jax.devices()],
             "matmul_peak_flops_fp32": peak, "host_malloc": host_malloc}
  for shape in args.shapes.split(","):
    if shape == "default":
      exp = default_exp
      mcfg = exp.model
    elif shape == "124m":
      exp = default_exp
      mcfg = dataclasses.replace(exp.model, **SHAPE_124M).validate()
    elif shape == "config":
      exp, _ = load_experiment(cfg_args)
      mcfg = exp.model
    else:
      raise SystemExit(f"--shapes: unknown shape {shape!r}; use default, 124m or config")
    batch = args.batch or (exp.data.batch_size if shape != "124m" else 8)
    seq = args.seq or exp.data.seq_len
    mcfg = dataclasses.replace(mcfg, max_seq_len=max(mcfg.max_seq_len, seq))
    tcfg = dataclasses.replace(exp.train, steps=10_000, warmup_steps=10)
    fpt = flops_per_token(mcfg, seq)
    steps = args.steps if shape != "124m" else max(2, args.steps // 3)
    res = {"shape": shape, "params": count_params(mcfg).params, "flops_per_token": fpt,
           "batch": batch, "seq_len": seq, "precision": exp.train.precision,
           "machine": machine}
    runners = {"lmx": LmxRunner(mcfg, tcfg, batch, seq)}
    if not args.no_peer:
      try:
        runners["hf_llama_torch"] = HfLlamaRunner(mcfg, tcfg, batch, seq)
      except ImportError as e:
        res["hf_llama_torch"] = f"skipped: {e} (pip install -e '.[reference]')"
    step_s = measure(runners, steps, args.warmup, args.rounds)
    for name, r in runners.items():
      tps = batch * seq / step_s[name]
      res[name] = {"step_s": step_s[name], "tokens_per_s": tps, "mfu": mfu(tps, fpt, 1, peak),
                   **r.info()}
    if "hf_llama_torch" in runners:
      res["lmx_speedup_vs_peer"] = step_s["hf_llama_torch"] / step_s["lmx"]
    print(json.dumps(res), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
