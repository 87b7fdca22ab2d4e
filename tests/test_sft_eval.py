"""SFT generation eval: hand-computed F1 / exact match, prompts that are encode_conversation's
prefix, greedy decoding equal to a full-forward argmax loop, scores over (forced) predictions."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ModelConfig
from lmx.data import sft
from lmx.eval import sft_eval
from lmx.model import Transformer

@pytest.fixture(scope="module")
def tok(chat_tokenizer):
  return chat_tokenizer


@pytest.fixture(scope="module")
def model(tok):
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                    max_seq_len=64).validate()
  # Random weights drawn in numpy into the abstract model: an eager Transformer(...) init
  # compiles every initializer (~4 s on 2 cores); the scale 0.3 makes the logits peaky.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


def _greedy_by_full_forward(model, prompts, n):
  """Reference: re-run whole rows and take the argmax after each row's last token. Rows sit
  left-aligned in one (B, T) buffer, one compile: by causality later slots cannot matter."""
  lens = [len(p) for p in prompts]
  buf = np.zeros((len(prompts), max(lens) + n), np.int32)
  for b, p in enumerate(prompts):
    buf[b, :len(p)] = p
  fwd = jax.jit(lambda x: model(x))
  for k in range(n):
    logits = np.asarray(fwd(jnp.asarray(buf)))  # (B, T, V)
    for b, t in enumerate(lens):
      buf[b, t + k] = logits[b, t + k - 1].argmax()
  return [buf[b, t:t + n].tolist() for b, t in enumerate(lens)]


_CONVS = [
    [{"role": "user", "content": "how do I sort a list"},
     {"role": "assistant", "content": "use sorted"}],
    [{"role": "system", "content": "be brief"},
     {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "hello world"},
     {"role": "user", "content": "return self"},
     {"role": "assistant", "content": "def self"}],
]


def test_token_f1_and_exact_match_by_hand():
  # 'def f(a, b):' -> def f ( a , b ) :  (8 tokens); 'def f(a):' -> def f ( a ) :  (6).
  # All 6 reference tokens are predicted: P = 6/8, R = 6/6, F1 = 2 * .75 * 1 / 1.75 = 6/7.
  assert sft_eval.token_f1("def f(a, b):", "def f(a):") == pytest.approx(6 / 7)
  assert sft_eval.token_f1("def f(a):", "def f(a, b):") == pytest.approx(6 / 7)  # symmetric
  # Multisets: pred 'a a b' vs ref 'a b b' share {a, b}: P = R = 2/3, F1 = 2/3.
  assert sft_eval.token_f1("a a b", "a b b") == pytest.approx(2 / 3)
  # Case is kept (Python names): 'Sort' != 'sort'; 'x' shared: P = R = 1/2, F1 = 1/2.
  assert sft_eval.token_f1("Sort x", "sort x") == pytest.approx(0.5)
  # Whitespace does not matter to tokens; punctuation splits them.
  assert sft_eval.token_f1("def  f( x ):", "def f(x):") == 1.0
  assert sft_eval.token_f1("", "") == 1.0
  assert sft_eval.token_f1("", "x") == sft_eval.token_f1("x", "") == 0.0
  assert sft_eval.token_f1("a b", "c d") == 0.0

  assert sft_eval.exact_match("  def f(x):\n", "def f(x):")
  assert not sft_eval.exact_match("def f(x):", "def f(y):")
  assert not sft_eval.exact_match("def f( x):", "def f(x):")  # spacing inside counts
  assert not sft_eval.exact_match("Sorted", "sorted")


def test_prompt_ids_are_the_encode_conversation_prefix(tok):
  assistant = sft.chat_token_ids(tok)["<|assistant|>"]
  for conv in _CONVS:
    full = sft.encode_conversation(tok, conv)[0].tolist()
    cut = len(full) - 1 - full[::-1].index(assistant)  # the final <|assistant|> token
    got = sft_eval.prompt_ids(tok, conv)
    assert got == full[:cut + 1]
    assert got[0] == tok.bos_id and got[-1] == assistant
    # What follows in the training ids is exactly the reference the model must produce.
    rest = full[cut + 1:]
    assert tok.decode(rest[:-2]) == conv[-1]["content"] and rest[-1] == tok.eos_id
  # Turns after the final assistant turn are not part of its prompt.
  trailing = _CONVS[0] + [{"role": "user", "content": "ok"}]
  assert sft_eval.prompt_ids(tok, trailing) == sft_eval.prompt_ids(tok, _CONVS[0])
  with pytest.raises(ValueError, match="no assistant turn"):
    sft_eval.prompt_ids(tok, [{"role": "user", "content": "hi"}])


@pytest.mark.slow  # compiles models: kept out of the 90 s fast set
def test_greedy_decode_equals_the_full_forward_argmax(model, tok):
  # Three lengths in batches of 2: rows of different lengths share a batch, and the last
  # batch is padded with a copy. (test_generate.py ties generate() to the same reference.)
  # The longest prompt and 6 new tokens: the shapes generation_scores compiles below.
  prompts = [sft_eval.prompt_ids(tok, c) for c in _CONVS] + [[1, 7]]
  want = _greedy_by_full_forward(model, prompts, 6)
  assert sft_eval.greedy_decode(model, prompts, 6, batch_size=2) == want
  # A stop id ends a row before it (not included), like generate's eos_id.
  stop = want[1][2]
  got = sft_eval.greedy_decode(model, prompts, 6, stop_ids=[stop], batch_size=2)
  assert got[1] == want[1][:want[1].index(stop)]
  assert got == [w[:w.index(stop)] if stop in w else w for w in want]


def test_generation_scores_on_a_random_model(model, tok):
  out = sft_eval.generation_scores(model, tok, _CONVS, max_new_tokens=6)
  assert out["n"] == 2
  assert 0.0 <= out["exact_match"] <= 1.0 and 0.0 <= out["token_f1"] <= 1.0
  assert [e[1] for e in out["examples"]] == ["use sorted", "def self"]


def test_generation_scores_of_forced_predictions(tok, monkeypatch):
  end = sft.chat_token_ids(tok)[sft.END_TOKEN]
  preds = ["use sorted", "def self"]

  def fake_decode(model, prompts, max_new_tokens, *, stop_ids=(), batch_size=32):
    assert prompts == [sft_eval.prompt_ids(tok, c) for c in _CONVS[:len(prompts)]]
    assert end in stop_ids and tok.eos_id in stop_ids
    return [tok.encode(p) for p in preds[:len(prompts)]]

  monkeypatch.setattr(sft_eval, "greedy_decode", fake_decode)
  out = sft_eval.generation_scores(None, tok, _CONVS)
  assert out["exact_match"] == 1.0 and out["token_f1"] == 1.0 and out["n"] == 2
  # One right, one with an extra token: EM = 1/2; F1 = (1 + 2 * (2/3) * 1 / (5/3)) / 2 = 0.9.
  preds[1] = "def self ok"
  out = sft_eval.generation_scores(None, tok, _CONVS)
  assert out["exact_match"] == 0.5 and out["token_f1"] == pytest.approx(0.9)
  assert out["examples"][1][1:] == ("def self", "def self ok")
  assert sft_eval.generation_scores(None, tok, _CONVS, limit=1)["n"] == 1
