"""Build the device mesh from config, place parameters and constrain activations."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmx.config import MESH_AXES, MeshConfig
from lmx.parallel.rules import DEFAULT_RULES, logical_to_spec


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor, pipeline, expert); one device is a mesh of size 1."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [getattr(cfg, a) for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"Invalid config: `mesh` fixes {known} devices per replica, which does "
                       f"not divide the {len(devices)} available devices.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"Invalid config: `mesh` sizes {dict(zip(MESH_AXES, sizes))} multiply to "
                     f"{math.prod(sizes)}, but {len(devices)} devices are available.")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.devices.shape))


def spec_for(names, mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
  return logical_to_spec(names, rules, mesh_sizes(mesh))


def named_sharding(names, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, spec_for(names, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx.State (or abstract state) from each Variable's logical names.

  Variables carry their names as `out_sharding` metadata (see lmx.model.layers.param).
  Anything unannotated is replicated.
  """

  def one(x):
    names = None
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding")
      ndim = np.ndim(x.get_value()) if hasattr(x, "get_value") else np.ndim(x.value)
    else:
      ndim = np.ndim(x)
    if names is None:
      names = (None,) * ndim
    return NamedSharding(mesh, spec_for(names, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# The mesh that `constrain` uses; set by the trainer with `use_mesh`. None = no constraint
# (single device, eager tests).
_ACTIVE: list[tuple[Mesh, tuple]] = []


class use_mesh:
  """Context: activations constrained by `constrain` are laid out on this mesh."""

  def __init__(self, mesh: Mesh, rules=DEFAULT_RULES):
    self.item = (mesh, rules)

  def __enter__(self):
    _ACTIVE.append(self.item)
    return self.item[0]

  def __exit__(self, *exc):
    _ACTIVE.pop()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrain an activation's layout by logical names (a no-op outside `use_mesh`)."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  if mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(names, mesh, rules))
