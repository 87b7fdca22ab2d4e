"""Scores for evaluation: exact match, token F1, accuracy, BLEU, ROUGE and bits per byte.

    exact_match   pred.strip() == ref.strip(): case and inner spacing count (the shipped
                  tasks are Python names, where they change the meaning)
    token_f1      SQuAD-style F1 over the multisets of tokens `\\w+|[^\\w\\s]` (words and
                  single punctuation marks, case and punctuation kept)
    contains      the normalized reference occurs in the normalized prediction (lowercase,
                  whitespace runs collapsed): the generation tasks' `accuracy`, which
                  forgives a model that says more than the answer
    bleu          corpus BLEU of `sacrebleu` (its defaults: 13a tokenization, exp smoothing),
                  on the 0-100 scale
    rouge         mean over pairs of the F-measures of `rouge-score` (ROUGE-1, -2, -L; its
                  default tokenizer: lowercase, non-alphanumerics dropped, no stemming)
    bits_per_byte total NLL in nats / (UTF-8 bytes * ln 2): independent of the tokenizer,
                  so models with different vocabularies compare
BLEU and ROUGE are the libraries' own numbers; nothing here re-implements them.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Sequence

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def exact_match(pred: str, ref: str) -> bool:
  return pred.strip() == ref.strip()


def token_f1(pred: str, ref: str) -> float:
  """Harmonic mean of token precision and recall over multisets (module docstring).
  Two empty strings agree (1.0); one empty string scores 0.0."""
  p, r = _TOKEN_RE.findall(pred), _TOKEN_RE.findall(ref)
  if not p or not r:
    return float(p == r)
  same = sum((collections.Counter(p) & collections.Counter(r)).values())
  if not same:
    return 0.0
  precision, recall = same / len(p), same / len(r)
  return 2 * precision * recall / (precision + recall)


def _normalize(s: str) -> str:
  return " ".join(s.lower().split())


def contains(pred: str, ref: str) -> bool:
  """The normalized `ref` is a substring of the normalized `pred` (an empty ref never
  counts: it is in every string)."""
  r = _normalize(ref)
  return bool(r) and r in _normalize(pred)


def accuracy(correct: Sequence[bool]) -> float:
  """Share of True; an empty sequence is an error, not 0 or 1."""
  if not len(correct):
    raise ValueError("accuracy: no items to score")
  return sum(bool(c) for c in correct) / len(correct)


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
  """sacrebleu's corpus BLEU (0-100) of `preds` against one reference each."""
  import sacrebleu
  if len(preds) != len(refs):
    raise ValueError(f"bleu: {len(preds)} predictions but {len(refs)} references")
  return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """{'rouge1', 'rouge2', 'rougeL'}: mean F-measure of rouge-score over the pairs."""
  from rouge_score import rouge_scorer
  if len(preds) != len(refs):
    raise ValueError(f"rouge: {len(preds)} predictions but {len(refs)} references")
  if not preds:
    raise ValueError("rouge: no pairs to score")
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for p, r in zip(preds, refs):
    s = scorer.score(r, p)  # (target, prediction)
    for k in ROUGE_TYPES:
      totals[k] += s[k].fmeasure
  return {k: v / len(preds) for k, v in totals.items()}


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
  """Total negative log-likelihood (nats) of some text over its UTF-8 byte count, in bits.
  Equals loss * tokens / (bytes * ln 2) for a mean per-token loss `loss`."""
  if n_bytes <= 0:
    raise ValueError(f"bits_per_byte: n_bytes is {n_bytes}; it must be > 0")
  return float(nll_nats) / (n_bytes * math.log(2))
