"""Per-row sampling settings in the decode engine: one call serves rows with different
temperature / top-k / top-p / min-p / penalties / seeds / min_new_tokens / max_new_tokens,
and each row equals its prompt decoded alone with those settings as scalars.

The per-row stages are checked against numpy (the masked distribution of each row); the
engine tests compile programs and are slow (~2 s per program on a 2-core CPU).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.infer.engine import SamplingOptions, choose_row_tokens, decode, stream
from lmx.infer.sampling import apply_row_penalties, filter_row_logits
from test_engine import PROMPTS, MAX_NEW, make_model, np_penalize

S = SamplingOptions


def np_filter(z, top_k, top_p, min_p):
  """top-k (stable: lower id first on ties) -> top-p on the renormalized top k -> min-p,
  in numpy float64: the kept mask of one row's tempered logits z."""
  v = len(z)
  keep = np.zeros(v, bool)
  keep[np.argsort(-z, kind="stable")[:top_k or v]] = True
  if top_p < 1.0:
    p = np.exp(np.where(keep, z, -np.inf) - z[keep].max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    assert np.min(np.abs(before - top_p)) > 1e-4  # not a float32 borderline case
    keep[order[before >= top_p]] = False
  if min_p > 0.0:
    keep &= z >= z[keep].max() + np.log(min_p)
  return keep


@pytest.mark.parametrize("width", [None, 16])
def test_row_filters_equal_numpy_per_row(width):
  """Each row its own (top_k, top_p, min_p), incl. all-off and every stage removing tokens;
  kept logits unchanged, the rest -inf. width 16 < V = 32: a top-k of the largest k (no row
  has top-p without top-k), where a row with no filter keeps all 32 tokens."""
  rng = np.random.default_rng(7)
  settings = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.2), (9, 0.85, 0.1),
              (1, 0.5, 0.0), (16, 0.9, 0.0)]
  if width is not None:
    settings = [s for s in settings if s[0] or s[1] == 1.0]
  z = rng.normal(size=(len(settings), 32)) * 1.5
  z[0, 3] = z[0, 4]  # a tie: the lower id ranks first
  k = jnp.asarray([s[0] or 32 for s in settings], jnp.int32)
  p = jnp.asarray([s[1] for s in settings], jnp.float32)
  log_min_p = jnp.asarray([np.log(s[2]) if s[2] else -np.inf for s in settings], jnp.float32)
  got = np.asarray(jax.jit(filter_row_logits, static_argnums=4)(
      jnp.asarray(z, jnp.float32), k, p, log_min_p, width))
  sizes = []
  for b, (top_k, top_p, min_p) in enumerate(settings):
    keep = np_filter(z[b], top_k, top_p, min_p)
    sizes.append(int(keep.sum()))
    np.testing.assert_array_equal(np.isfinite(got[b]), keep, err_msg=f"row {b}")
    np.testing.assert_allclose(got[b][keep], z[b][keep], rtol=1e-6)
  assert sizes[0] == 32 and 1 in sizes and all(1 < n < 32 for n in sizes[1:] if n != 1)


def test_row_filter_top_k_breaks_ties_by_lower_id():
  z = jnp.zeros((2, 6), jnp.float32)  # all tied
  got = jax.jit(filter_row_logits)(z, jnp.asarray([2, 4], jnp.int32), jnp.ones(2, jnp.float32),
                                   jnp.full(2, -jnp.inf, jnp.float32))
  np.testing.assert_array_equal(np.isfinite(np.asarray(got)),
                                [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])


def test_row_penalties_equal_numpy_per_row():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 10)) * 2
  prompts, generated = [[1, 2, 3], [4], [0]], [[3, 5, 5, 5], [0, 4, 9], [1, 1]]
  counts = np.stack([np.bincount(g, minlength=10) for g in generated])
  seen = np.zeros((3, 10), bool)
  for b in range(3):
    seen[b, prompts[b] + generated[b]] = True
  pen = [(1.3, 0.4, 0.7), (1.0, 0.0, 0.0), (0.8, -0.5, 1.5)]
  rep, freq, pres = (jnp.asarray(c, jnp.float32) for c in zip(*pen))
  got = np.asarray(apply_row_penalties(jnp.asarray(logits, jnp.float32), jnp.asarray(counts),
                                       jnp.asarray(seen), rep, freq, pres))
  want = [np_penalize(logits[b], prompts[b], generated[b], *pen[b]) for b in range(3)]
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-6, atol=1e-6)
  # a row with every penalty off comes back bit for bit
  np.testing.assert_array_equal(got[1], np.asarray(logits[1], np.float32))


def test_row_draws_follow_each_rows_masked_distribution():
  """choose_row_tokens over many keys: each row samples only its own kept set (numpy), a
  greedy row always its argmax, in one call."""
  z = np.array([[0.3, 1.0, -0.5, 0.9, 1.1, 0.0, -1.0, 0.2],
                [2.0, 1.5, 1.0, 0.0, -1.0, -3.0, 0.5, -0.2],
                [0.1, -0.4, 0.8, 2.0, 1.9, 0.0, 0.3, -2.0]])
  temps, ks, ps = [0.7, 1.0, 0.0], [3, 0, 0], [1.0, 0.7, 1.0]
  from lmx.infer.engine import _Rows, _RowPlan
  rows = _Rows(temperature=jnp.asarray(temps, jnp.float32),
               top_k=jnp.asarray([k or 8 for k in ks], jnp.int32),
               top_p=jnp.asarray(ps, jnp.float32), log_min_p=jnp.full(3, -jnp.inf),
               repetition=jnp.ones(3), frequency=jnp.zeros(3), presence=jnp.zeros(3),
               max_new=jnp.full(3, 8, jnp.int32))
  plan = _RowPlan(sampled=True, penalties=False, repetition=False, static_filter=None,
                  row_filter=True, rank_width=8)

  @jax.jit
  def draw(seed):
    keys = jax.vmap(jax.random.key)(seed + jnp.arange(3))
    return choose_row_tokens(keys, jnp.asarray(z, jnp.float32), jnp.int32(0), None, None,
                             jnp.zeros((0,), jnp.int32), jnp.zeros(3, jnp.int32), rows, plan)[0]

  draws = np.asarray(jax.vmap(draw)(jnp.arange(0, 3 * 2000, 3)))  # (2000, 3)
  for b in range(2):
    want = set(np.flatnonzero(np_filter(z[b] / temps[b], ks[b], ps[b], 0.0)).tolist())
    assert set(draws[:, b].tolist()) == want and len(want) > 1
  assert set(draws[:, 2].tolist()) == {int(np.argmax(z[2]))}


def test_per_row_settings_are_checked():
  model = make_model()
  with pytest.raises(ValueError, match="temperature has 2 per-row values"):
    decode(model, PROMPTS, 4, S(temperature=(0.0, 1.0)))
  with pytest.raises(ValueError, match="top_p is 1.5"):
    decode(model, PROMPTS, 4, S(top_p=(1.0, 1.5, 0.5)))
  with pytest.raises(ValueError, match="max_new_tokens"):
    decode(model, PROMPTS, [4, 0, 2], S(temperature=0.0))
  with pytest.raises(ValueError, match="max_new_tokens"):
    decode(model, PROMPTS, [4, 2], S(temperature=0.0))


# ---- slow: engine programs ----

@pytest.fixture(scope="module")
def model():
  return make_model()


ROWS = [S(temperature=0.0, stop_ids=(7, 41)),
        S(temperature=1.0, top_k=5, seed=3, stop_ids=(7, 41)),
        S(temperature=0.7, top_p=0.8, min_p=0.05, seed=11, repetition_penalty=1.3,
          frequency_penalty=0.5, min_new_tokens=3, stop_ids=(7, 41))]


def _mixed(rows):
  """The rows' scalar settings as ONE per-row SamplingOptions."""
  fields = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "frequency_penalty", "presence_penalty", "min_new_tokens", "seed")
  return S(stop_ids=rows[0].stop_ids, **{f: tuple(getattr(r, f) for r in rows) for f in fields})


@pytest.mark.slow  # compiles 4 engine programs
def test_mixed_settings_batch_equals_each_row_alone(model):
  """Greedy, seeded top-k, seeded top-p + min-p + penalties + min_new in one call: each row
  equals its prompt decoded alone with scalar settings (a seeded row's draws do not depend
  on the batch it shares)."""
  alone = [decode(model, [p], MAX_NEW, r) for p, r in zip(PROMPTS, ROWS)]
  mixed = decode(model, PROMPTS, MAX_NEW, _mixed(ROWS))
  for i, a in enumerate(alone):
    assert mixed.tokens[i] == a.tokens[0], i
    assert mixed.finish_reason[i] == a.finish_reason[0], i
    np.testing.assert_allclose(mixed.logprobs[i], a.logprobs[0], rtol=1e-5, atol=1e-5)
  # the sampled rows really sample (not greedy), and the batch in another order agrees
  greedy = decode(model, PROMPTS[1:], MAX_NEW, S(temperature=0.0)).tokens
  assert mixed.tokens[1] != greedy[0] and mixed.tokens[2] != greedy[1]
  rev = decode(model, PROMPTS[::-1], MAX_NEW, _mixed(ROWS[::-1]))
  assert rev.tokens[::-1] == mixed.tokens
  # one row given as 1-tuples: the static path, the same tokens as the scalars
  assert decode(model, PROMPTS[1:2], MAX_NEW, _mixed(ROWS[1:2])).tokens == alone[1].tokens
  chunks = list(stream(model, PROMPTS, MAX_NEW, _mixed(ROWS), chunk=3))
  assert [sum((c.tokens[i] for c in chunks), []) for i in range(3)] == mixed.tokens


@pytest.mark.slow  # compiles 1 engine program (the greedy one is shared with the test above)
def test_per_row_max_new_tokens_stop_each_row_at_its_own_limit(model):
  limits = [2, 8, 5]
  full = decode(model, PROMPTS, MAX_NEW, S(temperature=0.0))
  res = decode(model, PROMPTS, limits, S(temperature=0.0))
  # greedy rows through the per-row program: bit for bit the static program's, cut
  assert res.tokens == [t[:n] for t, n in zip(full.tokens, limits)]
  assert res.logprobs == [lp[:n] for lp, n in zip(full.logprobs, limits)]
  assert res.finish_reason == ["length"] * 3 and res.steps == 8
  short = decode(model, PROMPTS, [2, 3, 1], S(temperature=0.0))
  assert short.steps == 3  # the loop ends when the longest row's own limit is reached
  assert short.tokens == [t[:n] for t, n in zip(full.tokens, [2, 3, 1])]


@pytest.mark.slow  # compiles 4 engine programs
def test_mixed_top_k_rows_equal_each_alone(model):
  """Top-k rows only (no top-p): the per-row program takes a top-k of width 8, not a sort
  of the vocabulary; a row without filters keeps every token."""
  rows = [S(temperature=1.0, top_k=3, seed=1), S(temperature=1.2, top_k=7, min_p=0.1, seed=2),
          S(temperature=1.0, seed=3)]
  mixed = decode(model, PROMPTS, MAX_NEW, _mixed(rows))
  assert mixed.tokens == [decode(model, [p], MAX_NEW, r).tokens[0]
                          for p, r in zip(PROMPTS, rows)]


@pytest.mark.slow  # compiles 1 engine program
def test_per_row_min_new_tokens_and_limits_on_flat_logits():
  """Every logit 0 (ties go to the lowest id): stop ids 0 and 1 masked for row b's own
  min_new steps, so 2 wins until then, then 0 stops the row -- unless its own
  max_new_tokens comes first."""
  flat = make_model(flat_logits=True)
  res = decode(flat, PROMPTS, [8, 8, 3], S(temperature=0.0, stop_ids=(0, 1),
                                           min_new_tokens=(0, 2, 5)))
  assert res.tokens == [[0], [2, 2, 0], [2, 2, 2]]
  assert res.finish_reason == ["stop", "stop", "length"]
  assert res.steps == 3
