"""Decode throughput: lmx's jitted engine vs transformers' `generate` on torch, same weights.

    .venv/bin/python benchmarks/decode.py [--batches 1,8] [--new 64] [--prompt 32] [--rounds 3]

Both decode greedily from the same random LLaMA-shaped weights (the default experiment's
shape; lmx's weights are copied into LlamaForCausalLM with lmx.interop.hf.llama_to_hf), for
`--new` tokens after a `--prompt`-token prompt, at each batch size. EOS is disabled on both
sides so every row runs the full length. Rounds alternate the two (drift on a shared
machine hits both alike); the median round is reported. The first lmx call (compile) is
reported apart. Also reported: the KV-cache + weight bytes one decode step must read,
divided by the step time -- the memory traffic rate (on CPU a ratio against the peer,
not a hardware-limit figure). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np
from flax import nnx

from lmx.config import ModelConfig
from lmx.infer.engine import SamplingOptions, decode
from lmx.interop.hf import llama_to_hf
from lmx.model.transformer import Transformer

SHAPE = ModelConfig(vocab_size=4096, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2,
                    max_seq_len=256, scan_layers=False)


def hf_model(model: Transformer):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  c = model.cfg
  hf = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ff_dim,
                   num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                   num_key_value_heads=c.kv_heads, head_dim=c.dim_per_head,
                   max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                   rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                   attention_bias=False, mlp_bias=False)
  m = LlamaForCausalLM(hf).eval()
  tree = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in llama_to_hf(tree, c).items()}
  missing, unexpected = m.load_state_dict(sd, strict=False)
  assert not unexpected and all("rotary" in k or "lm_head" in k for k in missing), missing
  if c.tie_embeddings:
    m.tie_weights()
  return m, torch


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="1,8")
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args(argv)
  model = Transformer(SHAPE, rngs=nnx.Rngs(params=0))
  hf, torch = hf_model(model)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  rng = np.random.default_rng(0)
  out = {"shape": "default", "new_tokens": args.new, "prompt_tokens": args.prompt,
         "machine": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
                     "jax_backend": jax.default_backend(), "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads()},
         "runs": []}
  opts = SamplingOptions(temperature=0.0, stop_ids=())
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = rng.integers(4, SHAPE.vocab_size, (b, args.prompt)).tolist()
    t0 = time.perf_counter()
    first = decode(model, prompts, args.new, opts)
    compile_s = time.perf_counter() - t0
    ids = torch.tensor(prompts)

    def run_lmx():
      t = time.perf_counter()
      res = decode(model, prompts, args.new, opts)
      return time.perf_counter() - t, res

    def run_hf():
      t = time.perf_counter()
      with torch.no_grad():
        res = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                          min_new_tokens=args.new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
      return time.perf_counter() - t, res

    run_hf()  # warm-up
    lt, ht = [], []
    for _ in range(args.rounds):
      s, res = run_lmx()
      lt.append(s)
      s, hres = run_hf()
      ht.append(s)
    agree = float(np.mean([a == bb for a, bb in zip(
        np.asarray(res.tokens).ravel(), hres[:, args.prompt:].numpy().ravel())]))
    l_s, h_s = statistics.median(lt), statistics.median(ht)
    cache_bytes = 2 * SHAPE.n_layers * b * (args.prompt + args.new) * SHAPE.kv_heads * \
        SHAPE.dim_per_head * 4
    out["runs"].append({
        "batch": b, "lmx_tokens_per_s": b * args.new / l_s, "hf_tokens_per_s": b * args.new / h_s,
        "lmx_speedup_vs_hf": h_s / l_s, "lmx_first_call_s": compile_s,
        "lmx_steps": first.steps, "greedy_token_agreement": agree,
        "lmx_bytes_per_s_read": (weight_bytes + cache_bytes) * args.new / l_s})
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
