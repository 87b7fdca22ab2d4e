"""Speculative decoding (lmx.infer.speculative): greedy output equals the target alone (a
different draft, the target as its own draft, prompt lookup); sampled tokens follow the
target's distribution exactly (chi-square, with the draft's distribution rejected by the
same test); the accept / reject kernel on hand numbers.

NOTE: compile time is nearly all of the run time (~1.5-2 s per program on a 2-core CPU):
the fast greedy test shares ONE speculative program (the draft has the target's config, so
both drafts hit the same jit key) plus one engine program for the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from lmx.config import ModelConfig
from lmx.infer.engine import SamplingOptions, decode
from lmx.infer.speculative import (acceptance_prob, lookup_proposals, prompt_lookup_decode,
                                   residual_dist, speculative_decode, verify)
from test_engine import make_model

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                  max_seq_len=64, position="rope")
GREEDY = SamplingOptions(temperature=0.0)
PROMPT = [[5, 9, 2, 7, 11]]
MAX_NEW, K = 16, 3


# ---- the kernel on hand numbers (no model) ----

def test_accept_and_residual_on_hand_numbers():
  p = jnp.asarray([[0.5, 0.3, 0.2]])  # target
  q = jnp.asarray([[0.2, 0.6, 0.2]])  # draft
  # x = 0: p/q = 0.5/0.2 = 2.5 -> min(1, .) = 1 (always accepted)
  # x = 1: p/q = 0.3/0.6 = 0.5
  # x = 2: p/q = 0.2/0.2 = 1
  got = [float(acceptance_prob(p, q, jnp.asarray([x]))[0]) for x in range(3)]
  np.testing.assert_allclose(got, [1.0, 0.5, 1.0], rtol=1e-6)
  # max(0, p - q) = [0.3, 0, 0] -> normalized [1, 0, 0]: a rejection (only of x = 1 here)
  # must give token 0, the only one the draft under-proposes.
  np.testing.assert_allclose(residual_dist(p, q)[0], [1.0, 0.0, 0.0], atol=1e-7)
  # A second case with two under-proposed tokens: p = [.4 .4 .2], q = [.1 .2 .7]
  # max(0, p - q) = [.3 .2 0], sum .5 -> [.6 .4 0]; accept(x=2) = .2/.7
  p2, q2 = jnp.asarray([[0.4, 0.4, 0.2]]), jnp.asarray([[0.1, 0.2, 0.7]])
  np.testing.assert_allclose(residual_dist(p2, q2)[0], [0.6, 0.4, 0.0], atol=1e-6)
  np.testing.assert_allclose(acceptance_prob(p2, q2, jnp.asarray([2]))[0], 0.2 / 0.7,
                             rtol=1e-6)
  # Overall: P(token t) = q(t) * accept(t) + P(reject) * residual(t) must equal p(t).
  acc = np.asarray([float(acceptance_prob(p2, q2, jnp.asarray([x]))[0]) for x in range(3)])
  reject = 1.0 - float(np.sum(np.asarray(q2[0]) * acc))
  np.testing.assert_allclose(np.asarray(q2[0]) * acc + reject * np.asarray(
      residual_dist(p2, q2)[0]), p2[0], atol=1e-6)


def test_verify_greedy_accepts_the_target_argmax_and_corrects_to_it():
  z = jnp.log(jnp.asarray([[[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))  # (1, 3, 3)
  accept, fix = verify(jax.random.key(0), z, None, jnp.asarray([[1, 2]]), greedy=True)
  assert accept.tolist() == [[True, False]] and fix.tolist() == [[1, 0, 2]]


def test_lookup_proposals_take_the_latest_earlier_match():
  look = jax.jit(lambda h: lookup_proposals(h, jnp.int32(8), jnp.asarray([1]), 4, 2))
  # slots: 0 pad, then 3 4 5 3 4 6 3 4 ; the last two tokens (3, 4) occur earlier at slots
  # 1 and 4; the latest (4) is followed by 6 3 4 and then the present: tokens past slot
  # c = 8 repeat hist[c]
  hist = jnp.asarray([[0, 3, 4, 5, 3, 4, 6, 3, 4, 0, 0, 0]])
  assert look(hist).tolist() == [[6, 3, 4, 4]]
  # no earlier match of (9, 4): propose the last token k times
  assert look(hist.at[0, 7].set(9)).tolist() == [[4, 4, 4, 4]]


# ---- greedy: identical to the target alone ----

@pytest.fixture(scope="module")
def target():
  return make_model(CFG, seed=0)


@pytest.mark.slow  # compiles models: kept out of the 90 s fast set
def test_greedy_equals_target_alone_for_any_draft(target):
  ref = decode(target, PROMPT, MAX_NEW, GREEDY)
  other = make_model(CFG, seed=1)  # a different random model: little agreement
  res = speculative_decode(target, other, PROMPT, MAX_NEW, GREEDY, k=K)
  assert res.tokens == ref.tokens
  assert res.acceptance_rate < 0.5
  same = speculative_decode(target, target, PROMPT, MAX_NEW, GREEDY, k=K)
  assert same.tokens == ref.tokens
  assert same.acceptance_rate == 1.0
  # every round emits k + 1 tokens: ceil(16 / 4) = 4 verify passes + the prefill
  assert same.target_calls == -(-MAX_NEW // (K + 1)) + 1


# ---- slow: exact sampling, prompt lookup, ragged batches ----

V8 = ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                 max_seq_len=32, position="rope")
N = 4000


def _first_token_probs(model, prompt):
  """The model's softmax at temperature 1 after `prompt`, by a full forward pass."""
  logits = np.asarray(model(jnp.asarray([prompt]))[0, -1], np.float64)  # (V,)
  e = np.exp(logits - logits.max())
  return e / e.sum()


@pytest.mark.slow
def test_sampled_tokens_follow_the_target_distribution():
  target, draft = make_model(V8, seed=0), make_model(V8, seed=3)
  prompt = [1, 5, 2, 6]
  p, q = _first_token_probs(target, prompt), _first_token_probs(draft, prompt)
  opts = SamplingOptions(temperature=1.0, seed=7)
  # N identical rows in one batch: independent draws (the shared accepted length only
  # shortens rounds, it never biases a token)
  for res in (speculative_decode(target, draft, [prompt] * N, 1, opts, k=2),
              prompt_lookup_decode(target, [prompt] * N, 1, opts, k=2, ngram=1)):
    first = np.asarray([t[0] for t in res.tokens])
    counts = np.bincount(first, minlength=8)
    assert scipy.stats.chisquare(counts, p * N).pvalue > 1e-3
  # power: the same test rejects the draft's own distribution
  draft_alone = np.bincount([t[0] for t in speculative_decode(
      draft, draft, [prompt] * N, 1, opts, k=2).tokens], minlength=8)
  assert scipy.stats.chisquare(draft_alone, p * N).pvalue < 1e-6
  assert scipy.stats.chisquare(draft_alone, q * N).pvalue > 1e-3


@pytest.mark.slow
def test_prompt_lookup_greedy_equals_target_alone_and_accepts_repeats(target):
  prompts = [[3, 4, 5, 6, 3, 4, 5, 6], [5, 9, 2, 7, 5, 9, 2]]  # both pad to P = 8
  ref = decode(target, prompts, 24, GREEDY)
  looked = [prompt_lookup_decode(target, [row], 24, GREEDY, k=K) for row in prompts]
  assert [r.tokens[0] for r in looked] == ref.tokens
  assert looked[0].accepted > 0 and looked[0].target_calls < 24


@pytest.mark.slow
def test_ragged_batch_with_stop_ids_equals_the_engine(target):
  prompts = [[5, 9, 2], [1, 1, 30, 7, 8, 9, 10], [3, 4, 5, 6, 7]]
  ref = decode(target, prompts, 12, GREEDY).tokens
  stops = tuple(sorted({t[3] for t in ref}))
  # greedy with stop ids = the stop-free output cut after its first stop id
  want = [next((t[:i + 1] for i, x in enumerate(t) if x in stops), t) for t in ref]
  res = speculative_decode(target, make_model(CFG, seed=1), prompts, 12,
                           SamplingOptions(temperature=0.0, stop_ids=stops), k=K)
  assert res.tokens == want
  assert res.finish_reason == ["stop" if len(w) < 12 or w[-1] in stops else "length"
                               for w in want]


@pytest.mark.slow
def test_cli_with_a_draft_reports_acceptance(monkeypatch, capsys, tmp_path):
  import pathlib

  import lmx.data.tokenizer
  import lmx.train.checkpoint
  from conftest import CharTokenizer
  from lmx.infer.generate import cli_main

  monkeypatch.setattr(lmx.data.tokenizer, "load_or_train_tokenizer",
                      lambda exp: CharTokenizer())
  monkeypatch.setattr(lmx.train.checkpoint, "restore_params",
                      lambda exp, model, directory=None: {"source": "fake", "step": 0})
  default = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"
  tiny = dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1)
  (tmp_path / "draft.py").write_text(
      "import importlib.util\n"
      "def get_config(arg=None):\n"
      f"  spec = importlib.util.spec_from_file_location('base', {str(default)!r})\n"
      "  m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
      "  c = m.get_config(arg)\n"
      f"  c.model.update({tiny!r})\n"
      "  return c\n")
  cfg = [f"--config={default}", "--config.sample.temperature=0.0",
         *(f"--config.model.{k}={v}" for k, v in tiny.items()),
         "--config.model.d_model=32", "--prompt", "abab", "--max_new_tokens", "6"]
  # NOTE: one run only: the CLI builds its models eagerly (op-by-op compiles, seconds each)
  assert cli_main(cfg + [f"--draft_config={tmp_path / 'draft.py'}", "--spec_k", "2"]) == 0
  out, err = capsys.readouterr()
  assert out.startswith("abab")
  assert "speculative (draft, k=2): acceptance" in err and "target calls" in err
