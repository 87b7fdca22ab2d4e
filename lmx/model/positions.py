"""Position information: rotary embeddings, fixed sinusoids and a learned table.

RoPE (Su et al. 2021) rotates each (q, k) feature pair by an angle proportional to the
token position, so q_m . k_n depends only on m - n. lmx pairs feature i with feature
i + Dh/2 (the "rotate half" layout of GPT-NeoX / LLaMA checkpoints), not adjacent features.
Llama 3.1's `rope_scaling` (ModelConfig.rope_scaling='llama3') slows the low frequencies
only: a frequency whose wavelength exceeds original_max_len / low_freq_factor is divided by
`factor`, one whose wavelength is below original_max_len / high_freq_factor is kept, and the
band between is interpolated, so short-range position detail survives a longer context.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.config import ModelConfig
from lmx.model.layers import normal, param


def llama3_inv_freq(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_len: int) -> np.ndarray:
  """Llama 3.1 scaled inverse frequencies, float32 (Dh/2,), computed on the host in float64
  (they depend on the config only)."""
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * math.pi / inv_freq
  low_wavelen = original_max_len / low_freq_factor  # longer than this: divide by factor
  high_wavelen = original_max_len / high_freq_factor  # shorter than this: keep
  # Between the two: blend from 1/factor (at low_wavelen) to 1 (at high_wavelen).
  smooth = ((original_max_len / wavelen - low_freq_factor)
            / max(high_freq_factor - low_freq_factor, 1e-30))
  blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  out = np.where(wavelen > low_wavelen, inv_freq / factor,
                 np.where(wavelen < high_wavelen, inv_freq, blended))
  return out.astype(np.float32)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray | None:
  """The config's scaled inverse frequencies, or None for plain RoPE (`rope_angles`)."""
  if cfg.rope_scaling != "llama3":
    return None
  return llama3_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_factor,
                         cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                         cfg.rope_original_max_len)


def rope_angles(positions: jax.Array, head_dim: int, theta: float,
                inv_freq: np.ndarray | None = None) -> jax.Array:
  """Rotation angles, float32 (B, T, Dh/2): position * theta^(-2i/Dh), or position *
  `inv_freq` (Dh/2,) when given (scaled RoPE)."""
  if inv_freq is None:
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # (Dh/2,)
  else:
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               inv_freq: np.ndarray | None = None) -> jax.Array:
  """Rotate queries or keys: x (B, T, N, Dh), positions int (B, T) -> (B, T, N, Dh).
  `inv_freq` (Dh/2,): scaled frequencies (`rope_inv_freq`) instead of theta's."""
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"apply_rope: head dimension {head_dim} must be even.")
  angles = rope_angles(positions, head_dim, theta, inv_freq)[:, :, None, :]  # (B, T, 1, Dh/2)
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :head_dim // 2], x32[..., head_dim // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def sinusoidal(positions: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
  """Vaswani et al. 2017 table, float32 (B, T, D): PE[p, 2i] = sin(p / base^(2i/D)),
  PE[p, 2i+1] = cos(p / base^(2i/D))."""
  if dim % 2:
    raise ValueError(f"sinusoidal: model dimension {dim} must be even.")
  inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # (D/2,)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, D/2)
  # Interleave so sin lands on even and cos on odd features.
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # (B, T, D/2, 2)
  return pe.reshape(*angles.shape[:-1], dim)  # (B, T, D)


class LearnedPositions(nnx.Module):
  """A (max_seq_len, D) table added to the token embeddings (GPT-2)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.max_len = cfg.max_seq_len
    self.table = param(rngs.params(), (cfg.max_seq_len, cfg.d_model), (None, "embed"),
                       normal(cfg.init_std))

  def __call__(self, positions: jax.Array) -> jax.Array:  # int (B, T) -> float32 (B, T, D)
    # NOTE: jnp.take clamps out-of-range indices under jit; callers keep positions
    # < max_seq_len (the config and `generate` check this).
    return jnp.take(self.table[...], positions, axis=0)
