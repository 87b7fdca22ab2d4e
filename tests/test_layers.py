"""`lmx.model.layers.project`: its hand-written VJP against autodiff of the plain einsum.

A constant-factor error in a weight gradient would hide behind Adam's scale invariance in
every training test, so the gradients are compared here directly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.model.layers import project


def _reference(x, w, n_in):
  """The same contraction as one plain einsum (no custom VJP)."""
  letters = "KLMN"[:w.ndim]
  ins, outs = letters[:n_in], letters[n_in:]
  return jnp.einsum(f"BT{ins},{ins}{outs}->BT{outs}", x, w)


CASES = [  # (x shape, w shape, n_in)
    ((2, 3, 8), (8, 5), 1),  # a plain (D, F) projection
    ((1, 7, 6), (6, 2, 4), 1),  # q/k/v: (D, N, H)
    ((3, 4, 2, 4), (2, 4, 6), 2),  # the output projection: (N, H, D)
]


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("xs,ws,n_in", CASES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_project_value_and_grads_equal_autodiff_of_einsum(xs, ws, n_in, dtype, tol):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, xs, jnp.float32).astype(dtype)
  w = jax.random.normal(kw, ws, jnp.float32).astype(dtype)
  out_shape = xs[:2] + ws[n_in:]
  cot = jax.random.normal(kg, out_shape, jnp.float32).astype(dtype)  # a non-uniform cotangent

  y, vjp = jax.vjp(lambda a, b: project(a, b, n_in), x, w)
  y_ref, vjp_ref = jax.vjp(lambda a, b: _reference(a, b, n_in), x, w)
  assert y.shape == out_shape and y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                             rtol=tol, atol=tol)
  for got, want, name in zip(vjp(cot), vjp_ref(cot), ("d/dx", "d/dw")):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    scale = float(np.max(np.abs(np.asarray(want, np.float32))))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * scale, err_msg=name)


def test_project_grad_matches_numpy_on_a_hand_case():
  """d/dw of sum(project(x, w) * g) is x^T g summed over (B, T); d/dx is g w^T."""
  x = np.arange(12, dtype=np.float32).reshape(1, 3, 4) / 10
  w = np.arange(8, dtype=np.float32).reshape(4, 2) - 3
  g = np.array([[[1, -1], [2, 0.5], [0, 3]]], np.float32)
  dx, dw = jax.grad(lambda a, b: jnp.sum(project(a, b) * g), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(np.asarray(dw), x[0].T @ g[0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dx), g @ w.T, rtol=1e-6)
