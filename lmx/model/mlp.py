"""Position-wise feed-forward block: relu / gelu, or the gated swiglu / geglu (Shazeer 2020).

Einsum letters: B batch, T length, D d_model, F ff_dim. Gated variants compute
act(x W_gate) * (x W_up) and so carry one extra (D, F) matrix; `ModelConfig.ff_dim` shrinks F
to 8/3 d (LLaMA) to keep the parameter count close to the ungated 4 d.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.config import ModelConfig
from lmx.model.layers import Projections, compute_dtype, normal, output_init_std, param, zeros
from lmx.parallel.mesh import constrain

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,  # tanh approximation, as in GPT-2.
    "swiglu": jax.nn.silu,
    "geglu": jax.nn.gelu,
}


class MLP(Projections):
  PROJECTIONS = ("w_gate", "w_up", "w_down")

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.ff_dim
    self.cfg = cfg
    init, out_init = normal(cfg.init_std), normal(output_init_std(cfg))
    self.w_up = param(rngs.params(), (d, f), ("embed", "mlp"), init)
    self.w_gate = param(rngs.params(), (d, f), ("embed", "mlp"), init) if cfg.gated else None
    self.w_down = param(rngs.params(), (f, d), ("mlp", "embed"), out_init)
    if cfg.use_bias:
      self.b_up = param(rngs.params(), (f,), ("mlp",), zeros)
      self.b_gate = param(rngs.params(), (f,), ("mlp",), zeros) if cfg.gated else None
      self.b_down = param(rngs.params(), (d,), ("embed",), zeros)
    else:
      self.b_up = self.b_gate = self.b_down = None

  def _w(self, p) -> jax.Array:
    return p[...].astype(compute_dtype(self.cfg))

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D); `key`: the dropout key of a training step, or None."""
    act = _ACTIVATIONS[self.cfg.mlp]
    up = self.proj("w_up", x, key=key)  # (B, T, F)
    if self.b_up is not None:
      up = up + self._w(self.b_up)
    if self.w_gate is not None:
      gate = self.proj("w_gate", x, key=key)
      if self.b_gate is not None:
        gate = gate + self._w(self.b_gate)
      h = act(gate) * up
    else:
      h = act(up)
    h = constrain(h, ("batch", "seq", "mlp"))  # (B, T, F)
    y = self.proj("w_down", h, key=key)  # (B, T, D)
    if self.b_down is not None:
      y = y + self._w(self.b_down)
    return y
