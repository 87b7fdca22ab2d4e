"""Attention, RoPE and sinusoidal positions against plain numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ModelConfig
from lmx.model.attention import Attention, blocked_causal_attention, query_block, segment_mask
from lmx.model.positions import apply_rope, sinusoidal


def _run(module, *args):
  """module(*args) under jit: one compile is cheaper than compiling every eager op."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


def _cfg(**kw):
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
              position="rope", use_bias=True)
  base.update(kw)
  return ModelConfig(**base).validate()


def _np_rope(x, positions, theta):
  """Reference RoPE via complex multiplication; pairs feature i with i + Dh/2."""
  h = x.shape[-1] // 2
  z = x[..., :h] + 1j * x[..., h:]  # (B, T, N, h)
  freqs = theta ** (-np.arange(h, dtype=np.float64) * 2 / (2 * h))
  rot = np.exp(1j * positions[..., None, None] * freqs)  # (B, T, 1, h)
  z = z * rot
  return np.concatenate([z.real, z.imag], axis=-1)


def _randomize(module, seed=1):
  """Non-zero biases and varied weights so every parameter matters in the comparison."""
  rng = np.random.default_rng(seed)
  for _, p in nnx.iter_graph(module):
    if isinstance(p, nnx.Param):
      p.set_value(jnp.asarray(rng.normal(0, 0.3, p.get_value().shape), jnp.float32))


def _np_attention(p, x, positions, segment_ids, cfg):
  """Plain softmax attention with explicit K/V head repetition, float64."""
  g = cfg.n_heads // cfg.kv_heads
  q = np.einsum("btd,dnh->btnh", x, p["wq"]) + p["bq"]
  k = np.einsum("btd,dkh->btkh", x, p["wk"]) + p["bk"]
  v = np.einsum("btd,dkh->btkh", x, p["wv"]) + p["bv"]
  q, k = _np_rope(q, positions, cfg.rope_theta), _np_rope(k, positions, cfg.rope_theta)
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # head n reads kv head n // g
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  t = x.shape[1]
  allowed = np.tril(np.ones((t, t), bool))[None, None]
  allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  s = np.where(allowed, s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bnts,bsnh->btnh", w, v)
  return np.einsum("btnh,nhd->btd", o, p["wo"]) + p["bo"]


def _params(module):
  return {k: np.asarray(getattr(module, k).get_value(), np.float64)
          for k in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo")}


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("impl", ["jax", "blocked"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_attention_matches_numpy_reference(n_kv_heads, impl):
  cfg = _cfg(n_kv_heads=n_kv_heads, attention_impl=impl)
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  _randomize(attn)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, cfg.d_model)).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3]], np.int32)
  seg = np.array([[1] * 7, [1, 1, 1, 2, 2, 2, 0]], np.int32)
  got = _run(attn, jnp.asarray(x), jnp.asarray(positions), jnp.asarray(seg))
  want = _np_attention(_params(attn), x.astype(np.float64), positions, seg, cfg)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa_cfg = _cfg(n_kv_heads=2)
  mha_cfg = _cfg(n_kv_heads=4)
  gqa = Attention(gqa_cfg, rngs=nnx.Rngs(0))
  _randomize(gqa)
  mha = Attention(mha_cfg, rngs=nnx.Rngs(5))
  g = gqa_cfg.n_heads // gqa_cfg.kv_heads
  for name in ("wq", "wo", "bq", "bo"):
    getattr(mha, name).set_value(getattr(gqa, name).get_value())
  for name, axis in (("wk", 1), ("wv", 1), ("bk", 0), ("bv", 0)):
    getattr(mha, name).set_value(jnp.repeat(getattr(gqa, name).get_value(), g, axis=axis))
  x = jax.random.normal(jax.random.key(1), (2, 6, gqa_cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
  ref = np.asarray(_run(gqa, x, pos))
  np.testing.assert_allclose(np.asarray(_run(mha, x, pos)), ref, atol=1e-5)
  # Sanity: a *different* repetition order (tile instead of repeat) must not match.
  for name, axis in (("wk", 1), ("wv", 1)):
    w = getattr(gqa, name).get_value()
    getattr(mha, name).set_value(jnp.concatenate([w] * g, axis=axis))
  assert not np.allclose(np.asarray(_run(mha, x, pos)), ref, atol=1e-3)


def _np_core(q, k, v, segment_ids):
  """softmax(q k^T / sqrt(H)) v with causal + segment masking, float64, K/V repeated."""
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  t = q.shape[1]
  allowed = np.tril(np.ones((t, t), bool))[None, None]
  allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  w = np.exp(np.where(allowed, s, -np.inf) - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("block", [1, 3, 4, 11])  # ragged last block, one block, per query
def test_blocked_attention_matches_reference_and_dot_product_attention(n_kv_heads, block):
  rng = np.random.default_rng(block)
  b, t, n, h = 2, 11, 4, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k, v = (rng.normal(size=(b, t, n_kv_heads, h)).astype(np.float32) for _ in range(2))
  seg = np.array([[1] * 11, [1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]], np.int32)
  mask = segment_mask(jnp.asarray(seg))
  got = jax.jit(lambda q, k, v: blocked_causal_attention(q, k, v, mask, block))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), _np_core(*(x.astype(np.float64) for x in (q, k, v)),
                                                       seg), atol=1e-5)

  # Gradients equal jax.nn.dot_product_attention's (the default path off CPU).
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def grads(fn):
    return jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v)[1](cot))(q, k, v)

  ref = grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True))
  for a, r in zip(grads(lambda q, k, v: blocked_causal_attention(q, k, v, mask, block)), ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5)
  # The causal mask is really applied: without it a future key changes the output.
  v2 = v.copy()
  v2[:, -1] += 10.0
  moved = jax.jit(lambda v: blocked_causal_attention(q, k, v, None, block))(v2)
  base = jax.jit(lambda v: blocked_causal_attention(q, k, v, None, block))(v)
  np.testing.assert_array_equal(np.asarray(moved)[:, :-1], np.asarray(base)[:, :-1])
  assert not np.allclose(np.asarray(moved)[:, -1], np.asarray(base)[:, -1])


def test_query_block_rule():
  assert [query_block(t) for t in (1, 64, 256, 512, 1024, 8192)] == [64, 64, 64, 64, 128, 1024]


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_blocked_attention_bf16_keeps_dtype_and_tracks_float32():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 70, 2, 8)), jnp.float32) for _ in range(3))
  ref = blocked_causal_attention(q, k, v)
  out = blocked_causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_matches_complex_rotation(theta):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 1000, size=(2, 5)).astype(np.int32)
  got = apply_rope(jnp.asarray(x), jnp.asarray(pos), theta)
  np.testing.assert_allclose(np.asarray(got), _np_rope(x.astype(np.float64), pos, theta),
                             atol=2e-4)


def test_rope_dot_product_depends_only_on_position_difference():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(m, n):
    qm = apply_rope(q, jnp.full((1, 1), m, jnp.int32), 10000.0)
    kn = apply_rope(k, jnp.full((1, 1), n, jnp.int32), 10000.0)
    return float(jnp.sum(qm * kn))

  for diff in (0, 1, 7):
    ref = score(diff, 0)
    for m in (3, 50, 311):
      assert score(m + diff, m) == pytest.approx(ref, abs=1e-4)
  assert abs(score(1, 0) - score(7, 0)) > 1e-3  # the score does depend on the difference
  # Rotations preserve the norm.
  rot = apply_rope(q, jnp.full((1, 1), 42, jnp.int32), 10000.0)
  assert float(jnp.linalg.norm(rot)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)


def test_sinusoidal_formula():
  d = 16
  pos = np.array([[0, 1, 5, 99]], np.int32)
  got = np.asarray(sinusoidal(jnp.asarray(pos), d))
  want = np.zeros((1, 4, d))
  for t, p in enumerate(pos[0]):
    for i in range(d // 2):
      want[0, t, 2 * i] = np.sin(p / 10000 ** (2 * i / d))
      want[0, t, 2 * i + 1] = np.cos(p / 10000 ** (2 * i / d))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_bf16_runs_and_keeps_dtype():
  cfg = _cfg(dtype="bfloat16")
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 4, cfg.d_model), jnp.bfloat16)
  out = _run(attn, x, jnp.zeros((1, 4), jnp.int32))
  assert out.dtype == jnp.bfloat16
  assert attn.wq.get_value().dtype == jnp.float32


@pytest.mark.slow  # compiles a sharded gradient
def test_blocked_attention_keeps_the_tensor_split():
  """Under data x tensor sharding (8 fake devices) the blocked kernel runs on each device's
  own heads: no all-gather in the compiled gradient. Reshaping batch and kv heads into one
  axis made XLA gather q, k and v everywhere (24 all-gathers, 2.3x the temp memory)."""
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = jax.make_mesh((4, 2), ("data", "tensor"))
  sh = NamedSharding(mesh, PartitionSpec("data", None, "tensor", None))
  shapes = [jax.ShapeDtypeStruct((8, 32, n, 16), jnp.float32) for n in (4, 2, 2)]
  f = jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(blocked_causal_attention(q, k, v,
                                                                                  block=8))),
                         argnums=(0, 1, 2))
  hlo = jax.jit(f, in_shardings=(sh,) * 3, out_shardings=(None, (sh,) * 3)).lower(
      *shapes).compile().as_text()
  assert hlo.count("all-gather") == 0 and hlo.count("all-to-all") == 0
