"""Pick the next token from logits: penalties, greedy, temperature, top-k, top-p, min-p.

All functions are pure and jittable; the settings are Python numbers (static under jit).
The order, as in HF transformers and vLLM:

    penalties (`apply_penalties`: repetition, then frequency and presence)
      -> temperature scales the logits (0 = greedy: argmax of the penalized logits)
      -> top-k keeps the k most likely tokens
      -> top-p keeps the smallest prefix of those (by descending probability) whose
         probability mass reaches p
      -> min-p keeps tokens whose probability is >= min_p times the most likely one's

Every filter always keeps the most likely token, so they compose in any combination.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_sampling_args(temperature: float, top_k: int, top_p: float,
                        min_p: float = 0.0) -> None:
  """Raise ValueError naming the bad setting and its valid range."""
  if temperature < 0:
    raise ValueError(f"sampling: temperature is {temperature!r}; it must be >= 0 (0 = greedy).")
  if top_k < 0:
    raise ValueError(f"sampling: top_k is {top_k!r}; it must be >= 0 (0 disables it).")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"sampling: top_p is {top_p!r}; it must be in (0, 1] (1 disables it).")
  if not 0.0 <= min_p < 1.0:
    raise ValueError(f"sampling: min_p is {min_p!r}; it must be in [0, 1) (0 disables it).")


def check_penalties(repetition: float, frequency: float, presence: float) -> None:
  """Raise ValueError naming the bad penalty and its valid range."""
  if not repetition > 0:
    raise ValueError(f"sampling: repetition_penalty is {repetition!r}; it must be > 0 "
                     "(1 disables it, > 1 discourages repeats).")
  for name, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
    if not -2.0 <= value <= 2.0:
      raise ValueError(f"sampling: {name} is {value!r}; it must be in [-2, 2] (0 disables "
                       "it; OpenAI's range).")


def apply_penalties(logits: jax.Array, counts: jax.Array | None, seen: jax.Array | None,
                    repetition: float = 1.0, frequency: float = 0.0,
                    presence: float = 0.0) -> jax.Array:
  """Penalized logits float32 (B, V).

  counts (B, V) int: how often each token was generated so far in the row. seen (B, V)
  bool: tokens present in the row's prompt or generated so far.

    repetition (CTRL, Keskar et al. 2019; HF's rule): a seen token's logit l becomes
        l / r if l > 0 else l * r
    frequency, presence (OpenAI; vLLM counts generated tokens only, as here):
        l -= frequency * count + presence * (count > 0)
  """
  check_penalties(repetition, frequency, presence)
  logits = logits.astype(jnp.float32)
  if repetition != 1.0:
    penalized = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = jnp.where(seen, penalized, logits)
  if frequency != 0.0 or presence != 0.0:
    logits = (logits - frequency * counts.astype(jnp.float32)
              - presence * (counts > 0).astype(jnp.float32))
  return logits


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0) -> jax.Array:
  """Tempered logits float32 (B, V) with every token outside top-k / top-p / min-p set to
  -inf.

  Ties are broken by token id (lower id first), so exactly min(k, V) tokens survive top-k.
  min-p compares probabilities after temperature: it keeps l >= max(l) + log(min_p).
  """
  check_sampling_args(temperature, top_k, top_p, min_p)
  logits = logits.astype(jnp.float32)
  if temperature > 0:
    logits = logits / temperature
  v = logits.shape[-1]
  k = v if top_k == 0 else min(top_k, v)
  if k < v or top_p < 1.0:
    sorted_logits, order = jax.lax.top_k(logits, k)  # (B, k) descending; token ids
    keep = jnp.ones(sorted_logits.shape, bool)
    if top_p < 1.0:
      probs = jax.nn.softmax(sorted_logits, axis=-1)  # renormalized over the top k
      mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
      keep = mass_before < top_p  # always keeps the first token
    rows = jnp.arange(logits.shape[0])[:, None]
    kept = jnp.zeros(logits.shape, bool).at[rows, order].set(keep)  # back to vocab order
    logits = jnp.where(kept, logits, -jnp.inf)
  if min_p > 0.0:
    # p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p); the renormalization by top-k /
    # top-p cancels in the ratio, so this equals min-p on the filtered distribution.
    floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.float32(math.log(min_p))
    logits = jnp.where(logits >= floor, logits, -jnp.inf)
  return logits


def greedy(logits: jax.Array) -> jax.Array:
  """argmax over the vocabulary: (..., V) -> int32 (...,), the first index of the maximum
  (ties: the lowest id, as `jnp.argmax`).

  Two plain reductions (the max, then the lowest index holding it) instead of argmax's
  (value, index) pair reduction, which XLA:CPU runs about 2x slower over a 32000-token
  vocabulary: 0.5 ms of the 20 ms batch-8 decode step of the 58M shape (docs/decoding.md).
  An all -inf row gets 0 (as from `jnp.argmax`); a row with a NaN gets 0 too.
  """
  v = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  ids = jnp.arange(v, dtype=jnp.int32)
  first = jnp.min(jnp.where(logits == top, ids, v), axis=-1)
  return jnp.where(first < v, first, 0).astype(jnp.int32)


def chosen_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log_softmax(logits)[token] for logits (B, V) float32 and tokens (B,) -> (B,), without
  the (B, V) log_softmax: logits[token] - logsumexp(logits)."""
  top = jnp.max(logits, axis=-1)
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
  return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse


def sample_token(rng: jax.Array, logits: jax.Array, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> jax.Array:
  """One token per row: logits (B, V) -> int32 (B,). temperature == 0 is greedy."""
  check_sampling_args(temperature, top_k, top_p, min_p)
  if temperature == 0:
    return greedy(logits)
  filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------ per-row settings
# The same stages with a RUNTIME setting per row ((B,) arrays), for one engine call that
# serves requests with different settings (`lmx.infer.engine`, the server's batcher).
# Disabled values: repetition 1, frequency / presence 0, top_k >= V, top_p 1, log_min_p -inf.


def apply_row_penalties(logits: jax.Array, counts: jax.Array, seen: jax.Array | None,
                        repetition: jax.Array, frequency: jax.Array,
                        presence: jax.Array) -> jax.Array:
  """`apply_penalties` with (B,) float32 settings; seen None skips the repetition stage (no
  row has one). A disabled row's logits come back bit for bit (l / 1, l - 0)."""
  logits = logits.astype(jnp.float32)
  if seen is not None:
    r = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
  return (logits - frequency[:, None] * counts.astype(jnp.float32)
          - presence[:, None] * (counts > 0).astype(jnp.float32))


def filter_row_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array,
                      log_min_p: jax.Array, width: int | None = None) -> jax.Array:
  """`filter_logits` after temperature, with (B,) settings: top_k int32 (>= V disables),
  top_p float32 (>= 1 disables), log_min_p float32 (log(min_p); -inf disables).

  k is a runtime value, so there is no `lax.top_k(k)`: each row's `width` most likely
  tokens (static; default V) are taken once (descending, ties to the lower id as
  `filter_logits`) and masked by rank. width must be >= every row's top_k, and V if a row
  has top-p without top-k; a row with neither keeps every token. 0 skips the stage."""
  logits = logits.astype(jnp.float32)
  b, v = logits.shape
  width = v if width is None else width
  if width > 0:
    ranked, order = jax.lax.top_k(logits, width)  # (B, width)
    in_k = jnp.arange(width)[None] < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)  # over the top k
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    kept = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], order].set(keep)
    kept = kept | ((top_k >= v) & (top_p >= 1.0))[:, None]  # rows without either filter
    logits = jnp.where(kept, logits, -jnp.inf)
  floor = jnp.max(logits, axis=-1, keepdims=True) + log_min_p[:, None]
  return jnp.where(logits >= floor, logits, -jnp.inf)
