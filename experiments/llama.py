"""LLaMA-style preset family: RoPE, RMSNorm, SwiGLU, GQA, untied embeddings.

Launch:   lmx info  --config=experiments/llama.py:150m
          lmx train --config=experiments/llama.py:60m --config.mesh.fsdp=-1 --config.mesh.data=1
Sizes:    'tiny' (CPU smoke, ~2M), '60m', '150m', '1b' (arg after ':'; default '60m').
Runs on:  60m/150m on one accelerator; 1b with FSDP over 8+ devices (bf16, remat save_dots).
Expect:   `lmx info` params: tiny 1,836,160; 60m 56,369,664; 150m 149,840,640;
          1b 1,151,952,896 (32k vocab, untied).
"""

from lmx.config import base_config

# name: (d_model, n_layers, n_heads, n_kv_heads, vocab)
SHAPES = {
    "tiny": (128, 4, 4, 2, 4096),
    "60m": (512, 8, 8, 4, 32000),
    "150m": (768, 16, 12, 4, 32000),
    "1b": (2048, 22, 16, 8, 32000),
}


def get_config(arg: str | None = None):
  size = arg or "60m"
  if size not in SHAPES:
    raise ValueError(f"Invalid config: llama size {size!r}; choose one of {sorted(SHAPES)}.")
  d_model, n_layers, n_heads, n_kv_heads, vocab = SHAPES[size]
  c = base_config()
  c.name = f"llama_{size}"
  c.run_dir = f"runs/llama_{size}"  # where checkpoints and metrics go

  m = c.model
  m.vocab_size = vocab  # SentencePiece vocabulary
  m.d_model = d_model  # residual width
  m.n_layers = n_layers  # blocks
  m.n_heads = n_heads  # query heads
  m.n_kv_heads = n_kv_heads  # GQA key/value heads
  m.mlp = "swiglu"  # gated MLP, d_ff = 8/3 d rounded to 64
  m.norm = "rmsnorm"  # no bias
  m.position = "rope"  # rotary
  m.rope_theta = 10000.0  # RoPE base
  m.max_seq_len = 2048 if size != "tiny" else 256  # context
  m.tie_embeddings = False  # LLaMA unties input/output embeddings
  m.remat = "save_dots" if size == "1b" else "none"  # activation memory vs recompute

  c.data.seq_len = m.max_seq_len  # full context
  c.data.batch_size = 256 if size != "tiny" else 16  # sequences per step

  t = c.train
  t.steps = 10000 if size != "tiny" else 200  # optimizer steps
  t.learning_rate = 3e-4 if size == "1b" else 1e-3  # peak LR
  t.warmup_steps = 1000 if size != "tiny" else 20  # warmup
  t.precision = "bfloat16" if size != "tiny" else "float32"  # compute dtype
  return c
