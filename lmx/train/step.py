"""The pure training and evaluation steps, and their jitted, sharded forms.

The model is split once outside (`graphdef, params, rest = nnx.split(model, nnx.Param,
...)`); the loss merges it back inside the traced function, so the step is a pure function
of pytrees and can be jitted with explicit shardings and a donated state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmx.config import TrainConfig
from lmx.parallel.mesh import active_mesh, constrain, mesh_sizes, named_sharding, state_shardings
from lmx.parallel.pipeline import pipeline_parts, pipeline_value_and_grad
from lmx.parallel.zero import constrain_grads, to_device, train_state_shardings
from lmx.train.loss import chunked_lm_loss, lm_loss
from lmx.train.optimizer import make_schedule
from lmx.train.precision import MIN_SCALE, update_loss_scale, uses_loss_scaling
from lmx.train.state import TrainState

Batch = dict[str, jax.Array]
BATCH_NAMES = ("batch", "seq")


def batch_loss(graphdef, rest, params, batch: Batch, z_loss: float = 0.0,
               chunk_tokens: int = 0) -> tuple[jax.Array, dict]:
  """`lm_loss` of the model on a batch; with chunk_tokens > 0 the LM head and softmax run
  a chunk of sequence positions at a time (`chunked_lm_loss`, same value)."""
  model = nnx.merge(graphdef, params, rest) if rest is not None else nnx.merge(graphdef, params)
  kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
  if chunk_tokens:
    h = model.hidden(batch["inputs"], **kw)
    return chunked_lm_loss(h, model.head_weight(), batch["targets"], batch["loss_mask"],
                           z_loss, chunk_tokens)
  logits = model(batch["inputs"], **kw)  # (B, T, V) float32
  return lm_loss(logits, batch["targets"], batch["loss_mask"], z_loss)


def _split_microbatches(batch: Batch, k: int) -> Batch:
  """(B, T) -> (k, B/k, T). Microbatch i takes rows i, i+k, ... so that every device
  keeps an equal share of each microbatch under a batch-sharded layout."""
  def one(x):
    b = x.shape[0]
    x = x.reshape(b // k, k, *x.shape[1:])  # (B/k, k, T)
    return jnp.swapaxes(x, 0, 1)  # (k, B/k, T)
  return jax.tree.map(one, batch)


def _select(pred, new, old):
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State | None,
                    optimizer: optax.GradientTransformation,
                    cfg: TrainConfig) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (state, metrics)` for a batch of (B, T) arrays.

  With grad_accum_steps=k the batch is cut into k microbatches scanned one after another
  (or, on a mesh with pipeline > 1, run through the pipeline stages on `pipeline_schedule`);
  token-summed losses and gradients are added and divided once by the total token count,
  so the update equals the one-large-batch update up to float summation order.
  A non-finite loss or gradient norm skips the update: everything but the counters (and
  the fp16 loss scale) is returned unchanged.
  """
  k = cfg.grad_accum_steps
  schedule = make_schedule(cfg)
  scaled = uses_loss_scaling(cfg.precision)

  def scaled_loss(params, micro: Batch, scale):
    """This microbatch's share of the batch-mean loss, times `scale` (see train_step)."""
    _, aux = batch_loss(graphdef, rest, params, micro, cfg.z_loss, cfg.loss_chunk_tokens)
    return (aux["ce_sum"] + aux["z_sum"]) * scale, aux

  grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

  # How the batch's (ce_sum, z_sum, n_tokens) and summed gradients are computed: one pass,
  # k microbatches in a scan, or k microbatches through the pipeline stages.
  def one_pass(params, batch, scale):
    mb = jax.tree.map(lambda x: constrain(x, BATCH_NAMES), batch)
    (_, aux), g = grad_fn(params, mb, scale)  # no loop: XLA fuses the gradient into the update
    return (aux["ce_sum"], aux["z_sum"], aux["n_tokens"]), g

  def accumulate(params, batch, scale):
    def body(carry, mb):
      g_sum, ce_sum, z_sum, n = carry
      mb = jax.tree.map(lambda x: constrain(x, BATCH_NAMES), mb)
      (_, aux), g = grad_fn(params, mb, scale)
      g_sum = constrain_grads(jax.tree.map(jnp.add, g_sum, g), cfg.zero_stage)
      return (g_sum, ce_sum + aux["ce_sum"], z_sum + aux["z_sum"], n + aux["n_tokens"]), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (constrain_grads(zeros, cfg.zero_stage), jnp.float32(0), jnp.float32(0),
            jnp.float32(0))
    (g_sum, ce_sum, z_sum, n), _ = jax.lax.scan(body, init, _split_microbatches(batch, k))
    return (ce_sum, z_sum, n), g_sum

  def pipelined(params, batch, scale):
    mesh, rules = active_mesh()
    parts = pipeline_parts(graphdef, rest, params)
    return pipeline_value_and_grad(parts, params, batch, scale, kind=cfg.pipeline_schedule,
                                   microbatches=k, mesh=mesh, rules=rules, z_loss=cfg.z_loss,
                                   chunk_tokens=cfg.loss_chunk_tokens)

  def train_step(state: TrainState, batch: Batch):
    # The gradient is taken of sum(loss) * loss_scale / n_tokens(whole batch), so the fp16
    # loss scale means what it means elsewhere (a factor on the mean loss): scaling the
    # token *sum* would multiply every cotangent by n_tokens more and overflow fp16.
    denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    scale = state.loss_scale / denom
    mesh, _ = active_mesh()
    if mesh is not None and mesh_sizes(mesh).get("pipeline", 1) > 1:
      engine = pipelined
    else:
      engine = one_pass if k == 1 else accumulate
    (ce_sum, z_sum, n), g_sum = engine(state.params, batch, scale)
    # ZeRO-2/3: each data replica keeps only its slice of the gradient sum (reduce-scatter).
    grads = constrain_grads(jax.tree.map(lambda g: g / state.loss_scale, g_sum), cfg.zero_stage)
    loss = (ce_sum + z_sum) / denom
    grad_norm = optax.tree.norm(grads)

    loss_ok, grads_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    ok = loss_ok & grads_ok
    opt_in = to_device(state.opt_state, cfg.optimizer_memory)  # ZeRO-Offload: host -> device
    updates, opt_state = optimizer.update(grads, opt_in, state.params)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(state.rng)

    if scaled:
      loss_scale, good_steps = update_loss_scale(state.loss_scale, state.good_steps, ok,
                                                 cfg.loss_scale_period)
      # An fp16 overflow the scale can still absorb (by halving) is routine, not "bad".
      absorbed = loss_ok & ~grads_ok & (state.loss_scale > MIN_SCALE)
    else:
      loss_scale, good_steps = state.loss_scale, state.good_steps
      absorbed = jnp.bool_(False)
    bad = ~ok & ~absorbed
    new = TrainState(
        params=params, opt_state=opt_state, step=state.step + 1, rng=rng,
        loss_scale=loss_scale, good_steps=good_steps,
        consecutive_bad_steps=jnp.where(bad, state.consecutive_bad_steps + 1,
                                        jnp.where(ok, 0, state.consecutive_bad_steps)),
        total_bad_steps=state.total_bad_steps + bad.astype(jnp.int32))
    kept = _select(ok, new.replace(consecutive_bad_steps=state.consecutive_bad_steps,
                                   total_bad_steps=state.total_bad_steps,
                                   loss_scale=state.loss_scale, good_steps=state.good_steps),
                   state.replace(opt_state=opt_in))
    out = kept.replace(loss_scale=new.loss_scale, good_steps=new.good_steps,
                       consecutive_bad_steps=new.consecutive_bad_steps,
                       total_bad_steps=new.total_bad_steps)
    metrics = {"loss": loss, "ce": ce_sum / denom, "grad_norm": grad_norm,
               "lr": schedule(state.step), "tokens": n, "bad_step": bad, "skipped": ~ok,
               "loss_scale": state.loss_scale}
    return out, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State | None, chunk_tokens: int = 0):
  """`eval_step(params, batch) -> (ce_sum, n_tokens)`: summed cross entropy (no z-loss)
  and the count of masked-in tokens, for exact averaging over many batches."""

  def eval_step(params: nnx.State, batch: Batch):
    batch = jax.tree.map(lambda x: constrain(x, BATCH_NAMES), batch)
    _, aux = batch_loss(graphdef, rest, params, batch, 0.0, chunk_tokens)
    return aux["ce_sum"], aux["n_tokens"]

  return eval_step


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return named_sharding(BATCH_NAMES, mesh)


def jit_train_step(train_step, state_or_abstract: Any, mesh: Mesh,
                   cfg: TrainConfig | None = None):
  """jit with the state's shardings in and out (parameters by their logical names; Adam
  moments in the parameters' layout, plus `data` from ZeRO stage 1; scalars replicated),
  the batch split over ('batch', 'seq'), and the input state donated so params/moments are
  updated in place."""
  cfg = cfg or TrainConfig()  # its zero_stage and optimizer_memory pick the state layout
  state_sh = train_state_shardings(state_or_abstract, mesh, cfg.zero_stage,
                                   optimizer_memory=cfg.optimizer_memory)
  return jax.jit(train_step, in_shardings=(state_sh, batch_sharding(mesh)),
                 out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_step, params_or_abstract: Any, mesh: Mesh):
  return jax.jit(eval_step,
                 in_shardings=(state_shardings(params_or_abstract, mesh), batch_sharding(mesh)),
                 out_shardings=replicated(mesh))


def put_batch(batch: dict, mesh: Mesh) -> Batch:
  """Host numpy batch (this process's rows) -> global jax arrays sharded over the batch."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in batch.items()}
