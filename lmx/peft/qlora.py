"""QLoRA's frozen base weight: NF4 with double quantization (lmx.quant), dequantized at use.

`NF4Weight` replaces a projection's float `nnx.Param` (lmx.peft.apply_peft, method
'qlora'); `Projections.proj` calls it as `w(x, dtype, n_in)`. Its arrays are `QParam`s (an
`nnx.Param` subtype): they ride in the train state's parameters, frozen (train.trainable
selects only the LoRA modules), so they are sharded and donated like every parameter
rather than baked into the step as constants. A stacked weight (L, ...) is quantized layer
by layer (vmap), so the layer scan slices the NF4 arrays with the rest of the layer.
NOTE: the NF4 arrays are replicated over fsdp/tensor (their layout is not the weight's).
"""

from __future__ import annotations

import jax
from flax import nnx

from lmx.model.layers import project
from lmx.quant import QTensor, dequantize, quantize

_FIELDS = ("data", "scale", "scale_scale", "scale_mean")


class QParam(nnx.Param):
  """A frozen array of a quantized weight (codes or scales), not a float parameter."""


class NF4Weight(nnx.Module):

  def __init__(self, w: nnx.Variable, n_in: int, group_size: int = 64):
    value = w.get_value()
    names = tuple(w.get_metadata().get("out_sharding") or ())
    self.stacked = bool(names) and names[0] == "layers"
    self.names = names  # the float weight's logical axes, for `to_param`
    self.n_in = n_in
    q = lambda a: quantize(a, "nf4", group_size=group_size, reduce_axes=tuple(range(n_in)))
    qt = jax.vmap(q)(value) if self.stacked else q(value)
    lead = ("layers",) if self.stacked else ()
    for f in _FIELDS:
      a = getattr(qt, f)
      if a is not None:
        setattr(self, f, QParam(a, out_sharding=lead + (None,) * (a.ndim - len(lead)),
                                eager_sharding=False))
    # A tuple, not a dict: static attributes are part of the (hashed) graphdef.
    self.static = tuple(dict(kind=qt.kind, shape=qt.shape, reduce_axes=qt.reduce_axes,
                             group_size=qt.group_size, dtype=qt.dtype).items())

  def qtensor(self) -> QTensor:
    arrays = {f: getattr(self, f)[...] for f in _FIELDS if hasattr(self, f)}
    return QTensor(**arrays, **dict(self.static))

  def dequantized(self, dtype) -> jax.Array:
    """The float weight (with the leading layer axis when stacked)."""
    qt = self.qtensor()
    return jax.vmap(lambda t: dequantize(t, dtype))(qt) if self.stacked and \
        qt.data.ndim > len(qt.shape) - self.n_in + 1 else dequantize(qt, dtype)

  def nbytes(self) -> int:
    return sum(getattr(self, f)[...].nbytes for f in _FIELDS if hasattr(self, f))

  def __call__(self, x: jax.Array, dtype, n_in: int) -> jax.Array:
    return project(x, dequantize(self.qtensor(), dtype), n_in)

  def to_param(self) -> nnx.Param:
    """A float32 Param of the dequantized weight (for merging LoRA into it)."""
    value = self.dequantized("float32")
    names = self.names or (None,) * value.ndim
    return nnx.Param(value, out_sharding=names, eager_sharding=False)
