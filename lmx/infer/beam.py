"""Beam search: ragged prompts -> the n best continuations per prompt, in ONE jitted program.

    prompts --left pad to P (lmx.infer.engine.pad_prompts)--> tokens (B, P), start (B,)
      prefill: one model.decode over the B prompts (each prompt once), LM head on slot P-1
      tile:    cache rows b -> b*K .. b*K+K-1 (K = beams), logits likewise
      loop:    jax.lax.while_loop, one token per beam per step:
               cand (B, K*V) = beam score + log_softmax(logits); top-K over cand;
               REORDER the cache rows by the chosen parent beams; decode the new tokens
    -> per prompt, up to n_best (tokens, score), best first

Design choices:
- Scores are sums of log_softmax(raw logits) (no temperature, penalties or filters). A
  finished hypothesis scores sum_logprob / length ** length_penalty with length = generated
  tokens INCLUDING the stop token (the Hugging Face convention); the stop id is kept in the
  returned tokens (as `lmx.infer.engine` keeps it).
- Step 0 has one distinct beam per prompt: beams 1..K-1 start at score -inf, so the first
  top-K draws from beam 0 only and no duplicate hypotheses arise.
- Each step, as Hugging Face: of the K best candidates of a prompt (over K*V), those that
  end in a stop id enter the prompt's finished pool (size n_best, kept sorted by score);
  the K live beams are the K best candidates that are NOT stop ids, so K beams stay live.
- Reordering: live beam j of prompt b continues parent beam p, so cache row b*K+j takes
  row b*K+p (one gather over the batch axis of every cache leaf -- k/v (L, B*K, kv heads, S, H),
  int8 scales if any -- and of kv_start). The write index is shared, as in the engine.
- Stopping per prompt (`done`): early_stopping=True stops a prompt as soon as its pool
  holds n_best finished hypotheses (HF early_stopping=True). early_stopping=False stops it
  only when the pool is full AND no live beam can still beat the pool's worst: the bound
  is best_live / max_len ** lp when lp > 0 (log-probs only lower a sum, but a longer
  length divides a negative sum by more) and best_live / (step + 1) ** lp otherwise
  (HF early_stopping="never"). The loop ends when every prompt is done or after
  max_new_tokens steps; then prompts not done add their live beams (length max_new, no
  stop token) to the pool, as HF's finalize does.
- One jit per (graphdef, B, P, max_new, beams, n_best, length_penalty, early_stopping,
  number of stop ids); the stop ids are a runtime input. Done prompts keep computing (the
  batch is dense) but add nothing to their pool.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.infer.engine import check_prompts, pad_prompts
from lmx.model.transformer import KVCache, Transformer, for_decoding


class _Carry(NamedTuple):
  step: jax.Array  # () int32: tokens generated per live beam so far
  cache: KVCache  # B*K rows, row b*K + j is beam j of prompt b
  seqs: jax.Array  # (B, K, max_new) int32 live beams' tokens
  scores: jax.Array  # (B, K) float32 live beams' summed log-probs
  fin_seqs: jax.Array  # (B, N, max_new) int32 finished hypotheses (stop id included)
  fin_scores: jax.Array  # (B, N) float32 length-normalized, sorted, -inf = empty
  fin_len: jax.Array  # (B, N) int32 generated tokens of each finished hypothesis
  done: jax.Array  # (B,) bool: the prompt's pool is final


def _normalize(raw: jax.Array, length: jax.Array, lp: float) -> jax.Array:
  """sum log-prob / length ** length_penalty (float32)."""
  return raw / length.astype(jnp.float32) ** lp


def _merge_pool(fin_seqs, fin_scores, fin_len, seqs, scores, lens, n: int):
  """Pool (B, N, ...) + candidates (B, C, ...) -> the best N, sorted (pool first on ties)."""
  all_scores = jnp.concatenate([fin_scores, scores], axis=1)  # (B, N + C)
  best, idx = jax.lax.top_k(all_scores, n)  # (B, N)
  all_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)  # (B, N + C, max_new)
  all_len = jnp.concatenate([fin_len, lens], axis=1)
  return (jnp.take_along_axis(all_seqs, idx[:, :, None], axis=1), best,
          jnp.take_along_axis(all_len, idx, axis=1))


def reorder_cache(cache: KVCache, rows: jax.Array) -> KVCache:
  """Gather cache rows (the batch axis: axis 1 of every stacked (L, B, ...) leaf, axis 0
  of a per-layer tuple's (B, ...) leaves (`UnrolledLayers`) and of kv_start) -> row i of
  the result is row rows[i] of `cache`."""
  axis = 0 if isinstance(cache.layers, tuple) else 1
  layers = jax.tree.map(lambda x: jnp.take(x, rows, axis=axis), cache.layers)
  kv_start = None if cache.kv_start is None else jnp.take(cache.kv_start, rows, axis=0)
  return KVCache(layers=layers, index=cache.index, kv_start=kv_start)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "beams", "n_best",
                                             "length_penalty", "early_stopping"))
def _beam(graphdef, state, tokens, start, stop_ids, *, max_new: int, beams: int, n_best: int,
          length_penalty: float, early_stopping: bool):
  """tokens (B, P) left-padded, start (B,), stop_ids (S,) -> (fin_seqs (B, N, max_new),
  fin_scores (B, N) sorted, fin_len (B, N), steps ())."""
  model = for_decoding(nnx.merge(graphdef, state))  # outside the loop (model.decode_layers)
  b, p = tokens.shape
  k, n = beams, n_best
  v = model.cfg.vocab_size
  slots = jnp.arange(p, dtype=jnp.int32)
  positions = jnp.maximum(slots[None] - start[:, None], 0)  # (B, P), pads at 0 as the engine
  cache = model.init_cache(b, p + max_new, kv_start=start)
  logits, cache = model.decode(tokens, positions, cache, last_only=True)  # (B, 1, V)
  tiled = jnp.repeat(jnp.arange(b), k)  # (B*K,) row b*K + j <- prompt b
  cache = reorder_cache(cache, tiled)
  logits = jnp.take(logits[:, 0], tiled, axis=0)  # (B*K, V)
  start_k = jnp.take(start, tiled)  # (B*K,)
  is_stop = jnp.zeros(v, bool).at[stop_ids].set(True)  # (V,)
  base = (jnp.arange(b, dtype=jnp.int32) * k)[:, None]  # (B, 1) first row of each prompt

  def record(c: _Carry, logits) -> _Carry:
    """Logits (B*K, V) after each live beam's last token -> the next beams and pool."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, v)
    cand = (c.scores[:, :, None] + logp).reshape(b, k * v)  # (B, K*V)
    length = c.step + 1  # tokens generated by every candidate
    # Finished: the stop-id candidates among the K best of all candidates.
    top, top_idx = jax.lax.top_k(cand, k)  # (B, K)
    top_parent, top_tok = top_idx // v, top_idx % v
    ok = is_stop[top_tok] & ~c.done[:, None] & jnp.isfinite(top)
    fin_new = jnp.where(ok, _normalize(top, length, length_penalty), -jnp.inf)
    seq_new = jnp.take_along_axis(c.seqs, top_parent[:, :, None], axis=1)  # (B, K, max_new)
    seq_new = seq_new.at[:, :, c.step].set(top_tok)
    fin_seqs, fin_scores, fin_len = _merge_pool(
        c.fin_seqs, c.fin_scores, c.fin_len, seq_new, fin_new,
        jnp.full((b, k), length, jnp.int32), n)
    # Live: the K best candidates that are not stop ids.
    live = jnp.where(jnp.tile(is_stop, k)[None], -jnp.inf, cand)
    scores, idx = jax.lax.top_k(live, k)  # (B, K)
    parent, tok = idx // v, idx % v
    seqs = jnp.take_along_axis(c.seqs, parent[:, :, None], axis=1).at[:, :, c.step].set(tok)
    cache = reorder_cache(c.cache, (base + parent).reshape(-1).astype(jnp.int32))
    # Per-prompt stopping (module docstring).
    full = jnp.isfinite(fin_scores[:, -1])  # (B,) pool holds n_best
    if early_stopping:
      done = c.done | full
    else:
      best_len = max_new if length_penalty > 0 else length + 1
      bound = _normalize(scores[:, 0], jnp.asarray(best_len, jnp.int32), length_penalty)
      done = c.done | (full & (bound <= fin_scores[:, -1]))
    return _Carry(step=c.step + 1, cache=cache, seqs=seqs, scores=scores, fin_seqs=fin_seqs,
                  fin_scores=fin_scores, fin_len=fin_len, done=done)

  def body(c: _Carry) -> _Carry:
    prev = c.seqs[:, :, c.step - 1].reshape(b * k, 1)  # (B*K, 1) written at slot p+step-1
    pos = (p + c.step - 1 - start_k)[:, None]  # (B*K, 1) unpadded positions
    logits, cache = model.decode(prev, pos, c.cache)  # (B*K, 1, V)
    return record(c._replace(cache=cache), logits[:, 0])

  def cond(c: _Carry) -> jax.Array:
    return (c.step < max_new) & ~jnp.all(c.done)

  scores0 = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf).astype(jnp.float32)
  first = _Carry(step=jnp.zeros((), jnp.int32), cache=cache,
                 seqs=jnp.zeros((b, k, max_new), jnp.int32),
                 scores=jnp.broadcast_to(scores0, (b, k)),
                 fin_seqs=jnp.zeros((b, n, max_new), jnp.int32),
                 fin_scores=jnp.full((b, n), -jnp.inf, jnp.float32),
                 fin_len=jnp.zeros((b, n), jnp.int32), done=jnp.zeros((b,), bool))
  c = jax.lax.while_loop(cond, body, record(first, logits))
  # Prompts that ran out of steps add their live beams (length max_new, no stop token).
  tail = jnp.where(c.done[:, None], -jnp.inf, _normalize(c.scores, c.step, length_penalty))
  fin_seqs, fin_scores, fin_len = _merge_pool(
      c.fin_seqs, c.fin_scores, c.fin_len, c.seqs, tail,
      jnp.broadcast_to(c.step, (b, k)).astype(jnp.int32), n)
  return fin_seqs, fin_scores, fin_len, c.step


def beam_search(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                beams: int, length_penalty: float = 1.0, early_stopping: bool = True,
                stop_ids: Sequence[int] = (), n_best: int | None = None,
                prompt_bucket: int = 8) -> list[list[tuple[list[int], float]]]:
  """Beam search of width `beams` for each prompt (lists of ids; lengths may differ).

  Returns per prompt up to `n_best` (default `beams`, at most `beams`) pairs (tokens,
  score), best first: tokens are the generated ids (a final stop id included), score is
  sum log-prob / len(tokens) ** length_penalty. Pass the tokenizer's EOS in `stop_ids`.
  Semantics of early_stopping and the pool: the module docstring.
  """
  vocab = model.cfg.vocab_size
  n_best = beams if n_best is None else n_best
  stop_ids = tuple(dict.fromkeys(int(t) for t in stop_ids))
  prompts = check_prompts("beam_search", prompts, vocab, max_new_tokens)
  if not 1 <= n_best <= beams or beams + len(stop_ids) > vocab:
    raise ValueError(f"beam_search: needs 1 <= n_best ({n_best}) <= beams ({beams}) and "
                     f"beams + len(stop_ids) <= vocab_size ({vocab}).")
  if any(not 0 <= t < vocab for t in stop_ids):
    raise ValueError(f"beam_search: stop_ids {stop_ids} must be in [0, {vocab}).")
  limit = None
  if model.cfg.position == "learned":  # positions (not slots) index the table
    limit = model.cfg.max_seq_len - max_new_tokens
    if max(len(q) for q in prompts) > limit:
      raise ValueError(f"beam_search: a prompt plus max_new_tokens={max_new_tokens} exceeds "
                       f"model.max_seq_len={model.cfg.max_seq_len} (learned positions).")
  tokens, start = pad_prompts(prompts, prompt_bucket, limit)
  graphdef, state = nnx.split(model)
  seqs, scores, lens, _ = jax.device_get(_beam(
      graphdef, state, jnp.asarray(tokens), jnp.asarray(start),
      jnp.asarray(stop_ids, jnp.int32).reshape(-1), max_new=max_new_tokens, beams=int(beams),
      n_best=int(n_best), length_penalty=float(length_penalty),
      early_stopping=bool(early_stopping)))
  return [[(seqs[i, j, :lens[i, j]].tolist(), float(scores[i, j]))
           for j in range(n_best) if np.isfinite(scores[i, j])] for i in range(len(prompts))]
