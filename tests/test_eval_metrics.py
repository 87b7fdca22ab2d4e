"""lmx.eval.metrics against the reference libraries called directly, and hand cases."""

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmx.eval import metrics

# (predictions, references): ordinary, unequal lengths (brevity penalty), unicode, and
# degenerate cases (empty prediction, everything empty, no overlap).
_CASES = [
    (["the cat sat on the mat", "def f(x): return x"],
     ["the cat sat on the mat", "def f(y): return y"]),
    (["a short one"], ["a much longer reference sentence than the prediction is"]),
    (["a much longer prediction sentence than the reference is here"], ["a short one"]),
    (["naïve café über", "日本語 の テキスト"], ["naïve café", "日本語 テキスト"]),
    (["", "something"], ["reference text", "something else"]),
    ([""], [""]),
    (["alpha beta"], ["gamma delta"]),
    (["running runs ran"], ["run running runner"]),
]


@pytest.mark.parametrize("preds,refs", _CASES)
def test_bleu_equals_sacrebleu(preds, refs):
  want = sacrebleu.corpus_bleu(preds, [refs]).score
  assert metrics.bleu(preds, refs) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("preds,refs", _CASES)
def test_rouge_equals_rouge_score(preds, refs):
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
  got = metrics.rouge(preds, refs)
  for key in ("rouge1", "rouge2", "rougeL"):
    want = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(preds, refs)) / len(preds)
    assert got[key] == pytest.approx(want, abs=1e-12), key


def test_bleu_rouge_reject_mismatched_lengths():
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.bleu(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    metrics.rouge(["a", "b"], ["a"])


def test_bits_per_byte_by_hand():
  # Mean loss 2.0 nats over 3 tokens that decode to 4 bytes: 6 nats / (4 ln 2) bits per byte.
  assert metrics.bits_per_byte(2.0 * 3, 4) == pytest.approx(6.0 / (4 * math.log(2)), rel=1e-15)
  # A uniform model over 256 byte values spends exactly 8 bits per byte.
  assert metrics.bits_per_byte(10 * math.log(256), 10) == pytest.approx(8.0, rel=1e-12)
  with pytest.raises(ValueError, match="n_bytes is 0"):
    metrics.bits_per_byte(1.0, 0)


def test_exact_match_f1_contains_accuracy_by_hand():
  assert metrics.exact_match("  foo \n", "foo")
  assert not metrics.exact_match("Foo", "foo")  # case counts
  # 'def f(a, b):' -> def f ( a , b ) : (8 tokens); 'def f(a):' (6); 6 shared:
  # P = 6/8, R = 6/6, F1 = 2 * 0.75 / 1.75 = 6/7.
  assert metrics.token_f1("def f(a, b):", "def f(a):") == pytest.approx(6 / 7)
  assert metrics.token_f1("a a b", "a a c") == pytest.approx(2 / 3)  # multisets, not sets
  assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("x", "") == 0.0
  assert metrics.token_f1("x y", "z") == 0.0
  assert metrics.contains("The answer is  Get_Name.", "get_name")
  assert not metrics.contains("getname", "get_name")
  assert not metrics.contains("anything", "  ")  # an empty answer never counts
  assert metrics.accuracy([True, False, True, True]) == 0.75
  with pytest.raises(ValueError, match="no items"):
    metrics.accuracy([])
