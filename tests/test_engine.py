"""The decode engine (lmx.infer.engine): a ragged greedy batch equals each prompt decoded
alone by full forward passes (tokens and log-probs); stop ids, min_new_tokens and the
loop's early exit; the sampling order, penalties and filters against numpy references.

NOTE: compile time is nearly all of the run time (~2 s per engine program on a 2-core
CPU), so the fast tests share ONE compiled engine program: batch 3, P = 8, max_new = 8,
greedy, two stop ids (the seed, the stop ids and min_new_tokens are runtime inputs). The
models' weights are drawn with numpy: an eager random init compiles op by op (~6 s).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ModelConfig
from lmx.infer.engine import (SamplingOptions, _advance_jit, _start_jit, choose_tokens, decode,
                               sampling_logits, stream)
from lmx.infer.sampling import apply_penalties
from lmx.model import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  max_seq_len=64, position="rope")
PROMPTS = [[5, 9, 2], [1, 1, 30, 7, 8, 9, 10], [3, 4, 5, 6, 7]]  # lengths 3, 7, 5
MAX_NEW = 8
GREEDY = SamplingOptions(temperature=0.0)
V = CFG.vocab_size


def make_model(cfg: ModelConfig = CFG, seed: int = 0, flat_logits: bool = False) -> Transformer:
  """cfg's Transformer with numpy-drawn weights (std 0.2: peaky logits, no argmax near
  ties). flat_logits zeroes the final norm's gain: every logit is 0, so token 0 is the
  argmax at every step (ties go to the lowest id)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path[:-1])  # no .value
    if "norm" in name and name.endswith("scale"):
      gain = 0.0 if flat_logits and name.startswith("final_norm") else 1.0
      return jnp.asarray(gain * (1.0 + 0.1 * rng.standard_normal(s.shape)), jnp.float32)
    return jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


_FORWARD: dict = {}


def alone_by_full_forward(model, prompt, n, penalties: dict | None = None):
  """Reference: ONE prompt, no cache, no padding; each step re-runs the whole sequence
  (a fixed (1, 16 + n) buffer, so one compile serves every step: by causality the zeros
  after position t cannot change the logits at t) and takes the argmax, optionally of
  numpy-penalized logits. Returns (tokens, log_softmax(raw logits) at them)."""
  graphdef, state = nnx.split(model)
  key = (graphdef, n)
  if key not in _FORWARD:
    _FORWARD[key] = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  buf = np.zeros((1, 16 + n), np.int32)
  buf[0, :len(prompt)] = prompt
  toks, lps = [], []
  for i in range(len(prompt), len(prompt) + n):
    raw = np.asarray(_FORWARD[key](state, jnp.asarray(buf)), np.float64)[0, i - 1]  # (V,)
    z = raw if penalties is None else np_penalize(raw, prompt, toks, **penalties)
    t = int(np.argmax(z))
    logp = raw - raw.max() - np.log(np.exp(raw - raw.max()).sum())
    toks.append(t)
    lps.append(logp[t])
    buf[0, i] = t
  return toks, lps


def np_penalize(z, prompt, generated, repetition=1.0, frequency=0.0, presence=0.0):
  """The penalty formulas in numpy: CTRL repetition over prompt + generated tokens, then
  OpenAI frequency / presence over generated tokens."""
  z = np.array(z, np.float64)
  seen = sorted(set(prompt) | set(generated))
  z[seen] = np.where(z[seen] > 0, z[seen] / repetition, z[seen] * repetition)
  counts = np.bincount(np.asarray(generated, np.int64), minlength=len(z))
  return z - frequency * counts - presence * (counts > 0)


@pytest.fixture(scope="module")
def model():
  return make_model()


@pytest.fixture(scope="module")
def reference(model):
  return [alone_by_full_forward(model, p, MAX_NEW) for p in PROMPTS]


def run(model, **kw):
  """The shared fast program: 2 stop ids (never fired unless chosen), greedy."""
  return decode(model, PROMPTS, MAX_NEW, dataclasses.replace(GREEDY, **kw))


def test_ragged_greedy_equals_each_prompt_alone_by_full_forward(model, reference):
  used = {t for toks, _ in reference for t in toks}
  unused = tuple(t for t in range(V) if t not in used)[:2]  # stop ids that never fire
  res = run(model, stop_ids=unused)
  for (want, want_lp), got, got_lp in zip(reference, res.tokens, res.logprobs):
    assert got == want
    np.testing.assert_allclose(got_lp, want_lp, atol=1e-5)
  assert res.finish_reason == ["length"] * 3
  assert res.steps == MAX_NEW


def test_several_stop_ids_end_each_row_at_its_first(model, reference):
  refs = [toks for toks, _ in reference]
  a = refs[0][1]
  b = next(t for t in refs[2][1:] if t != a and t not in refs[0][:2])  # a different id
  res = run(model, stop_ids=(a, b))
  fired = set()
  for ref, got, why in zip(refs, res.tokens, res.finish_reason):
    hits = [i for i, t in enumerate(ref) if t in (a, b)]
    want = ref[:hits[0] + 1] if hits else ref  # the stop token is kept
    assert got == want
    assert why == ("stop" if hits else "length")
    fired |= {got[-1]} if hits else set()
  assert fired == {a, b}


def test_min_new_tokens_masks_stop_ids_and_the_loop_exits_early():
  flat = make_model(flat_logits=True)  # same structure: the same compiled program
  for min_new in (0, 2, 5):
    res = run(flat, stop_ids=(0, 1), min_new_tokens=min_new)
    # stop ids 0 and 1 are masked for min_new steps, so 2 wins the tie; then 0 stops.
    assert res.tokens == [[2] * min_new + [0]] * 3
    assert res.finish_reason == ["stop"] * 3
    assert res.steps == min_new + 1  # the while_loop ran min_new + 1 steps, not MAX_NEW
    np.testing.assert_allclose(np.concatenate(res.logprobs), -np.log(V), atol=1e-5)


# ---- streaming: the same programs, resumed chunk by chunk ----

def assert_stream_equals_decode(model, opts, chunk, max_new=MAX_NEW):
  """Streamed chunks concatenate to decode's result exactly; every chunk but the last is
  `chunk` steps, no row gains more than `chunk` tokens per chunk, and there are
  ceil(steps / chunk) chunks (none empty at the end)."""
  want = decode(model, PROMPTS, max_new, opts)
  chunks = list(stream(model, PROMPTS, max_new, opts, chunk=chunk))
  assert len(chunks) == -(-want.steps // chunk)
  assert [c.steps for c in chunks] == [min((i + 1) * chunk, want.steps)
                                       for i in range(len(chunks))]
  for i in range(len(PROMPTS)):
    assert all(len(c.tokens[i]) == len(c.logprobs[i]) <= chunk for c in chunks)
    assert sum((c.tokens[i] for c in chunks), []) == want.tokens[i]
    assert sum((c.logprobs[i] for c in chunks), []) == want.logprobs[i]  # bit-exact
    reasons = [c.finish_reason[i] for c in chunks]
    ends = reasons.index(want.finish_reason[i])  # known from the chunk the row ended in
    assert reasons == [None] * ends + [want.finish_reason[i]] * (len(chunks) - ends)
    assert [c.done[i] for c in chunks] == [r is not None for r in reasons]
    assert sum(len(c.tokens[i]) for c in chunks[:ends + 1]) == len(want.tokens[i])
  assert all(chunks[-1].done)
  return chunks


def test_stream_concatenates_to_decode_greedy_with_ragged_stops(model, reference):
  refs = [toks for toks, _ in reference]
  a = refs[0][3]  # row 0 stops at step <= 4; the others later or at max_new
  unused = tuple(t for t in range(V) if t not in {t for r in refs for t in r})[:1]
  for chunk in (3, 1, MAX_NEW, 20):  # uneven, one step, all at once, past max_new
    chunks = assert_stream_equals_decode(
        model, dataclasses.replace(GREEDY, stop_ids=(a,) + unused), chunk)
  assert chunks[-1].finish_reason[0] == "stop" and "length" in chunks[-1].finish_reason


def test_stream_where_every_row_stops_early_ends_early():
  flat = make_model(flat_logits=True)  # every row: 2 2 2 2 0 (stop) at step 5 of 8
  opts = dataclasses.replace(GREEDY, stop_ids=(0, 1), min_new_tokens=4)
  chunks = assert_stream_equals_decode(flat, opts, chunk=2)
  assert [c.steps for c in chunks] == [2, 4, 5]
  assert chunks[-1].tokens == [[0]] * 3  # step 4's 2s came in chunk 2
  assert chunks[-1].finish_reason == ["stop"] * 3
  assert [c.done for c in chunks[:-1]] == [[False] * 3] * 2


# ---- the sampling chain (small jitted functions, no model) ----

NO_STOP = jnp.zeros((0,), jnp.int32)


def _draws(logits, opts, n, counts=None, seen=None):
  """n samples per row from `choose_tokens` (one key per sample): int (n, B)."""
  fn = jax.jit(jax.vmap(lambda k: choose_tokens(k, logits, jnp.int32(0), counts, seen,
                                                NO_STOP, jnp.int32(0), opts)[0]))
  return np.asarray(fn(jax.random.split(jax.random.key(0), n)))


def _np_probs(z):
  p = np.exp(z - z.max())
  return p / p.sum()


def test_top_k_1_is_greedy():
  logits = jax.random.normal(jax.random.key(1), (6, V)) * 3
  draws = _draws(logits, SamplingOptions(temperature=1.7, top_k=1), 200)
  assert (draws == np.argmax(np.asarray(logits), -1)[None]).all()


def test_top_p_never_samples_outside_the_nucleus():
  logits = np.array([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0, 0.5, -0.2]])
  probs = _np_probs(logits[0])
  order = np.argsort(-probs)
  cum = np.cumsum(probs[order])
  nucleus = set(order[:int(np.searchsorted(cum, 0.7)) + 1].tolist())  # smallest set >= 0.7
  draws = _draws(jnp.asarray(logits, jnp.float32), SamplingOptions(top_p=0.7), 4000)
  assert set(draws[:, 0].tolist()) == nucleus


def test_min_p_never_samples_below_min_p_times_the_top_probability():
  logits = np.array([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0, 0.5, -0.2]])
  temperature, min_p = 0.8, 0.3
  probs = _np_probs(logits[0] / temperature)
  want = set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
  assert 1 < len(want) < 8
  draws = _draws(jnp.asarray(logits, jnp.float32),
                 SamplingOptions(temperature=temperature, min_p=min_p), 4000)
  assert set(draws[:, 0].tolist()) == want


def test_penalties_match_the_numpy_formulas():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 10)) * 2
  prompts, generated = [[1, 2, 3], [4]], [[3, 5, 5, 5], [0, 4, 9]]
  counts = np.stack([np.bincount(g, minlength=10) for g in generated])
  seen = np.zeros((2, 10), bool)
  for b in range(2):
    seen[b, prompts[b] + generated[b]] = True
  kw = dict(repetition=1.3, frequency=0.4, presence=0.7)
  got = apply_penalties(jnp.asarray(logits, jnp.float32), jnp.asarray(counts),
                        jnp.asarray(seen), **kw)
  want = [np_penalize(logits[b], prompts[b], generated[b], **kw) for b in range(2)]
  np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=1e-6, atol=1e-6)


def test_sampling_chain_order_penalties_then_temperature_then_filters():
  """sampling_logits = penalties -> stop mask -> temperature -> top-k -> top-p -> min-p,
  against numpy. Chosen so that every stage removes tokens: 2 stop ids, top-k 10 -> 8,
  top-p 8 -> 7 and 5, min-p 7 -> 6 and 5 -> 3 (rows 0 and 1)."""
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 12)) * 1.5
  prompts, generated = [[0, 1], [7]], [[2, 2, 2, 3], [7, 7, 8]]
  counts = np.stack([np.bincount(g, minlength=12) for g in generated])
  prompt_seen = np.zeros((2, 12), bool)
  for b in range(2):
    prompt_seen[b, prompts[b]] = True
  opts = SamplingOptions(temperature=1.5, top_k=8, top_p=0.9, min_p=0.15,
                         repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.5)
  stop, min_new = np.array([4, 5], np.int32), 3
  got = np.asarray(sampling_logits(jnp.asarray(logits, jnp.float32), jnp.int32(2),
                                   jnp.asarray(counts), jnp.asarray(prompt_seen),
                                   jnp.asarray(stop), jnp.int32(min_new), opts))
  for b in range(2):
    z = np_penalize(logits[b], prompts[b], generated[b], opts.repetition_penalty,
                    opts.frequency_penalty, opts.presence_penalty)
    z[stop] = -np.inf  # step 2 < min_new_tokens 3
    z = z / opts.temperature
    keep = np.zeros(12, bool)
    keep[np.argsort(-z, kind="stable")[:opts.top_k]] = True
    p = _np_probs(np.where(keep, z, -np.inf))
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    assert np.min(np.abs(before - opts.top_p)) > 1e-3  # not a float32 borderline case
    keep[order[before >= opts.top_p]] = False
    n_top_p = keep.sum()
    keep &= z >= z[keep].max() + np.log(opts.min_p)
    assert 8 > n_top_p > keep.sum() > 1
    np.testing.assert_array_equal(np.isfinite(got[b]), keep)
    np.testing.assert_allclose(got[b][keep], z[keep], rtol=1e-5)


# ---- slow: more engine programs ----

@pytest.mark.slow  # compiles another engine program
def test_engine_top_k_1_equals_greedy_and_seeds_are_deterministic(model, reference):
  opts = SamplingOptions(temperature=1.3, top_k=1, seed=5)
  res = decode(model, PROMPTS, MAX_NEW, opts)
  assert res.tokens == [toks for toks, _ in reference]
  sampled = SamplingOptions(temperature=1.0, seed=1)
  a, b = (decode(model, PROMPTS, MAX_NEW, sampled) for _ in range(2))
  c = decode(model, PROMPTS, MAX_NEW, dataclasses.replace(sampled, seed=2))
  assert a.tokens == b.tokens and a.tokens != c.tokens


@pytest.mark.slow  # compiles the sampling engine programs (shared with the test above)
def test_stream_concatenates_to_decode_with_seeded_sampling(model):
  opts = SamplingOptions(temperature=1.0, seed=1)
  chunks = assert_stream_equals_decode(model, opts, chunk=3)
  assert len(chunks) == 3  # no stop ids: every row runs to max_new


@pytest.mark.slow  # compiles another engine program
def test_engine_penalties_equal_a_numpy_penalized_full_forward(model):
  pen = dict(repetition=1.5, frequency=0.5, presence=0.3)
  opts = SamplingOptions(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5,
                         presence_penalty=0.3)
  res = decode(model, PROMPTS, MAX_NEW, opts)
  for prompt, got, got_lp in zip(PROMPTS, res.tokens, res.logprobs):
    want, want_lp = alone_by_full_forward(model, prompt, MAX_NEW, pen)
    assert got == want
    np.testing.assert_allclose(got_lp, want_lp, atol=1e-5)  # raw logits, not penalized


def assert_ragged_greedy_matches_full_forward(m):
  """Greedy decoding of the ragged PROMPTS equals each prompt alone by full forwards."""
  res = decode(m, PROMPTS, MAX_NEW, GREEDY)
  for prompt, got, got_lp in zip(PROMPTS, res.tokens, res.logprobs):
    want, want_lp = alone_by_full_forward(m, prompt, MAX_NEW)
    assert got == want
    np.testing.assert_allclose(got_lp, want_lp, atol=1e-5)


@pytest.mark.slow  # compiles other models
@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_ragged_greedy_with_absolute_positions(position):
  m = make_model(dataclasses.replace(CFG, position=position, max_seq_len=24))
  assert_ragged_greedy_matches_full_forward(m)


@pytest.mark.slow  # compiles a PEFT model
def test_prefix_tuned_model_ragged_decode_equals_its_full_forward():
  from lmx.config import PeftConfig
  from lmx.peft import apply_peft
  m = make_model()
  with jax.threefry_partitionable(False):  # compiles faster on CPU (tests/test_peft.py)
    apply_peft(m, PeftConfig(method="prefix", num_virtual_tokens=4), nnx.Rngs(params=1))
  assert getattr(m.layers.block.attn, "prefix_peft", None) is not None
  assert_ragged_greedy_matches_full_forward(m)


@pytest.mark.slow  # compiles a larger model
@pytest.mark.parametrize("layout", ["scan", "unrolled"])
def test_the_cache_is_never_copied(layout):
  """The prefill creates the cache as its output; the loop takes the carry donated and
  updates it in place: its output aliases its input (the cache and buffers), and each
  program's scratch memory is well under one cache (measured: 0.16x prefill, 0.34x loop:
  one layer's k/v being attended), never a second copy. The unrolled layout adds one copy
  of the layer weights per call (its per-layer slices, made before the loop) and nothing
  per token. A short prompt keeps the prefill's (B, N, P, S) scores small."""
  cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=4, n_heads=4, max_seq_len=512,
                    decode_layers=layout)
  m = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(m)
  start = functools.partial(_start_jit, graphdef, max_new=504, opts=GREEDY)
  args = (state, jnp.zeros((2, 8), jnp.int32), jnp.zeros((2,), jnp.int32), jax.random.key(0),
          NO_STOP, jnp.int32(0))
  fixed, carry = jax.eval_shape(start, *args)
  prefill = start.func.lower(graphdef, *args, **start.keywords).compile().memory_analysis()
  loop_compiled = _advance_jit.lower(graphdef, state, fixed, carry, jnp.int32(504),
                                     opts=GREEDY).compile()
  loop = loop_compiled.memory_analysis()
  cache_bytes = 2 * 4 * 2 * 512 * 4 * 16 * 4  # k and v: (L, B, K, S, H) float32
  weights = 0 if layout == "scan" else sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(state["layers"]))
  assert prefill.temp_size_in_bytes < 0.5 * cache_bytes + weights
  assert loop.alias_size_in_bytes > cache_bytes  # donated: the cache is updated in place
  assert loop.temp_size_in_bytes < 0.5 * cache_bytes + weights
  if layout == "unrolled":  # per-layer (B, K, S, H) buffers, none copied inside the loop
    assert isinstance(carry.cache.layers, tuple) and len(carry.cache.layers) == 4
    assert carry.cache.layers[0].k.shape == (2, 4, 512, 16)
    # ... nor transposed: attention reads the (B, K, S, H) cache where it lies (in a
    # (B, S, K, H) cache XLA transposed and copied every layer's k and v each step).
    moved = [line for line in loop_compiled.as_text().splitlines()
             if (m := re.search(r"= f32\[(\d+),(\d+),(\d+),(\d+)\]\S* (copy|transpose)\(", line))
             and sorted(map(int, m.groups()[:4])) == [2, 4, 16, 512]]
    assert not moved, moved[:2]
