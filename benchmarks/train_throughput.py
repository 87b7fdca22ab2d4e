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
data loading, which benchmarks/data_throughput.py measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from lmx.config import MeshConfig
from lmx.scaling.accounting import count_params, flops_per_token, mfu
from lmx.train.optimizer import make_optimizer
from lmx.train.state import create_train_state
from lmx.train.step import jit_train_step, make_train_step, put_batch

# A GPT-2-small-sized model in LLaMA form (RoPE, RMSNorm, SwiGLU, MHA, tied).
SHAPE_124M = dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=0,
                  mlp="swiglu", norm="rmsnorm", position="rope", tie_embeddings=True)


def measure_matmul_peak(dtype=jnp.float32, sizes=(1024, 2048), reps=5) -> float:
  """Best FLOP/s of a jitted n x n matmul on the default device."""
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
      out = f(a, b)
    out.block_until_ready()
    dt = (time.perf_counter() - t0) / reps
    best = max(best, 2 * n**3 / dt)
  return best


def synthetic_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict:
  toks = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
          "loss_mask": np.ones((batch, seq), np.float32)}


def bench_lmx(mcfg: ModelConfig, tcfg: TrainConfig, batch: int, seq: int, steps: int,
              warmup: int) -> dict:
  mesh = make_mesh(MeshConfig())
  model = Transformer(mcfg, rngs=nnx.Rngs(0))
  graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
  rest = rest[0] if rest else None
  opt = make_optimizer(tcfg)
  state = create_train_state(params, opt, tcfg, seed=0)
  rng = np.random.default_rng(0)
  with use_mesh(mesh):
    step = jit_train_step(make_train_step(graphdef, rest, opt, tcfg), state, mesh)
    batches = [put_batch(synthetic_batch(rng, batch, seq, mcfg.vocab_size), mesh)
               for _ in range(2)]
    t0 = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(warmup - 1):
      state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
      state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
  return {"step_s": dt, "tokens_per_s": batch * seq / dt, "first_step_s": compile_s,
          "final_loss": float(m["loss"])}


def bench_hf_llama(mcfg: ModelConfig, tcfg: TrainConfig, batch: int, seq: int, steps: int,
                   warmup: int) -> dict:
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  hf = LlamaConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.d_model,
                   intermediate_size=mcfg.ff_dim, num_hidden_layers=mcfg.n_layers,
                   num_attention_heads=mcfg.n_heads, num_key_value_heads=mcfg.kv_heads,
                   head_dim=mcfg.dim_per_head, max_position_embeddings=max(seq, 128),
                   rms_norm_eps=mcfg.norm_eps, rope_theta=mcfg.rope_theta,
                   tie_word_embeddings=mcfg.tie_embeddings, attention_bias=False,
                   mlp_bias=False)
  model = LlamaForCausalLM(hf)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=tcfg.learning_rate,
                          betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps,
                          weight_decay=tcfg.weight_decay)
  rng = np.random.default_rng(0)
  data = [torch.from_numpy(rng.integers(0, mcfg.vocab_size, (batch, seq), dtype=np.int64))
          for _ in range(2)]

  def one(i):
    out = model(input_ids=data[i % 2], labels=data[i % 2])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)

  for i in range(warmup):
    one(i)
  t0 = time.perf_counter()
  for i in range(steps):
    loss = one(i)
  dt = (time.perf_counter() - t0) / steps
  n_params = sum(p.numel() for p in model.parameters())
  return {"step_s": dt, "tokens_per_s": batch * seq / dt, "final_loss": loss,
          "params": n_params, "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  cfg_args, rest = split_config_args(argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="default,124m",
                 help="comma list of: default (experiments/default.py), 124m, config "
                      "(the --config given)")
  p.add_argument("--steps", type=int, default=10, help="timed steps per framework")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (incl. compile)")
  p.add_argument("--batch", type=int, default=0, help="override batch (0: config's)")
  p.add_argument("--seq", type=int, default=0, help="override seq_len (0: config's)")
  p.add_argument("--no-peer", action="store_true", help="skip the Hugging Face peer")
  args = p.parse_args(rest)

  default_exp, _ = load_experiment(["--config=experiments/default.py"])
  peak = measure_matmul_peak()
  machine = {"platform": platform.platform(), "processor": platform.processor(),
             "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
             "devices": [str(d) for d in jax.devices()],
             "matmul_peak_flops_fp32": peak}
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
    lm = bench_lmx(mcfg, tcfg, batch, seq, steps, args.warmup)
    lm["mfu"] = mfu(lm["tokens_per_s"], fpt, 1, peak)
    res["lmx"] = lm
    if not args.no_peer:
      try:
        hf = bench_hf_llama(mcfg, tcfg, batch, seq, steps, args.warmup)
        hf["mfu"] = mfu(hf["tokens_per_s"], fpt, 1, peak)
        res["hf_llama_torch"] = hf
        res["lmx_speedup_vs_peer"] = lm["tokens_per_s"] / hf["tokens_per_s"]
      except ImportError as e:
        res["hf_llama_torch"] = f"skipped: {e} (pip install -e '.[reference]')"
    print(json.dumps(res), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
