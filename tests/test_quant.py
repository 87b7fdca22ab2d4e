"""`lmx.quant`: int8 per-channel, int4 group-wise and NF4 weight quantization.

The error bounds are checked per block against scales the test computes itself with numpy,
so a wrong scale, code table or layout in the library cannot also move the bound.
NOTE: each layout is quantized every way in one jitted call, cached for all tests: XLA
compiles dominate this file's time, and a program per (kind, shape) took ~15 s.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.model.layers import project
from lmx.quant import NF4_CODE, QTensor, bits_per_param, dequantize, nbytes, quantize
from lmx.quant import quantized_matmul
from lmx.quant.weights import DQ_BLOCK, nf4_code_from_quantiles, pack_nibbles, unpack_nibbles

G = 64  # group size (the default)
LAYOUTS = [  # (weight shape, reduce_axes); each has 2 * 160 = 320 groups of 64
    ((128, 160), (0,)),  # (D, F)
    ((128, 4, 40), (0,)),  # (D, N, H)
    ((4, 32, 160), (0, 1)),  # (N, H, D)
    ((160, 128), (1,)),  # contraction not leading, e.g. a tied (V, D) unembedding
]
VARIANTS = {  # name -> quantize keyword arguments
    "int8": dict(kind="int8"),
    "int4": dict(kind="int4", group_size=G),
    "nf4": dict(kind="nf4", group_size=G),  # double quantization on
    "nf4_single": dict(kind="nf4", group_size=G, double_quant=False),
}


def _gaussian(shape, seed=0):
  """numpy, not jax.random: eager jax ops compile one by one and this file must stay fast."""
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


@functools.cache
def _quantized(layout: int):
  """A Gaussian weight with one all-zero output channel, and {variant: (QTensor, dequantized)}."""
  shape, axes = LAYOUTS[layout]
  w = _gaussian(shape, layout)
  w[tuple(0 if a not in axes else slice(None) for a in range(len(shape)))] = 0.0

  @jax.jit
  def run(w):
    qs = {name: quantize(w, **kw, reduce_axes=axes) for name, kw in VARIANTS.items()}
    return qs, {name: dequantize(q) for name, q in qs.items()}

  qs, deqs = run(w)
  return w, {n: (qs[n], np.asarray(deqs[n])) for n in VARIANTS}


def _groups(w, axes, g=G):
  """numpy: w -> (n_groups, g, M) blocks of g consecutive elements of the flattened contraction."""
  rest = tuple(a for a in range(w.ndim) if a not in axes)
  m = np.transpose(w, axes + rest).reshape(int(np.prod([w.shape[a] for a in axes])), -1)
  return m.reshape(m.shape[0] // g, g, m.shape[1])


def test_nf4_table_matches_the_normal_quantile_construction():
  np.testing.assert_allclose(nf4_code_from_quantiles(), NF4_CODE, atol=1e-4)
  np.testing.assert_allclose(nf4_code_from_quantiles(0.9677083), NF4_CODE, atol=1e-4)
  assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
  assert np.all(np.diff(NF4_CODE) > 0)


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_round_trip_shapes_and_dtype(layout):
  shape, axes = LAYOUTS[layout]
  w, out = _quantized(layout)
  out_shape = tuple(s for a, s in enumerate(shape) if a not in axes)
  k = w.size // int(np.prod(out_shape))
  assert out["int8"][0].data.shape == shape and out["int8"][0].scale.shape == out_shape
  for name in ("int4", "nf4", "nf4_single"):
    q = out[name][0]
    assert q.data.shape == (k // 2, *out_shape) and q.data.dtype == jnp.uint8
    assert q.scale.shape == (k // G, *out_shape)
  assert all(deq.shape == shape and deq.dtype == np.float32 for _, deq in out.values())
  bf16 = jax.eval_shape(lambda q: dequantize(q, jnp.bfloat16), out["nf4"][0])
  assert bf16.shape == shape and bf16.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.stack([deq for _, deq in out.values()])))


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_int8_matches_a_numpy_reference(layout):
  _, axes = LAYOUTS[layout]
  w, out = _quantized(layout)
  scale = np.max(np.abs(w), axis=axes) / np.float32(127)
  safe = np.where(scale == 0, np.float32(1), scale)
  codes = np.clip(np.round(w / np.expand_dims(safe, axes)), -127, 127).astype(np.int8)
  q, deq = out["int8"]
  assert q.data.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(q.data), codes)
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=2e-7)  # XLA: 1 ulp
  np.testing.assert_allclose(deq, codes * np.expand_dims(scale, axes), rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_int4_error_is_at_most_half_a_step_per_block(layout):
  _, axes = LAYOUTS[layout]
  w, out = _quantized(layout)
  err = _groups(np.abs(w - out["int4"][1]), axes)
  step = np.max(np.abs(_groups(w, axes)), axis=1, keepdims=True) / 7  # codes are integers
  assert np.all(err <= step / 2 + 1e-6)


@pytest.mark.parametrize("variant", ["nf4", "nf4_single"])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_nf4_error_is_at_most_half_the_largest_gap_per_block(layout, variant):
  _, axes = LAYOUTS[layout]
  w, out = _quantized(layout)
  err = _groups(np.abs(w - out[variant][1]), axes)
  absmax = np.max(np.abs(_groups(w, axes)), axis=1)  # (n_groups, M)
  bound = absmax * np.max(np.diff(NF4_CODE)) / 2
  if variant == "nf4":  # the absmax itself is off by at most half its int8 step
    centered = np.pad(absmax.reshape(-1) - absmax.mean(), (0, -absmax.size % DQ_BLOCK))
    step2 = np.max(np.abs(centered.reshape(-1, DQ_BLOCK)), axis=1) / 127
    bound = bound + np.repeat(step2 / 2, DQ_BLOCK)[:absmax.size].reshape(absmax.shape)
  assert np.all(err <= bound[:, None] + 1e-6)


def test_nf4_reconstructs_code_times_absmax_exactly():
  # Every block holds +1 (so its absmax is the block's `a`) and the other 15 codes.
  k, m, g = 32, DQ_BLOCK // 2, 16
  idx = np.random.default_rng(0).permuted(np.tile(np.arange(16), (2 * m, 1)), axis=1)
  w = NF4_CODE[idx].reshape(2, m, g).transpose(0, 2, 1).reshape(k, m)  # (K, M), blocks along K
  w_varied = w * np.linspace(0.5, 3, m, dtype=np.float32)
  w_equal = w * np.float32(2)  # double quantization is exact only if all absmaxes are equal

  @jax.jit
  def run(w_varied, w_equal):
    return (dequantize(quantize(w_varied, "nf4", group_size=g, double_quant=False)),
            dequantize(quantize(w_equal, "nf4", group_size=g, double_quant=True)))

  single, double = run(w_varied, w_equal)
  np.testing.assert_array_equal(np.asarray(single), w_varied)
  np.testing.assert_array_equal(np.asarray(double), w_equal)


def test_four_bit_packing_by_hand():
  codes = np.array([[15, 0], [1, 2], [8, 9], [9, 12]], np.uint8)  # (K=4, M=2)
  packed = pack_nibbles(codes)  # numpy in, numpy out
  np.testing.assert_array_equal(packed, [[0x1F, 0x20], [0x98, 0xC9]])
  # int4 of [7, -7, 0, 1] with group absmax 7: scale 1, codes 15, 1, 8, 9 (code + 8).
  q = quantize(np.array([[7.0], [-7.0], [0.0], [1.0]], np.float32), "int4", group_size=4)
  np.testing.assert_array_equal(np.asarray(q.data), [[0x1F], [0x98]])
  np.testing.assert_array_equal(np.asarray(q.scale), [[1.0]])
  np.testing.assert_array_equal(np.asarray(jax.jit(unpack_nibbles)(packed)), codes)


def test_nbytes_and_bits_per_param():
  # A full (4096, 4096) weight, shape-only.
  k = m = 4096
  abstract = jax.ShapeDtypeStruct((k, m), jnp.float32)
  q = jax.eval_shape(lambda w: quantize(w, "nf4", group_size=64), abstract)
  n_groups = k * m // 64
  # 4-bit codes, int8 absmaxes, an fp32 scale per 256 absmaxes, their fp32 mean
  assert nbytes(q) == k * m // 2 + n_groups + 4 * (n_groups // DQ_BLOCK) + 4
  assert bits_per_param(q) == pytest.approx(4.127, abs=1e-3)
  q = jax.eval_shape(lambda w: quantize(w, "nf4", group_size=64, double_quant=False), abstract)
  assert bits_per_param(q) == 4.5
  # Concrete arrays: 2 * 160 = 320 groups leave a partial double-quantization block.
  _, out = _quantized(0)
  assert nbytes(out["nf4"][0]) == 128 * 160 // 2 + 320 + 4 * 2 + 4
  assert nbytes(out["nf4_single"][0]) == 128 * 160 // 2 + 4 * 320
  assert nbytes(out["int4"][0]) == 128 * 160 // 2 + 4 * 320
  assert nbytes(out["int8"][0]) == 128 * 160 + 4 * 160


def test_bad_arguments_raise_naming_the_field():
  w = np.zeros((48, 8), np.float32)
  with pytest.raises(ValueError, match="group_size=32 does not divide"):
    quantize(w, "nf4", group_size=32)
  with pytest.raises(ValueError, match="group_size=3 "):
    quantize(w, "int4", group_size=3)
  with pytest.raises(ValueError, match="kind 'int3' is unknown"):
    quantize(w, "int3")
  with pytest.raises(ValueError, match="reduce_axes"):
    quantize(w, "int8", reduce_axes=(0, 1))


def test_error_ordering_on_gaussian_weights():
  w, out = _quantized(0)
  err = {name: np.linalg.norm(w - deq) / np.linalg.norm(w) for name, (_, deq) in out.items()}
  assert err["int8"] < err["int4"] < 1
  assert err["nf4"] < err["int4"]  # NF4's levels follow the normal distribution: its point


@pytest.mark.parametrize("layout", [1, 2])  # (D, N, H) and (N, H, D)
def test_quantized_matmul_is_project_with_the_dequantized_weight(layout):
  shape, axes = LAYOUTS[layout]
  x = _gaussian((2, 3, *shape[:len(axes)]), 4)  # (B, T, *in)
  q = _quantized(layout)[1]["nf4"][0]

  @jax.jit  # also: a QTensor passes through jit as a pytree
  def run(x, q):
    return quantized_matmul(x, q), project(x, dequantize(q), len(axes))

  y, y_ref = run(x, q)
  assert y.shape == (2, 3, *shape[len(axes):])
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
  assert isinstance(jax.tree.map(lambda a: a, q), QTensor)
