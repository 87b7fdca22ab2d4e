"""Start a run from another run's weights (`train.init_from`): fine-tuning.

The base's parameters are read from its best checkpoint (else its latest), checked tensor
by tensor against the new model's base tree, and given to the sharded init, which loads
them before PEFT modules are attached (lmx.peft.apply_peft) -- so QLoRA quantizes the
*loaded* weights. A larger vocabulary (SFT's chat role tokens) grows the embedding: new
row i starts at the mean of the base embeddings of `new_rows[i]` (the ids that spell the
new token in the base tokenizer), so distinct new tokens start distinct.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lmx.train.checkpoint import BEST_DIR, STATE_DIR
from lmx.train.trainable import path_str


def resolve(source: str) -> str:
  """A run directory for `train.init_from` / `distill.teacher_run`: a directory as given,
  or an experiment file (`experiments/default.py`), meaning that experiment's run_dir --
  trained first, in this process, if it has no checkpoint yet."""
  if not source.endswith(".py") and ".py:" not in source:
    return source
  from lmx.experiment import load_experiment
  exp = load_experiment([f"--config={source}"])[0]
  run = pathlib.Path(exp.run_dir)
  if not any((run / d).exists() and any((run / d).iterdir()) for d in (BEST_DIR, STATE_DIR)):
    import sys
    from lmx.train.loop import train
    print(f"lmx: {run} has no checkpoint; training {source} first", file=sys.stderr)
    train(exp)
  return str(run)


def read_params(directory: str | pathlib.Path) -> tuple[dict, str]:
  """The raw parameter tree (nested dicts of arrays) of a run directory (or an experiment
  file, see `resolve`), and its source."""
  run = pathlib.Path(resolve(str(directory)))
  opts = ocp.CheckpointManagerOptions(create=False)
  for sub, items, key in ((BEST_DIR, ("params", "meta"), "params"),
                          (STATE_DIR, ("state", "data"), "state")):
    if not (run / sub).exists():
      continue
    with ocp.CheckpointManager((run / sub).absolute(), options=opts, item_names=items) as m:
      step = m.latest_step()
      if step is None:
        continue
      out = m.restore(step, args=ocp.args.Composite(**{key: ocp.args.StandardRestore()}))
      tree = out[key] if key == "params" else out[key]["params"]
      return tree, str(run / sub / str(step))
  raise FileNotFoundError(f"train.init_from={str(directory)!r}: no checkpoint under it "
                          f"({BEST_DIR}/ or {STATE_DIR}/); train the base model first")


def _lookup(tree, path: str):
  node = tree
  for k in path.split("."):
    if isinstance(node, dict) and k in node:
      node = node[k]
    elif isinstance(node, dict) and "value" in node and k == "value":
      node = node["value"]
    else:
      return None
  if isinstance(node, dict) and set(node) == {"value"}:
    node = node["value"]
  return node


def base_params(directory: str | pathlib.Path, like: nnx.State,
                new_rows: Sequence[Sequence[int]] = ()) -> tuple[nnx.State, str]:
  """`like` (the new model's base Param state, abstract) filled from `directory`.

  Every tensor must exist with the same shape, except that `embed` (V, D) and `lm_head`
  (D, V) may be smaller in V: the missing rows are grown (see the module docstring).
  Raises ValueError naming the first tensor that is missing or has another shape.
  """
  tree, source = read_params(directory)
  flat = jax.tree_util.tree_flatten_with_path(
      like, is_leaf=lambda x: isinstance(x, nnx.Variable))
  values = []
  for path, var in flat[0]:
    name = path_str(path)
    want = var.get_value() if isinstance(var, nnx.Variable) else var
    got = _lookup(tree, name)
    if got is None:
      raise ValueError(f"train.init_from: the base checkpoint {source} has no tensor {name!r}")
    got = np.asarray(got)
    if got.shape != tuple(want.shape):
      grow = name in ("embed", "lm_head")
      axis = 0 if name == "embed" else 1
      ok = grow and got.ndim == 2 and all(
          g == w for i, (g, w) in enumerate(zip(got.shape, want.shape)) if i != axis)
      if not ok or got.shape[axis] > want.shape[axis]:
        raise ValueError(f"train.init_from: tensor {name!r} is {got.shape} in {source} but "
                         f"{tuple(want.shape)} in this model")
      got = _grow(got, want.shape[axis], axis, new_rows)
    values.append(var.replace(got.astype(want.dtype)) if isinstance(var, nnx.Variable) else got)
  return jax.tree_util.tree_unflatten(flat[1], values), source


def _grow(w: np.ndarray, size: int, axis: int, new_rows: Sequence[Sequence[int]]) -> np.ndarray:
  rows = np.moveaxis(w, axis, 0)
  extra = []
  for i in range(size - rows.shape[0]):
    ids = [j for j in (new_rows[i] if i < len(new_rows) else ()) if j < rows.shape[0]]
    extra.append(rows[ids].mean(0) if ids else rows.mean(0))
  return np.moveaxis(np.concatenate([rows, np.stack(extra)]), 0, axis)


def grown_rows(exp) -> list[list[int]]:
  """The base-tokenizer spellings of the ids a run adds to the vocabulary (SFT's chat role
  tokens, in id order), for `base_params(new_rows=...)`; [] for a text run. Train,
  generate and evaluate compute the same rows, so a run whose embedding is frozen (PEFT)
  rebuilds the same grown embedding from the base checkpoint."""
  if exp.data.format != "sft":
    return []
  from lmx.data.sft import ROLE_TOKENS
  from lmx.data.tokenizer import load_or_train_tokenizer
  tok = load_or_train_tokenizer(exp, base=True)
  return [tok.encode(t) for t in ROLE_TOKENS]
