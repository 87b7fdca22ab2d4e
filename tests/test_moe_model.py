"""MoE in the model: parameter/active accounting against the real tree (presets and
variants), the Mixtral-8x7B figures, decode == forward, and the aux sums reaching the
train step's loss and metrics."""

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ModelConfig, MoEConfig, TrainConfig, from_config_dict
from lmx.model import Transformer, count_model_params
from lmx.scaling import accounting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(arg):
  spec = importlib.util.spec_from_file_location("moe", os.path.join(ROOT, "experiments",
                                                                     "moe.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return from_config_dict(mod.get_config(arg))


SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                    max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2))
VARIANTS = {
    "every_layer": {},
    "every_2nd_shared_sigmoid": dict(every_n_layers=2, shared_experts=1, router="sigmoid"),
    "every_4th_d_ff": dict(every_n_layers=4, d_ff=24, top_k=1),
}


def _variant(name, **model):
  return dataclasses.replace(SMALL, moe=dataclasses.replace(SMALL.moe, **VARIANTS[name]),
                             **model)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_count_params_equals_tree(name):
  for cfg in (_variant(name), _variant(name, mlp="gelu", tie_embeddings=False)):
    tree = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert count_model_params(tree) == accounting.count_params(cfg).params


@pytest.mark.parametrize("arg", ["moe", "dense", "dropless", "mixtral_8x7b"])
def test_presets_count_equals_tree(arg):
  cfg = _experiment(arg).model
  tree = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  assert count_model_params(tree) == accounting.count_params(cfg).params


def test_active_params_by_hand():
  # every 2nd of 4 layers is MoE: 2 dense layers, 2 MoE layers with 4 experts of F = 96,
  # top-2, one shared expert, sigmoid router (E weights + E biases per layer).
  cfg = _variant("every_2nd_shared_sigmoid")
  d, f = 32, cfg.ff_dim
  attn = d * 4 * 8 + 2 * d * 2 * 8 + 4 * 8 * d
  expert = 3 * d * f
  dense = attn + expert + 2 * d
  moe_common = attn + 2 * d + d * 4 + 4 + expert  # + the shared expert
  pc = accounting.count_params(cfg)
  assert pc.params == 64 * d + 2 * dense + 2 * (moe_common + 4 * expert) + d
  assert pc.active_params == 64 * d + 2 * dense + 2 * (moe_common + 2 * expert) + d
  assert pc.active_non_embedding_params == pc.active_params - 64 * d
  assert accounting.flops_per_token(cfg, 16) == (
      6 * (pc.active_non_embedding_params + d * 64) + 6 * 4 * 16 * 4 * 8)
  dense_cfg = dataclasses.replace(cfg, moe=MoEConfig())
  assert accounting.count_params(dense_cfg).active_params == accounting.count_params(
      dense_cfg).params


def test_mixtral_8x7b_figures():
  cfg = _experiment("mixtral_8x7b").model
  assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ff_dim, cfg.vocab_size,
          cfg.tie_embeddings, cfg.moe.num_experts, cfg.moe.top_k) == (
              4096, 32, 32, 8, 14336, 32000, False, 8, 2)
  pc = accounting.count_params(cfg)
  assert pc.params == 46_702_792_704  # Mixtral-8x7B's published tensor sizes
  assert pc.active_params == 12_879_925_248  # ~12.9B per token (2 of 8 experts)


def test_cpu_preset_matches_dense_twin_in_active_params():
  moe, dense = (accounting.count_params(_experiment(a).model) for a in ("moe", "dense"))
  assert moe.active_params - dense.active_params == 3 * 128 * 8  # the routers only
  assert moe.params > 2 * dense.params


def _batch(b=2, t=8, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, 64, size=(b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[1, -3:] = 0  # padding at the end of row 1
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "segment_ids": seg, "loss_mask": (seg != 0).astype(np.float32)}


@pytest.mark.slow  # compiles forward and decode
@pytest.mark.parametrize("name", ["every_layer", "every_2nd_shared_sigmoid"])
def test_decode_equals_forward(name):
  cfg = _variant(name)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  toks = jnp.asarray(_batch()["inputs"])
  full = nnx.jit(lambda m, t: m(t))(model, toks)
  cache = model.init_cache(2, 16)
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
  first, cache = decode(model, toks[:, :5], pos[:, :5], cache)
  rest, _ = decode(model, toks[:, 5:], pos[:, 5:], cache)
  np.testing.assert_allclose(np.concatenate([first, rest], 1), full, atol=2e-5)


@pytest.mark.slow  # compiles a train step
def test_aux_losses_reach_the_train_step():
  from lmx.train.objectives import lm_sums
  from lmx.train.optimizer import make_optimizer
  from lmx.train.state import create_train_state
  from lmx.train.step import make_train_step
  cfg = _variant("every_2nd_shared_sigmoid")
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, aux_loss_coef=0.5,
                                                         capacity_factor=0.5))
  train = TrainConfig(steps=10, warmup_steps=1, learning_rate=1e-2)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  # The reference: the model's own pieces, computed outside the step.
  ce, aux, metrics = jax.jit(lambda p: (lambda m: (lm_sums(m, batch), m.aux_losses(),
                                                   m.aux_metrics()))(
      nnx.merge(graphdef, p, rest)))(params)
  n = float(jnp.sum(batch["loss_mask"]))
  opt = make_optimizer(train)
  step = jax.jit(make_train_step(graphdef, rest, opt, train))
  _, m = step(create_train_state(params, opt, train, 0), batch)
  want = (float(ce["ce_sum"]) + float(aux["moe_balance_sum"]) +
          float(aux["moe_router_z_sum"])) / n
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
  for k in ("moe_balance", "moe_router_z", "moe_dropped", "moe_load_cv", "moe_load_max",
            "moe_load_min"):
    src = aux if k + "_sum" in aux else metrics
    np.testing.assert_allclose(float(m[k]), float(src[k + "_sum"]) / n, rtol=1e-5)
  assert 0 < float(m["moe_dropped"]) < 1  # capacity 0.5 drops some
