"""Unigram baseline perplexity by hand; token-weighted validation loss."""

import math

import numpy as np
import pytest

from lmx.eval.perplexity import count_targets, unigram_perplexity, validation_loss


def test_unigram_perplexity_by_hand():
  # V=3, train counts (2, 1, 0), N=3: p = (3/6, 2/6, 1/6) with add-one smoothing.
  counts = np.array([2, 1, 0])
  valid = np.array([0, 1, 2, 0])
  logp = [math.log(3 / 6), math.log(2 / 6), math.log(1 / 6), math.log(3 / 6)]
  want = math.exp(-sum(logp) / 4)
  assert unigram_perplexity(counts, valid, 3) == pytest.approx(want, rel=1e-12)
  # Uniform counts give perplexity V.
  assert unigram_perplexity(np.full(5, 7), np.arange(5), 5) == pytest.approx(5.0)


def test_unigram_rejects_bad_input():
  with pytest.raises(ValueError, match="outside"):
    unigram_perplexity(np.ones(3), np.array([3]), 3)
  with pytest.raises(ValueError, match="shape"):
    unigram_perplexity(np.ones(4), np.array([0]), 3)
  with pytest.raises(ValueError, match="empty"):
    unigram_perplexity(np.ones(3), np.array([], np.int64), 3)


def test_count_targets_respects_mask():
  b = {"targets": np.array([[0, 1, 1], [2, 2, 0]]),
       "loss_mask": np.array([[1, 1, 0], [1, 0, 0]], np.float32)}
  np.testing.assert_array_equal(count_targets([b, b], 4), [2, 2, 2, 0])


def test_validation_loss_is_token_weighted():
  # Batch sums/counts: (10, 4), (2, 1) -> 12 / 5, not the mean of batch means (2.25).
  sums = iter([(10.0, 4.0), (2.0, 1.0)])
  out = validation_loss(lambda p, b: next(sums), None, [0, 1])
  assert out["val_loss"] == pytest.approx(12 / 5)
  assert out["val_ppl"] == pytest.approx(math.exp(12 / 5))
  assert out["val_tokens"] == 5.0
