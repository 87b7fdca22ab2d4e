"""The layer stack: stacked parameters and their shardings, scan == unrolled == a plain loop
over layers, slices compose (the pipeline property), flat compiled size, stack-aware decay."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.config import MeshConfig, ModelConfig
from lmx.model import Transformer
from lmx.model.stack import run_layers
from lmx.parallel.mesh import make_mesh, state_shardings, use_mesh
from lmx.train.optimizer import decay_mask


def tiny(**kw) -> ModelConfig:
  # init_std 0.2: each layer changes the residual stream enough for order to show.
  base = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16,
              init_std=0.2)
  base.update(kw)
  return ModelConfig(**base).validate()


def _tokens(shape, seed=0, vocab=61):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


def _inputs(b=2, t=12, d=32, seed=0):
  """Hidden states (B, T, D), positions and two packed segments per row."""
  x = jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) % 7, (b, t))
  segment_ids = jnp.broadcast_to(jnp.where(jnp.arange(t) < 7, 1, 2).astype(jnp.int32), (b, t))
  return x, positions, segment_ids


def _layer(state, i):
  return jax.tree.map(lambda a: a[i], state)


def _loop_reference(graphdef, state, x, positions, segment_ids):
  """The stack as a plain Python loop: layer i's Block merged from slice i, called in turn."""
  for i in range(jax.tree.leaves(state)[0].shape[0]):
    x = nnx.merge(graphdef, _layer(state, i))(x, positions, segment_ids)
  return x


def test_stacked_params_lead_with_layers_axis_and_name():
  cfg = tiny(use_bias=True, norm="layernorm")
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  stacked = nnx.state(model.layers, nnx.Param)
  leaves = jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert len(leaves) == 18  # attention 8, gated MLP 6, two LayerNorms 4: each once
  for p in leaves:
    names = p.get_metadata()["out_sharding"]
    assert p.get_value().shape[0] == cfg.n_layers
    assert names[0] == "layers" and "layers" not in names[1:]
    assert len(names) == p.get_value().ndim
  assert stacked["block"]["attn"]["wq"].get_value().shape == (4, 32, 4, 8)  # (L, D, N, H)
  assert stacked["block"]["mlp_norm"]["scale"].get_value().shape == (4, 32)
  # Layers outside the stack have no 'layers' axis.
  assert model.embed.get_metadata()["out_sharding"] == ("vocab", "embed")

  # The rules put 'layers' on the pipeline mesh axis (dropped when that axis has size 1).
  params = nnx.state(model, nnx.Param)
  piped = state_shardings(params, make_mesh(MeshConfig(data=2, pipeline=2, tensor=2)))
  blk = piped["layers"]["block"]
  assert blk["attn"]["wq"].spec == P("pipeline", None, "tensor", None)
  assert blk["mlp"]["w_down"].spec == P("pipeline", "tensor", None)
  assert blk["attn_norm"]["scale"].spec == P("pipeline", None)
  assert piped["embed"].spec == P("tensor", None)
  flat = state_shardings(params, make_mesh(MeshConfig(data=8)))
  assert flat["layers"]["block"]["attn"]["wq"].spec == P(None, None, None, None)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_scan_unrolled_and_loop_agree_values_and_grads():
  """(Remat variants against no remat: tests/test_model.py, for both stack modes.)"""
  cfg = tiny(n_layers=3)
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)).layers.block)
  x, positions, segment_ids = _inputs(t=10)

  def loss(fn):
    def f(state, x):
      y = fn(state, x)
      return jnp.sum(y * jnp.cos(y)), y  # a loss whose gradient depends on y nonlinearly
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  ref = loss(lambda s, x: _loop_reference(graphdef, s, x, positions, segment_ids))
  (_, want), want_g = ref(state, x)
  for unroll in (False, True):
    run = loss(lambda s, x: run_layers(graphdef, s, x, positions, segment_ids, unroll=unroll))
    (_, got), got_g = run(state, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-6), got_g, want_g)
  assert float(jnp.abs(want - x).max()) > 0.1  # the layers did something


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_model_scan_equals_unrolled_logits_and_grads():
  # Every optional parameter (biases, LayerNorm bias, untied head) and the post-LN wiring.
  kw = dict(norm_position="post", norm="layernorm", use_bias=True, mlp="gelu",
            tie_embeddings=False)
  tokens = _tokens((2, 9), seed=1)

  def logits_and_grads(scan):
    model = Transformer(tiny(scan_layers=scan, n_layers=3, **kw), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def f(p):
      logits = nnx.merge(graphdef, p)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits

    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (loss_s, logits_s), grads_s = logits_and_grads(True)
  (loss_u, logits_u), grads_u = logits_and_grads(False)
  np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_u), rtol=1e-5, atol=1e-5)
  assert float(loss_s) == pytest.approx(float(loss_u), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-5, atol=1e-6), grads_s, grads_u)
  # Each layer has its own weights and its own (nonzero) gradient.
  g = np.asarray(grads_s["layers"]["block"]["attn"]["wq"][...])  # (L, D, N, H)
  assert g.shape[0] == 3 and all(np.abs(g[i]).max() > 0 for i in range(3))
  model = Transformer(tiny(n_layers=3, **kw), rngs=nnx.Rngs(0))
  wq = np.asarray(model.layers.block.attn.wq.get_value())
  assert not np.allclose(wq[0], wq[1]) and not np.allclose(wq[1], wq[2])


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_slices_compose_like_the_whole_stack():
  """A pipeline stage runs its own slice [i:j] of the layers axis: [0:k] then [k:L] is
  [0:L], and so are four one-layer stages."""
  graphdef, state = nnx.split(Transformer(tiny(), rngs=nnx.Rngs(0)).layers.block)
  x, positions, segment_ids = _inputs(seed=2)
  run = jax.jit(lambda s, x: run_layers(graphdef, s, x, positions, segment_ids))
  whole = np.asarray(run(state, x))
  ref = jax.jit(lambda s, x: _loop_reference(graphdef, s, x, positions, segment_ids))
  np.testing.assert_allclose(whole, np.asarray(ref(state, x)), rtol=1e-5, atol=1e-5)
  for k in (1, 3):  # slices of 1 and 3 layers: one compile each
    head = jax.tree.map(lambda a: a[:k], state)
    tail = jax.tree.map(lambda a: a[k:], state)
    np.testing.assert_allclose(np.asarray(run(tail, run(head, x))), whole, rtol=1e-5,
                               atol=1e-5)
  y = x
  for i in range(4):
    y = run(jax.tree.map(lambda a: a[i:i + 1], state), y)
  np.testing.assert_allclose(np.asarray(y), whole, rtol=1e-5, atol=1e-5)
  # Order matters: the slices in the other order give something else.
  swapped = run(jax.tree.map(lambda a: a[:1], state), run(jax.tree.map(lambda a: a[1:], state), x))
  assert not np.allclose(np.asarray(swapped), whole, atol=1e-3)


def _compiled_dots(cfg, tokens) -> int:
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  fwd = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens))
  return fwd.lower(state).compile().as_text().count(" dot(")


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_scanned_program_holds_one_layer_unrolled_holds_all():
  """What keeps compile time flat in depth: with the scan, XLA compiles one layer whatever
  L is; scan_layers=False unrolls it into L copies."""
  tokens = _tokens((1, 8))
  scan = [_compiled_dots(tiny(n_layers=n), tokens) for n in (2, 3)]
  unrolled = [_compiled_dots(tiny(n_layers=n, scan_layers=False), tokens) for n in (2, 3)]
  assert scan[0] == scan[1]
  assert unrolled[1] - unrolled[0] >= 9  # q, k, v, o, scores, values, gate, up, down
  assert unrolled[0] - scan[0] >= 9


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_sharded_over_pipeline_matches_single_device():
  """Stacked params split over the 'pipeline' mesh axis along L: same logits."""
  cfg = tiny(vocab_size=64, tie_embeddings=False)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens((4, 8), vocab=64)
  graphdef, state = nnx.split(model)
  want = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens))(state)
  mesh = make_mesh(MeshConfig(data=2, pipeline=2, tensor=2))
  state = jax.device_put(state, state_shardings(state, mesh))
  wq = state["layers"]["block"]["attn"]["wq"].get_value()
  assert wq.addressable_shards[0].data.shape == (2, 32, 2, 8)  # L and heads split

  @jax.jit
  def fwd(state, tokens):
    with use_mesh(mesh):
      return nnx.merge(graphdef, state)(tokens)

  np.testing.assert_allclose(np.asarray(fwd(state, tokens)), np.asarray(want), atol=1e-5)


def test_decay_mask_ignores_the_layers_axis():
  """A stack of norm scales is (L, D) but still a norm scale: no weight decay; a stack of
  matrices is decayed. Checked on the real model's parameter tree (abstract: shapes suffice)."""
  cfg = tiny(use_bias=True, norm="layernorm", tie_embeddings=False)
  params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  mask = nnx.to_pure_dict(decay_mask(params))
  blk = mask["layers"]["block"]
  assert not blk["attn_norm"]["scale"] and not blk["attn_norm"]["bias"]
  assert not blk["mlp_norm"]["scale"] and not blk["attn"]["bo"] and not blk["mlp"]["b_up"]
  assert blk["attn"]["wq"] and blk["mlp"]["w_down"]
  assert mask["embed"] and mask["lm_head"] and not mask["final_norm"]["scale"]
