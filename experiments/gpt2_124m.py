"""GPT-2 small (124M): learned positions, LayerNorm, GELU, biases, tied embeddings.

Launch:   lmx info --config=experiments/gpt2_124m.py   -> "params": 124439808
          lmx train --config=experiments/gpt2_124m.py --config.mesh.fsdp=-1 --config.mesh.data=1
Runs on:  one TPU v5e-8 / one H100 (bf16); on a 2-core CPU only `info` and shape checks.
Expect:   124,439,808 parameters (the well-known figure, with the 50,257-token GPT-2 vocab).
"""

from lmx.config import base_config


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.name = "gpt2_124m"
  c.run_dir = "runs/gpt2_124m"  # where checkpoints and metrics go

  m = c.model
  m.vocab_size = 50257  # GPT-2 BPE vocabulary size
  m.d_model = 768  # residual width
  m.n_layers = 12  # blocks
  m.n_heads = 12  # heads of 64
  m.n_kv_heads = 0  # MHA
  m.d_ff = 3072  # 4 * d_model
  m.mlp = "gelu"  # GPT-2 MLP
  m.norm = "layernorm"  # with bias
  m.norm_eps = 1e-5  # GPT-2 LayerNorm epsilon
  m.norm_position = "pre"  # GPT-2 is pre-LN with a final LayerNorm
  m.position = "learned"  # learned absolute positions
  m.max_seq_len = 1024  # context length (size of the position table)
  m.use_bias = True  # biases on every projection and LayerNorm
  m.tie_embeddings = True  # lm head = token embedding^T

  c.data.seq_len = 1024  # full context
  c.data.batch_size = 512  # ~0.5M tokens per step, as GPT-2/3 small

  t = c.train
  t.steps = 20000  # ~10B tokens
  t.learning_rate = 6e-4  # GPT-3 small peak LR
  t.warmup_steps = 700  # linear warmup
  t.weight_decay = 0.1  # AdamW
  t.beta2 = 0.95  # GPT-3 betas
  t.precision = "bfloat16"  # fp32 master weights, bf16 compute
  t.grad_accum_steps = 1  # raise when the batch does not fit
  t.eval_every = 500  # validation cadence
  c.model.remat = "save_dots"  # recompute cheap ops, keep matmul outputs
  return c
