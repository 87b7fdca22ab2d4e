"""The Transformer: parameter accounting, causality, packing, KV cache, remat, dtypes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ConfigError, ModelConfig
from lmx.model import Transformer, count_model_params
from lmx.parallel.rules import DEFAULT_RULES
from lmx.scaling.accounting import count_params

GPT2_124M = ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, mlp="gelu",
                        norm="layernorm", position="learned", max_seq_len=1024, use_bias=True,
                        tie_embeddings=True)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens, positions, segment_ids):
  return nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids)


def forward(model, tokens, positions=None, segment_ids=None) -> np.ndarray:
  """model(tokens) under jit: one compile per shape is much cheaper than eager op-by-op."""
  graphdef, state = nnx.split(model)
  return np.asarray(_jit_forward(graphdef, state, tokens, positions, segment_ids))


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
  base.update(kw)
  return ModelConfig(**base).validate()


def abstract_params(cfg):
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def test_gpt2_124m_param_count_without_allocation():
  model = abstract_params(GPT2_124M)
  assert count_model_params(model) == 124_439_808
  assert count_model_params(nnx.state(model, nnx.Param)) == 124_439_808
  assert count_model_params(nnx.state(model)) == 124_439_808  # only Params count
  assert count_params(GPT2_124M).params == 124_439_808


@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie_embeddings=False),
    dict(position="learned"),
    dict(position="sinusoidal"),
    dict(use_bias=True),
    dict(use_bias=True, norm="layernorm"),
    dict(norm="layernorm"),
    dict(n_kv_heads=2, mlp="geglu", tie_embeddings=False, use_bias=True),
    dict(n_kv_heads=1, mlp="relu", head_dim=16, d_ff=72),
    dict(mlp="gelu", position="learned", norm_position="post", norm="layernorm",
         use_bias=True, tie_embeddings=False),
])
def test_param_count_matches_accounting(kw):
  cfg = tiny(**kw)
  assert count_model_params(abstract_params(cfg)) == count_params(cfg).params


def test_every_param_float32_with_known_logical_names():
  model = abstract_params(tiny(use_bias=True, position="learned", tie_embeddings=False,
                               dtype="bfloat16"))
  known = {n for n, _ in DEFAULT_RULES}
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert leaves
  for p in leaves:
    names = p.get_metadata()["out_sharding"]
    assert len(names) == p.get_value().ndim
    assert all(n is None or n in known for n in names)
    assert p.get_value().dtype == jnp.float32
  # embed, pos table, final norm, lm_head; the stack's 16 block params, each stacked (L, ...)
  assert len(leaves) == 4 + 16


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_init_statistics():
  cfg = tiny(d_model=64, n_layers=8, init_std=0.05, use_bias=True, norm="layernorm")
  m = Transformer(cfg, rngs=nnx.Rngs(0))
  blk = m.layers.block  # every parameter stacked (8, ...)
  wq = np.asarray(blk.attn.wq.get_value())
  assert np.std(wq) == pytest.approx(0.05, rel=0.05)
  for layer in (0, 7):  # each layer at the right scale on its own, too
    assert np.std(wq[layer]) == pytest.approx(0.05, rel=0.1)
  scaled = 0.05 / np.sqrt(2 * 8)
  assert np.std(np.asarray(blk.attn.wo.get_value())) == pytest.approx(scaled, rel=0.05)
  assert np.std(np.asarray(blk.mlp.w_down.get_value())) == pytest.approx(scaled, rel=0.05)
  np.testing.assert_array_equal(np.asarray(blk.attn_norm.scale.get_value()), 1.0)
  np.testing.assert_array_equal(np.asarray(blk.attn_norm.bias.get_value()), 0.0)
  np.testing.assert_array_equal(np.asarray(blk.mlp.b_up.get_value()), 0.0)


def test_invalid_config_fails_early():
  with pytest.raises(ConfigError, match="model.n_heads"):
    Transformer(dataclasses.replace(tiny(), n_kv_heads=3), rngs=nnx.Rngs(0))


def _tokens(shape, seed=0, vocab=61):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


VARIANTS = [
    dict(),  # rope, rmsnorm, swiglu, pre-LN
    dict(position="learned"),
    dict(position="sinusoidal"),
    dict(norm="layernorm", use_bias=True),
    dict(norm_position="post"),
    dict(mlp="relu"),
    dict(mlp="gelu"),
    dict(mlp="geglu", n_kv_heads=2),
    dict(n_kv_heads=1, tie_embeddings=False),
]


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("kw", VARIANTS)
def test_causality(kw):
  model = Transformer(tiny(**kw), rngs=nnx.Rngs(0))
  tokens = _tokens((2, 10))
  base = forward(model, tokens)
  for cut in (3, 7):
    changed = tokens.at[:, cut:].set((tokens[:, cut:] + 1) % 61)
    out = forward(model, changed)
    np.testing.assert_allclose(out[:, :cut], base[:, :cut], atol=1e-5)
    assert not np.allclose(out[:, cut], base[:, cut], atol=1e-4)  # the change is visible


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal"])
def test_packed_segments_do_not_attend_across(position):
  model = Transformer(tiny(position=position, n_kv_heads=2), rngs=nnx.Rngs(0))
  a, b = _tokens((1, 5), seed=1), _tokens((1, 6), seed=2)
  packed = jnp.concatenate([a, b], axis=1)  # (1, 11)
  seg = jnp.asarray([[1] * 5 + [2] * 6], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(6))], jnp.int32)
  out = forward(model, packed, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(out[:, :5], forward(model, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], forward(model, b), atol=1e-5)
  # Without segment ids, segment 2 sees segment 1 and its logits change.
  leaky = forward(model, packed, positions=pos)
  assert not np.allclose(leaky[:, 5:], forward(model, b), atol=1e-4)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_pre_and_post_ln_both_run_and_differ():
  tokens = _tokens((2, 8))
  pre = Transformer(tiny(norm_position="pre"), rngs=nnx.Rngs(0))
  post = Transformer(tiny(norm_position="post"), rngs=nnx.Rngs(0))
  # Same seed, same parameter tree: only the wiring differs.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(pre, nnx.Param),
               nnx.state(post, nnx.Param))
  a, b = forward(pre, tokens), forward(post, tokens)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  assert not np.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("kw", [
    dict(n_kv_heads=2, tie_embeddings=False, rope_theta=100.0),
    dict(position="learned", use_bias=True, norm="layernorm", mlp="gelu"),
    dict(position="sinusoidal", n_kv_heads=1, norm_position="post", scan_layers=False),
])
@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_kv_cache_decode_matches_full_forward(kw):
  model = Transformer(tiny(**kw), rngs=nnx.Rngs(0))
  b, t, prefill = 2, 9, 4
  tokens = _tokens((b, t), seed=3)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  full = forward(model, tokens)
  cache = model.init_cache(b, t + 2)  # spare slots must stay invisible
  step = jax.jit(lambda g, s, tok, pos, c: nnx.merge(g, s).decode(tok, pos, c))
  g, s = nnx.split(model)
  logits, cache = step(g, s, tokens[:, :prefill], positions[:, :prefill], cache)
  outs = [np.asarray(logits)]
  for i in range(prefill, t):
    logits, cache = step(g, s, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
    outs.append(np.asarray(logits))
  assert int(cache.index) == t
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)
  # One stacked cache (L, B, K, S, H): slots 0..t-1 written, the spare ones still zero.
  cfg = model.cfg
  assert cache.layers.k.shape == (cfg.n_layers, b, cfg.kv_heads, t + 2, cfg.dim_per_head)
  assert np.all(np.abs(np.asarray(cache.layers.k[:, :, :, :t])).max(axis=(1, 2, 4)) > 0)
  np.testing.assert_array_equal(np.asarray(cache.layers.v[:, :, :, t:]), 0.0)


def _loss_and_grads(cfg, tokens):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("scan", [True, False])
def test_remat_gives_same_loss_and_grads(scan):
  tokens = _tokens((2, 9), seed=4)
  ref_loss, ref_grads = _loss_and_grads(tiny(remat="none", scan_layers=scan), tokens)
  assert np.isfinite(float(ref_loss))
  for policy in ("full", "save_dots"):
    loss, grads = _loss_and_grads(tiny(remat=policy, scan_layers=scan), tokens)
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), grads, ref_grads)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("n_layers", [2, 3])
def test_remat_policies_recompute_what_they_promise(n_layers):
  """Counted in the traced gradient, where the scan over layers holds one layer's program
  (so the counts are per layer, whatever the depth): 'full' recomputes every forward
  matmul, 'save_dots' keeps the projections (named by `project`) and recomputes only
  attention's two."""
  tokens = _tokens((2, 9), seed=4)

  def n_dots(policy):
    cfg = tiny(remat=policy, n_layers=n_layers)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    grad = jax.grad(lambda p: nnx.merge(graphdef, p)(tokens).sum())
    return jax.jit(grad).lower(params).as_text().count("stablehlo.dot_general")

  none, save_dots, full = n_dots("none"), n_dots("save_dots"), n_dots("full")
  assert save_dots - none == 2  # scores and values (T=9 is one query block)
  # 'full' also recomputes at least q, k, v, gate and up (whose outputs the backward reads).
  assert full - save_dots >= 5


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_bf16_compute_returns_float32_logits_close_to_fp32():
  tokens = _tokens((2, 8))
  fp32 = Transformer(tiny(), rngs=nnx.Rngs(0))
  bf16 = Transformer(tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
  b = _jit_forward(*nnx.split(bf16), tokens, None, None)
  assert b.dtype == jnp.float32 and b.shape == (2, 8, 61)
  a = forward(fp32, tokens)
  np.testing.assert_allclose(np.asarray(b), a, atol=0.05)
  assert not np.array_equal(a, np.asarray(b))  # bf16 really was used


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_sharded_forward_matches_single_device():
  from lmx.config import MeshConfig
  from lmx.parallel.mesh import make_mesh, state_shardings, use_mesh
  cfg = tiny(vocab_size=64, n_kv_heads=2, tie_embeddings=False)  # every dim divisible by 2
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens((4, 8), vocab=64)
  want = forward(model, tokens)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, state_shardings(state, mesh))

  @jax.jit
  def fwd(state, tokens):
    with use_mesh(mesh):
      return nnx.merge(graphdef, state)(tokens)

  got = fwd(state, tokens)
  assert len(state["embed"].get_value().sharding.device_set) == 8  # really sharded
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
