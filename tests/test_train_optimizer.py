"""Schedule values against the closed-form formula; the weight-decay mask."""

import pytest
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmx.config import TrainConfig
from lmx.train.optimizer import decay_mask, make_optimizer, make_schedule


def test_schedule_warmup_mid_end():
  cfg = TrainConfig(steps=1000, warmup_steps=100, learning_rate=2e-3, min_lr_ratio=0.1)
  s = make_schedule(cfg)
  lr, lo = 2e-3, 2e-4
  np.testing.assert_allclose(float(s(0)), 0.0, atol=1e-12)
  np.testing.assert_allclose(float(s(50)), lr * 50 / 100, rtol=1e-6)
  np.testing.assert_allclose(float(s(100)), lr, rtol=1e-6)  # warmup end = peak
  mid = 100 + 450  # halfway through the cosine: (peak + floor) / 2
  np.testing.assert_allclose(float(s(mid)), (lr + lo) / 2, rtol=1e-5)
  q = 100 + 900 * 0.25
  np.testing.assert_allclose(float(s(q)), lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * 0.25)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(s(1000)), lo, rtol=1e-5)
  np.testing.assert_allclose(float(s(5000)), lo, rtol=1e-5)  # flat after the end


def test_wsd_schedule_warmup_stable_linear_decay():
  cfg = TrainConfig(steps=1000, warmup_steps=100, learning_rate=2e-3, min_lr_ratio=0.1,
                    schedule="wsd", decay_fraction=0.2).validate()
  s = make_schedule(cfg)
  lr, lo = 2e-3, 2e-4
  np.testing.assert_allclose(float(s(50)), lr / 2, rtol=1e-6)  # same warmup as cosine
  for step in (100, 500, 800):  # stable at the peak until the last 20% (step 800)
    np.testing.assert_allclose(float(s(step)), lr, rtol=1e-6)
  np.testing.assert_allclose(float(s(900)), (lr + lo) / 2, rtol=1e-5)  # linear: halfway
  np.testing.assert_allclose(float(s(1000)), lo, rtol=1e-5)
  np.testing.assert_allclose(float(s(3000)), lo, rtol=1e-5)
  # A decay longer than the post-warmup span is cut to it: it starts at the warmup's end
  # and still reaches the floor at `steps`.
  short = make_schedule(TrainConfig(steps=100, warmup_steps=50, learning_rate=1.0,
                                    min_lr_ratio=0.0, schedule="wsd", decay_fraction=1.0))
  np.testing.assert_allclose([float(short(x)) for x in (50, 75, 100)], [1.0, 0.5, 0.0],
                             atol=1e-6)


def test_warmup_longer_than_the_run_is_capped_at_the_run():
  """A 5-step smoke run of a preset with 20 warmup steps warms up over the 5 steps."""
  for schedule in ("cosine", "wsd"):
    s = make_schedule(TrainConfig(steps=5, warmup_steps=20, learning_rate=1.0,
                                  schedule=schedule).validate())
    np.testing.assert_allclose([float(s(x)) for x in (0, 1, 4)], [0.0, 0.2, 0.8], atol=1e-6)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_decay_mask_excludes_1d_params():
  params = {"w": jnp.ones((3, 4)), "scale": jnp.ones((4,)), "bias": jnp.ones((4,)),
            "e": jnp.ones((2, 3, 4))}
  assert decay_mask(params) == {"w": True, "scale": False, "bias": False, "e": True}
  # With zero gradients only the decayed params move: AdamW's decay is lr * wd * p.
  cfg = TrainConfig(steps=10, warmup_steps=0, learning_rate=0.1, weight_decay=0.5,
                    grad_clip=0.0)
  opt = make_optimizer(cfg)
  state = opt.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["w"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(new["e"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(new["scale"], 1.0)
  np.testing.assert_array_equal(new["bias"], 1.0)


def test_clipping_bounds_update():
  # With b1 = b2 = 0, Adam's first update is -lr * g / (|g| + eps): with eps = 1 it depends on
  # the gradient's size, so it shows exactly which gradient reached Adam.
  cfg = TrainConfig(steps=10, warmup_steps=0, learning_rate=1.0, weight_decay=0.0,
                    grad_clip=1.0, beta1=0.0, beta2=0.0, eps=1.0)
  opt = make_optimizer(cfg)
  p = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((4,))}
  g = {"w": jnp.full((2, 2), 30.0), "b": jnp.full((4,), 40.0)}  # global norm 100
  u, _ = opt.update(g, opt.init(p), p)
  # Clipped to global norm 1: entries 0.3 and 0.4 (same direction), so -0.3/1.3 and -0.4/1.4.
  np.testing.assert_allclose(u["w"], -0.3 / 1.3, rtol=1e-5)
  np.testing.assert_allclose(u["b"], -0.4 / 1.4, rtol=1e-5)
  # A gradient already under the clip passes unchanged: entries 0.1 (norm 0.2 per leaf).
  small = {"w": jnp.full((2, 2), 0.1), "b": jnp.full((4,), 0.1)}
  u, _ = opt.update(small, opt.init(p), p)
  np.testing.assert_allclose(u["w"], -0.1 / 1.1, rtol=1e-5)
  # grad_clip = 0 turns clipping off: the raw gradient reaches Adam.
  raw = make_optimizer(TrainConfig(steps=10, warmup_steps=0, learning_rate=1.0,
                                   weight_decay=0.0, grad_clip=0.0, beta1=0.0, beta2=0.0,
                                   eps=1.0))
  u, _ = raw.update(g, raw.init(p), p)
  np.testing.assert_allclose(u["w"], -30.0 / 31.0, rtol=1e-5)
