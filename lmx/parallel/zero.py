"""ZeRO stages over the `data` mesh axis, as shardings of the train state.

Data parallelism keeps a full copy of parameters, gradients and Adam moments on every
`data` replica. ZeRO (Rajbhandari et al. 2020) removes the copies stage by stage:

    stage 0  nothing sharded over `data`
    stage 1  Adam moments sharded over `data`: each replica updates its slice of the
             parameters, then the updated parameters are all-gathered
    stage 2  + gradients reduce-scattered (each replica keeps only its slice's sum)
    stage 3  + parameters sharded too (= FSDP over `data`; gathered layer by layer at use)

ZeRO-Offload (train.optimizer_memory='pinned_host') keeps the optimizer state in host
memory between steps, where the backend has memory kinds (TPU, GPU). On the CPU backend
host and device memory are the same RAM: the path runs (and is tested) but saves nothing.

Nothing here moves data by hand: each stage is a layout (a PartitionSpec per leaf), and
XLA's SPMD partitioner inserts the reduce-scatter / all-gather the layouts imply. The
`fsdp` mesh axis is ZeRO-3 by construction (the rules table shards parameters on it).

A leaf gains the `data` axis on its largest dimension that still divides evenly; leaves
with no such dimension (scalars, tiny vectors) stay replicated, and `lmx info` counts them
as such.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lmx.parallel.mesh import active_rules, mesh_sizes, state_shardings

ZERO_AXIS = "data"


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def add_mesh_axis(spec: PartitionSpec, shape, axis: str, sizes: dict[str, int]) -> PartitionSpec:
  """`spec` with mesh `axis` added to the largest dimension whose local size it divides;
  unchanged if the axis is already used, has size 1, or divides no dimension."""
  n = sizes.get(axis, 1)
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if n == 1 or any(axis in _axes(e) for e in entries):
    return spec
  best = None
  for dim, (size, e) in enumerate(zip(shape, entries)):
    local = size
    for a in _axes(e):
      local //= sizes[a]
    if local % n == 0 and (best is None or local > best[1]):
      best = (dim, local)
  if best is None:
    return spec
  dim = best[0]
  entries[dim] = _axes(entries[dim]) + (axis,)
  entries[dim] = entries[dim][0] if len(entries[dim]) == 1 else entries[dim]
  return PartitionSpec(*entries)


def _widen(shardings, values, mesh):
  sizes = mesh_sizes(mesh)
  return jax.tree.map(
      lambda sh, v: NamedSharding(mesh, add_mesh_axis(sh.spec, v.shape, ZERO_AXIS, sizes)),
      shardings, values)


def _values(tree):
  """The arrays (or ShapeDtypeStructs) of a tree whose Variables hold them."""
  return jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def train_state_shardings(state, mesh, stage: int, rules=None, optimizer_memory: str = ""):
  """Shardings of a TrainState (or its abstract shape) for ZeRO `stage` on `mesh`.

  Parameters follow their logical names (rules table), plus `data` at stage 3; the
  optimizer state (Adam moments mirror the parameter tree) adds `data` from stage 1;
  scalars (step, counters, loss scale) are replicated. optimizer_memory='pinned_host'
  keeps the optimizer state in host memory (ZeRO-Offload; see `to_device`).
  """
  rules = rules or active_rules(mesh)
  sh = state_shardings(state, mesh, rules)
  if stage and mesh_sizes(mesh).get(ZERO_AXIS, 1) > 1:
    vals = _values(state)
    sh = sh.replace(opt_state=_widen(sh.opt_state, vals.opt_state, mesh))
    if stage >= 3:
      sh = sh.replace(params=_widen(sh.params, vals.params, mesh))
  if optimizer_memory:
    sh = sh.replace(opt_state=jax.tree.map(lambda x: x.with_memory_kind(optimizer_memory),
                                           sh.opt_state))
  return sh


def to_device(tree, optimizer_memory: str):
  """Inside the jitted step: bring an offloaded optimizer state into device memory for the
  update (the step's out_shardings send the new state back to the host)."""
  if not optimizer_memory:
    return tree
  return jax.device_put(tree, jax.memory.Space.Device)


def constrain_grads(grads, stage: int):
  """Lay out the gradients for ZeRO `stage` inside a jitted step under `use_mesh`:
  stages 0-1 all-reduce them to the parameters' layout, 2-3 reduce-scatter them over `data`
  (each replica then holds only the slice its optimizer shard updates)."""
  from lmx.parallel.mesh import _ACTIVE  # the trainer's mesh and rules
  if not _ACTIVE or _ACTIVE[-1][0] is None or _ACTIVE[-1][0].size == 1:
    return grads
  mesh, rules = _ACTIVE[-1]
  sh = state_shardings(grads, mesh, rules)
  if stage >= 2 and mesh_sizes(mesh).get(ZERO_AXIS, 1) > 1:
    sh = _widen(sh, _values(grads), mesh)
  return jax.lax.with_sharding_constraint(grads, sh)
