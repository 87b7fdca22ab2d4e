"""AdamW with a warmup + cosine or warmup-stable-decay schedule, global-norm clipping and no
decay on 1-D params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmx.config import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup 0 -> learning_rate over min(warmup_steps, steps), then down to
  learning_rate * min_lr_ratio at step `steps` (and flat after):

  cosine: a half cosine over all post-warmup steps.
  wsd:    warmup-stable-decay -- flat at the peak, then linear down over the last
          `decay_fraction` of the steps. Lets the LR stay high while a small model is still
          learning fast, and (as in MiniCPM's scaling studies) any prefix of a run is a
          valid run to branch a decay from.
  """
  peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
  # A warmup longer than the run (a 5-step smoke run of a preset) ends at the last step.
  warmup = min(cfg.warmup_steps, cfg.steps)
  if cfg.schedule == "wsd":
    # The decay never overlaps the warmup: it is cut to the post-warmup span if need be.
    decay = max(min(int(round(cfg.decay_fraction * cfg.steps)), cfg.steps - warmup), 1)
    start = cfg.steps - decay
  else:
    start, decay = warmup, max(cfg.steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1)
    frac = jnp.clip((step - start) / decay, 0.0, 1.0)
    if cfg.schedule == "wsd":
      after = peak + (floor - peak) * frac
    else:
      after = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup, warm, after)

  return schedule


def decay_mask(params):
  """True where weight decay applies: matrices and up. Norm scales and biases (1-D) and
  scalars are not decayed -- shrinking a norm gain toward 0 only fights the next layer.
  A stacked layer parameter's leading 'layers' axis (lmx.model.stack; read from an
  nnx.Variable's logical names) does not count: a stack of norm scales (L, D) is 1-D."""

  def decays(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding") or ()
      return x.replace(jnp.ndim(x.get_value()) - tuple(names).count("layers") > 1)
    return jnp.ndim(x) > 1

  return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: TrainConfig, params=None) -> optax.GradientTransformation:
  """optax chain: clip_by_global_norm(grad_clip) (if > 0) then AdamW on the schedule.

  `params` is accepted for symmetry with callers that have it; the decay mask is computed
  from the tree passed to `init`, so it is not needed.
  """
  del params
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return _standard_promotion(optax.chain(*parts))


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """NOTE: optax's Adam bias correction computes `b1 ** count` (float ** int32), which
  strict dtype promotion (used by lmx's tests to catch silent upcasts) rejects; the
  optimizer's own arithmetic runs under standard promotion."""

  def init(params):
    with jax.numpy_dtype_promotion("standard"):
      return tx.init(params)

  def update(updates, state, params=None):
    with jax.numpy_dtype_promotion("standard"):
      return tx.update(updates, state, params)

  return optax.GradientTransformation(init, update)
