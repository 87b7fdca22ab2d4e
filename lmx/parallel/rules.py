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
