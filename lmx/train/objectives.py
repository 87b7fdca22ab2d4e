"""Training objectives as plug-ins of the one train step.

An objective says what a batch's loss is; the step (lmx.train.step) does everything else
the same way for all of them: sharding, gradient accumulation, pipelining, mixed
precision, clipping, skipping non-finite steps, checkpointing.

    loss_fn(model, batch, rngs) -> (loss_sum, aux)

`loss_sum` is a float32 scalar *summed* over the batch's units (tokens for language
modelling, pairs for preference losses, ...); `aux` is a dict of float32 scalar sums
(`ce_sum`, `z_sum`, `kd_sum`, the MoE `moe_balance_sum`, ...). Sums, not means, so that
microbatches combine exactly: the step adds them up and divides once by
`normalizer(batch)`, computed from the whole batch before the forward pass (the fp16 loss
scale is applied to the mean, lmx.train.step). Every aux key `<name>_sum` is logged as
`<name>` = sum / normalizer; `n_tokens` is logged as `tokens`.

`batch_names` gives each batch leaf its logical axes (lmx.parallel.rules), so per-sequence
inputs -- reference log-probs (B,), a pair axis (B, 2, T) -- shard over the batch like the
tokens do; leaves it does not name are (batch, seq).

Language-model pretraining and SFT are the same objective (`lm`): SFT differs only in its
data, whose `loss_mask` is 1 on the assistant tokens alone (lmx.data.sft).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.config import ConfigError
from lmx.train.loss import chunked_lm_loss, lm_loss

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, nnx.Rngs | None], tuple[jax.Array, dict[str, jax.Array]]]
TOKEN_NAMES = ("batch", "seq")


def count_tokens(batch: Batch) -> jax.Array:
  """The default normalizer: the number of targets that count (sum of `loss_mask`)."""
  return jnp.sum(batch["loss_mask"].astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss over a batch, summed; see the module docstring.

  name: for logs and errors.
  loss_fn: (model, batch, rngs) -> (loss_sum, aux sums).
  normalizer: batch -> the float32 count `loss_sum` is divided by (default: tokens).
  batch_names: logical axes per batch key, for keys that are not (batch, seq).
  eval_fn: (model, batch) -> (sum, count) for validation; default: the LM cross entropy.
  pipeline_head: True when the loss is the LM loss on the final hidden states, which the
    pipeline executor computes on its last stage (lmx.parallel.pipeline); other objectives
    do not run under mesh.pipeline > 1 yet.
  """

  name: str
  loss_fn: LossFn
  normalizer: Callable[[Batch], jax.Array] = count_tokens
  batch_names: Mapping[str, tuple[str | None, ...]] = dataclasses.field(default_factory=dict)
  eval_fn: Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array]] | None = None
  pipeline_head: bool = False

  def names_for(self, key: str, ndim: int) -> tuple[str | None, ...]:
    names = self.batch_names.get(key)
    if names is None:
      names = TOKEN_NAMES[:ndim] + (None,) * max(ndim - 2, 0)
    if len(names) != ndim:
      raise ValueError(f"objective {self.name!r}: batch key {key!r} has {ndim} dims but "
                       f"batch_names gives {names}")
    return tuple(names)


def lm_sums(model: nnx.Module, batch: Batch, z_loss: float = 0.0, chunk_tokens: int = 0,
            dropout_key: jax.Array | None = None) -> dict[str, jax.Array]:
  """Next-token cross-entropy sums of `model` on a token batch: ce_sum, z_sum, n_tokens.
  With chunk_tokens > 0 the head and softmax run a chunk of positions at a time."""
  kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"],
            dropout_key=dropout_key)
  if chunk_tokens:
    h = model.hidden(batch["inputs"], **kw)
    _, aux = chunked_lm_loss(h, model.head_weight(), batch["targets"], batch["loss_mask"],
                             z_loss, chunk_tokens)
  else:
    _, aux = lm_loss(model(batch["inputs"], **kw), batch["targets"], batch["loss_mask"],
                     z_loss)
  return {k: aux[k] for k in ("ce_sum", "z_sum", "n_tokens")}


def model_aux_sums(model: nnx.Module) -> dict[str, jax.Array]:
  """Auxiliary loss sums a model reports after its forward pass (e.g. an MoE router's
  balancing loss), already weighted; {} for a model that has none."""
  get = getattr(model, "aux_losses", None)
  return dict(get()) if get is not None else {}


def model_aux_metrics(model: nnx.Module) -> dict[str, jax.Array]:
  """Sums a model reports for logging only (e.g. an MoE's dropped-token fraction and expert
  load); `<name>_sum` keys like the losses', but never added to the loss."""
  get = getattr(model, "aux_metrics", None)
  return dict(get()) if get is not None else {}


def lm_objective(z_loss: float = 0.0, chunk_tokens: int = 0) -> Objective:
  """Next-token prediction on `loss_mask` (pretraining, and SFT with masked prompts)."""

  def loss_fn(model, batch, rngs=None):
    key = None if rngs is None else rngs.dropout()
    aux = lm_sums(model, batch, z_loss, chunk_tokens, key)
    aux.update(model_aux_sums(model))
    total = sum(v for k, v in aux.items() if k.endswith("_sum"))
    aux.update(model_aux_metrics(model))  # logged, not trained on
    return total, aux

  return Objective("lm", loss_fn, pipeline_head=True)


def lm_eval_sums(model: nnx.Module, batch: Batch, chunk_tokens: int = 0):
  """(ce_sum, n_tokens): the validation figures (cross entropy only, no z-loss)."""
  aux = lm_sums(model, batch, 0.0, chunk_tokens)
  return aux["ce_sum"], aux["n_tokens"]


OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register(name: str):
  """Decorator: `make(train_cfg, **kwargs) -> Objective` under `train.objective=name`."""

  def add(make):
    OBJECTIVES[name] = make
    return make

  return add


@register("lm")
def _make_lm(cfg, **_: Any) -> Objective:
  return lm_objective(cfg.z_loss, cfg.loss_chunk_tokens)


def make_objective(cfg, **kwargs: Any) -> Objective:
  """The objective named by `train.objective`, built from the train config (and extra
  pieces such as a teacher model, passed by keyword)."""
  name = getattr(cfg, "objective", "lm")
  if name not in OBJECTIVES:
    raise ConfigError(f"Invalid config: `train.objective` is {name!r}; it must be one of "
                      f"{', '.join(map(repr, sorted(OBJECTIVES)))}.")
  return OBJECTIVES[name](cfg, **kwargs)


@register("distill")
def _make_distill(cfg, *, exp=None, **_: Any) -> Objective:
  """The student is the model; the frozen teacher is its `teacher` submodule (attached by
  the loop, excluded from training by train.trainable), so it is sharded, donated and
  checkpoint-free like any frozen parameter."""
  from lmx.train.distill import distill_sums
  d = exp.distill

  def loss_fn(model, batch, rngs=None):
    del rngs
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    s_h = model.hidden(batch["inputs"], **kw)
    t_h = model.teacher.hidden(batch["inputs"], **kw)
    sums = distill_sums(s_h, model.head_weight(), t_h, model.teacher.head_weight(),
                        batch["targets"], batch["loss_mask"], temperature=d.temperature,
                        alpha=d.alpha, top_k=d.top_k,
                        chunk_tokens=cfg.loss_chunk_tokens or 512)
    total = sums.pop("loss_sum")
    return total, sums

  def eval_fn(model, batch):  # the student's own cross entropy
    return lm_eval_sums(model, batch, cfg.loss_chunk_tokens)

  return Objective("distill", loss_fn, eval_fn=eval_fn)
