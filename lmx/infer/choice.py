"""How each decoded token is chosen: the settings (`SamplingOptions`, scalar or per row) and
the functions that turn one step's raw logits into tokens and their log-probs, for the
decode engine (lmx.infer.engine) and speculative decoding.

- Sampling order (`lmx.infer.sampling`): repetition penalty (CTRL; over prompt + generated
  tokens) -> frequency / presence penalties (OpenAI; over generated tokens, as vLLM) ->
  stop ids masked to -inf until min_new_tokens are generated -> temperature (0 = greedy
  argmax of the penalized logits) -> top-k -> top-p -> min-p.
- `logprobs` are log_softmax of the RAW model logits (before penalties, masking,
  temperature and filters) at the chosen token: the policy's own log-probability, which is
  what PPO / GRPO ratios need. (It is NOT the log-probability under the sampling
  distribution.)
- Per-row settings: `_row_plan` collapses uniform tuples to scalars (the static program),
  else makes the jit key (`_RowPlan`: which stages exist) and the runtime (B,) values
  (`_Rows`); `choose_row_tokens` then draws row b with fold_in(keys[b], step).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmx.infer.sampling import (apply_penalties, apply_row_penalties, check_penalties,
                                 check_sampling_args, chosen_logprob, filter_logits,
                                 filter_row_logits, greedy)


ROW_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
              "frequency_penalty", "presence_penalty", "min_new_tokens", "seed")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How to choose each token and when to stop. Hashable: the jit key, except `seed`,
  `stop_ids` (only their number) and `min_new_tokens`, which are runtime inputs.

  Every field in ROW_FIELDS may instead be a tuple with one value per prompt (per-row
  settings: one call serves requests with different settings; see the module docstring).
  A scalar applies to every row."""
  temperature: float | tuple[float, ...] = 1.0  # 0 = greedy
  top_k: int | tuple[int, ...] = 0  # keep the k most likely tokens; 0 disables
  top_p: float | tuple[float, ...] = 1.0  # nucleus mass; 1 disables
  min_p: float | tuple[float, ...] = 0.0  # keep p >= min_p * p_max; 0 disables
  repetition_penalty: float | tuple[float, ...] = 1.0  # CTRL; 1 disables, > 1 discourages
  frequency_penalty: float | tuple[float, ...] = 0.0  # OpenAI: -= f * count so far
  presence_penalty: float | tuple[float, ...] = 0.0  # OpenAI: -= p if generated before
  stop_ids: tuple[int, ...] = ()  # a row stops at the first of these (included)
  min_new_tokens: int | tuple[int, ...] = 0  # stop ids are masked until this many tokens
  seed: int | tuple[int, ...] = 0  # step i samples with fold_in(key(seed), i)

  def validate(self, vocab_size: int) -> SamplingOptions:
    for row in self.rows(max((len(getattr(self, f)) for f in ROW_FIELDS
                              if isinstance(getattr(self, f), tuple)), default=1)):
      check_sampling_args(row.temperature, row.top_k, row.top_p, row.min_p)
      check_penalties(row.repetition_penalty, row.frequency_penalty, row.presence_penalty)
      if row.min_new_tokens < 0:
        raise ValueError(f"engine: min_new_tokens is {row.min_new_tokens}; it must be >= 0.")
    if any(not 0 <= t < vocab_size for t in self.stop_ids):
      raise ValueError(f"engine: stop_ids {self.stop_ids} must be in [0, {vocab_size}).")
    return self

  def rows(self, n: int) -> list[SamplingOptions]:
    """The n rows' scalar settings (a scalar field repeats; a tuple must have n values)."""
    for f in ROW_FIELDS:
      v = getattr(self, f)
      if isinstance(v, tuple) and len(v) != n:
        raise ValueError(f"engine: {f} has {len(v)} per-row values; it needs one per prompt "
                         f"({n}) or a single value.")
    return [dataclasses.replace(self, **{f: getattr(self, f)[i] for f in ROW_FIELDS
                                         if isinstance(getattr(self, f), tuple)})
            for i in range(n)]

  @property
  def uses_counts(self) -> bool:
    return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0)


def sampling_logits(logits: jax.Array, step: jax.Array, counts: jax.Array | None,
                    prompt_seen: jax.Array | None, stop_ids: jax.Array, min_new: jax.Array,
                    opts: SamplingOptions) -> jax.Array:
  """Raw logits (B, V) at generation step `step` -> the float32 (B, V) logits a token is
  drawn from (argmax'd when temperature is 0), in the module docstring's order.

  counts (B, V): generated-token counts (None without penalties); prompt_seen (B, V): the
  prompt's tokens (None without a repetition penalty); stop_ids (S,) int32 are -inf while
  step < min_new."""
  z = logits.astype(jnp.float32)
  if opts.uses_counts:
    seen = None if prompt_seen is None else prompt_seen | (counts > 0)
    z = apply_penalties(z, counts, seen, opts.repetition_penalty, opts.frequency_penalty,
                        opts.presence_penalty)
  is_stop = jnp.zeros(z.shape[-1], bool).at[stop_ids].set(True)  # (V,)
  z = jnp.where(is_stop[None] & (step < min_new), -jnp.inf, z)
  if opts.temperature == 0:
    return z
  return filter_logits(z, opts.temperature, opts.top_k, opts.top_p, opts.min_p)


def choose_tokens(key: jax.Array, logits: jax.Array, step: jax.Array,
                  counts: jax.Array | None, prompt_seen: jax.Array | None,
                  stop_ids: jax.Array, min_new: jax.Array,
                  opts: SamplingOptions) -> tuple[jax.Array, jax.Array]:
  """Raw logits float32 (B, V) -> (tokens int32 (B,), their log-probs float32 (B,) under
  log_softmax(raw logits)). Step i draws with fold_in(key, i)."""
  z = sampling_logits(logits, step, counts, prompt_seen, stop_ids, min_new, opts)
  if opts.temperature == 0:
    tokens = greedy(z)
  else:
    tokens = jax.random.categorical(jax.random.fold_in(key, step), z, axis=-1).astype(jnp.int32)
  return tokens, chosen_logprob(logits.astype(jnp.float32), tokens)


@dataclasses.dataclass(frozen=True)
class _RowPlan:
  """The jit key of a per-row call: which stages its program has. The settings themselves
  are runtime (B,) arrays (`_Rows`), so requests with new values reuse the program."""
  sampled: bool  # some row has temperature > 0
  penalties: bool  # some row has a penalty (counts are kept)
  repetition: bool  # some row has a repetition penalty (prompt tokens are kept)
  static_filter: tuple | None  # (top_k, top_p, min_p) shared by every sampled row, or
  row_filter: bool  # the sampled rows' filters differ: `filter_row_logits` per step
  rank_width: int = 0  # its static top-k width (0: no row has top-k or top-p)

  @property
  def uses_counts(self) -> bool:
    return self.penalties


class _Rows(NamedTuple):
  """Per-row settings, (B,) each, runtime inputs of a per-row call."""
  temperature: jax.Array  # float32; 0 = greedy
  top_k: jax.Array  # int32; >= V disables
  top_p: jax.Array  # float32; 1 disables
  log_min_p: jax.Array  # float32; -inf disables
  repetition: jax.Array  # float32
  frequency: jax.Array  # float32
  presence: jax.Array  # float32
  max_new: jax.Array  # int32: the row ends after this many tokens


def choose_row_tokens(keys: jax.Array, logits: jax.Array, step: jax.Array,
                      counts: jax.Array | None, prompt_seen: jax.Array | None,
                      stop_ids: jax.Array, min_new: jax.Array, rows: _Rows,
                      plan: _RowPlan) -> tuple[jax.Array, jax.Array]:
  """`choose_tokens` with per-row settings and keys (B,): row b draws with
  fold_in(keys[b], step) from its own (V,) logits, so its tokens do not depend on the other
  rows (a row equals its prompt decoded alone with those scalar settings and that seed)."""
  z = logits.astype(jnp.float32)
  if plan.penalties:
    seen = None if prompt_seen is None else prompt_seen | (counts > 0)
    z = apply_row_penalties(z, counts, seen, rows.repetition, rows.frequency, rows.presence)
  is_stop = jnp.zeros(z.shape[-1], bool).at[stop_ids].set(True)  # (V,)
  z = jnp.where(is_stop[None] & (step < min_new)[:, None], -jnp.inf, z)
  tokens = greedy(z)  # greedy rows
  if plan.sampled:
    t = rows.temperature
    zs = z / jnp.where(t > 0, t, 1.0)[:, None]
    if plan.static_filter is not None:
      zs = filter_logits(zs, 1.0, *plan.static_filter)
    elif plan.row_filter:
      zs = filter_row_logits(zs, rows.top_k, rows.top_p, rows.log_min_p, plan.rank_width)
    drawn = jax.vmap(lambda k, r: jax.random.categorical(jax.random.fold_in(k, step), r))(
        keys, zs).astype(jnp.int32)
    tokens = jnp.where(t > 0, drawn, tokens)
  return tokens, chosen_logprob(logits.astype(jnp.float32), tokens)


def _row_plan(options: SamplingOptions, n: int, vocab: int, per_row_max: bool):
  """-> (options with every per-row field that is the same on all rows collapsed to its
  scalar, then _RowPlan and the rows' scalar settings, or None, None when nothing differs
  across rows: the static path). A seed tuple stays per row (row b draws with its own
  key) unless n == 1."""
  same = {}
  for f in ROW_FIELDS:
    v = getattr(options, f)
    if isinstance(v, tuple) and (len(set(v)) == 1 and (f != "seed" or n == 1)):
      same[f] = v[0]
  options = dataclasses.replace(options, **same)
  if not per_row_max and not any(isinstance(getattr(options, f), tuple) for f in ROW_FIELDS):
    return options, None, None
  rows = options.rows(n)
  sampled = [r for r in rows if r.temperature > 0]
  filters = {(min(r.top_k or vocab, vocab), r.top_p, r.min_p) for r in sampled}
  static_filter = None
  if len(filters) == 1 and filters != {(vocab, 1.0, 0.0)}:
    static_filter = next(iter(filters))
  # The rank stage's width: the vocabulary when a row has top-p without top-k (its
  # nucleus may need every token), else the largest k rounded up to a power of two (fewer
  # compiles; a top-k of the width, not a sort of the vocabulary, per step).
  width = max((k for k, _, _ in filters if k < vocab), default=0)
  if width:
    width = min(1 << (width - 1).bit_length(), vocab)
  if any(k >= vocab and p < 1.0 for k, p, _ in filters):
    width = vocab
  plan = _RowPlan(sampled=bool(sampled), penalties=any(r.uses_counts for r in rows),
                  repetition=any(r.repetition_penalty != 1.0 for r in rows),
                  static_filter=static_filter, row_filter=len(filters) > 1,
                  rank_width=width if len(filters) > 1 else 0)
  return options, plan, rows
