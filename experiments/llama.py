"""LLaMA-style preset family: RoPE, RMSNorm, SwiGLU, GQA, untied embeddings.

Launch:   lmx info  --config=experiments/llama.py:150m
          lmx train --config=experiments/llama.py:60m --config.mesh.fsdp=-1 --config.mesh.data=1
          lmx info  --config=experiments/llama.py:70b --devices 256 --table
Sizes:    'tiny' (CPU smoke, ~2M), '60m', '150m', '1b', '70b' (arg after ':'; default '60m').
Runs on:  60m/150m on one accelerator; 1b with FSDP over 8+ devices (bf16, remat save_dots);
          70b (the Llama-2-70B shape) planned for 256 devices as fsdp=32 x tensor=8 (bf16,
          remat full, 4M-token batches in 8 microbatches); its memory plan: docs/scaling.md.
Expect:   `lmx info` params: tiny 1,836,160; 60m 56,369,664; 150m 149,840,640;
          1b 1,151,952,896 (32k vocab, untied); 70b 68,976,648,192 (= Llama-2-70B).
"""

from lmx.config import base_config

# name: (d_model, n_layers, n_heads, n_kv_heads, vocab, d_ff); d_ff 0 = 8/3 d_model rounded to 64
SHAPES = {
    "tiny": (128, 4, 4, 2, 4096, 0),
    "60m": (512, 8, 8, 4, 32000, 0),
    "150m": (768, 16, 12, 4, 32000, 0),
    "1b": (2048, 22, 16, 8, 32000, 0),
    "70b": (8192, 80, 64, 8, 32000, 28672),  # Llama-2-70B (Touvron et al. 2023)
}


def get_config(arg: str | None = None):
  size = arg or "60m"
  if size not in SHAPES:
    raise ValueError(f"Invalid config: llama size {size!r}; choose one of {sorted(SHAPES)}.")
  d_model, n_layers, n_heads, n_kv_heads, vocab, d_ff = SHAPES[size]
  c = base_config()
  c.name = f"llama_{size}"
  c.run_dir = f"runs/llama_{size}"  # where checkpoints and metrics go

  m = c.model
  m.vocab_size = vocab  # SentencePiece vocabulary
  m.d_model = d_model  # residual width
  m.n_layers = n_layers  # blocks
  m.n_heads = n_heads  # query heads
  m.n_kv_heads = n_kv_heads  # GQA key/value heads
  m.mlp = "swiglu"  # gated MLP
  m.d_ff = d_ff  # 0: 8/3 d rounded to 64; Llama-2-70B widens it to 28672
  m.norm = "rmsnorm"  # no bias
  m.position = "rope"  # rotary
  m.rope_theta = 10000.0  # RoPE base
  m.max_seq_len = {"tiny": 256, "70b": 4096}.get(size, 2048)  # context
  m.tie_embeddings = False  # LLaMA unties input/output embeddings
  m.remat = {"1b": "save_dots", "70b": "full"}.get(size, "none")  # memory vs recompute

  c.data.seq_len = m.max_seq_len  # full context
  c.data.batch_size = {"tiny": 16, "70b": 1024}.get(size, 256)  # sequences/step (70b: 4M tok)

  t = c.train
  t.steps = 10000 if size != "tiny" else 200  # optimizer steps
  t.learning_rate = {"1b": 3e-4, "70b": 1.5e-4}.get(size, 1e-3)  # peak LR (70b: Llama-2's)
  t.warmup_steps = 1000 if size != "tiny" else 20  # warmup
  t.precision = "bfloat16" if size != "tiny" else "float32"  # compute dtype
  if size == "70b":
    t.grad_accum_steps = 8  # 1024 sequences as 8 microbatches: activations for 128 at a time
    c.mesh.data = 1  # 256 devices: fsdp=32 x tensor=8 (one 8-way tensor group per host)
    c.mesh.fsdp = -1
    c.mesh.tensor = 8
  return c
