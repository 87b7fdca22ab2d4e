"""QLoRA's frozen base weight: NF4 with double-quantized absmax (Dettmers et al. 2023).

`NF4Weight` is `lmx.quant.apply.QuantizedWeight` with kind 'nf4': it replaces a LoRA
target's float `nnx.Param` (lmx.peft.apply_peft, method 'qlora') and is dequantized at
each use by `Projections.proj`. Its arrays are `QParam`s, frozen by train.trainable (only
the LoRA modules train), sharded and donated like any parameter.
"""

from __future__ import annotations

from flax import nnx

from lmx.quant.apply import QParam, QuantizedWeight

__all__ = ["NF4Weight", "QParam"]


class NF4Weight(QuantizedWeight):

  def __init__(self, w: nnx.Variable, n_in: int, group_size: int = 64):
    super().__init__(w, n_in, "nf4", group_size)
