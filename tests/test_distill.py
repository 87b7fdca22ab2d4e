"""distill_sums against a float64 numpy reference, a hand-computed KL, full-logits gradients
and lm_loss; top-k limits; and the gradient jaxpr holding no (B, T, V) array."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.train.distill import distill_sums
from lmx.train.loss import lm_loss

B, T, DS, DT, V = 2, 8, 4, 5, 11  # B*T*V = 176 matches no other size (Ds*V = 44, Dt*V = 55)


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  sh = rng.normal(size=(B, T, DS)).astype(np.float32)
  sw = (rng.normal(size=(DS, V)) * 0.8).astype(np.float32)
  th = rng.normal(size=(B, T, DT)).astype(np.float32)
  tw = (rng.normal(size=(DT, V)) * 0.8).astype(np.float32)
  targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
  mask = (rng.random((B, T)) > 0.3).astype(np.float32)
  mask[0, 0], mask[1, -1] = 0.0, 0.0  # zeros at both ends whatever the seed
  return sh, sw, th, tw, targets, mask


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_reference(sh, sw, th, tw, targets, mask, temperature, alpha):
  """Full (B, T, V) logits in float64."""
  s = sh.astype(np.float64) @ sw.astype(np.float64)
  t = th.astype(np.float64) @ tw.astype(np.float64)
  log_q, log_p = _np_log_softmax(s / temperature), _np_log_softmax(t / temperature)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  kd = temperature ** 2 * (kl * mask).sum()
  nll = -np.take_along_axis(_np_log_softmax(s), targets[..., None], -1)[..., 0]
  ce = (nll * mask).sum()
  return kd, ce, alpha * kd + (1 - alpha) * ce


def _call(args, chunk_tokens=4, **kw):
  return distill_sums(*map(jnp.asarray, args), chunk_tokens=chunk_tokens, **kw)


# kd_sum and ce_sum are checked at every temperature, loss_sum at each alpha. (Each call
# compiles its scan, ~0.3 s: one per case keeps the file fast.)
@pytest.mark.parametrize("temperature,alpha", [(0.5, 0.3), (1.0, 1.0), (4.0, 0.0)])
def test_matches_numpy_reference(temperature, alpha):
  args = _problem()
  out = _call(args, temperature=temperature, alpha=alpha)  # 2 positions x B = 4 chunks
  kd, ce, loss = _np_reference(*args, temperature, alpha)
  np.testing.assert_allclose(float(out["kd_sum"]), kd, rtol=1e-5)
  np.testing.assert_allclose(float(out["ce_sum"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(out["loss_sum"]), loss, rtol=1e-5)
  assert float(out["n_tokens"]) == args[-1].sum()
  assert all(x.dtype == jnp.float32 for x in out.values())


def test_temperature_squared_on_a_hand_case():
  # V = 2, one position, D = 1 (hidden = [1], so the head row is the logits), T = 2.
  # teacher logits [0, 0]            -> p = [1/2, 1/2]
  # student logits [2 ln 3, 0] / T   =  [ln 3, 0] -> q = [3/4, 1/4]
  # KL(p || q) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
  # kd_sum = T^2 * KL = 4 * 1/2 ln(4/3) = 2 ln(4/3) ~= 0.5754
  # The teacher is bf16 (its 1 and 0 are exact there): the sums still come out float32.
  out = distill_sums(jnp.ones((1, 1, 1), jnp.float32),
                     jnp.asarray([[2 * math.log(3), 0.0]], jnp.float32),
                     jnp.ones((1, 1, 1), jnp.bfloat16), jnp.zeros((1, 2), jnp.bfloat16),
                     jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.float32),
                     temperature=2.0, alpha=1.0)
  assert all(x.dtype == jnp.float32 for x in out.values())
  np.testing.assert_allclose(float(out["kd_sum"]), 2 * math.log(4 / 3), rtol=1e-6)
  np.testing.assert_allclose(float(out["loss_sum"]), 2 * math.log(4 / 3), rtol=1e-6)


def _jnp_reference_loss(sh, sw, th, tw, targets, mask, temperature, alpha):
  """Full-logits jnp version of `_np_reference` (float32), to differentiate."""
  s, t = sh @ sw, th @ tw  # (B, T, V)
  log_q = jax.nn.log_softmax(s / temperature)
  log_p = jax.nn.log_softmax(t / temperature)
  kd = temperature ** 2 * jnp.sum(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1) * mask)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(s), targets[..., None], -1)[..., 0]
  return alpha * kd + (1 - alpha) * jnp.sum(nll * mask)


def test_gradients_match_full_logits_and_teacher_gets_none():
  args = [jnp.asarray(a) for a in _problem(1)]
  kw = dict(temperature=2.0, alpha=0.3)

  def chunked(sh, sw, th, tw):
    return distill_sums(sh, sw, th, tw, *args[4:], chunk_tokens=4, **kw)["loss_sum"]

  # Jitted: one compile is cheaper than the eager op-by-op backward pass.
  got = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3)))(*args[:4])
  want = jax.jit(jax.grad(lambda sh, sw: _jnp_reference_loss(sh, sw, *args[2:], 2.0, 0.3),
                          argnums=(0, 1)))(*args[:2])
  for g, w in zip(got[:2], want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(got[0])[args[5] == 0])  # masked positions get no gradient
  for g in got[2:]:
    assert not np.any(np.asarray(g))


def test_alpha_zero_is_plain_cross_entropy():
  sh, sw, th, tw, targets, mask = _problem(2)
  out = _call((sh, sw, th, tw, targets, mask), temperature=3.0, alpha=0.0)
  _, aux = jax.jit(lm_loss)(jnp.asarray(sh @ sw), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(out["loss_sum"]), float(aux["ce_sum"]), rtol=1e-5)
  np.testing.assert_allclose(float(out["ce_sum"]), float(aux["ce_sum"]), rtol=1e-5)


def test_top_k_full_vocab_and_top_1():
  args = _problem(3)
  temperature = 2.0
  # top_k = V against the full-vocabulary reference that top_k = 0 matches above.
  all_k = _call(args, temperature=temperature, alpha=1.0, top_k=V)
  full_kd = _np_reference(*args, temperature, 1.0)[0]
  np.testing.assert_allclose(float(all_k["kd_sum"]), full_kd, rtol=1e-5)
  # top_k = 1: the teacher is a point mass on its argmax, so KL = -log q^T(argmax).
  sh, sw, th, tw, _, mask = args
  log_q = _np_log_softmax((sh.astype(np.float64) @ sw) / temperature)
  argmax = (th.astype(np.float64) @ tw).argmax(-1)
  want = temperature ** 2 * (-np.take_along_axis(log_q, argmax[..., None], -1)[..., 0]
                             * mask).sum()
  top1 = _call(args, temperature=temperature, alpha=1.0, top_k=1)
  np.testing.assert_allclose(float(top1["kd_sum"]), want, rtol=1e-5)
  assert full_kd > 0 and want > 0


def _outvar_shapes(jaxpr):
  """Shapes of every equation's outputs, recursing into scan / remat / pjit bodies."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield tuple(getattr(v.aval, "shape", ()))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else [p]):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _outvar_shapes(sub)


def _grad_shapes(chunk_tokens, top_k=0):
  args = [jnp.asarray(a) for a in _problem()]

  def loss(sh, sw):
    return distill_sums(sh, sw, *args[2:], temperature=2.0, alpha=0.5, top_k=top_k,
                        chunk_tokens=chunk_tokens)["loss_sum"]

  return list(_outvar_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(*args[:2]).jaxpr))


@pytest.mark.parametrize("top_k", [0, 3])
def test_gradient_never_holds_full_logits(top_k):
  def full_sized(shapes):
    return [s for s in shapes if s == (B, T, V) or math.prod(s) == B * T * V]

  # 4 tokens per chunk: the largest logits anywhere, forward or backward, are (B, 2, V).
  shapes = _grad_shapes(chunk_tokens=4, top_k=top_k)
  assert (B, 2, V) in shapes
  assert not full_sized(shapes)
  # The check can fail: one chunk of all B * T positions holds (B, T, V) logits.
  assert full_sized(_grad_shapes(chunk_tokens=B * T, top_k=top_k))


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=1.0, alpha=-0.1), "alpha"), (dict(temperature=1.0, alpha=1.5), "alpha"),
    (dict(temperature=0.0, alpha=0.5), "temperature"),
    (dict(temperature=-2.0, alpha=0.5), "temperature"),
    (dict(temperature=1.0, alpha=0.5, top_k=V + 1), "top_k")])
def test_bad_arguments_raise(kw, name):
  with pytest.raises(ValueError, match=name):
    _call(_problem(), **kw)
