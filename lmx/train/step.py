"""The pure training and evaluation steps, and their jitted, sharded forms.

The model is split once outside (`graphdef, params, rest = nnx.split(model, nnx.Param,
...)`); the loss merges it back inside the traced function, so the step is a pure function
of pytrees and can be jitted with explicit shardings and a donated state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmx.config import ConfigError, TrainConfig
from lmx.parallel.mesh import active_mesh, constrain, mesh_sizes, named_sharding, state_shardings
from lmx.parallel.pipeline import pipeline_parts, pipeline_value_and_grad
from lmx.parallel.zero import constrain_grads, to_device, train_state_shardings
from lmx.train.objectives import Objective, lm_eval_sums, lm_objective, make_objective
from lmx.train.optimizer import make_schedule
from lmx.train.precision import MIN_SCALE, update_loss_scale, uses_loss_scaling
from lmx.train.state import TrainState
from lmx.train.trainable import join, split_trainable

Batch = dict[str, jax.Array]
BATCH_NAMES = ("batch", "seq")


def merge_model(graphdef, rest, params) -> nnx.Module:
  return nnx.merge(graphdef, params, rest) if rest is not None else nnx.merge(graphdef, params)


def batch_loss(graphdef, rest, params, batch: Batch, z_loss: float = 0.0,
               chunk_tokens: int = 0) -> tuple[jax.Array, dict]:
  """The LM objective's (token-mean loss, sums) of the model on a batch (memory planning
  and tests use it; the step runs any `Objective`)."""
  loss_sum, aux = lm_objective(z_loss, chunk_tokens).loss_fn(
      merge_model(graphdef, rest, params), batch, None)
  return loss_sum / jnp.maximum(aux["n_tokens"], 1.0), aux


def _split_microbatches(batch: Batch, k: int) -> Batch:
  """(B, ...) -> (k, B/k, ...). Microbatch i takes rows i, i+k, ... so that every device
  keeps an equal share of each microbatch under a batch-sharded layout."""
  def one(x):
    b = x.shape[0]
    x = x.reshape(b // k, k, *x.shape[1:])  # (B/k, k, ...)
    return jnp.swapaxes(x, 0, 1)  # (k, B/k, ...)
  return jax.tree.map(one, batch)


def _select(pred, new, old):
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def constrain_batch(batch: Batch, objective: Objective) -> Batch:
  return {k: constrain(v, objective.names_for(k, v.ndim)) for k, v in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State | None,
                    optimizer: optax.GradientTransformation, cfg: TrainConfig,
                    objective: Objective | None = None,
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (state, metrics)` for `objective` (default: the one
  `train.objective` names; lmx.train.objectives).

  The objective returns sums; the step divides once by `objective.normalizer(batch)` of
  the whole batch. With grad_accum_steps=k the batch is cut into k microbatches scanned
  one after another (or, on a mesh with pipeline > 1, run through the pipeline stages on
  `pipeline_schedule`); sums and gradients are added, so the update equals the
  one-large-batch update up to float summation order. Only the parameters that
  `train.trainable` selects (lmx.train.trainable) are differentiated and updated; the
  optimizer state covers them alone. A non-finite loss or gradient norm skips the update:
  everything but the counters (and the fp16 loss scale) is returned unchanged.
  """
  objective = objective or make_objective(cfg)
  k = cfg.grad_accum_steps
  schedule = make_schedule(cfg)
  scaled = uses_loss_scaling(cfg.precision)
  pattern = cfg.trainable

  def scaled_loss(params, frozen, micro: Batch, scale, key):
    """This microbatch's share of the batch-mean loss, times `scale` (see train_step)."""
    model = merge_model(graphdef, rest, join(params, frozen))
    loss_sum, aux = objective.loss_fn(model, micro, nnx.Rngs(dropout=key))
    return loss_sum * scale, {**aux, "loss_sum": loss_sum}

  grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

  # How the batch's sums and summed gradients are computed: one pass, k microbatches in a
  # scan, or k microbatches through the pipeline stages.
  def one_pass(params, frozen, batch, scale, key):
    (_, aux), g = grad_fn(params, frozen, constrain_batch(batch, objective), scale, key)
    return aux, g  # no loop: XLA fuses the gradient into the update

  def accumulate(params, frozen, batch, scale, key):
    def body(carry, xs):
      g_sum, sums = carry
      i, mb = xs
      (_, aux), g = grad_fn(params, frozen, constrain_batch(mb, objective), scale,
                            jax.random.fold_in(key, i))
      g_sum = constrain_grads(jax.tree.map(jnp.add, g_sum, g), cfg.zero_stage)
      return (g_sum, jax.tree.map(jnp.add, sums, aux)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    first = _split_microbatches(batch, k)
    sums0 = jax.eval_shape(lambda: grad_fn(params, frozen, jax.tree.map(lambda x: x[0], first),
                                           scale, key)[0][1])
    sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0)
    (g_sum, sums), _ = jax.lax.scan(body, (constrain_grads(zeros, cfg.zero_stage), sums0),
                                    (jnp.arange(k), first))
    return sums, g_sum

  def pipelined(params, frozen, batch, scale, key):
    del key
    if frozen is not None or not objective.pipeline_head:
      raise ConfigError(
          "Invalid config: `mesh.pipeline` > 1 runs the LM objective with every parameter "
          f"training; this run has train.objective={objective.name!r}, train.trainable="
          f"{pattern!r} (use mesh.pipeline=1).")
    mesh, rules = active_mesh()
    parts = pipeline_parts(graphdef, rest, params)
    (ce_sum, z_sum, n), g = pipeline_value_and_grad(
        parts, params, batch, scale, kind=cfg.pipeline_schedule, microbatches=k, mesh=mesh,
        rules=rules, z_loss=cfg.z_loss, chunk_tokens=cfg.loss_chunk_tokens)
    return {"ce_sum": ce_sum, "z_sum": z_sum, "n_tokens": n, "loss_sum": ce_sum + z_sum}, g

  def train_step(state: TrainState, batch: Batch):
    # The gradient is taken of sum(loss) * loss_scale / normalizer(whole batch), so the
    # fp16 loss scale means what it means elsewhere (a factor on the mean loss): scaling
    # the token *sum* would multiply every cotangent by n_tokens more and overflow fp16.
    denom = jnp.maximum(objective.normalizer(batch), 1.0)
    scale = state.loss_scale / denom
    mesh, _ = active_mesh()
    if mesh is not None and mesh_sizes(mesh).get("pipeline", 1) > 1:
      engine = pipelined
    else:
      engine = one_pass if k == 1 else accumulate
    rng, key = jax.random.split(state.rng)
    train_p, frozen = split_trainable(state.params, pattern)
    sums, g_sum = engine(train_p, frozen, batch, scale, key)
    # ZeRO-2/3: each data replica keeps only its slice of the gradient sum (reduce-scatter).
    grads = constrain_grads(jax.tree.map(lambda g: g / state.loss_scale, g_sum), cfg.zero_stage)
    loss = sums["loss_sum"] / denom
    grad_norm = optax.tree.norm(grads)

    loss_ok, grads_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    ok = loss_ok & grads_ok
    opt_in = to_device(state.opt_state, cfg.optimizer_memory)  # ZeRO-Offload: host -> device

    # The skip is a branch, not a select of old against new: `where(ok, new, old)` kept the
    # old Adam moments alive past the update, so XLA copied every donated moment buffer at
    # the top of the step. The branch divides by the loss scale itself so that XLA sees the
    # same expression for the clip as before (bitwise the same updates as the select).
    def update(operands):
      g_sum, opt_in, train_p = operands
      grads = constrain_grads(jax.tree.map(lambda g: g / state.loss_scale, g_sum),
                              cfg.zero_stage)
      updates, opt_state = optimizer.update(grads, opt_in, train_p)
      return optax.apply_updates(train_p, updates), opt_state

    def skip(operands):
      return operands[2], operands[1]

    new_p, opt_state = jax.lax.cond(ok, update, skip, (g_sum, opt_in, train_p))
    params = join(new_p, frozen)

    if scaled:
      loss_scale, good_steps = update_loss_scale(state.loss_scale, state.good_steps, ok,
                                                 cfg.loss_scale_period)
      # An fp16 overflow the scale can still absorb (by halving) is routine, not "bad".
      absorbed = loss_ok & ~grads_ok & (state.loss_scale > MIN_SCALE)
    else:
      loss_scale, good_steps = state.loss_scale, state.good_steps
      absorbed = jnp.bool_(False)
    bad = ~ok & ~absorbed
    # A skipped step also leaves the step counter and the RNG where they were.
    out = TrainState(
        params=params, opt_state=opt_state, step=jnp.where(ok, state.step + 1, state.step),
        rng=_select(ok, rng, state.rng),
        loss_scale=loss_scale, good_steps=good_steps,
        consecutive_bad_steps=jnp.where(bad, state.consecutive_bad_steps + 1,
                                        jnp.where(ok, 0, state.consecutive_bad_steps)),
        total_bad_steps=state.total_bad_steps + bad.astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "bad_step": bad, "skipped": ~ok, "loss_scale": state.loss_scale}
    for name, v in sums.items():
      if name == "n_tokens":
        metrics["tokens"] = v
      elif name.endswith("_sum") and name != "loss_sum":
        metrics[name[:-4]] = v / denom
    return out, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State | None, chunk_tokens: int = 0,
                   objective: Objective | None = None):
  """`eval_step(params, batch) -> (sum, count)` for exact averaging over many batches: the
  summed cross entropy (no z-loss) and the count of masked-in tokens, or the objective's
  own `eval_fn`."""

  def eval_step(params: nnx.State, batch: Batch):
    model = merge_model(graphdef, rest, params)
    if objective is not None and objective.eval_fn is not None:
      return objective.eval_fn(model, constrain_batch(batch, objective))
    batch = jax.tree.map(lambda x: constrain(x, BATCH_NAMES), batch)
    return lm_eval_sums(model, batch, chunk_tokens)

  return eval_step


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return named_sharding(BATCH_NAMES, mesh)


def batch_shardings(mesh: Mesh, batch_spec: dict[str, tuple] | None):
  """The batch's in_shardings: one (batch, seq) sharding for every leaf, or one per key
  from `batch_spec` (key -> logical names; `batch_spec_for`)."""
  if batch_spec is None:
    return batch_sharding(mesh)
  return {k: named_sharding(names, mesh) for k, names in batch_spec.items()}


def batch_spec_for(objective: Objective, batch: dict) -> dict[str, tuple]:
  """key -> logical names of a (host or device) batch under `objective`."""
  return {k: objective.names_for(k, np.ndim(v)) for k, v in batch.items()}


def jit_train_step(train_step, state_or_abstract: Any, mesh: Mesh,
                   cfg: TrainConfig | None = None, batch_spec: dict[str, tuple] | None = None):
  """jit with the state's shardings in and out (parameters by their logical names; Adam
  moments in the parameters' layout, plus `data` from ZeRO stage 1; scalars replicated),
  the batch split over ('batch', 'seq') (or per key by `batch_spec`), and the input state
  donated so params/moments are updated in place."""
  cfg = cfg or TrainConfig()  # its zero_stage and optimizer_memory pick the state layout
  state_sh = train_state_shardings(state_or_abstract, mesh, cfg.zero_stage,
                                   optimizer_memory=cfg.optimizer_memory)
  return jax.jit(train_step, in_shardings=(state_sh, batch_shardings(mesh, batch_spec)),
                 out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_step, params_or_abstract: Any, mesh: Mesh,
                  batch_spec: dict[str, tuple] | None = None):
  return jax.jit(eval_step,
                 in_shardings=(state_shardings(params_or_abstract, mesh),
                               batch_shardings(mesh, batch_spec)),
                 out_shardings=replicated(mesh))


def put_batch(batch: dict, mesh: Mesh, batch_spec: dict[str, tuple] | None = None) -> Batch:
  """Host numpy batch (this process's rows) -> global jax arrays sharded over the batch."""
  sh = batch_shardings(mesh, batch_spec)
  return {k: jax.make_array_from_process_local_data(sh if batch_spec is None else sh[k], v)
          for k, v in batch.items()}
