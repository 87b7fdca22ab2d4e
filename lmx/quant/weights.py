"""Weight-only quantization: int8 per-channel, int4 group-wise and NF4 (QLoRA), dequantized at use.

A weight is stored (in..., out...) as everywhere in lmx; `reduce_axes` names its contraction
(input) axes. Internally a weight is viewed as a (K, M) matrix, K = prod(in dims) (the
flattened contraction axis, row-major as in `lmx.model.layers.project`), M = prod(out dims):

  int8  symmetric, one scale per output channel = max|w| over K / 127, codes in [-127, 127].
  int4  symmetric, one scale per group of `group_size` consecutive rows of K and output
        channel = max|w| / 7, codes in [-7, 7] (-8 unused), stored as the nibble code + 8.
  nf4   per group (same blocks as int4) the absmax a, and the index of the nearest of the 16
        NormalFloat values to w / a (Dettmers et al. 2023, "QLoRA"). With `double_quant` the
        fp32 absmaxes are themselves quantized: minus their global mean, then symmetric int8
        with one fp32 scale per 256 consecutive absmaxes -- 8 + 32/256 bits per group instead
        of 32, i.e. ~4.127 bits per parameter at group 64 instead of 4.5.

4-bit codes are packed in pairs along K: byte i of a column holds row 2i in its low nibble and
row 2i+1 in its high nibble.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

KINDS = ("int8", "int4", "nf4")
DQ_BLOCK = 256  # absmax constants per double-quantization block (QLoRA's choice)

# The 16 NormalFloat4 values as published with QLoRA (bitsandbytes' NF4 table). The test
# rebuilds them from normal quantiles (`nf4_code_from_quantiles`).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
# Decision boundaries of nearest-value rounding: the midpoints between adjacent values.
_NF4_MIDPOINTS = ((NF4_CODE[1:] + NF4_CODE[:-1]) / 2).astype(np.float32)


def nf4_code_from_quantiles(offset: float = 1 - 0.5 * (1 / 32 + 1 / 30)) -> np.ndarray:
  """The NF4 values built as the QLoRA paper describes (needs scipy).

  Equal-probability quantiles of N(0, 1), made asymmetric so that 0 is exact: 8 positive
  values at probabilities evenly spaced from `offset` down to 0.5 (9 points, 0.5 dropped),
  7 negative ones likewise (8 points), plus 0; then scaled so the extremes are +-1. The offset
  0.9677 = 1 - (1/32 + 1/30) / 2 averages the outermost midpoints of a 16- and a 15-quantile
  grid, so the end quantiles stay finite.
  """
  from scipy.special import ndtri  # = scipy.stats.norm.ppf, without scipy.stats' 1 s import
  pos = ndtri(np.linspace(offset, 0.5, 9)[:-1])
  neg = -ndtri(np.linspace(offset, 0.5, 8)[:-1])
  values = np.sort(np.concatenate([pos, [0.0], neg]))
  return values / values.max()


@struct.dataclass
class QTensor:
  """A quantized weight: a pytree of arrays, with the layout in static fields.

  data         int8: int8 codes, the original shape.  int4/nf4: uint8 (K // 2, *out), two
               4-bit codes per byte (see the module docstring).
  scale        int8: float32 (*out,).  int4/nf4: float32 (K // group_size, *out); for nf4 with
               double_quant, the int8 codes of the absmaxes instead.
  scale_scale  nf4 with double_quant: float32 (ceil(n_groups / 256),), else None.
  scale_mean   nf4 with double_quant: float32 (), the mean subtracted from the absmaxes.
  """
  data: jax.Array
  scale: jax.Array
  scale_scale: jax.Array | None = None
  scale_mean: jax.Array | None = None
  kind: str = struct.field(pytree_node=False, default="int8")
  shape: tuple[int, ...] = struct.field(pytree_node=False, default=())  # the weight's shape
  reduce_axes: tuple[int, ...] = struct.field(pytree_node=False, default=(0,))
  group_size: int = struct.field(pytree_node=False, default=0)  # 0 for int8 (per channel)
  dtype: str = struct.field(pytree_node=False, default="float32")  # the weight's dtype

  @property
  def double_quant(self) -> bool:
    return self.scale_scale is not None


def _check(shape: tuple[int, ...], kind: str, group_size: int,
           reduce_axes: Sequence[int]) -> tuple[int, ...]:
  """Validates the arguments of `quantize`; returns reduce_axes normalized (sorted, >= 0)."""
  if kind not in KINDS:
    raise ValueError(f"quantize: kind {kind!r} is unknown; choose one of {KINDS}.")
  ndim = len(shape)
  axes = tuple(sorted(a % ndim if -ndim <= a < ndim else a for a in reduce_axes))
  if not axes or any(not 0 <= a < ndim for a in axes) or len(set(axes)) != len(axes):
    raise ValueError(f"quantize: reduce_axes {tuple(reduce_axes)} must name distinct axes of "
                     f"the {ndim}-d weight {shape}.")
  if len(axes) == ndim:
    raise ValueError(f"quantize: reduce_axes {axes} leave no output axis in weight {shape}.")
  k = math.prod(shape[a] for a in axes)
  if kind != "int8":
    if group_size < 2 or group_size % 2:
      raise ValueError(f"quantize: group_size={group_size} must be a positive even number "
                       f"(4-bit codes are packed in pairs).")
    if k % group_size:
      raise ValueError(f"quantize: group_size={group_size} does not divide the contraction "
                       f"size {k} (dims {axes} of weight {shape}).")
  return axes


def _to_matrix(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """(..., in..., ...) -> (K, M): the contraction axes first, flattened."""
  rest = tuple(a for a in range(w.ndim) if a not in axes)
  w = jnp.transpose(w, axes + rest)
  k = math.prod(w.shape[:len(axes)])
  return w.reshape(k, -1)


def _from_matrix(m: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
  """The inverse of `_to_matrix`: (K, M) -> the weight's shape."""
  rest = tuple(a for a in range(len(shape)) if a not in axes)
  perm = axes + rest
  m = m.reshape(tuple(shape[a] for a in perm))
  return jnp.transpose(m, np.argsort(perm))


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """(K, M) integers in [0, 16) -> (K // 2, M) uint8; row 2i low nibble, row 2i+1 high."""
  codes = codes.astype(jnp.uint8)
  return codes[0::2] | (codes[1::2] << 4)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """(K // 2, M) uint8 -> (K, M) uint8 in [0, 16); the inverse of `pack_nibbles`."""
  lo, hi = packed & 0xF, packed >> 4
  return jnp.stack([lo, hi], axis=1).reshape(-1, *packed.shape[1:])  # (K//2, 2, M) -> (K, M)


def _safe_div(x: jax.Array, s: jax.Array) -> jax.Array:
  """x / s, with all-zero channels (s == 0) mapped to code 0 instead of NaN."""
  return x / jnp.where(s == 0, jnp.ones_like(s), s)


def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(G, M) fp32 absmaxes -> int8 codes (G, M), scales (ceil(G*M / 256),), mean ()."""
  flat = absmax.reshape(-1)
  n = flat.shape[0]
  mean = jnp.mean(flat)
  centered = jnp.pad(flat - mean, (0, -n % DQ_BLOCK)).reshape(-1, DQ_BLOCK)  # (n2, 256)
  scale2 = jnp.max(jnp.abs(centered), axis=1) / 127
  codes = jnp.clip(jnp.round(_safe_div(centered, scale2[:, None])), -127, 127)
  return codes.reshape(-1)[:n].astype(jnp.int8).reshape(absmax.shape), scale2, mean


def _dequantize_absmax(q: QTensor) -> jax.Array:
  """The (G, M) fp32 absmaxes of an nf4 QTensor, undoing double quantization if used."""
  if not q.double_quant:
    return q.scale.reshape(q.scale.shape[0], -1)
  flat = q.scale.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  blocks = jnp.pad(flat, (0, -n % DQ_BLOCK)).reshape(-1, DQ_BLOCK)  # (n2, 256)
  absmax = (blocks * q.scale_scale[:, None]).reshape(-1)[:n] + q.scale_mean
  return absmax.reshape(q.scale.shape[0], -1)


def quantize(w: jax.Array, kind: str, *, group_size: int = 64, double_quant: bool = True,
             reduce_axes: Sequence[int] = (0,)) -> QTensor:
  """Quantizes weight `w` (in..., out...) with contraction axes `reduce_axes`.

  `group_size` applies to int4/nf4 (consecutive elements of the flattened contraction axis)
  and `double_quant` to nf4 only. Jitted (one compile per shape and settings); also works
  inside jit and `jax.eval_shape`.
  """
  axes = _check(tuple(w.shape), kind, group_size, reduce_axes)
  if kind == "int8":
    group_size, double_quant = 0, False
  elif kind == "int4":
    double_quant = False
  return _quantize(w, kind, group_size, double_quant, axes)


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(w: jax.Array, kind: str, group_size: int, double_quant: bool,
              axes: tuple[int, ...]) -> QTensor:
  shape = tuple(w.shape)
  meta = dict(kind=kind, shape=shape, reduce_axes=axes, dtype=jnp.dtype(w.dtype).name)
  w = w.astype(jnp.float32)
  if kind == "int8":
    scale = jnp.max(jnp.abs(w), axis=axes) / 127  # (*out,)
    codes = jnp.round(_safe_div(w, jnp.expand_dims(scale, axes)))
    return QTensor(jnp.clip(codes, -127, 127).astype(jnp.int8), scale, **meta, group_size=0)

  m = _to_matrix(w, axes)  # (K, M)
  k, n_out = m.shape
  groups = m.reshape(k // group_size, group_size, n_out)  # (G, g, M)
  absmax = jnp.max(jnp.abs(groups), axis=1)  # (G, M)
  out_shape = tuple(shape[a] for a in range(len(shape)) if a not in axes)
  if kind == "int4":
    scale = absmax / 7
    codes = jnp.clip(jnp.round(_safe_div(groups, scale[:, None])), -7, 7) + 8  # [1, 15]
    data = pack_nibbles(codes.reshape(k, n_out).astype(jnp.int32))
    return QTensor(data.reshape(k // 2, *out_shape), scale.reshape(-1, *out_shape), **meta,
                   group_size=group_size)

  x = _safe_div(groups, absmax[:, None])  # (G, g, M) in [-1, 1]
  # The nearest NF4 value's index = how many midpoints lie below x. (A fused compare-and-count
  # compiles in a third of the time of jnp.searchsorted's scan on CPU.)
  idx = jnp.sum(x[..., None] > jnp.asarray(_NF4_MIDPOINTS), axis=-1, dtype=jnp.int32)
  data = pack_nibbles(idx.reshape(k, n_out)).reshape(k // 2, *out_shape)
  if not double_quant:
    return QTensor(data, absmax.reshape(-1, *out_shape), **meta, group_size=group_size)
  codes2, scale2, mean = _double_quantize(absmax)
  return QTensor(data, codes2.reshape(-1, *out_shape), scale2, mean, **meta,
                 group_size=group_size)


@partial(jax.jit, static_argnames="dtype")
def dequantize(q: QTensor, dtype=jnp.float32) -> jax.Array:
  """The weight back in its original shape and layout, in `dtype` (computed in float32)."""
  if q.kind == "int8":
    scale = jnp.expand_dims(q.scale, q.reduce_axes)
    return (q.data.astype(jnp.float32) * scale).astype(dtype)
  codes = unpack_nibbles(q.data.reshape(q.data.shape[0], -1))  # (K, M) uint8
  k, n_out = codes.shape
  if q.kind == "int4":
    values = codes.astype(jnp.float32) - 8
    scale = q.scale.reshape(-1, n_out)
  elif q.kind == "nf4":
    values = jnp.asarray(NF4_CODE)[codes]
    scale = _dequantize_absmax(q)
  else:
    raise ValueError(f"dequantize: kind {q.kind!r} is unknown; choose one of {KINDS}.")
  groups = values.reshape(k // q.group_size, q.group_size, n_out) * scale[:, None]
  return _from_matrix(groups.reshape(k, n_out), q.shape, q.reduce_axes).astype(dtype)


def quantized_matmul(x: jax.Array, q: QTensor) -> jax.Array:
  """x (..., *in) times the quantized weight, dequantized on the fly into x.dtype.

  Contracts the last len(reduce_axes) axes of x with the weight's reduce_axes, in order:
  for the usual (in..., out...) layout this is `lmx.model.layers.project`'s contraction,
  (B, T, *in) x (*in, *out) -> (B, T, *out).
  """
  w = dequantize(q, x.dtype)
  n = len(q.reduce_axes)
  return jnp.tensordot(x, w, axes=(tuple(range(x.ndim - n, x.ndim)), q.reduce_axes))


def nbytes(q: QTensor) -> int:
  """Real bytes of all arrays in `q` (also for abstract ones from `jax.eval_shape`)."""
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(q))


def bits_per_param(q: QTensor) -> float:
  """Storage bits per weight element, scales included."""
  return 8 * nbytes(q) / math.prod(q.shape)
