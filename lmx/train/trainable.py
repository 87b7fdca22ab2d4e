"""Which parameters train: a filter on parameter paths.

`train.trainable` is a regular expression searched in each parameter's dotted path
(`layers.block.attn.wq`, `layers.block.attn.wq_lora.a`, `embed`, ...); '' trains
everything. PEFT methods set it for you (lmx.peft). The train state keeps the whole
parameter tree, but only the matching part has optimizer state, gradients and updates:

    trainable, frozen = split_trainable(params, pattern)

Frozen parameters are a constant of the step's gradient (no backward work for their
weight gradients; XLA drops it) and are returned untouched (donated in, aliased out).
"""

from __future__ import annotations

import re

import jax
from flax import nnx

from lmx.config import ConfigError


def path_str(path) -> str:
  """A state path (tuple of keys) as 'a.b.c'."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_paths(params: nnx.State) -> list[str]:
  flat = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return [path_str(p) for p, _ in flat]


def trainable_predicate(pattern: str):
  """An nnx filter `(path, value) -> bool` for `pattern` ('' = everything)."""
  rx = re.compile(pattern)

  def pred(path, value) -> bool:
    del value
    return bool(rx.search(path_str(path)))

  return pred


def check_pattern(params: nnx.State, pattern: str, field: str = "train.trainable") -> None:
  """One sentence, before compiling, when `pattern` is invalid or matches no parameter."""
  if not pattern:
    return
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"Invalid config: `{field}` is {pattern!r}, not a valid regular "
                      f"expression ({e}).") from None
  paths = param_paths(params)
  if not any(rx.search(p) for p in paths):
    raise ConfigError(f"Invalid config: `{field}` is {pattern!r}, which matches no parameter; "
                      f"parameter paths look like {', '.join(paths[:6])}, ...")


def split_trainable(params: nnx.State, pattern: str) -> tuple[nnx.State, nnx.State | None]:
  """(trainable, frozen); ('', None) means everything trains and nothing is split."""
  if not pattern:
    return params, None
  return nnx.split_state(params, trainable_predicate(pattern), ...)


def join(trainable: nnx.State, frozen: nnx.State | None) -> nnx.State:
  return trainable if frozen is None else nnx.merge_state(trainable, frozen)


def count(params: nnx.State, pattern: str) -> tuple[int, int]:
  """(trainable scalars, all scalars)."""
  from lmx.model.layers import count_model_params
  total = count_model_params(params)
  train, _ = split_trainable(params, pattern)
  return count_model_params(train), total


def saved_view(state, pattern: str):
  """What a checkpoint holds of a TrainState (or its abstract / shardings): everything, or
  with `pattern` set only the trainable parameters -- a PEFT run saves its adapters alone
  and rebuilds the frozen base from `train.init_from`."""
  if not pattern:
    return state
  return state.replace(params=split_trainable(state.params, pattern)[0])
