"""lm_loss against a plain numpy cross entropy."""

import numpy as np
import jax.numpy as jnp
import pytest

from lmx.train.loss import lm_loss


def _np_loss(logits, targets, mask, z):
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  logp = logits - lse[..., None]
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  n = mask.sum()
  return ((nll * mask).sum() + z * (lse ** 2 * mask).sum()) / n, (nll * mask).sum(), n


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
