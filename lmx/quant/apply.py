"""Weight-only quantization of a trained model for inference (`model.quant`).

`quantize_model` replaces every projection weight of the layer stack (attention wq/wk/wv/wo,
MLP w_gate/w_up/w_down) by a `QuantizedWeight`: int8 per output channel, or int4 / nf4 per
group of `model.quant_group` weights along the contraction axis (lmx.quant.weights). The
weight is dequantized at each use, into the compute dtype, and goes through the same
`project` matmul as a float weight, so only the stored bytes change (and the numbers, by
the rounding). The embedding / LM head and norms stay float: at small vocabularies they are
a large share of the model, but the head is where low precision hurts most.

`lmx generate` and `lmx evaluate` call it after restoring the weights when `model.quant` is
set; training ignores `model.quant` (quantize a trained model, or train adapters on a frozen
NF4 base with peft.method='qlora').

`decode_nll` scores a sequence teacher-forced through the KV cache (`Transformer.decode`),
chunk by chunk: the measure of what `model.kv_cache_dtype='int8'` costs.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.model.layers import project
from lmx.quant.weights import KINDS, QTensor, dequantize, quantize

_FIELDS = ("data", "scale", "scale_scale", "scale_mean")


class QParam(nnx.Param):
  """A frozen array of a quantized weight (codes or scales), not a float parameter."""


class QuantizedWeight(nnx.Module):
  """A projection weight (in..., out...) stored quantized; called by `Projections.proj` as
  `w(x, dtype, n_in)` like a float weight.

  A stacked weight (L, in..., out...) (the layer stack's) is quantized layer by layer with
  vmap, so every array keeps the leading L axis and the layer scan slices it with the rest
  of the layer. Arrays are frozen `QParam`s, so they are saved, sharded, donated and split
  like parameters (never baked into a step as constants); the layout is a static tuple in
  the graphdef. QLoRA's frozen base is this with kind 'nf4' (lmx.peft.qlora).
  NOTE: the quantized arrays are replicated over fsdp/tensor (their layout is not the
  weight's); only the 'layers' axis keeps its name.
  """

  def __init__(self, w: nnx.Variable, n_in: int, kind: str, group_size: int = 64,
               double_quant: bool = True):
    value = w.get_value()
    names = tuple(w.get_metadata().get("out_sharding") or ())
    self.stacked = bool(names) and names[0] == "layers"
    self.names = names  # the float weight's logical axes, for `to_param`
    self.n_in = n_in
    axes = tuple(range(n_in))  # the contraction axes of the per-layer weight
    q = lambda a: quantize(a, kind, group_size=group_size, double_quant=double_quant,
                           reduce_axes=axes)
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

  def dequantized(self, dtype="float32") -> jax.Array:
    """The float weight, with the leading L axis when stacked (and not sliced by a scan)."""
    qt = self.qtensor()
    sliced = qt.scale.ndim == _per_layer_scale_ndim(qt)
    return dequantize(qt, dtype) if sliced else jax.vmap(lambda t: dequantize(t, dtype))(qt)

  def nbytes(self) -> int:
    return sum(getattr(self, f)[...].nbytes for f in _FIELDS if hasattr(self, f))

  def to_param(self) -> nnx.Param:
    """A float32 Param of the dequantized weight, with the weight's logical axis names
    (for merging LoRA into it, lmx.peft.merge_lora)."""
    value = self.dequantized("float32")
    return nnx.Param(value, out_sharding=self.names or (None,) * value.ndim,
                     eager_sharding=False)

  def __call__(self, x: jax.Array, dtype, n_in: int) -> jax.Array:
    # Inside the layer scan the arrays are one layer's slice: dequantize that layer only.
    return project(x, dequantize(self.qtensor(), dtype), n_in)


def _per_layer_scale_ndim(qt: QTensor) -> int:
  """ndim of one layer's `scale`: the output dims, plus the group axis for int4/nf4."""
  n_out = len(qt.shape) - len(qt.reduce_axes)
  return n_out if qt.kind == "int8" else n_out + 1


def quantize_model(model, kind: str, group_size: int = 64) -> dict[str, int]:
  """Replace the layer stack's float projection weights of `model` (a Transformer) by
  `QuantizedWeight`s in place; returns {'bytes_before', 'bytes_after'} of those weights.

  Weights that are already quantized (e.g. QLoRA's NF4 base) are left alone.
  """
  if kind not in KINDS:
    raise ValueError(f"quantize_model: kind {kind!r} is unknown; choose one of {KINDS}.")
  block = model.layers.block
  before = after = 0
  for mod in (block.attn, block.mlp):
    for name in mod.projection_names():
      w = getattr(mod, name, None)
      if not isinstance(w, nnx.Variable):
        continue
      qw = QuantizedWeight(w, 2 if name == "wo" else 1, kind, group_size)
      before += w.get_value().nbytes
      after += qw.nbytes()
      setattr(mod, name, qw)
  return {"bytes_before": int(before), "bytes_after": int(after)}


def report_bytes(prog: str, kind: str, sizes: dict[str, int]) -> None:
  """One stderr line: the projection weights' bytes before and after quantization."""
  b, a = sizes["bytes_before"], sizes["bytes_after"]
  print(f"{prog}: {kind} projection weights {b / 2**20:.2f} MiB -> {a / 2**20:.2f} MiB "
        f"({a / b:.3f}x, {(b - a) / 2**20:.2f} MiB saved)", file=sys.stderr)


def decode_nll(model, inputs, targets, loss_mask=None, chunk: int = 64) -> tuple[float, float]:
  """Teacher-forced negative log-likelihood through the KV cache: (sum in nats, tokens).

  inputs/targets (B, T) int (targets[t] follows inputs[t]); loss_mask (B, T), default all
  ones. Feeds `chunk` tokens at a time into `model.decode` (T must be a multiple of chunk),
  positions 0..T-1, so every chunk after the first reads its prefix from the cache.
  NOTE: packed rows are scored as one sequence (the cache has no segment mask).
  """
  inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
  b, t = inputs.shape
  if t % chunk:
    raise ValueError(f"decode_nll: sequence length {t} is not a multiple of chunk={chunk}.")
  mask = np.ones((b, t), np.float32) if loss_mask is None else np.asarray(loss_mask, np.float32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, cache, tok, pos, tgt, m):
    logits, cache = nnx.merge(graphdef, state).decode(tok, pos, cache)  # (B, c, V) float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]  # (B, c)
    return cache, jnp.sum(nll * m)

  cache = model.init_cache(b, t)
  total = 0.0
  for lo in range(0, t, chunk):
    pos = np.broadcast_to(np.arange(lo, lo + chunk, dtype=np.int32), (b, chunk))
    cache, s = step(state, cache, inputs[:, lo:lo + chunk], pos, targets[:, lo:lo + chunk],
                    mask[:, lo:lo + chunk])
    total += float(s)
  return total, float(mask.sum())
