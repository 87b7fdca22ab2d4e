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
* Mixture of Experts (`model.moe`, lmx/model/moe.py): `params` counts every expert;
  `active_params` counts what one token passes through -- the router, its top_k routed
  experts and the shared experts of each MoE layer, everything else as usual. FLOPs per
  token use the *active* count: flops_per_token = 6 * (active_non_embedding_params +
  d_model * vocab_size) + the attention term (the 6 N_active convention; the dispatch's
  sorting and gathers are not counted). For a dense model active == total.
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
  per_layer: int  # mean over layers (MoE and dense layers differ)
  active_params: int  # per token (MoE: top_k routed experts); == params for dense models
  active_non_embedding_params: int


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
  dense_layer = attn + mlp + 2 * _norm_params(cfg)
  n_moe, moe_layer, moe_active = 0, 0, 0
  m = cfg.moe
  if m.num_experts:
    fe = m.d_ff or f
    expert = n_in * d * fe + fe * d
    router = d * m.num_experts + (m.num_experts if m.router == "sigmoid" else 0)
    common = attn + 2 * _norm_params(cfg) + router + m.shared_experts * expert
    n_moe = cfg.n_layers // m.every_n_layers
    moe_layer = common + m.num_experts * expert
    moe_active = common + m.top_k * expert
  n_dense = cfg.n_layers - n_moe
  embedding = v * d
  if cfg.position == "learned":
    embedding += cfg.max_seq_len * d
  if not cfg.tie_embeddings:
    embedding += d * v
  layers = n_dense * dense_layer + n_moe * moe_layer
  non_embedding = layers + _norm_params(cfg)  # + final norm
  active = n_dense * dense_layer + n_moe * moe_active + _norm_params(cfg)
  return ParamCount(params=embedding + non_embedding, embedding_params=embedding,
                    non_embedding_params=non_embedding, per_layer=layers // cfg.n_layers,
                    active_params=embedding + active, active_non_embedding_params=active)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
  """Training FLOPs per token; see the module docstring for the convention."""
  t = seq_len if seq_len is not None else cfg.max_seq_len
  n = count_params(cfg).active_non_embedding_params
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
