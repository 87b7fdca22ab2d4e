"""Mixture of Experts (lmx/model/moe.py, docs/moe.md): a CPU-sized 8-expert top-2 model, its
dense twin of equal active parameters, and the Mixtral-8x7B shape for planning.

Launch:   lmx train --config=experiments/moe.py            (8 experts, top-2, capacity 1.25)
          lmx train --config=experiments/moe.py:dropless   (sorted tokens + ragged_dot)
          lmx train --config=experiments/moe.py:dense      (the dense baseline)
          lmx train --config=experiments/moe.py:nobalance  (aux_loss_coef 0: watch moe_load_cv)
          lmx info  --config=experiments/moe.py:mixtral_8x7b
Shape:    the default experiment's 3 blocks of width 128, each MLP replaced by 8 SwiGLU experts
          of width 192 with top-2 routing: a token passes through 2 x 192 = 384 hidden units,
          the dense twin's d_ff, so active parameters (and FLOPs per token) match up to the
          router (3 x 128 x 8 = 3,072 parameters). Total 2,445,184 parameters, 1,118,080 active.
Runs on:  2 CPU cores: 1.21x the dense twin's step time (capacity path; dropless 3.7x);
          300 steps took 8-11 min on a shared 2-core machine at load 8-12, so the 600
          steps here take ~20 min there and less on an idle one (figures: docs/moe.md).
Expect:   per-step metrics moe_balance (~0.01 = aux_loss_coef x 1 when balanced),
          moe_router_z, moe_dropped (share of assignments over capacity),
          moe_load_cv / _max / _min.
          mixtral_8x7b: `lmx info` params 46,702,792,704, active_params 12,879,925,248.
"""

from lmx.experiment import sibling_config


def get_config(arg: str | None = None):
  arg = arg or "moe"
  if arg not in ("moe", "dense", "nobalance", "dropless", "mixtral_8x7b"):
    raise ValueError(f"Invalid config: experiments/moe.py argument {arg!r}; choose one of "
                     "moe, dense, nobalance, dropless, mixtral_8x7b.")
  if arg == "mixtral_8x7b":
    return _mixtral()
  c = sibling_config(__file__, "default")
  c.name = f"moe_{arg}" if arg != "moe" else "moe"
  c.run_dir = f"runs/{c.name}"
  m = c.model
  if arg == "dense":
    m.d_ff = 384  # = top_k x the experts' width: equal active parameters
  else:
    e = m.moe
    e.num_experts = 8  # routed experts per MoE layer
    e.top_k = 2  # experts per token
    e.d_ff = 192  # one expert's hidden width
    e.every_n_layers = 1  # every block's MLP is an MoE
    # 1.25: each expert takes up to 1.25x its even share, the rest dropped (counted). The
    # dropless path (0) is exact but 3.7x the dense step on XLA:CPU, whose ragged_dot is
    # slow; capacity is 1.2x (docs/moe.md).
    e.capacity_factor = 0.0 if arg == "dropless" else 1.25
    e.router = "softmax"  # top-k of a softmax, weights renormalized
    e.aux_loss_coef = 0.0 if arg == "nobalance" else 1e-2  # switch load-balancing loss
    e.router_z_loss = 1e-3  # ST-MoE router z-loss
  t = c.train
  t.steps = 600  # optimizer steps (~2.5M tokens)
  t.eval_every = 200  # validation loss every N steps
  c.checkpoint.every = 200
  return c


def _mixtral():
  """Mixtral 8x7B (Jiang et al. 2024): 32 blocks of width 4096, GQA 32/8, 8 SwiGLU experts of
  14336 per block, top-2, 32k vocabulary, untied; planned on 64 devices (fsdp 8 x expert 8)."""
  from lmx.config import base_config
  c = base_config()
  c.name = "mixtral_8x7b"
  c.run_dir = "runs/mixtral_8x7b"
  m = c.model
  m.vocab_size = 32000  # SentencePiece vocabulary
  m.d_model = 4096  # residual width
  m.n_layers = 32  # blocks
  m.n_heads = 32  # query heads (head_dim 128)
  m.n_kv_heads = 8  # GQA key/value heads
  m.d_ff = 14336  # each expert's SwiGLU width
  m.mlp = "swiglu"
  m.rope_theta = 1e6  # Mixtral's RoPE base
  m.max_seq_len = 32768  # context length
  m.tie_embeddings = False  # separate LM head
  m.remat = "full"  # recompute each block in the backward pass
  e = m.moe
  e.num_experts = 8  # experts per block
  e.top_k = 2  # experts per token
  e.capacity_factor = 0.0  # dropless
  c.data.seq_len = 4096  # tokens per row for planning
  c.data.batch_size = 512  # rows per step (2M tokens)
  c.train.precision = "bfloat16"
  c.train.grad_accum_steps = 8  # microbatches
  c.mesh.data = 1
  c.mesh.fsdp = 8  # parameters and batch split 8 ways
  c.mesh.expert = 8  # one expert per device along this axis
  return c
