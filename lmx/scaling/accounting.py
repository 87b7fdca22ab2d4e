"""Exact parameter counts, training FLOPs and MFU for a ModelConfig.

Memory per device is planned from the runtime's shardings in `lmx.scaling.memory`.

Conventions (stated once, used everywhere):

* `params` counts every trainable array of `lmx.model.Transformer`, exactly.
* `embedding_params` are the token embedding, the learned position table (if any) and the
  untied output projection (if any). `non_embedding_params = params - embedding_params`
  (Kaplan et al. 2020's N).
* Training FLOPs per token (forward + backward = 3x forward, a multiply-add = 2 FLOPs):

      flops_per_token = 6 * (non_embedding_params + d_model * vocab_size)
                      + 6 * n_layers * seq_len * n_heads * head_dim

  The first term is the matmul work of every weight a token passes through, with the
  output projection (d_model x vocab) counted whether or not it is tied. The second is
  attention's two matmuls (q.k^T and p.v), 2 * 2 * seq_len * n_heads * head_dim FLOPs per
  token per layer forward for full attention, *counted at half for causal masking*, times 3
  for training. Norms, softmax and the small per-parameter elementwise work are ignored.
  For GQA, q.k^T still costs n_heads * head_dim per key, so the term uses n_heads.
* Total training compute C = flops_per_token * tokens (approximately 6 N D).
"""

from __future__ import annotations

import dataclasses

from lmx.config import ModelConfig

PF_DAY = 1e15 * 24 * 3600  # FLOPs in one petaFLOP/s-day.

# Dense-matmul peak FLOP/s per chip, bf16 unless noted (vendor figures).
DEVICE_PEAK_FLOPS: dict[str, float] = {
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
    "tpu_v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,  # SXM, dense
    "h200": 989e12,  # same compute as H100 SXM
}


@dataclasses.dataclass(frozen=True)
class ParamCount:
  params: int
  embedding_params: int
  non_embedding_params: int
  per_layer: int


def _norm_params(cfg: ModelConfig) -> int:
  if cfg.norm == "layernorm" and cfg.use_bias:
    return 2 * cfg.d_model
  return cfg.d_model


def count_params(cfg: ModelConfig) -> ParamCount:
  d, h, kv, hd, f, v = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head,
                        cfg.ff_dim, cfg.vocab_size)
  attn = d * h * hd + 2 * d * kv * hd + h * hd * d
  if cfg.use_bias:
    attn += h * hd + 2 * kv * hd + d
  n_in = 2 if cfg.gated else 1
  mlp = n_in * d * f + f * d
  if cfg.use_bias:
    mlp += n_in * f + d
  per_layer = attn + mlp + 2 * _norm_params(cfg)
  embedding = v * d
  if cfg.position == "learned":
    embedding += cfg.max_seq_len * d
  if not cfg.tie_embeddings:
    embedding += d * v
  non_embedding = cfg.n_layers * per_layer + _norm_params(cfg)  # + final norm
  return ParamCount(params=embedding + non_embedding, embedding_params=embedding,
                    non_embedding_params=non_embedding, per_layer=per_layer)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
  """Training FLOPs per token; see the module docstring for the convention."""
  t = seq_len if seq_len is not None else cfg.max_seq_len
  n = count_params(cfg).non_embedding_params
  dense = 6 * (n + cfg.d_model * cfg.vocab_size)
  attention = 6 * cfg.n_layers * t * cfg.n_heads * cfg.dim_per_head
  return dense + attention


def training_flops(cfg: ModelConfig, tokens: int, seq_len: int | None = None) -> float:
  return float(flops_per_token(cfg, seq_len)) * tokens


def pf_days(flops: float) -> float:
  return flops / PF_DAY


def mfu(tokens_per_second: float, flops_per_tok: float, n_devices: int,
        peak_flops_per_device: float) -> float:
  """Model FLOPs utilization: achieved model FLOP/s over the devices' summed peak."""
  return tokens_per_second * flops_per_tok / (n_devices * peak_flops_per_device)
