"""Sampling filters and distributions against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.infer.sampling import chosen_logprob, filter_logits, greedy, sample_token


def _draws(logits, n, **kw):
  keys = jax.random.split(jax.random.key(0), n)
  fn = jax.jit(jax.vmap(lambda k: sample_token(k, logits, **kw)))
  return np.asarray(fn(keys))  # (n, B)


def _np_top_p_set(logits, p):
  """Smallest set of most likely tokens whose probability sums to >= p (float64)."""
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  cum = np.cumsum(probs[order])
  n = int(np.searchsorted(cum, p) + 1)  # first index where cum >= p, inclusive
  return set(order[:n].tolist()), cum


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_top_k_never_samples_outside_top_k():
  logits = jax.random.normal(jax.random.key(1), (3, 40)) * 2
  draws = _draws(logits, 3000, temperature=1.5, top_k=5)
  for b in range(3):
    top5 = set(np.argsort(-np.asarray(logits[b]))[:5].tolist())
    seen = set(draws[:, b].tolist())
    assert seen <= top5
    assert len(seen) == 5  # high temperature: all five do occur


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.95])
def test_top_p_keeps_smallest_set_reaching_p(p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 30)) * 1.5
  kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), top_p=p)))
  for b in range(6):
    want, cum = _np_top_p_set(logits[b], p)
    assert np.min(np.abs(cum - p)) > 1e-5  # not a float32 borderline case
    assert set(np.flatnonzero(kept[b]).tolist()) == want


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_top_p_samples_stay_in_nucleus_and_follow_renormalized_probs():
  logits = np.array([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
  want_set, _ = _np_top_p_set(logits[0], 0.7)
  draws = _draws(jnp.asarray(logits, jnp.float32), 20000, top_p=0.7)[:, 0]
  assert set(draws.tolist()) == want_set
  probs = np.exp(logits[0] - logits[0].max())
  probs /= probs.sum()
  idx = sorted(want_set)
  expected = probs[idx] / probs[idx].sum()
  freq = np.array([(draws == i).mean() for i in idx])
  np.testing.assert_allclose(freq, expected, atol=0.015)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_empirical_frequencies_match_softmax(temperature):
  logits = np.array([[1.0, 0.2, -0.5, 0.7]])
  draws = _draws(jnp.asarray(logits, jnp.float32), 20000, temperature=temperature)[:, 0]
  z = logits[0] / temperature
  expected = np.exp(z - z.max())
  expected /= expected.sum()
  freq = np.bincount(draws, minlength=4) / len(draws)
  np.testing.assert_allclose(freq, expected, atol=0.015)  # ~5 sigma at n=20000


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_top_k_and_top_p_compose():
  logits = jnp.asarray([[3.0, 2.9, 2.8, 0.0, -1.0]], jnp.float32)
  # top_k=4 renormalizes over the first four; the first three hold > 0.9 of that mass.
  kept = np.isfinite(np.asarray(filter_logits(logits, top_k=4, top_p=0.9)))
  assert kept[0].tolist() == [True, True, True, False, False]


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_temperature_zero_is_argmax_and_tiny_temperature_agrees():
  logits = jax.random.normal(jax.random.key(2), (8, 50))
  want = np.argmax(np.asarray(logits), axis=-1)
  got = sample_token(jax.random.key(0), logits, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(greedy(logits)), want)
  cold = sample_token(jax.random.key(3), logits, temperature=1e-4)
  np.testing.assert_array_equal(np.asarray(cold), want)
  assert got.dtype == jnp.int32 and got.shape == (8,)


@pytest.mark.parametrize("kw,field", [(dict(temperature=-1.0), "temperature"),
                                      (dict(top_k=-2), "top_k"),
                                      (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_invalid_settings_fail_with_named_field(kw, field):
  with pytest.raises(ValueError, match=field):
    sample_token(jax.random.key(0), jnp.zeros((1, 4)), **kw)


def test_greedy_takes_the_first_maximum_and_chosen_logprob_is_log_softmax():
  # numpy's argmax is the reference: ties -> the lowest id; -inf entries never win unless
  # the whole row is -inf (then 0, as np.argmax).
  z = np.array([[0.5, 2.0, 2.0, -1.0],
                [-np.inf, -np.inf, 3.0, 3.0],
                [-np.inf] * 4,
                [7.0, 1.0, 7.0, 7.0]], np.float32)
  np.testing.assert_array_equal(np.asarray(greedy(jnp.asarray(z))), np.argmax(z, axis=-1))
  wide = np.array(jax.random.normal(jax.random.key(5), (3, 32000)))
  wide[1, [17, 31999]] = wide[1].max() + 1.0  # a tie at the far end of a real vocabulary
  np.testing.assert_array_equal(np.asarray(greedy(jnp.asarray(wide))), np.argmax(wide, -1))
  tok = np.array([3, 0, 31999])
  shifted = wide - wide.max(-1, keepdims=True)
  want = shifted[np.arange(3), tok] - np.log(np.exp(shifted).sum(-1))
  np.testing.assert_allclose(np.asarray(chosen_logprob(jnp.asarray(wide), jnp.asarray(tok))),
                             want, rtol=1e-5)
