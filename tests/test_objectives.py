"""Objectives as plug-ins of the one train step (lmx/train/objectives.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmx.config import MeshConfig, ModelConfig, TrainConfig
from lmx.model import Transformer
from lmx.parallel.mesh import make_mesh, use_mesh
from lmx.train.objectives import Objective, lm_objective
from lmx.train.optimizer import make_optimizer
from lmx.train.state import init_train_state
from lmx.train.step import batch_spec_for, jit_train_step, make_train_step, put_batch

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=16)
B, T = 8, 16
TRAIN = TrainConfig(steps=20, warmup_steps=2, learning_rate=1e-2, grad_clip=1.0,
                    loss_chunk_tokens=0)


def batch(seed):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, MODEL.vocab_size, size=(B, T + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          "segment_ids": np.ones((B, T), np.int32),
          "loss_mask": (rng.random((B, T)) > 0.2).astype(np.float32)}


def fresh(train=TRAIN, mesh=None):
  mesh = mesh or make_mesh(MeshConfig(data=1), jax.devices()[:1])
  opt = make_optimizer(train)
  with use_mesh(mesh):
    graphdef, rest, state = init_train_state(lambda r: Transformer(MODEL, rngs=r), opt, train,
                                             0, mesh)
  return mesh, opt, graphdef, rest, state


def reference_losses(n_steps):
  """The LM step written plainly: mean cross entropy by hand (log_softmax), jax.grad,
  the same optax chain. No lmx loss or step code."""
  _, opt, graphdef, rest, state = fresh()
  params, opt_state = state.params, state.opt_state

  def loss_fn(p, b):
    logits = nnx.merge(graphdef, p, rest)(b["inputs"], positions=b["positions"],
                                          segment_ids=b["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * b["loss_mask"]) / jnp.sum(b["loss_mask"])

  @jax.jit
  def step(p, o, b):
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    with jax.numpy_dtype_promotion("standard"):
      u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  out = []
  for i in range(n_steps):
    params, opt_state, loss = step(params, opt_state, batch(i % 2))
    out.append(float(loss))
  return out


@pytest.mark.slow  # compiles two train steps
def test_lm_through_the_plugin_matches_a_plain_step():
  mesh, opt, graphdef, rest, state = fresh()
  with use_mesh(mesh):
    step = jit_train_step(make_train_step(graphdef, rest, opt, TRAIN, lm_objective()), state,
                          mesh, TRAIN)
    got = []
    for i in range(5):
      state, m = step(state, batch(i % 2))
      got.append(float(m["loss"]))
  want = reference_losses(5)
  print("plug-in", got, "plain", want)
  assert got[-1] < got[0]  # it trains
  np.testing.assert_allclose(got, want, rtol=2e-6)


def weighted_objective() -> Objective:
  """Per-sequence weights (B,) -- a leaf that is not (batch, seq) -- and a normalizer that
  is not the token count: loss = sum_b w_b * ce_b / sum_b w_b * n_b."""
  def loss_fn(model, b, rngs=None):
    logits = model(b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
    w = b["weights"][:, None] * b["loss_mask"]
    return jnp.sum(nll * w), {"n_tokens": jnp.sum(b["loss_mask"])}

  return Objective("weighted", loss_fn, normalizer=lambda b: jnp.sum(
      b["weights"][:, None] * b["loss_mask"]), batch_names={"weights": ("batch",)})


@pytest.mark.slow  # compiles the step on 4 devices
def test_custom_objective_per_leaf_sharding_and_normalizer():
  """A custom objective with a (B,) input, sharded over the batch on data=4: its loss is the
  hand-normalized value (numpy from the model's logits) and it trains."""
  obj = weighted_objective()
  b0 = batch(0)
  b0["weights"] = np.linspace(0.5, 2.0, B).astype(np.float32)
  mesh, opt, graphdef, rest, state = fresh(mesh=make_mesh(MeshConfig(data=4), jax.devices()[:4]))
  spec = batch_spec_for(obj, b0)
  assert spec["weights"] == ("batch",) and spec["inputs"] == ("batch", "seq")
  logits = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p, rest)(
      b0["inputs"], positions=b0["positions"]))(state.params), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, b0["targets"][..., None], -1)[..., 0]
  w = b0["weights"][:, None] * b0["loss_mask"]
  hand = float((nll * w).sum() / w.sum())
  with use_mesh(mesh):
    step = jit_train_step(make_train_step(graphdef, rest, opt, TRAIN, obj), state, mesh, TRAIN,
                          spec)
    out = []
    for _ in range(3):
      state, m = step(state, put_batch(b0, mesh, spec))
      out.append(float(m["loss"]))
    assert float(m["tokens"]) == float(b0["loss_mask"].sum())
    assert state.params["embed"][...].sharding.mesh.size == 4
  np.testing.assert_allclose(out[0], hand, rtol=1e-5)
  assert out[2] < out[0]


@pytest.mark.slow  # differentiates the model
def test_masked_targets_contribute_zero_loss_and_gradient():
  """An SFT batch: changing the target ids where loss_mask is 0 (prompt, system, tool
  output) leaves the loss sum and every gradient exactly unchanged; changing one counted
  target does not."""
  _, _, graphdef, rest, state = fresh()
  obj = lm_objective()
  b = {k: jnp.asarray(v) for k, v in batch(3).items()}
  mask = np.asarray(b["loss_mask"])

  grad_fn = jax.jit(jax.value_and_grad(lambda p, targets: obj.loss_fn(
      nnx.merge(graphdef, p, rest), {**b, "targets": targets}, None)[0]))

  def loss_and_grad(targets):
    return grad_fn(state.params, targets)

  loss, g = loss_and_grad(b["targets"])
  other = np.where(mask == 0, (np.asarray(b["targets"]) + 7) % MODEL.vocab_size,
                   np.asarray(b["targets"]))
  assert (other != np.asarray(b["targets"])).sum() == (mask == 0).sum() > 0
  loss2, g2 = loss_and_grad(jnp.asarray(other, jnp.int32))
  assert float(loss2) == float(loss)
  for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  counted = np.argwhere(mask == 1)[0]
  changed = np.asarray(b["targets"]).copy()
  changed[tuple(counted)] = (changed[tuple(counted)] + 1) % MODEL.vocab_size
  loss3, _ = loss_and_grad(jnp.asarray(changed))
  assert float(loss3) != float(loss)
