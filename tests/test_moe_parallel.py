"""Expert parallelism on 8 fake CPU devices: the experts' PartitionSpecs (a snapshot written
out by hand from the rules table), and 5 training steps on expert=4 x data=2 and
expert=4 x fsdp=2 against one device (dropless, so nothing depends on the token split)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.config import MeshConfig, ModelConfig, MoEConfig, TrainConfig
from lmx.model import Transformer
from lmx.parallel.mesh import make_mesh, make_rules, use_mesh
from lmx.parallel.zero import train_state_shardings
from lmx.train.optimizer import make_optimizer
from lmx.train.state import create_train_state, init_train_state
from lmx.train.step import jit_train_step, make_train_step

from conftest import random_lm_batches  # noqa: E402

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2))
TRAIN = TrainConfig(steps=50, warmup_steps=2, learning_rate=1e-2, grad_clip=1.0)
B, T = 8, 16

# Expert weights: w_up/w_gate (L=2, E=4, D=32, F=128), w_down (L, E, F, D), router (L, D, E).
LAYOUTS = {
    "expert_data": (MeshConfig(data=2, expert=4), {
        "w_up": P(None, "expert"), "w_gate": P(None, "expert"),
        "w_down": P(None, "expert"), "router": P()}),
    "expert_fsdp": (MeshConfig(data=1, fsdp=2, expert=4), {
        "w_up": P(None, "expert", "fsdp"), "w_gate": P(None, "expert", "fsdp"),
        "w_down": P(None, "expert", None, "fsdp"), "router": P(None, "fsdp")}),
}


def _norm(spec) -> tuple:
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return tuple(parts)


def _mlp_specs(params_shardings) -> dict:
  mlp = params_shardings["layers"]["block"]["mlp"]
  return {k: _norm(getattr(mlp[k], "sharding", mlp[k]).spec) for k in LAYOUTS["expert_data"][1]}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_expert_partition_spec_snapshot(layout):
  mesh_cfg, want = LAYOUTS[layout]
  opt = make_optimizer(TRAIN)
  abstract = jax.eval_shape(lambda: create_train_state(
      nnx.state(Transformer(MODEL, rngs=nnx.Rngs(0)), nnx.Param), opt, TRAIN, 1))
  sh = train_state_shardings(abstract, make_mesh(mesh_cfg), 0, make_rules(mesh_cfg))
  assert _mlp_specs(sh.params) == {k: _norm(v) for k, v in want.items()}


def _batches(n):
  return random_lm_batches(n, MODEL.vocab_size, B, T)


def _train(mesh_cfg, n_devices, steps=5):
  mesh = make_mesh(mesh_cfg, jax.devices()[:n_devices])
  opt = make_optimizer(TRAIN)
  losses, metrics = [], []
  with use_mesh(mesh, make_rules(mesh_cfg)):
    graphdef, rest, state = init_train_state(lambda rngs: Transformer(MODEL, rngs=rngs), opt,
                                             TRAIN, 0, mesh)
    step = jit_train_step(make_train_step(graphdef, rest, opt, TRAIN), state, mesh, TRAIN)
    batches = _batches(steps)
    hlo = step.lower(state, batches[0]).as_text()  # StableHLO: no second compile
    for b in batches:
      state, m = step(state, b)
      losses.append(float(m["loss"]))
      metrics.append({k: float(v) for k, v in m.items() if k.startswith("moe_")})
  return state, losses, metrics, hlo


@pytest.fixture(scope="module")
def one_device():
  return _train(MeshConfig(data=1), 1)


@pytest.mark.slow  # compiles one train step per layout
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_expert_parallel_trains_like_one_device(layout, one_device):
  mesh_cfg, want = LAYOUTS[layout]
  state, losses, metrics, hlo = _train(mesh_cfg, 8)
  _, ref_losses, ref_metrics, ref_hlo = one_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert len(set(losses)) == len(losses)  # it trained
  for got, ref in zip(metrics, ref_metrics):  # balance, z, load: global, not per device
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-6)
  assert "all_to_all" in hlo and "all_to_all" not in ref_hlo  # the dispatch is an all-to-all
  assert _mlp_specs(state.params) == {k: _norm(v) for k, v in want.items()}  # really laid out
