"""The one table that maps logical axis names to mesh axes.

Models annotate parameters and activations with *logical* names only ('embed', 'mlp',
'heads', ...). This table decides where each name lives on the mesh, so changing the
parallelism is a config change, never a model edit.

Parameter names: vocab, embed, mlp, heads, kv_heads, head_dim, expert, layers.
Activation names: batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab.

A mesh axis may appear at most once in one PartitionSpec; `logical_to_spec` drops a mesh
axis already used by an earlier dimension. That is how one table serves parameters and
activations alike: in an activation ('batch', 'seq', 'embed') the batch dimension takes
'fsdp' first, so 'embed' is replicated; in the parameter ('vocab', 'embed') 'embed' gets it.
"""

from __future__ import annotations

from typing import Sequence

from jax.sharding import PartitionSpec

# logical name -> mesh axes, in priority order.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", ()),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("vocab", ("tensor",)),
    ("expert", ("expert",)),
    ("layers", ("pipeline",)),
)


# 'sequence_parallel': activations' sequence dimension split over `tensor` (between the
# column- and row-parallel matmuls XLA all-gathers it); parameters as in the default.
RULE_SETS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "default": DEFAULT_RULES,
    "sequence_parallel": tuple((n, ("tensor",) if n == "seq" else a) for n, a in DEFAULT_RULES),
}
MESH_AXIS_NAMES = ("data", "fsdp", "tensor", "pipeline", "expert")


def parse_rules(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """A rules table from config text: '' or a set name from RULE_SETS, then ';'-separated
  overrides 'name=axis+axis' ('name=' replicates). Raises ValueError naming the bad part."""
  parts = [p.strip() for p in (text or "").split(";") if p.strip()]
  table = dict(DEFAULT_RULES)
  if parts and "=" not in parts[0]:
    name = parts.pop(0)
    if name not in RULE_SETS:
      raise ValueError(f"rule set {name!r} is unknown; known sets are {sorted(RULE_SETS)}")
    table = dict(RULE_SETS[name])
  for part in parts:
    name, sep, axes = part.partition("=")
    name = name.strip()
    if not sep or name not in table:
      raise ValueError(f"override {part!r} must be NAME=AXIS+AXIS with NAME one of "
                       f"{sorted(table)}")
    mesh_axes = tuple(a.strip() for a in axes.split("+") if a.strip())
    bad = [a for a in mesh_axes if a not in MESH_AXIS_NAMES]
    if bad:
      raise ValueError(f"override {part!r} names mesh axis {bad[0]!r}; mesh axes are "
                       f"{', '.join(MESH_AXIS_NAMES)}")
    table[name] = mesh_axes
  return tuple(table.items())


def logical_to_spec(names: Sequence[str | None] | None,
                    rules=DEFAULT_RULES,
                    mesh_axis_sizes: dict[str, int] | None = None) -> PartitionSpec:
  """Turn logical axis names into a PartitionSpec.

  Mesh axes of size 1 (when `mesh_axis_sizes` is given) are left out, and a mesh axis is
  used at most once per spec.
  """
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    axes = []
    for ax in table[name]:
      if ax in used:
        continue
      if mesh_axis_sizes is not None and mesh_axis_sizes.get(ax, 1) == 1:
        continue
      axes.append(ax)
      used.add(ax)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*out)
