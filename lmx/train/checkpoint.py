"""Orbax checkpoints of the TrainState plus the Grain iterator position.

Layout under `run_dir`:
    checkpoints/<step>/state   the TrainState pytree (params, Adam moments, step, RNG, loss
                               scale, bad-step counters), sharded arrays via OCDBT
    checkpoints/<step>/data    JSON: the data iterator state and the loop's own state
                               (iteration count, early-stopping record); with several
                               processes {"per_process": [one such dict per process]}
    best/<step>/params         params of the best validation loss so far (one kept)
    best/<step>/meta           JSON {step, val_loss}

`<step>` is the number of batches consumed. Orbax writes each step into a temporary folder
and renames it only once complete (and marks it with commit_success), so a process killed
mid-save leaves the previous checkpoints intact; the half-written folder is ignored and
cleaned up by the next manager.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lmx.config import CheckpointConfig
from lmx.parallel.distributed import allgather_json

STATE_DIR, BEST_DIR = "checkpoints", "best"
# Multi-process runs save the data item as {PER_PROCESS_KEY: [state of process 0, 1, ...]}.
PER_PROCESS_KEY = "per_process"


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying target shardings, for restoring straight into the layout.

  `shardings` comes from `state_shardings` (one NamedSharding per Variable); its leaves are
  in the same order as the abstract tree's leaves.
  """
  leaves, treedef = jax.tree.flatten(abstract)
  sh = jax.tree.leaves(shardings)
  if len(sh) != len(leaves):
    raise ValueError(f"{len(sh)} shardings for {len(leaves)} arrays")
  return treedef.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                            for a, s in zip(leaves, sh)])


def _manager(directory: pathlib.Path, keep: int, async_save: bool, items: tuple[str, ...]):
  # NOTE: a distinct barrier prefix per manager. With several processes, Orbax syncs them at
  # barriers named by fixed keys; the latest and best managers (and their async finalize
  # threads) would otherwise meet at the same key at once, which the coordination service
  # rejects ("Barrier ThreadSaveMultiHostValueHolder:set_value_start is already ongoing").
  mp = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=directory.name)
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=async_save,
                                      cleanup_tmp_directories=True,
                                      multiprocessing_options=mp)
  return ocp.CheckpointManager(directory.absolute(), options=opts, item_names=items)


class Checkpointer:
  """The run's latest-N checkpoints plus the best one by validation loss."""

  def __init__(self, run_dir: str | pathlib.Path, cfg: CheckpointConfig):
    self.cfg = cfg
    self.run_dir = pathlib.Path(run_dir)
    self.latest = _manager(self.run_dir / STATE_DIR, cfg.keep, cfg.async_save,
                           ("state", "data"))
    self.best = _manager(self.run_dir / BEST_DIR, 1, cfg.async_save, ("params", "meta"))

  def should_save(self, step: int) -> bool:
    return self.cfg.every > 0 and step % self.cfg.every == 0

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def path(self, step: int | None) -> str:
    return "none" if step is None else str(self.run_dir / STATE_DIR / str(step))

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Save (asynchronously if configured); a step already on disk is left alone."""
    if step in self.latest.all_steps():
      return
    if jax.process_count() > 1:
      # JsonSave writes on process 0 only, but every host has its own data position:
      # gather them all (every process must call this, as it must call save).
      data_state = {PER_PROCESS_KEY: allgather_json(data_state)}
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state)),
                     force=True)

  def save_best(self, step: int, params: nnx.State, val_loss: float) -> None:
    self.best.wait_until_finished()
    for old in self.best.all_steps():
      if old >= step:  # a rerun of the same steps: replace
        self.best.delete(old)
    self.best.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"step": step, "val_loss": float(val_loss)})), force=True)

  def restore_latest(self, abstract_state: Any, shardings: Any):
    """(state, data_state, step) of the newest complete checkpoint, or None if none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    target = abstract_with_shardings(abstract_state, shardings)
    out = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    data = out.data
    if PER_PROCESS_KEY in data or jax.process_count() > 1:
      per = data.get(PER_PROCESS_KEY, [data])
      if len(per) != jax.process_count():
        raise ValueError(f"checkpoint {self.path(step)} holds the data position of {len(per)} "
                         f"process(es); resuming needs the same process count, not "
                         f"{jax.process_count()}")
      data = per[jax.process_index()]
    return out.state, data, step

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def restore_params(exp, model: nnx.Module, directory: str | None = None) -> dict[str, Any]:
  """Load checkpoint params into `model` in place: the best checkpoint if one exists, else the
  latest. `directory` defaults to `exp.run_dir`. Returns {'source', 'step'}."""
  run_dir = pathlib.Path(directory or exp.run_dir)
  pattern = ""
  if getattr(exp, "peft", None) is not None and exp.peft.method:
    # A PEFT run saves only what trained: rebuild base + modules, then load those.
    from lmx.peft import apply_peft, new_token_count
    from lmx.train.init_from import base_params, grown_rows
    if exp.train.init_from:
      base, _ = base_params(exp.train.init_from, nnx.state(model, nnx.Param), grown_rows(exp))
      nnx.update(model, base)
    apply_peft(model, exp.peft, nnx.Rngs(params=exp.seed), new_token_count(exp))
    pattern = exp.train.trainable
  params = nnx.state(model, nnx.Param)
  if pattern:
    from lmx.train.trainable import split_trainable
    params = split_trainable(params, pattern)[0]
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        params)
  opts = ocp.CheckpointManagerOptions(create=False)
  best_dir, state_dir = run_dir / BEST_DIR, run_dir / STATE_DIR
  if best_dir.exists():
    with ocp.CheckpointManager(best_dir.absolute(), options=opts,
                               item_names=("params", "meta")) as m:
      step = m.latest_step()
      if step is not None:
        out = m.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        nnx.update(model, out.params)
        return {"source": str(best_dir / str(step)), "step": step}
  if state_dir.exists():
    with ocp.CheckpointManager(state_dir.absolute(), options=opts,
                               item_names=("state", "data")) as m:
      step = m.latest_step()
      if step is not None:
        # Restore only the params subtree of the saved TrainState.
        item = {"params": target}
        out = m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
        nnx.update(model, _as_state(out.state["params"], params))
        return {"source": str(state_dir / str(step)), "step": step}
  raise FileNotFoundError(f"no checkpoint found under {run_dir} (looked in {BEST_DIR}/ and "
                          f"{STATE_DIR}/); train first or pass the run directory")


def _as_state(restored: Any, like: nnx.State) -> nnx.State:
  leaves = jax.tree.leaves(restored)
  treedef = jax.tree.structure(like)
  return treedef.unflatten([np.asarray(x) if not isinstance(x, jax.Array) else x
                            for x in leaves])
