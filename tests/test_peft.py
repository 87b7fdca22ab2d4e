"""PEFT (lmx.peft): zero-init methods (and added-token rows) start at the base model,
LoRA's update against numpy, merging LoRA / QLoRA is exact, bad targets fail in one
sentence, GPT-2's LoRA fraction by hand, and a jitted step per method that trains only the
`*_peft` modules (frozen base bitwise unchanged, Adam state for the adapters alone) and
checkpoints only them.

Slow part: one train-step compile per method, cached for the whole file (`setup`)."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import CheckpointConfig, ConfigError, MeshConfig, ModelConfig, PeftConfig, \
    TrainConfig
from lmx.model import Transformer
from lmx.parallel.mesh import make_mesh, use_mesh
from lmx.peft import LoRA, apply_peft, merge_lora, peft_counts, trainable_pattern
from lmx.peft.qlora import NF4Weight
from lmx.train.checkpoint import Checkpointer
from lmx.train.optimizer import make_optimizer
from lmx.train.state import plan_train_state
from lmx.train.step import jit_train_step, make_train_step
from lmx.train.trainable import check_pattern, count, join, saved_view, split_trainable

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  max_seq_len=16)
B, T = 4, 16
L, D, N, K, H, F = 2, 32, 4, 2, 8, CFG.ff_dim  # layers, width, heads, kv heads, head dim, MLP
PEFT = PeftConfig(targets="all", rank=4, alpha=12.0, num_virtual_tokens=4, adapter_dim=8,
                  quant_group=16)  # scale alpha / rank = 3: a dropped or inverted scale shows
ROOT = pathlib.Path(__file__).resolve().parents[1]


def peft(method: str, **kw) -> PeftConfig:
  return dataclasses.replace(PEFT, method=method, **kw)


def tokens(seed: int = 0) -> jax.Array:
  """(B, T) random ids, ending in the last vocabulary id (an 'added token', NewTokens)."""
  toks = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T))
  toks[:, -2:] = CFG.vocab_size - 1
  return jnp.asarray(toks, jnp.int32)


def dotted(path) -> str:
  """A pytree key path as 'layers.block.attn.wq' (a Variable's own '.value' dropped)."""
  s = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
  return s.removesuffix(".value")


def paths(tree) -> list[str]:
  """Dotted paths of the array leaves of any pytree (nnx.State, optax state, ...)."""
  return [dotted(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def leaves_by_path(tree) -> dict[str, np.ndarray]:
  return dict(zip(paths(tree), (np.asarray(x) for x in jax.tree.leaves(tree))))


def shapes(tree) -> dict[str, tuple]:
  return {p: (x.shape, x.dtype) for p, x in zip(paths(tree), jax.tree.leaves(tree))}


def base_params(seed: int = 0) -> nnx.State:
  """Random base weights drawn with numpy into the model's abstract Param tree: the same
  base for every copy, and no eager random-init compiles (slow on a 2-core CPU)."""
  rng = np.random.default_rng(seed)
  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(params=0))),
                       nnx.Param)

  def draw(path, s):
    if dotted(path).endswith("scale"):  # norm gains
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), jnp.float32)
    return jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def as_base(m: Transformer) -> Transformer:
  """The plain base model holding `m`'s parameter values; fails unless `m` has exactly the
  base's arrays (no adapter left, every weight a float array of the base's shape)."""
  base = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(params=0)))
  got = nnx.to_pure_dict(nnx.state(m))
  assert shapes(got) == shapes(nnx.to_pure_dict(nnx.state(base)))
  nnx.update(base, got)
  return base


# NOTE: compile time is nearly all of this file's run time. What it compiles uses XLA's
# cheapest CPU backend optimization (same semantics, less codegen), and the PEFT inits
# draw with non-partitionable threefry, which XLA:CPU compiles ~4x faster (other numbers,
# same distribution; the default costs ~1.5 s per random draw here).
COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def cheap_random():
  return jax.threefry_partitionable(False)


def model(method: str = "", new_tokens: int = 0) -> Transformer:
  """The numpy base (seed 0) with `method`'s modules (and rows for `new_tokens` added
  tokens) attached by their own init (seed 1)."""
  m = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(params=0)))),
                base_params())
  if method:
    with cheap_random():
      apply_peft(m, peft(method), nnx.Rngs(params=1), new_tokens)
  return m


_FORWARDS: dict = {}


def logits(m: Transformer, toks: jax.Array, structure: str) -> np.ndarray:
  """m(toks) jitted, compiled once per `structure` (the method attached; NOTE: a QLoRA
  graphdef holds a dict, so it cannot be the cache key). An eager forward compiles op by
  op, which is slower still."""
  graphdef, state = nnx.split(m)
  if structure not in _FORWARDS:
    fn = jax.jit(lambda state, toks: nnx.merge(graphdef, state)(toks))
    _FORWARDS[structure] = fn.lower(state, toks).compile(COMPILE_OPTIONS)
  return np.asarray(_FORWARDS[structure](state, toks))


_BASE_LOGITS: dict = {}


def base_logits(seed: int) -> np.ndarray:
  if seed not in _BASE_LOGITS:
    _BASE_LOGITS[seed] = logits(model(), tokens(seed), "")
  return _BASE_LOGITS[seed]


def loras(m: Transformer) -> dict[str, LoRA]:
  block = m.layers.block
  return {name: getattr(mod, name + "_peft") for mod in (block.attn, block.mlp)
          for name in mod.projection_names() if isinstance(getattr(mod, name + "_peft", None),
                                                           LoRA)}


def randomize(m: Transformer, seed: int = 2) -> None:
  """LoRA B and added-token rows to random values (they start at zero), so the update is
  not trivially zero."""
  rng = np.random.default_rng(seed)
  zero_init = [lora.b for lora in loras(m).values()]
  if getattr(m, "embed_peft", None) is not None:
    zero_init.append(m.embed_peft.rows)
  for v in zero_init:
    v.set_value(jnp.asarray(0.05 * rng.standard_normal(v.shape), jnp.float32))


# ---------------------------------------------------------------------------------------------
# Fast: forwards of the tiny model, shapes of the big one.


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit"])
def test_zero_init_method_starts_at_the_base_model(method):
  # LoRA on every projection, plus rows for 2 added tokens (as SFT attaches them).
  m = model(method, new_tokens=2 if method == "lora" else 0)
  assert any("_peft" in p for p in paths(nnx.state(m, nnx.Param)))
  np.testing.assert_array_equal(logits(m, tokens(0), method), base_logits(0))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_change_the_output(method):
  """They add attended positions, so they are not the identity: their hooks are live."""
  out, base = logits(model(method), tokens(0), method), base_logits(0)
  assert out.shape == base.shape and np.isfinite(out).all()
  assert np.abs(out - base).max() > 1e-3


def test_merge_lora_is_exact_and_removes_the_adapters():
  toks = tokens(0)
  m = model("lora", new_tokens=2)
  randomize(m)
  adapted = logits(m, toks, "lora")
  assert np.abs(adapted - base_logits(0)).max() > 1e-2  # the update is not trivially small
  assert merge_lora(m) == 7  # wq wk wv wo w_gate w_up w_down
  assert not any("_peft" in p for p in paths(nnx.state(m)))
  assert not any(isinstance(x, LoRA) for _, x in nnx.iter_graph(m))
  np.testing.assert_allclose(logits(as_base(m), toks, ""), adapted, atol=1e-5, rtol=0)


@pytest.mark.slow  # compiles models: kept out of the 90 s fast set
def test_qlora_stores_nf4_and_merges_to_its_own_output():
  toks = tokens(0)
  base = model().layers.block
  float_bytes = 4 * sum(getattr(mod, n).size for mod in (base.attn, base.mlp)
                        for n in mod.projection_names())
  m = model("qlora")
  block = m.layers.block
  weights = [getattr(mod, n) for mod in (block.attn, block.mlp) for n in mod.projection_names()]
  assert len(weights) == 7 and all(isinstance(w, NF4Weight) for w in weights)
  nf4_bytes = sum(w.nbytes() for w in weights)
  print(f"QLoRA base: {nf4_bytes} NF4 bytes vs {float_bytes} float32 bytes "
        f"({nf4_bytes / float_bytes:.3f})")
  assert nf4_bytes < 0.3 * float_bytes
  randomize(m)
  adapted = logits(m, toks, "qlora")
  assert np.abs(adapted - base_logits(0)).max() > 1e-2
  assert merge_lora(m) == 7
  assert all(isinstance(getattr(mod, n), nnx.Param) for mod in (block.attn, block.mlp)
             for n in mod.projection_names())
  assert not any("_peft" in p for p in paths(nnx.state(m)))
  np.testing.assert_allclose(logits(as_base(m), toks, ""), adapted, atol=1e-5, rtol=0)


@pytest.mark.slow  # compiles models: kept out of the 90 s fast set
def test_lora_projection_against_numpy():
  """y = x W + (alpha / r) (x A) B for a one-input-axis (wq) and a two-input-axis (wo)
  projection, on layer 1 of the stack (the layer axis is sliced, not mixed)."""
  m = model("lora")
  randomize(m)
  attn = m.layers.block.attn
  graphdef, layers = nnx.split(m.layers.block)  # (L, ...) -> layer 1's (...) below
  rng = np.random.default_rng(3)
  xq = rng.standard_normal((B, T, D)).astype(np.float32)
  xo = rng.standard_normal((B, T, N, H)).astype(np.float32)
  got = jax.jit(lambda state: (lambda layer: {"wq": layer.attn.proj("wq", xq),
                                              "wo": layer.attn.proj("wo", xo, n_in=2)})(
      nnx.merge(graphdef, state)))(jax.tree.map(lambda a: a[1], layers))
  for name, x in (("wq", xq), ("wo", xo)):
    x = x.astype(np.float64).reshape(B * T, -1)  # (BT, K_in)
    w = np.asarray(getattr(attn, name)[...], np.float64)[1].reshape(x.shape[1], -1)
    a = np.asarray(getattr(attn, name + "_peft").a[...], np.float64)[1].reshape(x.shape[1], -1)
    b = np.asarray(getattr(attn, name + "_peft").b[...], np.float64)[1].reshape(PEFT.rank, -1)
    ref = x @ w + (PEFT.alpha / PEFT.rank) * (x @ a) @ b  # (BT, K_out)
    assert np.abs(ref - x @ w).max() > 1e-1, name  # the LoRA term matters at this tolerance
    np.testing.assert_allclose(np.asarray(got[name]).reshape(B * T, -1), ref, rtol=1e-5,
                               atol=1e-5, err_msg=name)


def test_bad_targets_and_patterns_fail_in_one_sentence():
  m = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(params=0)))
  with pytest.raises(ConfigError) as e:
    apply_peft(m, PeftConfig(method="lora", targets="wq,nope"), nnx.Rngs(params=1))
  msg = str(e.value)
  assert "peft.targets" in msg and "'nope'" in msg, msg  # 'wq,nope' is not "'nope'"
  listed = msg[msg.index("'nope'"):].replace(",", " ").split()  # the names it offers
  assert {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"} <= set(listed), msg
  params = nnx.state(m, nnx.Param)
  with pytest.raises(ConfigError, match="matches no parameter"):
    check_pattern(params, r"_lora\.")
  with pytest.raises(ConfigError, match="not a valid regular expression"):
    check_pattern(params, r"attn.(wq")
  check_pattern(params, r"attn\.wq$")  # a pattern that matches passes


def test_bitfit_trains_the_models_own_biases():
  """With biases in the model, BitFit adds nothing and trains exactly those (by hand)."""
  cfg = dataclasses.replace(CFG, use_bias=True)
  m = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
  n_before = len(paths(nnx.state(m, nnx.Param)))
  apply_peft(m, peft("bitfit"), nnx.Rngs(params=1))
  params = nnx.state(m, nnx.Param)
  assert len(paths(params)) == n_before
  n_train, n_all = count(params, trainable_pattern(peft("bitfit")))
  # bq bk bv bo + b_gate b_up b_down, per layer
  assert n_train == L * (N * H + 2 * K * H + D + 2 * F + D)
  assert n_all == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_gpt2_124m_lora_trains_under_one_percent():
  from lmx.experiment import load_experiment
  exp, _ = load_experiment([f"--config={ROOT / 'experiments/gpt2_124m.py'}",
                            "--config.peft.method=lora"])
  assert exp.train.trainable and exp.peft.targets == "wq,wk,wv,wo"

  def build():
    rngs = nnx.Rngs(params=0)
    m = Transformer(exp.model, rngs=rngs)
    apply_peft(m, exp.peft, rngs)
    return m

  params = nnx.state(nnx.eval_shape(build), nnx.Param)
  n_train, n_all = count(params, exp.train.trainable)
  print(f"GPT-2 124M + LoRA: {n_train:,} of {n_all:,} trainable ({n_train / n_all:.3%})")
  # GPT-2 small: D=768, 12 layers, 12 heads of 64 (MHA). Per target r * (D_in + D_out).
  r, d, nh = exp.peft.rank, 768, 12 * 64
  assert n_train == 12 * r * ((d + nh) + 2 * (d + nh) + (nh + d))
  assert n_all - n_train == 124_439_808  # the model itself, unchanged
  assert n_train / n_all < 0.01
  assert peft_counts(exp)["trainable_params"] == n_train  # what `lmx train` prints


# ---------------------------------------------------------------------------------------------
# Slow: one compiled step per method, shared by the tests below.

METHODS = ("lora", "qlora", "bitfit", "adapter", "prefix", "prompt")
_STEPS: dict = {}


def setup(method: str):
  """(mesh, pattern, plan, fresh state, jitted step) for `method` on the numpy base
  (loaded as `base`, as train.init_from does); planned and compiled once."""
  if method not in _STEPS:
    p = peft(method, targets="wq,wo")  # one and two input axes; 'all' above (compile time)
    pattern = trainable_pattern(p)
    train = TrainConfig(steps=50, warmup_steps=0, learning_rate=1e-2, weight_decay=0.0,
                        trainable=pattern)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    opt = make_optimizer(train)
    with use_mesh(mesh), cheap_random():
      plan = plan_train_state(lambda rngs: Transformer(CFG, rngs=rngs), opt, train, 0,
                              mesh, base=base_params(),
                              finish=lambda m, rngs, extra: apply_peft(m, p, rngs))
      graphdef, abstract, shardings, init = plan
      state, rest = init()
      step = jit_train_step(make_train_step(graphdef, rest, opt, train), abstract[0], mesh,
                            train).lower(state, batch()).compile(COMPILE_OPTIONS)
    _STEPS[method] = (mesh, pattern, plan, jax.tree.map(np.asarray, state), step)
  mesh, pattern, plan, state0, step = _STEPS[method]
  return mesh, pattern, plan, jax.device_put(state0, plan[2][0]), step


def batch(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, CFG.vocab_size, size=(B, T + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}


@pytest.mark.slow  # compiles one train step per method
@pytest.mark.parametrize("method", METHODS)
def test_step_trains_only_the_peft_modules(method):
  mesh, pattern, plan, state, step = setup(method)
  before = leaves_by_path(state.params)
  b = batch(0)
  losses = []
  with use_mesh(mesh):
    for _ in range(8):  # overfit one batch
      state, metrics = step(state, b)
      losses.append(float(metrics["loss"]))
  print(f"{method}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
  after = leaves_by_path(state.params)
  assert after.keys() == before.keys()
  # Chosen here, not by lmx.train.trainable: every method trains exactly its `_peft`
  # modules (BitFit adds `_peft` biases to this bias-free model).
  frozen = [p for p in before if "_peft" not in p]
  trained = [p for p in before if "_peft" in p]
  assert frozen and trained and any(p.startswith("embed") for p in frozen)
  for p in frozen:  # bitwise: the frozen base is not even rounded
    np.testing.assert_array_equal(after[p], before[p], err_msg=p)
  assert any(not np.array_equal(after[p], before[p]) for p in trained)
  # Adam moments exist for the `_peft` parameters alone, and add up to them.
  moments = {p: x for p, x in leaves_by_path(state.opt_state).items() if np.ndim(x) > 0}
  assert moments and all("_peft" in p for p in moments), sorted(moments)
  mu = sum(x.size for p, x in moments.items() if ".mu." in f".{p}.")
  nu = sum(x.size for p, x in moments.items() if ".nu." in f".{p}.")
  n_trained = sum(before[p].size for p in trained)
  assert mu == nu == n_trained == count(state.params, pattern)[0]
  if method == "qlora":  # the frozen base is NF4 codes and scales, not float weights
    assert any(p.endswith("attn.wq.data") for p in frozen)
    assert not any(p.endswith("attn.wq") for p in before)


@pytest.mark.slow  # reuses the LoRA step compiled above
def test_adapter_checkpoint_holds_only_peft_and_restores_onto_the_base(tmp_path):
  mesh, pattern, plan, state, step = setup("lora")
  graphdef, abstract, shardings, init = plan
  with use_mesh(mesh):
    for i in range(2):
      state, _ = step(state, batch(i))
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    ckpt.save(2, saved_view(state, pattern), {"step": 2})
    restored, data, at = ckpt.restore_latest(saved_view(abstract[0], pattern),
                                             saved_view(shardings[0], pattern))
    ckpt.close()
    saved = paths(restored.params)
    assert at == 2 and data == {"step": 2}
    assert saved and all("_peft" in p for p in saved), saved
    assert len(saved) == sum("_peft" in p for p in paths(state.params))
    # As lmx.train.loop does on resume: the frozen part comes from a fresh base.
    with cheap_random():  # as in setup: the init compiled there
      frozen = split_trainable(init()[0].params, pattern)[1]
    params = join(restored.params, frozen)
  got, want = leaves_by_path(params), leaves_by_path(state.params)
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=p)
  for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(restored.step) == 2


@pytest.mark.slow  # compiles the cached decode path
def test_prefix_tuned_model_decodes_with_the_kv_cache():
  """Prefix tuning's keys/values sit before the cache: prefill + one-token decode steps give
  the same logits as the full forward pass (which puts them before the sequence)."""
  m = model("prefix")
  toks = tokens(2)[:2, :8]
  full = logits(m, toks, "prefix-2x8")  # its own compiled forward: another shape
  graphdef, state = nnx.split(m)

  @jax.jit
  def run(state, toks):
    mm = nnx.merge(graphdef, state)
    cache = mm.init_cache(2, 8)
    pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    first, cache = mm.decode(toks[:, :4], pos[:, :4], cache)
    rest = []
    for t in range(4, 8):
      out, cache = mm.decode(toks[:, t:t + 1], pos[:, t:t + 1], cache)
      rest.append(out)
    return jnp.concatenate([first] + rest, axis=1)

  np.testing.assert_allclose(np.asarray(run(state, toks)), full, atol=2e-5)


def test_lora_dropout_is_unbiased_and_only_in_training():
  """peft.dropout: without a key (evaluation, decoding) the adapter is deterministic and
  equals the numpy update; with a training key a sample differs, and the mean over many
  keys is that update (inverted dropout: E[mask / keep] = 1), within 5 standard errors."""
  rng = np.random.default_rng(0)
  w = nnx.Param(jnp.zeros((8, 6), jnp.float32), out_sharding=("embed", "mlp"),
                eager_sharding=False)
  with cheap_random():
    lora = LoRA(w, 1, 2, 4.0, rngs=nnx.Rngs(params=0), dropout=0.25)
  lora.b.set_value(jnp.asarray(rng.standard_normal((2, 6)), jnp.float32))
  x = jnp.asarray(rng.standard_normal((1, 3, 8)), jnp.float32)
  y = jnp.zeros((1, 3, 6), jnp.float32)
  a, b = np.asarray(lora.a.get_value(), np.float64), np.asarray(lora.b.get_value(), np.float64)
  want = 2.0 * np.asarray(x, np.float64) @ a @ b  # (alpha / r) x A B
  np.testing.assert_allclose(np.asarray(lora(x, y)), want, rtol=1e-5, atol=1e-6)
  graphdef, state = nnx.split(lora)
  with cheap_random():
    keys = jax.random.split(jax.random.key(0), 4000)
    samples = np.asarray(jax.jit(jax.vmap(
        lambda k: nnx.merge(graphdef, state)(x, y, key=k)))(keys), np.float64)
  assert np.abs(samples[0] - want).max() > 1e-3  # dropout really happened
  err = np.abs(samples.mean(0) - want)
  assert (err <= 5 * samples.std(0) / np.sqrt(len(samples)) + 1e-6).all(), err.max()


@pytest.mark.slow  # compiles a model forward
def test_lora_dropout_reaches_the_model_through_the_objective():
  """The LM objective hands the step's dropout key to the model: two keys give two losses,
  no rngs (evaluation) gives the deterministic one, and dropout 0 ignores the key."""
  from lmx.train.objectives import lm_objective
  b = {"inputs": tokens(1), "targets": tokens(2),
       "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
       "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.ones((B, T), jnp.float32)}
  out = {}
  for rate in (0.0, 0.5):
    m = model("")
    with cheap_random():
      apply_peft(m, peft("lora", dropout=rate), nnx.Rngs(params=1))
    for mod in (m.layers.block.attn, m.layers.block.mlp):  # a live adapter
      for name in mod.projection_names():
        hook = getattr(mod, name + "_peft", None)
        if hook is not None:
          hook.b.set_value(jnp.full(hook.b.get_value().shape, 0.05, jnp.float32))
    graphdef, state = nnx.split(m)
    f = jax.jit(lambda s, k: lm_objective().loss_fn(
        nnx.merge(graphdef, s), b, None if k is None else nnx.Rngs(dropout=k))[0],
        static_argnums=())
    with cheap_random():
      out[rate] = [float(f(state, jax.random.key(0))), float(f(state, jax.random.key(1))),
                   float(jax.jit(lambda s: lm_objective().loss_fn(nnx.merge(graphdef, s), b,
                                                                  None)[0])(state))]
  assert out[0.0][0] == out[0.0][1] == out[0.0][2]
  assert out[0.5][0] != out[0.5][1] and out[0.5][2] == out[0.0][2]
