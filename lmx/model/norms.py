"""RMSNorm and LayerNorm over the last (embed) axis.

Statistics are always computed in float32, whatever the compute dtype: a bf16 mean of
squares over d_model loses too many bits. The result is cast back to the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.config import ModelConfig
from lmx.model.layers import ones, param, zeros


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale (Zhang & Sennrich 2019); no bias."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs.params(), (dim,), ("embed",), ones)

  def __call__(self, x: jax.Array) -> jax.Array:  # (..., D) -> (..., D)
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(ms + self.eps) * self.scale[...]
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """y = (x - mean) / sqrt(var + eps) * scale [+ bias] (Ba et al. 2016)."""

  def __init__(self, dim: int, eps: float, use_bias: bool, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs.params(), (dim,), ("embed",), ones)
    self.bias = param(rngs.params(), (dim,), ("embed",), zeros) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:  # (..., D) -> (..., D)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)


def make_norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
  if cfg.norm == "rmsnorm":
    return RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
  return LayerNorm(cfg.d_model, cfg.norm_eps, cfg.use_bias, rngs=rngs)
