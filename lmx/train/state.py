"""The training state: one pytree that the jitted step takes, returns and donates."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from lmx.config import TrainConfig
from lmx.parallel.mesh import check_divisible, state_shardings
from lmx.parallel.zero import train_state_shardings
from lmx.train.precision import initial_loss_scale
from lmx.train.trainable import check_pattern, split_trainable


@struct.dataclass
class TrainState:
  """Everything a bitwise-exact resume needs besides the data iterator position.

  params: nnx.State of the model's nnx.Param variables (float32 master weights).
  opt_state: the optax state; its moments mirror the trainable part of `params` (all of
    it unless `train.trainable` selects a part; same tree, same shardings).
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
      opt_state=optimizer.init(split_trainable(params, cfg.trainable)[0]),
      step=jnp.int32(0),
      rng=jax.random.PRNGKey(seed),
      loss_scale=initial_loss_scale(cfg.precision, cfg.loss_scale_init),
      good_steps=jnp.int32(0),
      consecutive_bad_steps=jnp.int32(0),
      total_bad_steps=jnp.int32(0),
  )


def plan_train_state(make_model: Callable[[nnx.Rngs], nnx.Module],
                     optimizer: optax.GradientTransformation, cfg: TrainConfig, seed: int,
                     mesh: Mesh, *, base: nnx.State | None = None,
                     finish: Callable[..., None] | None = None, extra: Any = None):
  """Shape before memory: plan the state without allocating it.

  Returns (graphdef, abstract, shardings, init): `abstract` is the (TrainState, rest) pair
  as ShapeDtypeStructs (`rest` is the model's non-Param state, often empty), `shardings`
  their NamedShardings (logical names through the rules table, and `train.zero_stage`;
  lmx.parallel.zero), and `init()` allocates both
  directly in that layout with one `jax.jit(..., out_shardings=...)` -- no full copy ever
  sits on one device. A resumed run restores into `abstract` and never calls `init`.

  base: parameters loaded into the fresh model (fine-tuning, lmx.train.init_from);
  finish(model, rngs, extra): run on the model after that (PEFT modules, a distillation
  teacher); `extra` is its arrays (a teacher's weights), passed into the jitted init.
  """

  def build(base_params, extra_arrays):
    rngs = nnx.Rngs(params=seed)
    model = make_model(rngs)
    if base_params is not None:
      nnx.update(model, base_params)
    if finish is not None:
      finish(model, rngs, extra_arrays)
    return model

  def init(base_params, extra_arrays):
    _, params, rest = nnx.split(build(base_params, extra_arrays), nnx.Param, ...)
    return create_train_state(params, optimizer, cfg, seed + 1), rest

  abstract = jax.eval_shape(init, base, extra)
  graphdef = nnx.split(nnx.eval_shape(lambda: build(None, None)), nnx.Param, ...)[0]
  check_divisible(abstract[0].params, mesh)  # one sentence, before anything compiles
  check_pattern(abstract[0].params, cfg.trainable)
  shardings = (train_state_shardings(abstract[0], mesh, cfg.zero_stage,
                                     optimizer_memory=cfg.optimizer_memory),
               state_shardings(abstract[1], mesh))
  jitted = jax.jit(init, out_shardings=shardings)
  return graphdef, abstract, shardings, lambda: jitted(base, extra)


def init_train_state(make_model: Callable[[nnx.Rngs], nnx.Module],
                     optimizer: optax.GradientTransformation, cfg: TrainConfig, seed: int,
                     mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State, TrainState]:
  """(graphdef, rest, state): a fresh state allocated sharded (see `plan_train_state`)."""
  graphdef, _, _, init = plan_train_state(make_model, optimizer, cfg, seed, mesh)
  state, rest = init()
  return graphdef, rest, state
