"""Mixed precision: which dtype the model computes in, and fp16 dynamic loss scaling.

float32: everything fp32. bfloat16: params (the master copy) and optimizer state stay fp32,
the model casts to bf16 at use (ModelConfig.dtype), logits/loss are fp32; bf16 has fp32's
exponent range, so no loss scaling. float16: as bf16 plus dynamic loss scaling, because fp16
gradients underflow below ~6e-8: the loss is multiplied by `scale` before backprop, the
gradients divided by it after; an overflow (non-finite gradient) halves the scale and skips
the update, and `period` finite steps in a row double it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_SCALE = 1.0


def uses_loss_scaling(precision: str) -> bool:
  return precision == "float16"


def initial_loss_scale(precision: str, init: float) -> jax.Array:
  return jnp.float32(init if uses_loss_scaling(precision) else 1.0)


def update_loss_scale(scale: jax.Array, good_steps: jax.Array, grads_finite: jax.Array,
                      period: int) -> tuple[jax.Array, jax.Array]:
  """One dynamic-loss-scale update. Returns (new_scale, new_good_steps).

  Overflow: scale / 2 (not below 1), counter reset. Finite: counter + 1, and once it
  reaches `period` the scale doubles and the counter resets.
  """
  grown = good_steps + 1
  double = grown >= period
  new_scale = jnp.where(grads_finite,
                        jnp.where(double, scale * 2.0, scale),
                        jnp.maximum(scale * 0.5, MIN_SCALE))
  new_good = jnp.where(grads_finite, jnp.where(double, 0, grown), 0)
  return new_scale.astype(jnp.float32), new_good.astype(jnp.int32)
