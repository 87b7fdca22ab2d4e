"""Every parallel layout on 8 fake CPU devices: the state's PartitionSpecs, written out by
hand per layout (a snapshot a reader can check against the rules table and the ZeRO
stages), and the training losses against one device.

Model: vocab 64, d_model 32, 2 stacked layers, 4 heads of 8, 2 KV heads, SwiGLU 128.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.config import MeshConfig, ModelConfig, TrainConfig
from lmx.model import Transformer
from lmx.parallel.mesh import make_mesh, make_rules, use_mesh
from lmx.parallel.zero import train_state_shardings
from lmx.train.optimizer import make_optimizer
from lmx.train.state import create_train_state, init_train_state
from lmx.train.step import jit_train_step, make_train_step

from conftest import random_lm_batches  # noqa: E402

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=16)
TRAIN = TrainConfig(steps=50, warmup_steps=2, learning_rate=1e-2, grad_clip=1.0)
B, T = 8, 16

PARAMS = ("embed", "final_norm.scale", "attn.wk", "attn.wo", "attn.wq", "attn.wv",
          "attn_norm.scale", "mlp.w_down", "mlp.w_gate", "mlp.w_up", "mlp_norm.scale")
# Shapes: embed (64, 32); final_norm (32,); wk/wv (L=2, 32, 2, 8); wo (2, 4, 8, 32);
# wq (2, 32, 4, 8); norms (2, 32); w_down (2, 128, 32); w_gate/w_up (2, 32, 128).

REPLICATED = {k: P() for k in PARAMS}
FSDP = {"embed": P(None, "fsdp"), "final_norm.scale": P("fsdp"),
        "attn.wk": P(None, "fsdp"), "attn.wo": P(None, None, None, "fsdp"),
        "attn.wq": P(None, "fsdp"), "attn.wv": P(None, "fsdp"),
        "attn_norm.scale": P(None, "fsdp"), "mlp.w_down": P(None, None, "fsdp"),
        "mlp.w_gate": P(None, "fsdp"), "mlp.w_up": P(None, "fsdp"),
        "mlp_norm.scale": P(None, "fsdp")}
TENSOR = {"embed": P("tensor"), "final_norm.scale": P(),  # vocab is column-split
          "attn.wk": P(None, None, "tensor"), "attn.wo": P(None, "tensor"),  # heads split
          "attn.wq": P(None, None, "tensor"), "attn.wv": P(None, None, "tensor"),
          "attn_norm.scale": P(), "mlp.w_down": P(None, "tensor"),  # row-parallel
          "mlp.w_gate": P(None, None, "tensor"), "mlp.w_up": P(None, None, "tensor"),
          "mlp_norm.scale": P()}
FSDP_TENSOR = {"embed": P("tensor", "fsdp"), "final_norm.scale": P("fsdp"),
               "attn.wk": P(None, "fsdp", "tensor"), "attn.wo": P(None, "tensor", None, "fsdp"),
               "attn.wq": P(None, "fsdp", "tensor"), "attn.wv": P(None, "fsdp", "tensor"),
               "attn_norm.scale": P(None, "fsdp"), "mlp.w_down": P(None, "tensor", "fsdp"),
               "mlp.w_gate": P(None, "fsdp", "tensor"), "mlp.w_up": P(None, "fsdp", "tensor"),
               "mlp_norm.scale": P(None, "fsdp")}
# ZeRO over data=8: each leaf gains 'data' on its largest dimension divisible by 8.
ZERO_SHARDED = {"embed": P("data"), "final_norm.scale": P("data"),
                "attn.wk": P(None, "data"), "attn.wo": P(None, None, None, "data"),
                "attn.wq": P(None, "data"), "attn.wv": P(None, "data"),
                "attn_norm.scale": P(None, "data"), "mlp.w_down": P(None, "data"),
                "mlp.w_gate": P(None, None, "data"), "mlp.w_up": P(None, None, "data"),
                "mlp_norm.scale": P(None, "data")}

# Pipeline: each stacked layer parameter splits its leading L axis over `pipeline` (stage s
# holds layers [s L/p, (s+1) L/p)); the embedding and final norm are replicated.
PIPELINE = {k: (P() if k in ("embed", "final_norm.scale") else P("pipeline")) for k in PARAMS}

# name -> (mesh, zero_stage, param specs, Adam moment specs)
LAYOUTS = {
    "data": (MeshConfig(data=8), 0, REPLICATED, REPLICATED),
    "fsdp": (MeshConfig(data=1, fsdp=8), 0, FSDP, FSDP),
    "data_tensor": (MeshConfig(data=4, tensor=2), 0, TENSOR, TENSOR),
    "fsdp_tensor": (MeshConfig(data=1, fsdp=4, tensor=2), 0, FSDP_TENSOR, FSDP_TENSOR),
    "zero1": (MeshConfig(data=8), 1, REPLICATED, ZERO_SHARDED),
    "zero2": (MeshConfig(data=8), 2, REPLICATED, ZERO_SHARDED),
    "zero3": (MeshConfig(data=8), 3, ZERO_SHARDED, ZERO_SHARDED),
    "pipeline2": (MeshConfig(data=4, pipeline=2), 0, PIPELINE, PIPELINE),
}


def _norm(spec: P) -> tuple:
  """A spec without trailing Nones (P(None, None) and P() are the same layout)."""
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return tuple(parts)


def _keys(path) -> list[str]:
  """Path keys as strings, without the Variable's own node (an array's path runs through
  its nnx.Variable, a sharding's does not)."""
  keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return keys[:-1] if keys and keys[-1] in ("value", "raw_value") else keys


def _param_name(path) -> str | None:
  keys = _keys(path)
  for name in PARAMS:
    if keys[-len(name.split(".")):] == name.split("."):
      return name
  return None


def _specs_by_name(shardings):
  """{('params'|'mu'|'nu', param name): spec} from a TrainState-shaped tree of shardings."""
  out = {}
  for path, sh in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    keys = _keys(path)
    name = _param_name(path)
    if name is None:
      assert _norm(sh.spec) == (), (keys, sh.spec)  # scalars: step, counts, loss scale
      continue
    kind = "params" if keys[0] == "params" else "mu" if "mu" in keys else "nu"
    out[(kind, name)] = _norm(sh.spec)
  return out


def _abstract_state(train):
  opt = make_optimizer(train)
  return jax.eval_shape(lambda: create_train_state(
      nnx.state(Transformer(MODEL, rngs=nnx.Rngs(0)), nnx.Param), opt, train, 1))


def _expected(params, moments):
  want = {("params", k): _norm(v) for k, v in params.items()}
  want.update({(m, k): _norm(v) for k, v in moments.items() for m in ("mu", "nu")})
  return want


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_partition_spec_snapshot(layout):
  mesh_cfg, stage, params, moments = LAYOUTS[layout]
  train = dataclasses.replace(TRAIN, zero_stage=stage)
  sh = train_state_shardings(_abstract_state(train), make_mesh(mesh_cfg), stage)
  assert _specs_by_name(sh) == _expected(params, moments)


def _batches(n):
  return random_lm_batches(n, MODEL.vocab_size, B, T)


def _train(mesh_cfg, train, n_devices, steps=5):
  mesh = make_mesh(mesh_cfg, jax.devices()[:n_devices])
  opt = make_optimizer(train)
  losses = []
  with use_mesh(mesh, make_rules(mesh_cfg)):
    graphdef, rest, state = init_train_state(lambda rngs: Transformer(MODEL, rngs=rngs), opt,
                                             train, 0, mesh)
    step = jit_train_step(make_train_step(graphdef, rest, opt, train), state, mesh, train)
    for b in _batches(steps):
      state, m = step(state, b)
      losses.append(float(m["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def single_device_losses():
  return _train(MeshConfig(data=1), TRAIN, 1)[1]


@pytest.mark.slow  # compiles one train step per layout
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_trains_like_one_device(layout, single_device_losses):
  mesh_cfg, stage, params, moments = LAYOUTS[layout]
  state, losses = _train(mesh_cfg, dataclasses.replace(TRAIN, zero_stage=stage), 8)
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
  assert len(set(losses)) == len(losses)  # it trained: the loss moved every step
  # The arrays really are laid out as the snapshot says (not just the planned shardings).
  actual = jax.tree.map(lambda x: x.sharding, state)
  assert _specs_by_name(actual) == _expected(params, moments)


@pytest.mark.slow
def test_zero2_with_accumulation_and_offload(single_device_losses):
  """ZeRO-2's reduce-scattered gradient sum through the accumulation scan, and the
  optimizer state kept in pinned host memory (ZeRO-Offload; on CPU the same RAM)."""
  train = dataclasses.replace(TRAIN, zero_stage=2, grad_accum_steps=2,
                              optimizer_memory="pinned_host")
  state, losses = _train(MeshConfig(data=4, fsdp=2), train, 8)
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
  assert kinds == {"pinned_host"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {"device"}


@pytest.mark.slow
def test_sequence_parallel_rules_train_like_one_device(single_device_losses):
  """mesh.rules='sequence_parallel' splits activations' sequence dimension over `tensor`
  (parameters as in the default table): same losses, activations really split."""
  mesh_cfg = MeshConfig(data=4, tensor=2, rules="sequence_parallel")
  _, losses = _train(mesh_cfg, TRAIN, 8)
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
  from lmx.parallel.mesh import named_sharding
  sh = named_sharding(("batch", "seq", "embed"), make_mesh(mesh_cfg), make_rules(mesh_cfg))
  assert _norm(sh.spec) == ("data", "tensor")
