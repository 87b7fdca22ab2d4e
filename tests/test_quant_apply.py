"""Weight-only quantization of a model for inference, and the int8 KV cache (lmx.quant.apply)."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ConfigError, ModelConfig
from lmx.model import Transformer
from lmx.quant.apply import QuantizedWeight, decode_nll, quantize_model

TINY = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                   max_seq_len=32, init_std=0.1)


def _model(cfg=TINY, seed=0):
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def _tokens(cfg, b=2, t=16, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size, jnp.int32)


def _quantized_weights(model):
  block = model.layers.block
  return {(m, n): getattr(getattr(block, m), n) for m in ("attn", "mlp")
          for n in getattr(block, m).projection_names()
          if isinstance(getattr(getattr(block, m), n), QuantizedWeight)}


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


@partial(jax.jit, static_argnums=0)
def _decode_step(graphdef, state, tokens, positions, cache):
  return nnx.merge(graphdef, state).decode(tokens, positions, cache)


def _forward(model, tokens):
  """Jitted logits, one compile per graphdef (eager NNX dispatches op by op: seconds even
  for the tiny model)."""
  return _logits(*nnx.split(model), tokens)


def _check_kind(kind):
  """Quantized logits equal a float model holding the dequantized weights (1e-6), and
  deviate from the float model's by a bounded multiple of the weights' relative error.
  Returns (logit error, bytes ratio)."""
  tokens = _tokens(TINY)
  qm, fm = _model(), _model()
  ref = _forward(fm, tokens)
  sizes = quantize_model(qm, kind, 64)
  qws = _quantized_weights(qm)
  assert len(qws) == 7  # wq wk wv wo w_gate w_up w_down
  w_err = 0.0
  for (m, n), qw in qws.items():
    p = getattr(getattr(fm.layers.block, m), n)
    w = qw.dequantized("float32")
    assert w.shape == p[...].shape
    w_err = max(w_err, _rel(w, p[...]))
    p[...] = w  # the explicitly dequantized weight, in a float model
  got = _forward(qm, tokens)
  np.testing.assert_allclose(got, _forward(fm, tokens), atol=1e-6, rtol=0)
  # To first order each projection passes its weight's relative error on; 2 layers of
  # attention (2 matmuls deep) + MLP (2 deep) give at most ~8x it at the logits.
  err = _rel(got, ref)
  assert 0 < err <= 8 * w_err, (kind, err, w_err)
  return err, sizes["bytes_after"] / sizes["bytes_before"]


_BEFORE = TINY.n_layers * 4 * (2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * 128 + 128 * 64)
# int8: 1 byte per weight + a float32 scale per output channel ((L, M) per projection)
_INT8_RATIO = 0.25 + TINY.n_layers * 4 * (64 + 32 + 32 + 64 + 128 + 128 + 64) / _BEFORE


@pytest.mark.slow  # compiles models: kept out of the 90 s fast set
def test_int8_model_exact_dequantized_bounded_and_smaller():
  err, ratio = _check_kind("int8")
  assert err < 0.03  # int8 per-channel: ~0.4% relative weight error, 1.5% in logits
  assert ratio == pytest.approx(_INT8_RATIO, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("kind,expected", [
    ("int4", 0.125 + 1 / 64),  # half a byte + a float32 scale per 64 weights
    ("nf4", 0.125 + (1 + 4 / 256) / (4 * 64)),  # int8 absmax per 64, fp32 per 256 absmaxes
])
def test_4bit_model_exact_dequantized_bounded_and_smaller(kind, expected):
  err, ratio = _check_kind(kind)
  assert 0.05 < err < 0.5  # ~10% weight error (25% in the logits here), but bounded
  assert ratio == pytest.approx(expected, rel=0.02)


@pytest.mark.slow
def test_int8_kv_cache_decode_matches_float_cache():
  cfg8 = dataclasses.replace(TINY, kv_cache_dtype="int8")
  fm, qm = _model(), _model(cfg8)
  nnx.update(qm, nnx.state(fm))
  assert fm.init_cache(2, 8).layers.k_scale is None  # the default cache is unchanged
  c8 = qm.init_cache(2, 8)
  assert c8.layers.k.dtype == jnp.int8 and c8.layers.k_scale.shape == (2, 2, 2, 8)  # (L, B, K, S)
  tokens = _tokens(TINY, t=8)
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  cf = fm.init_cache(2, 8)
  fs, qs = nnx.split(fm), nnx.split(qm)
  # a 4-token prefill, then 4 single-token steps
  for lo, hi in [(0, 4), (4, 5), (5, 6), (6, 7), (7, 8)]:
    lf, cf = _decode_step(*fs, tokens[:, lo:hi], pos[:, lo:hi], cf)
    lq, c8 = _decode_step(*qs, tokens[:, lo:hi], pos[:, lo:hi], c8)
    # int8 rounding of k/v: relative error <= 1/254 per element, well under 1% in logits
    assert _rel(lq, lf) < 0.01, (lo, _rel(lq, lf))
  # layer 0's codes (same input in both models) dequantize to the float keys within half a
  # step of their (token, head) scale; later layers' inputs already differ by the rounding
  k = c8.layers.k[0].astype(jnp.float32) * c8.layers.k_scale[0][..., None]
  step = c8.layers.k_scale[0][..., None]
  assert bool(jnp.all(jnp.abs(k - cf.layers.k[0]) <= 0.5 * step + 1e-6))
  assert int(c8.index) == 8


@pytest.mark.slow  # builds models: kept out of the 90 s fast set
def test_invalid_settings_fail_with_one_sentence():
  with pytest.raises(ConfigError, match=r"`model.quant` is 'int3'; it must be one of"):
    dataclasses.replace(TINY, quant="int3").validate()
  with pytest.raises(ConfigError, match=r"`model.quant_group` is 48; it must divide"):
    dataclasses.replace(TINY, quant="int4", quant_group=48).validate()
  with pytest.raises(ConfigError, match=r"`model.kv_cache_dtype` is 'fp8'"):
    dataclasses.replace(TINY, kv_cache_dtype="fp8").validate()
  dataclasses.replace(TINY, quant="int8", quant_group=48).validate()  # int8 has no groups
  with pytest.raises(ValueError, match=r"^quantize_model: kind 'int3' is unknown; [^.]*\.$"):
    quantize_model(_model(), "int3")
  with pytest.raises(ValueError, match=r"group_size=48 does not divide the contraction size"):
    quantize_model(_model(), "int4", 48)


@pytest.mark.slow
def test_default_size_int8_cache_perplexity_and_quantized_generate():
  """At the default model's shapes: decode-path NLL with the int8 cache within 0.5% of the
  float cache, and a quantized model runs through the jitted decode engine."""
  from lmx.infer.generate import generate
  cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=2, n_heads=4, max_seq_len=128,
                    init_std=0.05)
  fm, qm = _model(cfg), _model(dataclasses.replace(cfg, kv_cache_dtype="int8"))
  nnx.update(qm, nnx.state(fm))
  tokens = np.asarray(_tokens(cfg, b=2, t=129))
  nf, n = decode_nll(fm, tokens[:, :-1], tokens[:, 1:], chunk=32)
  nq, _ = decode_nll(qm, tokens[:, :-1], tokens[:, 1:], chunk=32)
  full = jax.nn.log_softmax(fm(jnp.asarray(tokens[:, :-1])), -1)
  ref = -float(jnp.take_along_axis(full, jnp.asarray(tokens[:, 1:])[..., None], -1).sum())
  assert nf == pytest.approx(ref, rel=1e-4)  # the decode path scores like the forward pass
  assert abs(np.exp(nq / n) / np.exp(nf / n) - 1) < 0.005
  sizes = quantize_model(qm, "nf4", 64)
  assert sizes["bytes_after"] / sizes["bytes_before"] < 0.14
  rows = generate(qm, [[1, 2, 3], [4, 5]], 4, temperature=0.0)
  assert [len(r) for r in rows] == [4, 4]
