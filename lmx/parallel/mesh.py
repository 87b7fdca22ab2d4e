"""Build the device mesh from config, place parameters and constrain activations."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmx.config import MESH_AXES, ConfigError, MeshConfig
from lmx.parallel.rules import DEFAULT_RULES, logical_to_spec, parse_rules


def mesh_axis_sizes(cfg: MeshConfig, n_devices: int) -> tuple[list[int], list[int]]:
  """(ici, dcn) sizes per axis in MESH_AXES order, the -1 axis filled; raises ConfigError
  with one sentence when they cannot multiply to `n_devices`."""
  ici = [getattr(cfg, a) for a in MESH_AXES]
  dcn = [getattr(cfg, f"dcn_{a}") for a in MESH_AXES]
  known = math.prod(s for s in ici if s != -1) * math.prod(dcn)
  if -1 in ici:
    if n_devices % known:
      raise ConfigError(f"Invalid config: `mesh` fixes {known} devices per replica "
                        f"({_describe(ici, dcn)}), which does not divide the {n_devices} "
                        "available devices.")
    ici[ici.index(-1)] = n_devices // known
  if math.prod(ici) * math.prod(dcn) != n_devices:
    raise ConfigError(f"Invalid config: `mesh` sizes {_describe(ici, dcn)} multiply to "
                      f"{math.prod(ici) * math.prod(dcn)}, but {n_devices} devices are "
                      "available; make the product equal the device count (or set one axis "
                      "to -1).")
  return ici, dcn


def _describe(ici, dcn) -> str:
  out = {a: s for a, s in zip(MESH_AXES, ici)}
  out.update({f"dcn_{a}": s for a, s in zip(MESH_AXES, dcn) if s != 1})
  return str(out)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor, pipeline, expert); one device is a mesh of size 1."""
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(device_grid(cfg, devices), MESH_AXES)


def device_grid(cfg: MeshConfig, devices: Sequence) -> np.ndarray:
  """The devices arranged as the mesh: an array of shape ici * dcn per axis.

  With dcn factors the devices are grouped by TPU slice (or, where devices have no slice,
  by process) so that only the dcn part of an axis crosses slices.
  """
  ici, dcn = mesh_axis_sizes(cfg, len(devices))
  if math.prod(dcn) > 1:
    by_process = not hasattr(devices[0], "slice_index")
    granules = len({getattr(d, "process_index" if by_process else "slice_index")
                    for d in devices})
    if granules != math.prod(dcn):
      unit = "processes" if by_process else "TPU slices"
      raise ConfigError(f"Invalid config: `mesh.dcn_*` factors multiply to {math.prod(dcn)} "
                        f"slices, but the {len(devices)} devices belong to {granules} {unit}; "
                        "set the dcn factors to multiply to that number.")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                process_is_granule=by_process)
  if devices[0].platform == "tpu":
    return mesh_utils.create_device_mesh(ici, devices)  # follows the physical torus
  return np.asarray(devices).reshape(ici)


def mesh_sizes(mesh) -> dict[str, int]:
  """Axis name -> size for a Mesh or an AbstractMesh (shape-only planning)."""
  return dict(mesh.shape)


def make_rules(cfg: MeshConfig):
  """The logical-axis rules table of this mesh config (`mesh.rules`)."""
  return parse_rules(cfg.rules)


def active_rules(mesh=None):
  """The rules of the innermost `use_mesh` (for `mesh`, if given), else the default table."""
  if _ACTIVE and (mesh is None or _ACTIVE[-1][0] is mesh):
    return _ACTIVE[-1][1]
  return DEFAULT_RULES


def spec_for(names, mesh, rules=None) -> PartitionSpec:
  return logical_to_spec(names, rules or active_rules(mesh), mesh_sizes(mesh))


def named_sharding(names, mesh, rules=None) -> NamedSharding:
  return NamedSharding(mesh, spec_for(names, mesh, rules))


def logical_names(x) -> tuple:
  """The logical axis names of a leaf: a Variable's `out_sharding` metadata, else None
  per dimension (replicated)."""
  if isinstance(x, nnx.Variable):
    names = x.get_metadata().get("out_sharding")
    ndim = np.ndim(x.get_value()) if hasattr(x, "get_value") else np.ndim(x.value)
  else:
    names, ndim = None, np.ndim(x)
  return tuple(names) if names is not None else (None,) * ndim


def state_shardings(state: nnx.State, mesh, rules=None):
  """NamedShardings for an nnx.State (or abstract state) from each Variable's logical names.

  Variables carry their names as `out_sharding` metadata (see lmx.model.layers.param).
  Anything unannotated is replicated. `mesh` may be an AbstractMesh (planning).
  """
  rules = rules or active_rules(mesh)
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(logical_names(x), mesh, rules)),
                      state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_divisible(state, mesh, rules=None) -> None:
  """Raise ConfigError naming the first parameter whose sharded dimension does not divide
  by its mesh axes (e.g. MQA's one KV head over tensor=2) -- before anything compiles."""
  rules = rules or active_rules(mesh)
  sizes = mesh_sizes(mesh)
  flat = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, x in flat:
    names = logical_names(x)
    shape = np.shape(x.get_value() if isinstance(x, nnx.Variable) else x)
    spec = spec_for(names, mesh, rules)
    for dim, (size, axes, name) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape),
                                                  names)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      split = math.prod(sizes[a] for a in axes)
      if split > 1 and size % split:
        where = jax.tree_util.keystr(path)
        raise ConfigError(
            f"Invalid config: parameter {where} has dimension {dim} ({name!r}) of size {size}, "
            f"which does not divide over mesh axes {'x'.join(axes)} = {split}; change the "
            f"mesh (e.g. mesh.{axes[0]}) or the model shape, or map {name!r} elsewhere with "
            "mesh.rules.")


# The mesh that `constrain` uses; set by the trainer with `use_mesh`. None = no constraint
# (single device, eager tests).
_ACTIVE: list[tuple[Mesh, tuple]] = []


class use_mesh:
  """Context: activations constrained by `constrain` are laid out on this mesh (None: no
  constraints, as inside a shard_map body)."""

  def __init__(self, mesh: Mesh, rules=DEFAULT_RULES):
    self.item = (mesh, rules)

  def __enter__(self):
    _ACTIVE.append(self.item)
    return self.item[0]

  def __exit__(self, *exc):
    _ACTIVE.pop()


def active_mesh():
  """(mesh, rules) of the innermost `use_mesh`, or (None, the default rules)."""
  return _ACTIVE[-1] if _ACTIVE else (None, DEFAULT_RULES)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrain an activation's layout by logical names (a no-op outside `use_mesh`)."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  if mesh is None or mesh.size == 1:  # None: inside a manual (shard_map) region
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(names, mesh, rules))
