"""The jitted train step: accumulation, sharding, overfitting, fp16 scaling, bad steps."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import MeshConfig, ModelConfig, TrainConfig
from lmx.model import Transformer
from lmx.parallel.mesh import make_mesh, use_mesh
from lmx.train.optimizer import make_optimizer
from lmx.train.state import init_train_state
from lmx.train.step import jit_train_step, make_train_step

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
B, T = 8, 16


def batch(seed=0, b=B, mask_inf=False):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, MODEL.vocab_size, size=(b, T + 1)).astype(np.int32)
  mask = (rng.random((b, T)) > 0.1).astype(np.float32)
  if mask_inf:
    mask[0, 0] = np.inf
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (b, T)).copy(),
          "segment_ids": np.ones((b, T), np.int32), "loss_mask": mask}


_CACHE = {}


def setup(train: TrainConfig, mesh_cfg=MeshConfig(data=1), n_devices=1, model=MODEL):
  """(mesh, fresh state, jitted step); compiled once per configuration and reused."""
  key = (train, mesh_cfg, n_devices, model)
  if key not in _CACHE:
    mesh = make_mesh(mesh_cfg, jax.devices()[:n_devices])
    opt = make_optimizer(train)
    with use_mesh(mesh):
      graphdef, rest, state = init_train_state(lambda rngs: Transformer(model, rngs=rngs), opt,
                                               train, 0, mesh)
      step = jit_train_step(make_train_step(graphdef, rest, opt, train), state, mesh, train)
    _CACHE[key] = (mesh, host(state), jax.tree.map(lambda x: x.sharding, state), step)
  mesh, state0, shardings, step = _CACHE[key]
  return mesh, jax.device_put(state0, shardings), step


def run(mesh, state, step, batches):
  losses = []
  with use_mesh(mesh):
    for b in batches:
      state, m = step(state, b)
      losses.append(float(m["loss"]))
  return state, losses


def host(tree):
  return jax.tree.map(np.asarray, tree)


TRAIN = TrainConfig(steps=50, warmup_steps=2, learning_rate=1e-2, grad_clip=1.0)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_grad_accumulation_equals_large_batch():
  b = batch(1)
  _, s1, step1 = setup(TRAIN)
  mesh, s4, step4 = setup(dataclasses.replace(TRAIN, grad_accum_steps=4))
  s1, l1 = run(mesh, s1, step1, [b, batch(2)])
  s4, l4 = run(mesh, s4, step4, [b, batch(2)])
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  for a, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-6)
  # The updates did something (so equality is not trivial).
  _, s0, _ = setup(TRAIN)
  assert not np.allclose(np.asarray(s0.params["embed"][...]), np.asarray(s1.params["embed"][...]))


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_chunked_loss_step_equals_full_logits_step():
  """train.loss_chunk_tokens only changes how the head+loss is computed, not the update."""
  bs = [batch(1), batch(2)]
  mesh, s_full, step_full = setup(dataclasses.replace(TRAIN, loss_chunk_tokens=0))
  _, s_chunk, step_chunk = setup(dataclasses.replace(TRAIN, loss_chunk_tokens=32))  # 4 pos.
  s_full, l_full = run(mesh, s_full, step_full, bs)
  s_chunk, l_chunk = run(mesh, s_chunk, step_chunk, bs)
  np.testing.assert_allclose(l_chunk, l_full, rtol=1e-6)
  for a, c in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(s_chunk.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-6)
  # The same chunked step on 8 devices (batch over data x fsdp, params over fsdp).
  mesh8, s8, step8 = setup(dataclasses.replace(TRAIN, loss_chunk_tokens=32),
                           MeshConfig(data=2, fsdp=4), 8)
  _, l8 = run(mesh8, s8, step8, bs)
  np.testing.assert_allclose(l8, l_full, rtol=1e-5)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_sharded_matches_single_device_and_params_are_sharded():
  assert jax.device_count() == 8
  batches = [batch(i) for i in range(3)]
  mesh1, s1, step1 = setup(TRAIN)
  _, l1 = run(mesh1, s1, step1, batches)
  mesh8, s8, step8 = setup(TRAIN, MeshConfig(data=2, fsdp=4), 8)
  s8, l8 = run(mesh8, s8, step8, batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # ('vocab', 'embed'): vocab -> tensor (size 1, dropped), embed -> fsdp.
  emb = s8.params["embed"][...]
  assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape == (64, 8)
  # The Adam moments share the params' layout.
  paths = jax.tree_util.tree_flatten_with_path(s8.opt_state)[0]
  moments = [x for p, x in paths if "embed" in jax.tree_util.keystr(p)]
  assert len(moments) == 2  # mu and nu
  assert all(m.sharding.spec == emb.sharding.spec for m in moments)


def test_tiny_model_overfits_one_batch():
  mesh, state, step = setup(TRAIN)  # shares the compiled step with the tests above
  b = batch(3)
  state, losses = run(mesh, state, step, [b] * 50)
  assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_nonfinite_step_leaves_state_unchanged_and_counts():
  mesh, state, step = setup(TRAIN)
  state, _ = run(mesh, state, step, [batch(0)])
  before = host(state)
  with use_mesh(mesh):
    state, m = step(state, batch(1, mask_inf=True))
  assert bool(m["bad_step"]) and bool(m["skipped"])
  after = host(state)
  for name in ("params", "opt_state", "step", "rng", "loss_scale"):
    for a, c in zip(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))):
      np.testing.assert_array_equal(a, c)
  assert int(after.consecutive_bad_steps) == 1 and int(after.total_bad_steps) == 1
  with use_mesh(mesh):
    state, m = step(state, batch(1, mask_inf=True))
    assert int(state.consecutive_bad_steps) == 2
    state, m = step(state, batch(2))
  assert not bool(m["bad_step"])
  assert int(state.consecutive_bad_steps) == 0 and int(state.total_bad_steps) == 2
  assert int(state.step) == 2


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_fp16_loss_scale_halves_on_overflow_and_skips_update():
  # A scale of 1e38 makes loss * scale overflow to inf in fp32 while the loss is finite.
  train = dataclasses.replace(TRAIN, precision="float16", loss_scale_init=1e38,
                              loss_scale_period=2)
  # NOTE: the model computes in float32 here: the loss-scale logic does not depend on it,
  # and XLA:CPU has no fp16 dot with fp32 accumulation.
  mesh, state, step = setup(train)
  before = host(state)
  with use_mesh(mesh):
    state, m = step(state, batch(0))
  assert bool(m["skipped"]) and not bool(m["bad_step"]) and np.isfinite(float(m["loss"]))
  np.testing.assert_allclose(float(state.loss_scale), 5e37, rtol=1e-6)
  for a, c in zip(jax.tree.leaves(before.params), jax.tree.leaves(host(state.params))):
    np.testing.assert_array_equal(a, c)
  assert int(state.step) == 0 and int(state.consecutive_bad_steps) == 0
  # Reset to a sane scale: two finite steps in a row double it (period=2).
  state = state.replace(loss_scale=jnp.float32(1024.0))
  with use_mesh(mesh):
    state, m1 = step(state, batch(1))
    assert float(state.loss_scale) == 1024.0 and int(state.good_steps) == 1
    state, m2 = step(state, batch(2))
  assert not bool(m1["skipped"]) and not bool(m2["skipped"])
  assert float(state.loss_scale) == 2048.0 and int(state.step) == 2


def _run_with_metrics(mesh, state, step, batches):
  out = []
  with use_mesh(mesh):
    for b in batches:
      state, m = step(state, b)
      out.append({k: float(m[k]) for k in ("loss", "grad_norm", "loss_scale")})
  return state, out


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("precision,loss_scale", [("bfloat16", 1.0), ("float16", 2.0**15)])
def test_low_precision_step_tracks_fp32(precision, loss_scale):
  """bf16 and fp16 compute (fp16 with dynamic loss scaling) on CPU: fp32 master weights and
  moments, losses and gradient norms close to the fp32 step's over a few steps, yet not
  identical to them (the compute really ran in low precision)."""
  batches = [batch(i) for i in range(4)]
  mesh, s32, step32 = setup(TRAIN)
  _, m32 = _run_with_metrics(mesh, s32, step32, batches)
  train = dataclasses.replace(TRAIN, precision=precision)
  _, slo, steplo = setup(train, model=dataclasses.replace(MODEL, dtype=precision))
  slo, mlo = _run_with_metrics(mesh, slo, steplo, batches)
  assert [m["loss_scale"] for m in mlo] == [loss_scale] * len(batches)  # no overflow seen
  for a, b in zip(mlo, m32):
    # The gradient norm is reported unscaled: a loss scale left in would be off by 2^15.
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=5e-2)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-2)
  assert any(a["loss"] != b["loss"] for a, b in zip(mlo, m32))
  assert int(slo.step) == len(batches)
  for leaf in jax.tree.leaves(slo.params) + jax.tree.leaves(slo.opt_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32  # master weights and Adam moments stay fp32


@pytest.mark.slow  # compiles a step: not in the 90 s fast set
@pytest.mark.parametrize("trainable", ["", "attn"])
def test_state_is_updated_in_place(trainable):
  """The donated state aliases the new one (frozen parameters included), and the compiled
  step copies none of it at the top: a skip written as where(ok, new, old) kept the old
  moments alive past the update, so XLA copied every one of them first."""
  train = dataclasses.replace(TRAIN, trainable=trainable)
  mesh, state, step = setup(train)
  with use_mesh(mesh):
    compiled = step.lower(state, batch(0)).compile()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert compiled.memory_analysis().alias_size_in_bytes == state_bytes
  hlo = compiled.as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  args = set(re.findall(r"%(\S+) = \S+ parameter\(\d+\)", entry))
  copied = [(name, shape) for shape, name in re.findall(r"= (\w+\[[\d,]*\])\S* copy\(%([^)]+)\)",
                                                        entry)
            if name in args and not shape.endswith("[]")]  # scalars are free
  assert not copied, copied
