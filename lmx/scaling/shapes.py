"""Model-shape rule: choose depth, width and heads for a target non-embedding size.

Rule (documented once, used by sweeps):
1. For every depth L in 1..max_layers, pick the width d whose exact non-embedding count
   (`accounting.count_params`) is closest to the target. Widths are multiples of 16 below
   128, of 32 below 256 and of 64 above, so that step 3 gives whole heads of 16/32/64.
2. Among depths whose count is within `tolerance` of the target, take the one whose aspect
   ratio d/L is closest (in log) to `aspect_ratio` (64 by default, nanochat's
   d_model = 64 * depth; Kaplan et al. find loss flat over a wide range of d/L). If no depth
   is within tolerance, take the closest count.
3. Heads: head_dim = the largest of (64, 32, 16) that is <= max(16, d/4) and divides d, so
   tiny models keep >= 4 heads; n_heads = d / head_dim (MHA).
The MLP width follows ModelConfig's default for `mlp` (4d, or 8/3 d rounded to 64 if gated).
"""

from __future__ import annotations

import dataclasses
import math

from lmx.config import ModelConfig
from lmx.scaling.accounting import count_params


def head_dim_for(d_model: int, max_head_dim: int = 64) -> int:
  for hd in (64, 32, 16):
    if hd <= max_head_dim and hd <= max(16, d_model // 4) and d_model % hd == 0:
      return hd
  return math.gcd(d_model, 16) or 1


def _config(d: int, n_layers: int, base: ModelConfig, max_head_dim: int) -> ModelConfig:
  hd = head_dim_for(d, max_head_dim)
  return dataclasses.replace(base, d_model=d, n_layers=n_layers, n_heads=d // hd,
                             n_kv_heads=0, head_dim=0, d_ff=0)


def _widths(limit: int = 1 << 16) -> list[int]:
  return ([d for d in range(16, 128, 16)] + [d for d in range(128, 256, 32)] +
          [d for d in range(256, limit, 64)])


WIDTHS = _widths()


def shape_for_params(target_non_embedding_params: int, *, aspect_ratio: float = 64.0,
                     vocab_size: int = 4096, max_head_dim: int = 64,
                     max_layers: int = 64, tolerance: float = 0.1,
                     base: ModelConfig | None = None) -> dict:
  """ModelConfig fields (d_model, n_layers, n_heads, head_dim, vocab_size) for the target,
  plus `non_embedding_params` and `params` actually achieved and the relative `error`."""
  target = int(target_non_embedding_params)
  if target <= 0:
    raise ValueError(f"target_non_embedding_params is {target}; it must be > 0")
  if aspect_ratio <= 0:
    raise ValueError(f"aspect_ratio is {aspect_ratio}; it must be > 0")
  base = dataclasses.replace(base or ModelConfig(), vocab_size=vocab_size)
  count = lambda d, layers: count_params(_config(d, layers, base, max_head_dim)
                                         ).non_embedding_params
  cands = []
  for layers in range(1, max_layers + 1):
    lo, hi = 0, len(WIDTHS) - 1  # count grows with width: bisect for the bracketing pair
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if count(WIDTHS[mid], layers) < target else (lo, mid)
    d = min((WIDTHS[lo], WIDTHS[hi]), key=lambda w: abs(count(w, layers) - target))
    err = abs(count(d, layers) - target) / target
    cands.append((err, abs(math.log(d / layers / aspect_ratio)), d, layers))
  within = [c for c in cands if c[0] <= tolerance]
  _, _, d, layers = min(within, key=lambda c: c[1]) if within else min(cands)
  cfg = _config(d, layers, base, max_head_dim).validate()
  pc = count_params(cfg)
  return {"d_model": d, "n_layers": layers, "n_heads": cfg.n_heads,
          "head_dim": cfg.dim_per_head, "vocab_size": vocab_size,
          "non_embedding_params": pc.non_embedding_params, "params": pc.params,
          "error": (pc.non_embedding_params - target) / target}


MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "head_dim", "vocab_size")
