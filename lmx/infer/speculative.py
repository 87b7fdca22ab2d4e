"""Speculative decoding: a cheap proposer guesses k tokens, the target checks them in ONE pass.

    prompts --left pad to P (lmx.infer.engine.pad_prompts)--> tokens (B, P), start (B,)
      prefill: target (and draft) decode slots 0..P-2; the last prompt token is `last`
      round:   propose x_0..x_{k-1}   (draft model: k autoregressive samples from q;
                                       prompt lookup: the k tokens after the latest earlier
                                       match of the last `ngram` tokens, q one-hot)
               target.decode([last, x_0..x_{k-1}]) (B, k+1) -> p_0..p_k in ONE pass
               accept x_j with prob min(1, p_j(x_j) / q_j(x_j)); at the first rejection
               draw from norm(max(0, p_j - q_j)); if all k pass, a bonus token from p_k
               roll both caches back to the accepted length
    -> SpecResult(tokens, finish_reason, accepted, proposed, target_calls)

(Leviathan et al. 2023, Chen et al. 2023; prompt lookup: Saxena 2023.) Every emitted token
is distributed exactly as the target's own sampling distribution; greedy (temperature 0)
accepts iff x_j is the target argmax and corrects to that argmax, so the output equals the
target decoding alone.

Design choices:
- p and q are the PROCESSED distributions: `lmx.infer.choice.sampling_logits` (stop ids
  masked before min_new_tokens, temperature, top-k, top-p, min-p) for both models, then a
  softmax. Penalties are not supported (they would need per-position counts inside a round).
- Batches: per-row accept/reject, then every row keeps the MINIMUM accepted length m over
  the live rows, plus one token at position m: x_m where that row accepted it, else its
  correction (residual draw, or the bonus when m = k). This stays exact: the token at each
  position is the standard accept-or-correct value, and whether a position is reached
  depends only on earlier positions (and on independent other rows). It lets the caches
  keep ONE shared write index (rollback = `cache.index = c + m + 1`); stale slots past the
  index are masked by `cache_mask`'s causal rule and overwritten later. Large batches
  therefore accept less: speculation pays most at batch 1.
- The draft runs k + 1 steps per round (the last only writes x_{k-1} into its cache), so
  after a full acceptance both caches hold every slot below the new `last` token.
- One jit per (graphdefs, B, P, max_new, k, ngram, sampling settings): prefill and a
  `jax.lax.while_loop` over rounds are one program; the host syncs once, at the end.
  Round r draws with fold_in(key(seed), r). Rounds are shared by all rows; finished rows
  keep computing but record nothing and do not limit m.
- `target_calls` counts target forward passes INCLUDING the prefill, so decoding N tokens
  alone costs N calls (a prefill that yields the first token, then N - 1 steps); the
  speed-up in target calls is tokens / target_calls. `accepted` sums m over rounds and
  `proposed` is k per round (for batch 1: accepted draft tokens / draft tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.infer.choice import ROW_FIELDS, SamplingOptions, sampling_logits
from lmx.infer.engine import check_prompts, pad_prompts
from lmx.infer import sampling
from lmx.model.transformer import KVCache, Transformer, for_decoding


@dataclasses.dataclass(frozen=True)
class SpecResult:
  """Per row: new token ids (a stop id included, as the engine) and why the row ended
  ('stop' / 'length'); totals: accepted proposals, proposed tokens, target forward passes
  (prefill included)."""
  tokens: list[list[int]]
  finish_reason: list[str]
  accepted: int
  proposed: int
  target_calls: int

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / max(self.proposed, 1)


# ---- the accept / reject kernel (pure; probabilities over the last axis) ----

def acceptance_prob(p: jax.Array, q: jax.Array, x: jax.Array) -> jax.Array:
  """min(1, p(x) / q(x)): p, q (..., V) probabilities, x (...) int -> (...) float32."""
  px = jnp.take_along_axis(p, x[..., None], axis=-1)[..., 0]
  qx = jnp.take_along_axis(q, x[..., None], axis=-1)[..., 0]
  return jnp.minimum(1.0, px / qx)  # qx > 0: x was drawn from q


def residual_dist(p: jax.Array, q: jax.Array) -> jax.Array:
  """norm(max(0, p - q)) (..., V): what a rejection draws from. Where p == q (rounding can
  still reject) the residual is empty and p itself is returned."""
  r = jnp.maximum(p - q, 0.0)
  total = jnp.sum(r, axis=-1, keepdims=True)
  return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p)


def verify(key: jax.Array, z_target: jax.Array, q: jax.Array | None, x: jax.Array,
           greedy: bool) -> tuple[jax.Array, jax.Array]:
  """Check k proposals against the target.

  z_target (B, k+1, V): the target's processed logits at the k proposals and the bonus
  position; q (B, k, V): the proposer's probabilities (unused when greedy); x (B, k).
  Returns accept (B, k) bool and fix (B, k+1) int32: the token emitted at position j if j
  is the first rejection (j = k: the bonus token).
  """
  k = x.shape[1]
  if greedy:
    best = sampling.greedy(z_target)  # (B, k+1)
    return x == best[:, :k], best
  p = jax.nn.softmax(z_target, axis=-1)  # (B, k+1, V)
  k_accept, k_fix = jax.random.split(key)
  u = jax.random.uniform(k_accept, x.shape)
  accept = u < acceptance_prob(p[:, :k], q, x)
  r = jnp.concatenate([residual_dist(p[:, :k], q), p[:, k:]], axis=1)  # (B, k+1, V)
  fix = jax.random.categorical(k_fix, jnp.log(r), axis=-1).astype(jnp.int32)
  return accept, fix


# ---- proposers ----

def lookup_proposals(hist: jax.Array, c: jax.Array, start: jax.Array, k: int,
                     ngram: int) -> jax.Array:
  """Prompt lookup: hist (B, S) tokens by slot, valid in slots start[b]..c. The k tokens
  that followed the latest earlier occurrence (start s with s + ngram <= c) of the last
  `ngram` tokens hist[c-ngram+1..c]; tokens past slot c repeat hist[c]. No match: hist[c]
  k times. -> (B, k) int32."""
  b, s_max = hist.shape
  key = jax.lax.dynamic_slice_in_dim(hist, c - ngram + 1, ngram, axis=1)  # (B, ngram)
  n_win = s_max - ngram + 1
  match = jnp.ones((b, n_win), bool)
  for j in range(ngram):
    match &= hist[:, j:j + n_win] == key[:, j:j + 1]
  s = jnp.arange(n_win)
  match &= (s[None] >= start[:, None]) & (s[None] + ngram <= c)
  match &= (c - ngram + 1 >= start)[:, None]  # the key itself is real tokens
  best = jnp.max(jnp.where(match, s[None], -1), axis=1)  # (B,) latest match or -1
  idx = jnp.minimum(best[:, None] + ngram + jnp.arange(k)[None], c)  # (B, k)
  idx = jnp.where(best[:, None] >= 0, idx, c)
  return jnp.take_along_axis(hist, idx, axis=1)


class _Carry(NamedTuple):
  step: jax.Array  # () int32 token columns emitted so far (= slot of `last` - (P - 1))
  rounds: jax.Array  # () int32 verify passes
  accepted: jax.Array  # () int32 sum over rounds of m
  last: jax.Array  # (B,) int32 newest token, not yet in either cache
  cache: KVCache  # target
  draft_cache: KVCache | None
  hist: jax.Array | None  # (B, S) tokens by slot (prompt lookup)
  out: jax.Array  # (B, max_new + k + 1) int32
  length: jax.Array  # (B,) int32
  done: jax.Array  # (B,) bool
  stopped: jax.Array  # (B,) bool


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "max_new", "k",
                                             "ngram", "opts"))
def _spec_decode(graphdef, state, draft_graphdef, draft_state, tokens, start, key, stop_ids,
                 min_new, *, max_new: int, k: int, ngram: int, opts: SamplingOptions):
  """tokens (B, P) left-padded (P >= 2), start (B,) -> (out (B, max_new), length, stopped,
  rounds, accepted). draft_graphdef None = prompt lookup."""
  model = for_decoding(nnx.merge(graphdef, state))  # outside the loop (model.decode_layers)
  draft = None if draft_graphdef is None else for_decoding(nnx.merge(draft_graphdef,
                                                                     draft_state))
  greedy = opts.temperature == 0
  b, p = tokens.shape
  s_max = p + max_new + k
  slots = jnp.arange(p - 1, dtype=jnp.int32)
  positions = jnp.maximum(slots[None] - start[:, None], 0)  # (B, P-1)

  def prefill(m):
    cache = m.init_cache(b, s_max, kv_start=start)
    return m.decode(tokens[:, :-1], positions, cache, last_only=True)[1]

  def process(logits, step):  # raw (B, V) -> processed logits (B, V) at generation step
    return sampling_logits(logits, step, None, None, stop_ids, min_new, opts)

  def propose_draft(c: _Carry, rkey):
    """k + 1 draft steps: feeds last, x_0..x_{k-1}; -> x (B, k), q (B, k, V), cache."""
    def one(carry, j):
      cache, tok = carry
      pos = (p - 1 + c.step + j - start)[:, None]
      logits, cache = draft.decode(tok[:, None], pos, cache)
      z = process(logits[:, 0], c.step + j)
      if greedy:
        nxt = sampling.greedy(z)
      else:
        nxt = jax.random.categorical(jax.random.fold_in(rkey, j), z, axis=-1).astype(jnp.int32)
      return (cache, nxt), (nxt, jax.nn.softmax(z, axis=-1))
    (cache, _), (xs, qs) = jax.lax.scan(one, (c.draft_cache, c.last), jnp.arange(k + 1))
    return xs[:k].T, jnp.moveaxis(qs[:k], 0, 1), cache  # (B, k), (B, k, V)

  def body(c: _Carry) -> _Carry:
    slot = p - 1 + c.step  # slot of `last`
    rkey = jax.random.fold_in(key, c.rounds)
    k_draft, k_verify = jax.random.split(rkey)
    if draft is not None:
      x, q, draft_cache = propose_draft(c, k_draft)
    else:
      x = lookup_proposals(c.hist, slot, start, k, ngram)
      q = jax.nn.one_hot(x, model.cfg.vocab_size, dtype=jnp.float32)
      draft_cache = None
    fed = jnp.concatenate([c.last[:, None], x], axis=1)  # (B, k+1)
    pos = slot + jnp.arange(k + 1, dtype=jnp.int32)[None] - start[:, None]
    logits, cache = model.decode(fed, pos, c.cache)  # (B, k+1, V), one target pass
    z = jnp.stack([process(logits[:, j], c.step + j) for j in range(k + 1)], axis=1)
    accept, fix = verify(k_verify, z, q, x, greedy)

    n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # (B,) leading accepts
    m = jnp.min(jnp.where(c.done, k, n))  # () shared accepted length
    cols = jnp.arange(k + 1)
    accept_m = jnp.concatenate([accept, jnp.zeros((b, 1), bool)], axis=1)[:, m]
    x_pad = jnp.concatenate([x, jnp.zeros((b, 1), jnp.int32)], axis=1)  # (B, k+1)
    y = jnp.where(accept_m, x_pad[:, m], fix[:, m])
    emitted = jnp.where(cols[None] < m, x_pad, jnp.where(cols[None] == m, y[:, None], 0))

    live = ~c.done
    valid = live[:, None] & (cols[None] <= m) & (c.step + cols[None] < max_new)  # (B, k+1)
    is_stop = valid & jnp.any(emitted[..., None] == stop_ids, axis=-1)
    first_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, axis=1), k + 1)
    keep = valid & (cols[None] <= first_stop[:, None])
    old = jax.lax.dynamic_slice_in_dim(c.out, c.step, k + 1, axis=1)
    out = jax.lax.dynamic_update_slice_in_dim(c.out, jnp.where(keep, emitted, old), c.step,
                                              axis=1)
    hist = c.hist
    if hist is not None:  # slots slot+1.. get emitted; junk past the new `last` is overwritten
      hist = jax.lax.dynamic_update_slice_in_dim(hist, emitted, slot + 1, axis=1)
    new_index = slot + m + 1  # rollback: forget the rejected slots
    cache = cache.replace(index=new_index)
    if draft_cache is not None:
      draft_cache = draft_cache.replace(index=new_index)
    stopped = c.stopped | jnp.any(is_stop, axis=1)
    step = c.step + m + 1
    return c._replace(step=step, rounds=c.rounds + 1, accepted=c.accepted + m, last=y,
                      cache=cache, draft_cache=draft_cache, hist=hist, out=out,
                      length=c.length + jnp.sum(keep, axis=1, dtype=jnp.int32),
                      stopped=stopped, done=c.done | stopped | (step >= max_new))

  def cond(c: _Carry) -> jax.Array:
    return (c.step < max_new) & ~jnp.all(c.done)

  hist = None
  if draft is None:
    hist = jnp.zeros((b, s_max + k + 1), jnp.int32).at[:, :p].set(tokens)
  zero = jnp.zeros((), jnp.int32)
  first = _Carry(step=zero, rounds=zero, accepted=zero, last=tokens[:, -1],
                 cache=prefill(model), draft_cache=None if draft is None else prefill(draft),
                 hist=hist, out=jnp.zeros((b, max_new + k + 1), jnp.int32),
                 length=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                 stopped=jnp.zeros((b,), bool))
  c = jax.lax.while_loop(cond, body, first)
  return c.out[:, :max_new], c.length, c.stopped, c.rounds, c.accepted


def _run(target: Transformer, draft: Transformer | None, prompts, max_new_tokens: int,
         options: SamplingOptions, k: int, ngram: int, prompt_bucket: int) -> SpecResult:
  vocab = target.cfg.vocab_size
  prompts = check_prompts("speculative", prompts, vocab, max_new_tokens)
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"speculative: k is {k!r}; it must be an int >= 1.")
  if not isinstance(ngram, int) or ngram < 1:
    raise ValueError(f"speculative: ngram is {ngram!r}; it must be an int >= 1.")
  if draft is not None and draft.cfg.vocab_size != vocab:
    raise ValueError(f"speculative: the draft's vocab_size {draft.cfg.vocab_size} differs "
                     f"from the target's {vocab}; they must share one tokenizer.")
  options.validate(vocab)
  per_row = [f for f in ROW_FIELDS if isinstance(getattr(options, f), tuple)]
  if per_row:
    raise ValueError(f"speculative: per-row settings ({', '.join(per_row)}) are not supported; "
                     "give one value for every prompt, or use lmx.infer.engine.decode.")
  if options.uses_counts:
    raise ValueError("speculative: repetition / frequency / presence penalties are not "
                     "supported; use lmx.infer.engine.decode.")
  limit = None
  for m in (target, draft):
    if m is not None and m.cfg.position == "learned":
      limit = min(limit or m.cfg.max_seq_len, m.cfg.max_seq_len) - max_new_tokens - k
      if max(map(len, prompts)) + 1 > limit:
        raise ValueError(f"speculative: prompt + max_new_tokens + k exceeds a model's "
                         f"max_seq_len={m.cfg.max_seq_len} (learned position table).")
  tokens, start = pad_prompts(prompts, prompt_bucket, limit)
  if tokens.shape[1] < 2:  # the prefill needs >= 1 slot before `last`: one more pad column
    tokens, start = pad_prompts(prompts, 2)
  graphdef, state = nnx.split(target)
  draft_graphdef, draft_state = (None, None) if draft is None else nnx.split(draft)
  static = dataclasses.replace(options, seed=0, stop_ids=(), min_new_tokens=0)
  out, length, stopped, rounds, accepted = jax.device_get(_spec_decode(
      graphdef, state, draft_graphdef, draft_state, jnp.asarray(tokens), jnp.asarray(start),
      jax.random.key(options.seed), jnp.asarray(options.stop_ids, jnp.int32).reshape(-1),
      jnp.asarray(options.min_new_tokens, jnp.int32), max_new=max_new_tokens, k=k,
      ngram=ngram, opts=static))
  return SpecResult(tokens=[out[i, :length[i]].tolist() for i in range(len(prompts))],
                    finish_reason=["stop" if s else "length" for s in stopped],
                    accepted=int(accepted), proposed=int(rounds) * k,
                    target_calls=int(rounds) + 1)


def speculative_decode(target: Transformer, draft: Transformer,
                       prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       options: SamplingOptions = SamplingOptions(), *, k: int = 4,
                       prompt_bucket: int = 8) -> SpecResult:
  """Continue each prompt by up to `max_new_tokens` tokens sampled exactly from `target`'s
  processed distribution, with `draft` (same vocabulary) proposing k tokens per round."""
  return _run(target, draft, prompts, max_new_tokens, options, k, 1, prompt_bucket)


def prompt_lookup_decode(target: Transformer, prompts: Sequence[Sequence[int]],
                         max_new_tokens: int, options: SamplingOptions = SamplingOptions(),
                         *, k: int = 4, ngram: int = 2, prompt_bucket: int = 8) -> SpecResult:
  """As `speculative_decode`, with the proposals looked up in the row's own prompt +
  generated tokens (the k tokens after the latest earlier match of its last `ngram`)."""
  return _run(target, None, prompts, max_new_tokens, options, k, ngram, prompt_bucket)
