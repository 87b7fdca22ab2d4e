"""Decode throughput: lmx's jitted engine vs transformers' `generate` on torch, same weights,
and as a fraction of the machine's memory-bandwidth limit.

    .venv/bin/python benchmarks/decode.py [--shapes default,b58] [--batches 1,8]
        [--new 128] [--prompt 32] [--rounds 3]

Shapes: `default` (the default experiment's model) and `b58` (the 58M LLaMA shape: vocab
32000, d 512, d_ff 1408, 8 layers, 8 heads, untied). Both sides decode greedily from the
same random weights (lmx's copied into LlamaForCausalLM with lmx.interop.hf.llama_to_hf),
`--new` tokens after a `--prompt`-token prompt, EOS off so every row runs the full length;
rounds alternate lmx / HF (drift hits both alike) and the median round is reported.

The bandwidth limit: a decoded token must read every weight matrix once except the input
embedding, of which it reads one row (168 MB for b58 in fp32). `bandwidth_fraction` =
those bytes x tokens/s at batch 1 / the read bandwidth measured in the same run (a jitted
`jnp.sum` over a 256 MB array, best of 5). KV-cache reads are not counted (small here).
`bandwidth_fraction_batch1_fp32_at_weight_size` divides instead by the same read over an
array of one token's weight bytes: where those fit in the last-level cache (168 MB does on
a CPU with 260 MiB of L3) it reads faster than 256 MB, and that is the stricter limit.
int8: the same model with `lmx.quant.apply.quantize_model(..., 'int8')` at batch 1.
Prints one JSON line.
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

SHAPES = {
    "default": ModelConfig(vocab_size=4096, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2,
                           max_seq_len=256, scan_layers=False),
    "b58": ModelConfig(vocab_size=32000, d_model=512, d_ff=1408, n_layers=8, n_heads=8,
                       max_seq_len=512, tie_embeddings=False, scan_layers=False),
}


def read_bandwidth(mb: float = 256, reps: int = 5) -> float:
  """Bytes/s of a jitted full read (sum) of an `mb` MiB float32 array, best of `reps`."""
  import jax.numpy as jnp
  x = jnp.ones((int(mb * (1 << 18)),), jnp.float32)  # mb MiB
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(reps))
  return x.nbytes / best


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def bytes_per_token(model: Transformer) -> int:
  """Weight bytes one decoded token reads: every parameter except the input embedding
  table, of which one row (a tied embedding is read whole, as the LM head)."""
  total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if model.cfg.tie_embeddings:
    return int(total)
  emb = model.embed.get_value()
  return int(total - emb.nbytes + emb.nbytes // emb.shape[0])


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


def measure_shape(name: str, cfg: ModelConfig, args, rng) -> dict:
  model = Transformer(cfg, rngs=nnx.Rngs(params=0))
  hf, torch = hf_model(model)
  opts = SamplingOptions(temperature=0.0, stop_ids=())
  per_token = bytes_per_token(model)
  out = {"shape": name, "params": int(sum(x.size for x in jax.tree.leaves(
      nnx.state(model, nnx.Param)))), "weight_bytes_per_token": per_token, "runs": []}
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = rng.integers(4, cfg.vocab_size, (b, args.prompt)).tolist()
    compile_s = _timed(lambda: decode(model, prompts, args.new, opts))
    ids = torch.tensor(prompts)
    res, hres = {}, {}

    def run_lmx():
      res["r"] = decode(model, prompts, args.new, opts)

    def run_hf():
      with torch.no_grad():
        hres["r"] = hf.generate(ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=args.new, min_new_tokens=args.new,
                                do_sample=False, eos_token_id=None, pad_token_id=0)

    run_hf()  # warm-up
    lt, ht = [], []
    for _ in range(args.rounds):
      lt.append(_timed(run_lmx))
      ht.append(_timed(run_hf))
    agree = float(np.mean(np.asarray(res["r"].tokens).ravel() ==
                          hres["r"][:, args.prompt:].numpy().ravel()))
    l_s, h_s = statistics.median(lt), statistics.median(ht)
    out["runs"].append({"batch": b, "lmx_tokens_per_s": b * args.new / l_s,
                        "hf_tokens_per_s": b * args.new / h_s, "lmx_speedup_vs_hf": h_s / l_s,
                        "lmx_first_call_s": compile_s, "greedy_token_agreement": agree})
  one = rng.integers(4, cfg.vocab_size, (1, args.prompt)).tolist()
  fp32_tps = next(r for r in out["runs"] if r["batch"] == 1)["lmx_tokens_per_s"] \
      if any(r["batch"] == 1 for r in out["runs"]) else None
  from lmx.quant.apply import quantize_model
  sizes = quantize_model(model, "int8")
  decode(model, one, args.new, opts)  # compile
  q_s = statistics.median(_timed(lambda: decode(model, one, args.new, opts))
                          for _ in range(args.rounds))
  out["int8_batch1_tokens_per_s"] = args.new / q_s
  out["int8_projection_bytes_ratio"] = sizes["bytes_after"] / sizes["bytes_before"]
  if fp32_tps:
    out["int8_vs_fp32_batch1"] = out["int8_batch1_tokens_per_s"] / fp32_tps
    out["fp32_batch1_bytes_per_s"] = per_token * fp32_tps
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="default,b58")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--new", type=int, default=128)
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args(argv)
  import torch
  bw = read_bandwidth()
  out = {"new_tokens": args.new, "prompt_tokens": args.prompt, "read_bytes_per_s": bw,
         "machine": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
                     "jax_backend": jax.default_backend(), "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads()},
         "shapes": []}
  rng = np.random.default_rng(0)
  for name in args.shapes.split(","):
    r = measure_shape(name, SHAPES[name], args, rng)
    if "fp32_batch1_bytes_per_s" in r:
      r["bandwidth_fraction_batch1_fp32"] = r["fp32_batch1_bytes_per_s"] / bw
      # The same read at the size of one token's weights: a CPU whose last-level cache
      # holds them reads them faster than 256 MB (this VM: 260 MiB of L3), so this is the
      # stricter limit for that model.
      r["read_bytes_per_s_at_weight_size"] = read_bandwidth(r["weight_bytes_per_token"] / 2**20)
      r["bandwidth_fraction_batch1_fp32_at_weight_size"] = (
          r["fp32_batch1_bytes_per_s"] / r["read_bytes_per_s_at_weight_size"])
    out["shapes"].append(r)
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
