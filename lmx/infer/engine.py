"""The decode engine: ragged prompts -> sampled continuations, prefill + one jitted loop.

    prompts (lists of ids, any lengths) --left pad to P--> tokens (B, P), start (B,)
      prefill: one model.decode over (B, P) fills cache slots 0..P-1; LM head on slot P-1 only
      loop:    jax.lax.while_loop, one token per row per step, until every row is done
               or max_new_tokens columns are filled
    -> DecodeResult(tokens, logprobs, finish_reason, steps)
    stream(...): the same, yielding StreamChunk(new tokens per row, ...) every `chunk` steps

Design choices:
- Ragged batches by LEFT padding. Row b has start[b] = P - len(prompt_b) pad slots, so
  every row's last prompt token sits in slot P-1 and every row writes the same slot each
  step: the cache keeps ONE shared write index (one dynamic_update_slice for all rows).
  Positions are per row, slot - start[b] (RoPE / learned / sinusoidal see the unpadded
  positions), and `KVCache.kv_start = start` makes attention skip each row's pad slots
  (`lmx.model.attention.cache_mask`). Each row therefore equals its prompt decoded alone.
  Pad slots hold token 0 at position 0 (finite activations, never read by a real query).
- P is rounded up to a multiple of `prompt_bucket` (8) so nearby prompt lengths share one
  compiled program; padding is masked, so it changes no number beyond float summation order.
- Two jitted programs per (graphdef, B, P, max_new_tokens, number of stop ids, sampling
  settings): `_start_jit` (create the cache, prefill, choose token 0) and `_advance_jit`
  (the while_loop, run until a step limit that is a RUNTIME input, or every row is done).
  `decode` runs start + one advance to max_new_tokens and syncs the host once, at the end;
  `stream` runs start + one advance per chunk (one compile serves every chunk) and copies
  only the chunk's new columns and the per-row flags to the host. The carry is donated to
  `_advance_jit`, so the cache and the buffers stay on the device, updated in place, and
  are never copied to or from the host. The seed, the stop ids and min_new_tokens are
  runtime inputs (no recompile); temperature, top-k/p, min-p and the penalties are static
  (top-k needs a static k; the others select code paths).
- Per-row settings (the server's batches): any of temperature, top_k, top_p, min_p, the
  penalties, min_new_tokens and seed may be a tuple with one value per prompt, and
  max_new_tokens a list (the static loop bound is the largest; a row ends at its own).
  When some of them differ across rows, the call takes the per-row program: the values
  are runtime (B,) arrays (`_Rows`), the jit key only says which stages exist
  (`_RowPlan`), and row b draws with fold_in(key(seed_b), i) from its own (V,) logits,
  so a row equals its prompt decoded alone with those settings as scalars, whatever
  batch it shares. Top-k with a runtime k takes each row's top `width` tokens once per
  step and masks by rank (`filter_row_logits`; width = the largest k, rounded up to a
  power of two, or the vocabulary if a row has top-p without top-k, as the static top-p
  already does); that runs only when the sampled rows' filters differ (shared filters
  stay the static `filter_logits`). Uniform tuples collapse to scalars, so the
  static program above is unchanged and still serves every call without per-row values.
- The loop carry (`_Carry`): the cache, the output buffers (B, max_new) of tokens and
  log-probs, per-row lengths and done / stopped flags, the step counter, and per-row token
  counts (B, V) when a penalty needs them. Loop invariants (`_Fixed`: key, stop ids,
  min_new, pad starts, prompt tokens seen) are passed beside it, not donated. The RNG key
  of step i is fold_in(key(seed), i) (no split in the carry). Finished rows keep computing
  (the batch is dense) but record nothing.
- Sampling order and log-probs: `lmx.infer.choice` (penalties -> stop-id mask ->
  temperature -> top-k -> top-p -> min-p; log-probs of the raw logits).
- Stopping: a row stops at the first sampled id in `stop_ids` (finish_reason 'stop'; the
  stop id IS included in tokens / logprobs, as an RL trajectory needs it) or after
  max_new_tokens tokens ('length'). The loop stops on token ids only; stop STRINGS are
  applied after decoding, in the generate / CLI layer (`lmx.infer.generate`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# How each token is chosen lives in lmx.infer.choice; its names are re-exported here.
from lmx.infer.choice import (ROW_FIELDS, SamplingOptions, _row_plan, _RowPlan, _Rows,  # noqa: F401
                              choose_row_tokens, choose_tokens, sampling_logits)
from lmx.model.transformer import KVCache, Transformer, for_decoding


@dataclasses.dataclass(frozen=True)
class DecodeResult:
  """Per row: new token ids (a stop id included), their log-probs under the raw model
  logits, and why the row ended ('stop' or 'length'); `steps` is the number of token
  columns the loop ran (< max_new_tokens when every row stopped early)."""
  tokens: list[list[int]]
  logprobs: list[list[float]]
  finish_reason: list[str]
  steps: int


class _Carry(NamedTuple):
  step: jax.Array  # () int32: token columns written so far
  cache: KVCache
  out: jax.Array  # (B, max_new) int32 chosen tokens (0 where a row had finished)
  logprobs: jax.Array  # (B, max_new) float32 log-probs of the chosen tokens (raw logits)
  length: jax.Array  # (B,) int32 tokens recorded per row
  done: jax.Array  # (B,) bool: row finished (stop id or max_new)
  stopped: jax.Array  # (B,) bool: row finished on a stop id
  counts: jax.Array | None  # (B, V) int32 generated-token counts, when a penalty needs them


class _Fixed(NamedTuple):
  """Loop invariants: read by every step, never written (so never donated)."""
  key: jax.Array  # the seed's key; step i draws with fold_in(key, i) ((B,) keys per row)
  stop_ids: jax.Array  # (S,) int32
  min_new: jax.Array  # () int32 ((B,) per row): stop ids are masked while step < min_new
  start: jax.Array  # (B,) int32 pad slots per row
  prompt_seen: jax.Array | None  # (B, V) bool prompt tokens, with a repetition penalty
  rows: _Rows | None = None  # per-row settings (a per-row call), else None


def _record(c: _Carry, logits: jax.Array, fixed: _Fixed, opts: SamplingOptions) -> _Carry:
  """Choose each row's token from raw logits (B, V) and write column c.step."""
  max_new = c.out.shape[1]
  if fixed.rows is None:
    tok, lp = choose_tokens(fixed.key, logits, c.step, c.counts, fixed.prompt_seen,
                            fixed.stop_ids, fixed.min_new, opts)
  else:
    tok, lp = choose_row_tokens(fixed.key, logits, c.step, c.counts, fixed.prompt_seen,
                                fixed.stop_ids, fixed.min_new, fixed.rows, opts)
  live = ~c.done
  out = c.out.at[:, c.step].set(jnp.where(live, tok, 0))
  logprobs = c.logprobs.at[:, c.step].set(jnp.where(live, lp, 0.0))
  counts = c.counts
  if counts is not None:
    counts = counts.at[jnp.arange(tok.shape[0]), tok].add(live.astype(jnp.int32))
  hit = live & jnp.any(tok[:, None] == fixed.stop_ids[None], axis=-1)  # False when S == 0
  step = c.step + 1
  length = c.length + live.astype(jnp.int32)
  stopped = c.stopped | hit
  done = c.done | hit | (step >= max_new)
  if fixed.rows is not None:
    done = done | (step >= fixed.rows.max_new)
  return c._replace(step=step, out=out, logprobs=logprobs, counts=counts, length=length,
                    stopped=stopped, done=done)


def _start(model: Transformer, tokens, start, key, stop_ids, min_new, rows, max_new: int,
           opts: SamplingOptions | _RowPlan) -> tuple[_Fixed, _Carry]:
  """Prefill: tokens (B, P) left-padded, start (B,) pad slots per row -> the loop
  invariants and the carry after the first token (step 1)."""
  b, p = tokens.shape
  v = model.cfg.vocab_size
  slots = jnp.arange(p, dtype=jnp.int32)
  real = slots[None] >= start[:, None]  # (B, P): not padding
  # (B, P) unpadded positions; pad slots at 0 (finite: a learned table has no row -1)
  positions = jnp.maximum(slots[None] - start[:, None], 0)
  cache = model.init_cache(b, p + max_new, kv_start=start)
  logits, cache = model.decode(tokens, positions, cache, last_only=True)  # (B, 1, V)

  prompt_seen = counts = None
  if opts.uses_counts:
    counts = jnp.zeros((b, v), jnp.int32)
    if (opts.repetition if isinstance(opts, _RowPlan) else opts.repetition_penalty != 1.0):
      prompt_seen = jnp.zeros((b, v), jnp.int32).at[jnp.arange(b)[:, None], tokens].add(
          real.astype(jnp.int32)) > 0
  fixed = _Fixed(key=key, stop_ids=stop_ids, min_new=min_new, start=start,
                 prompt_seen=prompt_seen, rows=rows)
  first = _Carry(step=jnp.zeros((), jnp.int32), cache=cache,
                 out=jnp.zeros((b, max_new), jnp.int32),
                 logprobs=jnp.zeros((b, max_new), jnp.float32),
                 length=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                 stopped=jnp.zeros((b,), bool), counts=counts)
  return fixed, _record(first, logits[:, 0], fixed, opts)


def _advance(model: Transformer, fixed: _Fixed, c: _Carry, until: jax.Array,
             opts: SamplingOptions | _RowPlan) -> _Carry:
  """Run the loop from c.step until step == `until` (() int32, a runtime value: one
  compile serves every chunk) or every row is done."""

  def body(c: _Carry) -> _Carry:
    prev = c.out[:, c.step - 1]  # (B,) the token chosen last step, at slot cache.index
    pos = (c.cache.index - fixed.start)[:, None]  # (B, 1) unpadded positions
    logits, cache = model.decode(prev[:, None], pos, c.cache)  # (B, 1, V)
    return _record(c._replace(cache=cache), logits[:, 0], fixed, opts)

  def cond(c: _Carry) -> jax.Array:
    return (c.step < until) & ~jnp.all(c.done)

  return jax.lax.while_loop(cond, body, c)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "opts"))
def _start_jit(graphdef, state, tokens, start, key, stop_ids, min_new, rows=None, *,
               max_new: int, opts: SamplingOptions | _RowPlan) -> tuple[_Fixed, _Carry]:
  # for_decoding: the layers' decode layout (model.decode_layers), made outside the loop.
  return _start(for_decoding(nnx.merge(graphdef, state)), tokens, start, key, stop_ids,
                min_new, rows, max_new, opts)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"), donate_argnames=("carry",))
def _advance_jit(graphdef, state, fixed: _Fixed, carry: _Carry, until, *,
                 opts: SamplingOptions | _RowPlan) -> _Carry:
  """The carry is donated: the cache and the output buffers are updated in place across
  calls (a stream's chunks), never copied."""
  return _advance(for_decoding(nnx.merge(graphdef, state)), fixed, carry, until, opts)


@functools.partial(jax.jit, static_argnames=("width",))
def _columns(out, logprobs, lo, *, width: int):
  """Columns [lo, lo + width) of the (B, max_new) output buffers: the only part of the
  carry a stream copies to the host per chunk (lo <= max_new - width, or it is clamped)."""
  return (jax.lax.dynamic_slice_in_dim(out, lo, width, axis=1),
          jax.lax.dynamic_slice_in_dim(logprobs, lo, width, axis=1))


def check_prompts(who: str, prompts: Sequence[Sequence[int]], vocab: int,
                  max_new_tokens) -> list[list[int]]:
  """The prompts as int lists, or one sentence (prefixed `who:`) naming what is wrong:
  none or an empty one, an id outside [0, vocab), max_new_tokens not an int >= 1."""
  prompts = [list(map(int, q)) for q in prompts]
  if not prompts or any(len(q) == 0 for q in prompts):
    raise ValueError(f"{who}: needs at least one prompt, and every prompt needs >= 1 token.")
  flat = [t for q in prompts for t in q]
  if min(flat) < 0 or max(flat) >= vocab:
    raise ValueError(f"{who}: prompt token ids must be in [0, {vocab}) (model.vocab_size); "
                     f"got values in [{min(flat)}, {max(flat)}].")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"{who}: max_new_tokens is {max_new_tokens!r}; it must be an int >= 1.")
  return prompts


def pad_prompts(prompts: Sequence[Sequence[int]], bucket: int = 1,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad prompts with id 0 to P = max length rounded up to `bucket` (but not past
  `limit`, if given and the bucket would cross it) -> (tokens int32 (B, P), start (B,))."""
  longest = max(len(q) for q in prompts)
  p = -(-longest // bucket) * bucket
  if limit is not None and p > limit:
    p = longest
  tokens = np.zeros((len(prompts), p), np.int32)
  start = np.asarray([p - len(q) for q in prompts], np.int32)
  for i, q in enumerate(prompts):
    tokens[i, start[i]:] = q
  return tokens, start


def _begin(model: Transformer, prompts: Sequence[Sequence[int]],
           max_new_tokens: int | Sequence[int], options: SamplingOptions, prompt_bucket: int):
  """Validate, pad and prefill -> (graphdef, state, static options or _RowPlan, fixed, carry
  at step 1, max_new bound); nothing is synced to the host."""
  vocab = model.cfg.vocab_size
  per_row_max = None
  if not isinstance(max_new_tokens, int):  # one limit per row; the loop bound is the largest
    per_row_max = list(max_new_tokens)
    if len(per_row_max) != len(prompts) or any(not isinstance(m, int) or m < 1
                                               for m in per_row_max):
      raise ValueError(f"engine: max_new_tokens is {max_new_tokens!r}; it must be an int >= 1 "
                       f"or one such int per prompt ({len(prompts)}).")
    max_new_tokens = max(per_row_max)
    if len(set(per_row_max)) == 1:
      per_row_max = None
  prompts = check_prompts("engine", prompts, vocab, max_new_tokens)
  options.validate(vocab)
  longest = max(len(q) for q in prompts)
  limit = None
  if model.cfg.position == "learned":  # positions (not slots) index the table
    limit = model.cfg.max_seq_len - max_new_tokens
    if longest > limit:
      raise ValueError(f"engine: prompt length {longest} + max_new_tokens {max_new_tokens} "
                       f"= {longest + max_new_tokens} exceeds model.max_seq_len="
                       f"{model.cfg.max_seq_len} (learned position table).")
  tokens, start = pad_prompts(prompts, prompt_bucket, limit)
  graphdef, state = nnx.split(model)
  stop_ids = jnp.asarray(options.stop_ids, jnp.int32).reshape(-1)
  options, plan, rows = _row_plan(options, len(prompts), vocab, per_row_max is not None)
  if plan is None:  # the static path: one setting for every row
    static = dataclasses.replace(options, seed=0, stop_ids=(), min_new_tokens=0)
    fixed, carry = _start_jit(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(start), jax.random.key(options.seed),
        stop_ids, jnp.asarray(options.min_new_tokens, jnp.int32), max_new=max_new_tokens,
        opts=static)
    return graphdef, state, static, fixed, carry, max_new_tokens
  f32 = lambda xs: jnp.asarray(np.asarray(xs, np.float32))  # noqa: E731
  sampled = [r.temperature > 0 for r in rows]
  row_arrays = _Rows(
      temperature=f32([r.temperature for r in rows]),
      top_k=jnp.asarray([min(r.top_k or vocab, vocab) if s else vocab
                         for r, s in zip(rows, sampled)], jnp.int32),
      top_p=f32([r.top_p if s else 1.0 for r, s in zip(rows, sampled)]),
      log_min_p=f32([np.log(np.float64(r.min_p)) if s and r.min_p > 0 else -np.inf
                     for r, s in zip(rows, sampled)]),
      repetition=f32([r.repetition_penalty for r in rows]),
      frequency=f32([r.frequency_penalty for r in rows]),
      presence=f32([r.presence_penalty for r in rows]),
      max_new=jnp.asarray(per_row_max or [max_new_tokens] * len(rows), jnp.int32))
  keys = jnp.stack([jax.random.key(r.seed) for r in rows])
  fixed, carry = _start_jit(
      graphdef, state, jnp.asarray(tokens), jnp.asarray(start), keys, stop_ids,
      jnp.asarray([r.min_new_tokens for r in rows], jnp.int32), row_arrays,
      max_new=max_new_tokens, opts=plan)
  return graphdef, state, plan, fixed, carry, max_new_tokens


def decode(model: Transformer, prompts: Sequence[Sequence[int]],
           max_new_tokens: int | Sequence[int],
           options: SamplingOptions = SamplingOptions(), *,
           prompt_bucket: int = 8) -> DecodeResult:
  """Continue each prompt (a list of ids; lengths may differ) by up to `max_new_tokens`
  tokens: prefill, then ONE loop to the end; the host syncs once. See the module
  docstring for the semantics."""
  graphdef, state, static, fixed, c, max_new_tokens = _begin(model, prompts, max_new_tokens,
                                                             options, prompt_bucket)
  c = _advance_jit(graphdef, state, fixed, c, jnp.int32(max_new_tokens), opts=static)
  out, logprobs, length, stopped, steps = jax.device_get(
      (c.out, c.logprobs, c.length, c.stopped, c.step))
  return DecodeResult(
      tokens=[out[i, :length[i]].tolist() for i in range(len(out))],
      logprobs=[logprobs[i, :length[i]].tolist() for i in range(len(out))],
      finish_reason=["stop" if s else "length" for s in stopped],
      steps=int(steps))


@dataclasses.dataclass(frozen=True)
class StreamChunk:
  """Per row: the tokens (and raw-logit log-probs) recorded since the previous chunk
  (empty for a row that finished earlier), whether the row is done, and why ('stop' or
  'length'; None while it runs). `steps` counts the token columns run so far."""
  tokens: list[list[int]]
  logprobs: list[list[float]]
  done: list[bool]
  finish_reason: list[str | None]
  steps: int


def stream(model: Transformer, prompts: Sequence[Sequence[int]],
           max_new_tokens: int | Sequence[int],
           options: SamplingOptions = SamplingOptions(), *, chunk: int = 16,
           prompt_bucket: int = 8) -> Iterator[StreamChunk]:
  """`decode`, yielded every `chunk` token columns: the same programs (prefill, then the
  loop resumed to step chunk, 2 chunk, ...; the step limit is a runtime input), so the
  chunks concatenate to `decode`'s result exactly. The carry (cache, buffers) stays on
  the device; per chunk only the new (B, <= chunk) columns and the per-row flags are
  copied to the host. Ends after ceil(steps / chunk) chunks: at max_new_tokens, or as
  soon as every row is done (no empty trailing chunk)."""
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"engine: chunk is {chunk!r}; it must be an int >= 1.")
  graphdef, state, static, fixed, c, max_new_tokens = _begin(model, prompts, max_new_tokens,
                                                             options, prompt_bucket)
  width = min(chunk, max_new_tokens)
  lo = 0  # the first column not yet sent
  while True:
    until = min(lo + chunk, max_new_tokens)
    c = _advance_jit(graphdef, state, fixed, c, jnp.int32(until), opts=static)
    first = min(lo, max_new_tokens - width)  # _columns' start, clamped to fit `width`
    out, logprobs = _columns(c.out, c.logprobs, jnp.int32(first), width=width)
    # NOTE: fetched before the next _advance_jit call donates (invalidates) this carry.
    out, logprobs, length, done, stopped, step = jax.device_get(
        (out, logprobs, c.length, c.done, c.stopped, c.step))
    step = int(step)
    rows = [slice(lo - first, max(lo, min(step, n)) - first) for n in length.tolist()]
    yield StreamChunk(
        tokens=[out[i, r].tolist() for i, r in enumerate(rows)],
        logprobs=[logprobs[i, r].tolist() for i, r in enumerate(rows)],
        done=done.tolist(),
        finish_reason=[("stop" if s else "length") if d else None
                       for d, s in zip(done.tolist(), stopped.tolist())],
        steps=step)
    if done.all() or step >= max_new_tokens:
      return
    lo = step
