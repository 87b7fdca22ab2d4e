"""Pick the next token from logits: greedy, temperature, top-k and top-p (nucleus).

All functions are pure and jittable; `temperature`, `top_k` and `top_p` are Python numbers
(static under jit). The filters are applied in the usual order: temperature scales the
logits, top-k keeps the k most likely tokens, then top-p keeps the smallest prefix of those
(by descending probability) whose probability mass reaches p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
  """Raise ValueError naming the bad setting and its valid range."""
  if temperature < 0:
    raise ValueError(f"sampling: temperature is {temperature!r}; it must be >= 0 (0 = greedy).")
  if top_k < 0:
    raise ValueError(f"sampling: top_k is {top_k!r}; it must be >= 0 (0 disables it).")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"sampling: top_p is {top_p!r}; it must be in (0, 1] (1 disables it).")


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Tempered logits float32 (B, V) with every token outside top-k / top-p set to -inf.

  Ties are broken by token id (lower id first), so exactly min(k, V) tokens survive top-k.
  """
  check_sampling_args(temperature, top_k, top_p)
  logits = logits.astype(jnp.float32)
  if temperature > 0:
    logits = logits / temperature
  v = logits.shape[-1]
  k = v if top_k == 0 else min(top_k, v)
  if k == v and top_p >= 1.0:
    return logits
  sorted_logits, order = jax.lax.top_k(logits, k)  # (B, k) descending; token ids
  keep = jnp.ones(sorted_logits.shape, bool)
  if top_p < 1.0:
    probs = jax.nn.softmax(sorted_logits, axis=-1)  # renormalized over the top k
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = mass_before < top_p  # always keeps the first token
  rows = jnp.arange(logits.shape[0])[:, None]
  kept = jnp.zeros(logits.shape, bool).at[rows, order].set(keep)  # back to vocab order
  return jnp.where(kept, logits, -jnp.inf)


def greedy(logits: jax.Array) -> jax.Array:
  """argmax over the vocabulary: (B, V) -> int32 (B,)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_token(rng: jax.Array, logits: jax.Array, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """One token per row: logits (B, V) -> int32 (B,). temperature == 0 is greedy."""
  check_sampling_args(temperature, top_k, top_p)
  if temperature == 0:
    return greedy(logits)
  filtered = filter_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
