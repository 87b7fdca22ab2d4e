"""lm_loss against a plain numpy cross entropy; the chunked head+loss against lm_loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.train.loss import chunked_lm_loss, lm_loss, seq_chunk


def _np_loss(logits, targets, mask, z):
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  logp = logits - lse[..., None]
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  n = mask.sum()
  return ((nll * mask).sum() + z * (lse ** 2 * mask).sum()) / n, (nll * mask).sum(), n


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("z", [0.0, 1e-2])
def test_lm_loss_matches_numpy(z):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
  mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
  loss, aux = lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z)
  ref, ce_sum, n = _np_loss(logits, targets, mask, z)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  np.testing.assert_allclose(float(aux["ce_sum"]), ce_sum, rtol=1e-5)
  assert float(aux["n_tokens"]) == n


def test_lm_loss_bf16_logits_upcast_and_all_masked():
  logits = jnp.zeros((1, 4, 8), jnp.bfloat16)
  targets = jnp.zeros((1, 4), jnp.int32)
  loss, _ = lm_loss(logits, targets, jnp.ones((1, 4), jnp.float32))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), np.log(8), rtol=1e-6)  # uniform over 8 tokens
  loss0, aux0 = lm_loss(logits, targets, jnp.zeros((1, 4), jnp.float32))
  assert float(loss0) == 0.0 and float(aux0["n_tokens"]) == 0.0


def _head_problem(dtype=jnp.float32, b=4, t=12, d=8, v=37, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
  w = jnp.asarray(rng.normal(size=(d, v)) * 0.7, dtype)
  targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
  mask = jnp.asarray((rng.random((b, t)) > 0.25).astype(np.float32))
  return h, w, targets, mask


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("z,chunk", [(0.0, 8), (0.0, 4 * 12), (1e-2, 12), (1e-2, 1)])
def test_chunked_loss_value_and_gradients_equal_full_logits(z, chunk):
  """The fused chunked head+loss against lm_loss on the full logits: same loss, same
  d/d(hidden) and d/d(head) (which it forms in the forward pass), any chunking."""
  h, w, targets, mask = _head_problem()

  def full(h, w):
    logits = jnp.einsum("btd,dv->btv", h, w)
    return lm_loss(logits, targets, mask, z)[0]

  def chunked(h, w):
    return chunked_lm_loss(h, w, targets, mask, z, chunk_tokens=chunk)[0]

  (l_full, g_full), (l_chunk, g_chunk) = (jax.value_and_grad(f, argnums=(0, 1))(h, w)
                                          for f in (full, chunked))
  np.testing.assert_allclose(float(l_chunk), float(l_full), rtol=1e-6)
  for a, b in zip(g_chunk, g_full):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # The cotangent scales the stored gradients (as in loss scaling / accumulation).
  g3 = jax.grad(lambda h, w: 3.0 * chunked(h, w), argnums=(0, 1))(h, w)
  np.testing.assert_allclose(np.asarray(g3[1]), 3.0 * np.asarray(g_full[1]), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_chunked_loss_aux_matches_and_keeps_dtypes():
  h, w, targets, mask = _head_problem(jnp.bfloat16)
  _, aux = chunked_lm_loss(h, w, targets, mask, 1e-3, chunk_tokens=16)
  logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
  _, ref = lm_loss(logits, targets, mask, 1e-3)
  for key in ("ce_sum", "z_sum", "n_tokens"):
    np.testing.assert_allclose(float(aux[key]), float(ref[key]), rtol=1e-5)
  gh, gw = jax.grad(lambda h, w: chunked_lm_loss(h, w, targets, mask)[0], argnums=(0, 1))(h, w)
  assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16


def test_seq_chunk_is_a_divisor_within_budget():
  assert seq_chunk(4, 12, 16) == 4  # 4 rows x 4 positions = 16 tokens
  assert seq_chunk(4, 12, 15) == 3
  assert seq_chunk(16, 256, 512) == 32
  assert seq_chunk(64, 10, 8) == 1  # never below one position
  assert seq_chunk(1, 7, 100) == 7
