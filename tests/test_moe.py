"""MoE MLP (lmx.model.moe) against plain numpy: routing (incl. ties), both dispatch paths,
dropped counts on a hand case, router gradients, the balance loss, bad config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ConfigError, ModelConfig, MoEConfig, base_config, from_config_dict
from lmx.model.moe import MoE, aux_sums, capacity, route

D, E = 8, 4
CFG = ModelConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=2, d_ff=16, max_seq_len=16,
                  moe=MoEConfig(num_experts=E, top_k=2))


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(-1, keepdims=True)


def _np_topk(p, k):
  idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]  # ties: lower index first
  return np.take_along_axis(p, idx, -1), idx


def _np_moe(m: MoE, x: np.ndarray) -> np.ndarray:
  """The MoE output token by token: sum over the top-k experts of weight * gated MLP."""
  g = lambda a: np.asarray(a[...], np.float64)
  r, wu, wg, wd = g(m.router), g(m.w_up), g(m.w_gate), g(m.w_down)
  xs = np.asarray(x, np.float64).reshape(-1, D)
  p = _np_softmax(xs @ r)
  w, idx = _np_topk(p, m.cfg.moe.top_k)
  if m.cfg.moe.top_k > 1:
    w = w / w.sum(-1, keepdims=True)
  silu = lambda v: v / (1 + np.exp(-v))
  out = np.zeros_like(xs)
  for n in range(len(xs)):
    for j, e in enumerate(idx[n]):
      out[n] += w[n, j] * ((silu(xs[n] @ wg[e]) * (xs[n] @ wu[e])) @ wd[e])
  return out.reshape(x.shape)


def _forward(m: MoE, x, valid=None, dropless=None):
  """m.forward, jitted (eager dispatch of the sort/scatter ops is slow on CPU)."""
  graphdef, state = nnx.split(m)
  f = jax.jit(lambda s, x, v: nnx.merge(graphdef, s).forward(x, v, dropless=dropless))
  return f(state, x, valid)


def _moe(cfg=CFG, **moe):
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))
  return MoE(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_matches_numpy_with_ties(k):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(12, 6)).astype(np.float32)
  logits[:4, 3] = logits[:4, 1]  # exact ties between experts 1 and 3
  logits[4] = 0.0  # a token with every expert tied
  w, idx, probs = route(jnp.asarray(logits), k)
  p = _np_softmax(logits.astype(np.float64))
  rw, ridx = _np_topk(p, k)
  if k > 1:
    rw = rw / rw.sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(idx), ridx)
  np.testing.assert_allclose(np.asarray(w), rw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # compiles MoE forwards
@pytest.mark.parametrize("factor", [0.0, 4.0])  # dropless; capacity = every token
def test_moe_output_matches_numpy(factor):
  m = _moe(capacity_factor=factor)
  x = np.random.default_rng(1).normal(size=(2, 5, D)).astype(np.float32)
  y, stats = _forward(m, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), _np_moe(m, x), rtol=1e-4, atol=1e-5)
  assert float(stats["dropped"]) == 0.0


@pytest.mark.slow  # compiles MoE forwards
def test_capacity_path_with_room_equals_dropless():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7, D)), jnp.float32)
  y0, s0 = _forward(_moe(capacity_factor=0.0, shared_experts=1), x)
  y1, s1 = _forward(_moe(capacity_factor=float(E), shared_experts=1), x)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(s1["load"]), np.asarray(s0["load"]))


def _steered(m: MoE, prefs: list[int]) -> jax.Array:
  """Tokens x (1, N, D) whose top-1 expert is prefs[n] (router = identity on the first E
  dimensions, x = 5 * one-hot)."""
  r = np.zeros((D, E), np.float32)
  r[:E, :E] = np.eye(E)
  m.router[...] = jnp.asarray(r)
  x = np.zeros((1, len(prefs), D), np.float32)
  x[0, np.arange(len(prefs)), prefs] = 5.0
  return jnp.asarray(x)


@pytest.mark.slow  # compiles MoE forwards
def test_dropped_counts_hand_case():
  # 8 tokens, top-1, capacity ceil(1.0 * 8 / 4) = 2 slots per expert. Expert 0 is wanted by
  # tokens 0, 1, 2, 4, 5 (token 1 is padding, so it goes last): 0 and 2 fit, 4 and 5 drop
  # (2 counted drops; padding's drop is not counted). Expert 1: tokens 3, 6 fit; expert 3: 7.
  assert capacity(8, 1, E, 1.0) == 2
  m = _moe(top_k=1, capacity_factor=1.0)
  x = _steered(m, [0, 0, 0, 1, 0, 0, 1, 3])
  valid = jnp.asarray([[True, False, True, True, True, True, True, True]])
  y, stats = _forward(m, x, valid)
  assert float(stats["dropped"]) == 2.0
  assert float(stats["assigned"]) == 7.0
  np.testing.assert_array_equal(np.asarray(stats["load"]), [4, 2, 0, 1])  # valid tokens only
  zero = np.abs(np.asarray(y[0])).sum(-1) == 0  # dropped tokens get no expert output
  np.testing.assert_array_equal(zero, [False, True, False, False, True, True, False, False])
  # Dropless keeps everyone.
  y2, s2 = _forward(m, x, valid, dropless=True)
  assert float(s2["dropped"]) == 0.0 and np.all(np.abs(np.asarray(y2[0])).sum(-1) > 0)


@pytest.mark.slow  # compiles MoE forwards
def test_first_choices_before_second_choices():
  # top-2, 4 tokens, capacity ceil(0.5 * 4 * 2 / 4) = 1: every token's first choice (its
  # own expert) is served before any second choice, so all 4 second choices drop.
  m = _moe(top_k=2, capacity_factor=0.5)
  x = _steered(m, [0, 1, 2, 3])
  _, stats = _forward(m, x)
  assert float(stats["dropped"]) == 4.0 and float(stats["assigned"]) == 8.0


@pytest.mark.slow  # compiles MoE forwards
def test_router_gets_gradient_through_output_and_losses():
  m = _moe()
  graphdef, params = nnx.split(m, nnx.Param)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, D)), jnp.float32)

  def out_only(p):
    return jnp.sum(nnx.merge(graphdef, p).forward(x)[0] ** 2)

  def balance_only(p):
    return nnx.merge(graphdef, p).forward(x)[1]["balance"]

  for f in (out_only, balance_only):
    g = jax.jit(jax.grad(f))(params)
    assert float(jnp.abs(g["router"][...]).max()) > 0


@pytest.mark.slow  # compiles MoE forwards
def test_balance_loss_is_one_for_uniform_routing_and_larger_otherwise():
  m = _moe(top_k=1)
  x = _steered(m, [0, 1, 2, 3, 3, 2, 1, 0])  # every expert gets 2 of 8 tokens
  stats = _forward(m, x)[1]
  np.testing.assert_allclose(float(stats["balance"]), 1.0, rtol=1e-6)
  stacked = jax.tree.map(lambda a: a[None], stats)
  losses, metrics = aux_sums(stacked, m.cfg, jnp.float32(8))
  coef = m.cfg.moe.aux_loss_coef
  np.testing.assert_allclose(float(losses["moe_balance_sum"]) / 8, coef, rtol=1e-6)
  assert float(metrics["moe_load_cv_sum"]) == 0.0
  skewed = _forward(m, _steered(m, [0, 0, 0, 0, 0, 0, 1, 2]))[1]
  assert float(skewed["balance"]) > 1.5


def test_load_metrics_match_numpy():
  load = np.array([[4.0, 2.0, 0.0, 2.0], [1.0, 1.0, 3.0, 3.0]], np.float32)
  stats = {"balance": jnp.ones(2), "z": jnp.ones(2), "load": jnp.asarray(load),
           "dropped": jnp.asarray([1.0, 2.0]), "assigned": jnp.asarray([4.0, 16.0]),
           "bias_grad": jnp.zeros(2)}
  _, m = aux_sums(stats, CFG, jnp.float32(10))
  mean = load.mean(-1, keepdims=True)
  np.testing.assert_allclose(float(m["moe_load_cv_sum"]) / 10,
                             np.mean(load.std(-1) / mean[:, 0]), rtol=1e-6)
  np.testing.assert_allclose(float(m["moe_load_max_sum"]) / 10, 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(m["moe_load_min_sum"]) / 10, 0.0, atol=1e-7)
  # Dropped over assigned, pooled over the layers: 3 of 20.
  np.testing.assert_allclose(float(m["moe_dropped_sum"]) / 10, 3 / 20, rtol=1e-6)


@pytest.mark.slow  # compiles MoE forwards
def test_sigmoid_router_bias_steers_and_gets_balancing_gradient():
  m = _moe(top_k=1, router="sigmoid")
  x = _steered(m, [0, 0, 0, 0, 0, 0, 1, 2])
  m.router_bias[...] = jnp.asarray([0.0, 0.0, 0.0, 2.0])  # +2 beats sigmoid(5) - sigmoid(0)
  _, idx, _ = route(jnp.einsum("ND,DE->NE", x[0], m.router[...]), 1, "sigmoid",
                    m.router_bias[...])
  assert np.all(np.asarray(idx) == 3)
  m.router_bias[...] = jnp.zeros(E)
  graphdef, params = nnx.split(m, nnx.Param)
  g = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).forward(x)[1]["bias_grad"]))(params)
  # d/d(bias) = load share - 1/E: expert 0 (6 of 8) is pushed down, idle 3 pushed up.
  np.testing.assert_allclose(np.asarray(g["router_bias"][...]),
                             [6 / 8 - 0.25, 1 / 8 - 0.25, 1 / 8 - 0.25, -0.25], atol=1e-6)


def _exp(**over):
  c = base_config()
  c.model.moe.num_experts = 8
  for k, v in over.items():
    section, _, field = k.rpartition(".")
    node = c
    for part in section.split("."):
      node = node[part]
    node[field] = v
  return from_config_dict(c)


@pytest.mark.parametrize("over, field", [
    ({"model.moe.top_k": 9}, "model.moe.top_k"),
    ({"model.moe.capacity_factor": -1.0}, "model.moe.capacity_factor"),
    ({"mesh.expert": 3, "mesh.data": 1}, "model.moe.num_experts"),
    ({"mesh.pipeline": 2}, "mesh.pipeline"),
    ({"model.use_bias": True}, "model.use_bias"),
    ({"model.moe.every_n_layers": 3}, "model.moe.every_n_layers"),
    ({"model.quant": "int8"}, "model.quant"),
    ({"peft.method": "lora"}, "peft.method"),
])
def test_bad_config_fails_with_one_sentence(over, field):
  with pytest.raises(ConfigError) as e:
    _exp(**over)
  msg = str(e.value)
  assert field in msg and msg.count(". ") == 0, msg


def test_good_config_passes():
  exp = _exp(**{"mesh.expert": 4, "model.moe.capacity_factor": 1.25})
  assert exp.model.moe.num_experts == 8 and exp.model.moe.capacity_factor == 1.25
