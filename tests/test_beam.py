"""Beam search (lmx.infer.beam) against hand-computed scores and full forward passes.

FAST: a bigram model whose next-token log-probs are a fixed table (an nnx module with the
Transformer's init_cache / decode interface), where greedy is a trap; its programs compile
in well under a second. SLOW: a tiny random Transformer (vocab 64, d 32, 2 layers): beam
width 1 is greedy, the scores are the full-forward log-prob sums over the length penalty,
and a ragged batch of 2 prompts gives each prompt's result alone.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ModelConfig
from lmx.infer.beam import beam_search
from lmx.model import Transformer
from lmx.model.attention import LayerCache
from lmx.model.transformer import KVCache

EOS = 0
# Next-token probabilities after each token (the rest of a row is spread evenly). After the
# prompt [1], greedy takes 2 (0.5), but every continuation of 2 is weak (<= 0.26), while
# 3 (0.4) -> 4 (0.9) -> EOS (0.95) is 0.342 in all. After [8], the chains 8 8 8 ... and
# 9 9 9 ... never reach EOS.
TABLE = {1: {2: 0.5, 3: 0.4}, 2: {5: 0.26, 6: 0.25, 7: 0.24}, 3: {4: 0.9}, 4: {EOS: 0.95},
         5: {EOS: 0.5}, 6: {EOS: 0.5}, 7: {EOS: 0.5}, 8: {8: 0.8, 9: 0.15}, 9: {9: 0.9}}
BV = 10


def bigram_probs() -> np.ndarray:
  p = np.zeros((BV, BV))
  for prev in range(BV):
    row = TABLE.get(prev, {})
    rest = [t for t in range(BV) if t not in row]
    p[prev, rest] = (1.0 - sum(row.values())) / len(rest)
    for t, q in row.items():
      p[prev, t] = q
  return p


@dataclasses.dataclass(frozen=True)
class BigramConfig:
  vocab_size: int = BV
  position: str = "rope"


class Bigram(nnx.Module):
  """Logits = log P(next | last token) from a fixed (V, V) table -- but only while the
  token before the last, READ FROM THE CACHE, could have preceded it (P >= 0.1); otherwise
  uniform. So a beam whose cache row holds another beam's history (no reorder) scores
  wrong. Same decode interface as Transformer; the cache (1, B, S, 1, 1) holds token ids."""

  def __init__(self):
    self.cfg = BigramConfig()
    self.probs = nnx.Variable(jnp.asarray(bigram_probs(), jnp.float32))

  def init_cache(self, batch, max_len, kv_start=None):
    z = jnp.zeros((1, batch, max_len, 1, 1), jnp.float32)
    return KVCache(layers=LayerCache(k=z, v=z), index=jnp.zeros((), jnp.int32),
                   kv_start=kv_start)

  def decode(self, tokens, positions, cache, *, last_only=False):
    """Logits (B, 1, V) for the last of tokens (B, t): all a prefill or a step needs."""
    b, t = tokens.shape
    k = jax.lax.dynamic_update_slice(cache.layers.k, tokens.astype(jnp.float32)[None, :, :,
                                     None, None], (0, 0, cache.index, 0, 0))
    slot = cache.index + t - 2  # the token before the last
    before = k[0, :, jnp.maximum(slot, 0), 0, 0].astype(jnp.int32)  # (B,)
    first = slot < (0 if cache.kv_start is None else cache.kv_start)  # (B,) no such token
    last = tokens[:, -1]
    p = self.probs[...]
    ok = first | (p[before, last] >= 0.1)
    logits = jnp.where(ok[:, None], jnp.log(p[last]), -jnp.log(float(BV)))  # (B, V)
    return logits[:, None], KVCache(layers=LayerCache(k=k, v=k), index=cache.index + t,
                                    kv_start=cache.kv_start)


def test_one_beam_falls_into_the_greedy_trap():
  assert beam_search(Bigram(), [[1]], 5, beams=1, stop_ids=(EOS,)) == [
      [([2, 5, EOS], pytest.approx((math.log(0.5) + math.log(0.26) + math.log(0.5)) / 3))]]


def test_two_beams_escape_the_trap_with_hand_computed_scores():
  """Prompt [1] stops early (both hypotheses end in EOS at step 3); prompt [8] runs out of
  steps, so its live beams are returned (length 5, no stop token). length_penalty 2 (not 1),
  so a wrong exponent or a wrong length shows."""
  lp, ln = 2.0, math.log
  got = beam_search(Bigram(), [[1], [8]], 5, beams=2, length_penalty=lp, stop_ids=(EOS,))
  want = [[([3, 4, EOS], (ln(0.4) + ln(0.9) + ln(0.95)) / 3 ** lp),
           ([2, 5, EOS], (ln(0.5) + ln(0.26) + ln(0.5)) / 3 ** lp)],
          [([8] * 5, 5 * ln(0.8) / 5 ** lp), ([9] * 5, (ln(0.15) + 4 * ln(0.9)) / 5 ** lp)]]
  for g, w in zip(got, want):
    assert [t for t, _ in g] == [t for t, _ in w]
    np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-5)


# ---- a tiny random Transformer (slow: each beam program compiles in ~2 s) ----

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  max_seq_len=64, position="rope")
MAX_NEW = 6
PROMPTS = [[5, 9, 2], [1, 1, 30, 7, 8, 9, 10]]


def make_model(seed: int = 0) -> Transformer:
  """Numpy-drawn weights (std 0.2; norms ~1): an eager random init compiles op by op."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path[:-1])
    if "norm" in name and name.endswith("scale"):
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), jnp.float32)
    return jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@pytest.fixture(scope="module")
def model():
  return make_model()


@pytest.fixture(scope="module")
def logprobs_of(model):
  """(prompt, tokens) -> log_softmax of the full forward (no cache) at each token: one
  (1, 16 + MAX_NEW) buffer, so one compile (causality: trailing zeros change nothing)."""
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: jax.nn.log_softmax(nnx.merge(graphdef, s)(x), axis=-1))

  def run(prompt, tokens):
    buf = np.zeros((1, 16 + MAX_NEW), np.int32)
    seq = list(prompt) + list(tokens)
    buf[0, :len(seq)] = seq
    logp = np.asarray(fwd(state, jnp.asarray(buf)), np.float64)[0]  # (T, V)
    return logp

  return run


def greedy_by_full_forward(logprobs_of, prompt, n):
  toks = []
  for _ in range(n):
    toks.append(int(np.argmax(logprobs_of(prompt, toks)[len(prompt) + len(toks) - 1])))
  return toks


@pytest.mark.slow
def test_one_beam_is_greedy(model, logprobs_of):
  for prompt in PROMPTS:
    ref = greedy_by_full_forward(logprobs_of, prompt, MAX_NEW)
    stop = ref[3] if ref[3] not in ref[:3] else ref[-1]  # a stop id that fires mid-way
    cut = ref[:ref.index(stop) + 1]
    got = beam_search(model, [prompt], MAX_NEW, beams=1, stop_ids=(stop,))[0]
    assert len(got) == 1 and got[0][0] == cut
    lp = logprobs_of(prompt, cut)
    want = sum(lp[len(prompt) + i - 1, t] for i, t in enumerate(cut)) / len(cut)
    np.testing.assert_allclose(got[0][1], want, rtol=1e-5)


@pytest.fixture(scope="module")
def stop_id():
  return 39  # common in these weights' beams: some hypotheses stop, others run out


@pytest.mark.slow
def test_scores_are_sorted_full_forward_sums_over_the_length_penalty(model, logprobs_of,
                                                                      stop_id):
  out = beam_search(model, PROMPTS, MAX_NEW, beams=3, length_penalty=1.5, stop_ids=(stop_id,))
  lengths = set()
  for prompt, hyps in zip(PROMPTS, out):
    assert len(hyps) == 3
    scores = [s for _, s in hyps]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(t) for t, _ in hyps}) == 3  # distinct hypotheses
    for toks, score in hyps:
      assert stop_id not in toks[:-1]
      assert toks[-1] == stop_id or len(toks) == MAX_NEW
      lp = logprobs_of(prompt, toks)
      raw = sum(lp[len(prompt) + i - 1, t] for i, t in enumerate(toks))
      np.testing.assert_allclose(score, raw / len(toks) ** 1.5, rtol=1e-5)
      lengths.add(len(toks))
  assert len(lengths) > 1  # both finished (stop id) and length-limited hypotheses


@pytest.mark.slow
def test_a_ragged_batch_equals_each_prompt_alone(model, stop_id):
  kw = dict(beams=3, length_penalty=1.5, stop_ids=(stop_id,))  # the program above
  batch = beam_search(model, PROMPTS, MAX_NEW, **kw)
  for prompt, got in zip(PROMPTS, batch):
    alone = beam_search(model, [prompt], MAX_NEW, **kw)[0]
    assert [t for t, _ in got] == [t for t, _ in alone]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in alone], rtol=1e-5,
                               atol=1e-6)




@pytest.mark.slow
def test_cli_beams_prints_the_n_best_with_scores(monkeypatch, capsys, tmp_path):
  import json
  from conftest import CharTokenizer
  import pathlib

  import lmx.data.tokenizer
  import lmx.train.checkpoint
  from lmx.experiment import load_experiment
  from lmx.infer.generate import cli_main

  monkeypatch.setattr(lmx.data.tokenizer, "load_or_train_tokenizer",
                      lambda exp: CharTokenizer())
  monkeypatch.setattr(lmx.train.checkpoint, "restore_params",
                      lambda exp, model, directory=None: {"source": "fake", "step": 0})
  default = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"
  cfg = [f"--config={default}", "--config.model.vocab_size=64", "--config.model.d_model=32",
         "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.n_kv_heads=1"]
  (tmp_path / "p.txt").write_text("ab\nhello\n")
  assert cli_main(cfg + ["--batch_file", str(tmp_path / "p.txt"), "--max_new_tokens", "5",
                         "--beams", "2"]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  exp, _ = load_experiment(cfg)
  model = Transformer(exp.model, rngs=nnx.Rngs(exp.seed))
  tok = CharTokenizer()
  want = beam_search(model, [[tok.bos_id] + tok.encode(p) for p in ("ab", "hello")], 5,
                     beams=2, stop_ids=(tok.eos_id,))
  for d, hyps in zip(lines, want):
    strip = [t[:-1] if t[-1] == tok.eos_id else t for t, _ in hyps]
    assert d["tokens"] == strip[0] and d["completion"] == tok.decode(strip[0])
    assert [b["tokens"] for b in d["beams"]] == strip
    np.testing.assert_allclose([b["score"] for b in d["beams"]], [s for _, s in hyps],
                               rtol=1e-6)
