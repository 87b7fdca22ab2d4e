"""The training state: one pytree that the jitted step takes, returns and donates."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from lmx.config import TrainConfig
from lmx.train.precision import initial_loss_scale


@struct.dataclass
class TrainState:
  """Everything a bitwise-exact resume needs besides the data iterator position.

  params: nnx.State of the model's nnx.Param variables (float32 master weights).
  opt_state: the optax state; its moments mirror `params` (same tree, same shardings).
  step: int32, optimizer steps taken (skipped non-finite steps do not count).
  rng: uint32[2] raw PRNG key, split once per step (for stochastic layers / sampling).
  loss_scale: float32, the fp16 dynamic loss scale (1.0 for fp32 / bf16).
  good_steps: int32, finite steps since the loss scale last changed.
  consecutive_bad_steps / total_bad_steps: int32 counters of non-finite steps.
  """

  params: nnx.State
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  loss_scale: jax.Array
  good_steps: jax.Array
  consecutive_bad_steps: jax.Array
  total_bad_steps: jax.Array


def create_train_state(params: nnx.State, optimizer: optax.GradientTransformation,
                       cfg: TrainConfig, seed: int) -> TrainState:
  """A fresh state at step 0 (traceable: call it inside `jax.jit` / `jax.eval_shape`)."""
  return TrainState(
      params=params,
      opt_state=optimizer.init(params),
      step=jnp.int32(0),
      rng=jax.random.PRNGKey(seed),
      loss_scale=initial_loss_scale(cfg.precision, cfg.loss_scale_init),
      good_steps=jnp.int32(0),
      consecutive_bad_steps=jnp.int32(0),
      total_bad_steps=jnp.int32(0),
  )
