"""Dedup: MinHash vs exact Jaccard, planted duplicates (precision/recall), cross-split, LSH."""

import re

import numpy as np
import pytest

from lmx.data import dedup


def _exact_jaccard(a: str, b: str, n: int) -> float:
  """Plain-Python reference: sets of lowercase word n-grams."""
  def grams(t):
    w = re.findall(r"\w+", t.lower())
    return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}
  ga, gb = grams(a), grams(b)
  return len(ga & gb) / len(ga | gb)


def _random_doc(rng, vocab, n_words=300):
  return " ".join(rng.choice(vocab, n_words))


def _edit(rng, text, vocab, frac):
  w = text.split()
  for k in rng.choice(len(w), int(frac * len(w)), replace=False):
    w[k] = str(rng.choice(vocab))
  return " ".join(w)


@pytest.fixture(scope="module")
def vocab():
  rng = np.random.default_rng(0)
  return ["".join(rng.choice(list("abcdefghijklmnop"), rng.integers(2, 9))) for _ in range(5000)]


def test_shingle_count_matches_python_sets(vocab):
  rng = np.random.default_rng(1)
  text = _random_doc(rng, vocab[:50], 400)  # small vocab: many repeated shingles
  w = text.split()
  for n in (1, 3, 5):
    ref = {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    assert len(dedup.shingle_hashes(text, "word", n)) == len(ref)
  ref_chars = {text[i:i + 7] for i in range(len(text) - 6)}
  assert len(dedup.shingle_hashes(text, "char", 7)) == len(ref_chars)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_minhash_estimates_exact_jaccard(vocab):
  rng = np.random.default_rng(2)
  mh = dedup.MinHasher(256, seed=3)
  errs = []
  for _ in range(40):
    a = _random_doc(rng, vocab, 300)
    b = _edit(rng, a, vocab, rng.uniform(0.0, 0.5))
    j = _exact_jaccard(a, b, 3)
    est = dedup.jaccard_estimate(mh.signature(dedup.shingle_hashes(a, "word", 3)),
                                 mh.signature(dedup.shingle_hashes(b, "word", 3)))
    errs.append(est - j)
  errs = np.array(errs)
  # Std of the MinHash estimator is sqrt(J(1-J)/P) <= 0.5/16 = 0.031 at P=256.
  assert abs(errs.mean()) < 0.015
  assert np.abs(errs).max() < 0.12
  assert errs.std() < 0.04


def test_choose_bands_places_the_step_for_recall():
  """Candidates are verified, so LSH must catch pairs just above the threshold (>= 95% at
  t + 0.05) with as many rows as allow it (fewest chance candidates far below)."""
  for perm in (128, 256):
    for t in (0.4, 0.5, 0.7, 0.85):
      b, r = dedup.choose_bands(t, perm)
      p = lambda s, b=b, r=r: 1 - (1 - s**r) ** b
      assert b * r <= perm and b == perm // r
      assert p(t + 0.05) >= 0.95
      assert 1 - (1 - (t + 0.05) ** (r + 1)) ** (perm // (r + 1)) < 0.95  # one more row: too few
      assert p(t - 0.25) < 0.25
  assert dedup.choose_bands(0.4, 256) == (85, 3)  # the shipped default


def test_planted_duplicates_precision_recall(vocab):
  """200 distinct docs + 20 exact copies + 30 near copies (~5% word edits)."""
  rng = np.random.default_rng(4)
  docs = [(f"doc{i:04d}", _random_doc(rng, vocab, int(rng.integers(150, 400))))
          for i in range(200)]
  truth = set()  # ids of planted copies: exactly these should be dropped
  for k in range(20):
    src = docs[int(rng.integers(0, 200))][1]
    docs.append((f"exact{k:03d}", src))
    truth.add(f"exact{k:03d}")
  for k in range(30):
    src = docs[int(rng.integers(0, 200))][1]
    docs.append((f"near{k:03d}", _edit(rng, src, vocab, 0.05)))
    truth.add(f"near{k:03d}")
  # 5% word edits of 3-word shingles -> Jaccard ~0.75; unrelated docs share ~nothing.
  cfg = dedup.DedupConfig(threshold=0.5, num_perm=128, shingle="word", shingle_size=3)
  res = dedup.deduplicate(docs, cfg)
  dropped = set(res.drop)
  tp = len(dropped & truth)
  precision = tp / max(1, len(dropped))
  recall = tp / len(truth)
  assert precision >= 0.95 and recall >= 0.95, (precision, recall)
  assert all(res.drop[f"exact{k:03d}"] == "exact_duplicate" for k in range(20))
  # Each cluster keeps its smallest id: originals (doc...) sort before exact.../near...
  for cluster in res.clusters:
    assert cluster[0] == min(cluster)


def test_char_shingles_find_near_duplicates(vocab):
  rng = np.random.default_rng(5)
  a = _random_doc(rng, vocab, 300)
  docs = [("a", a), ("b", _edit(rng, a, vocab, 0.03)), ("c", _random_doc(rng, vocab, 300))]
  res = dedup.deduplicate(docs, dedup.DedupConfig(threshold=0.6, shingle="char",
                                                  shingle_size=8))
  assert res.drop == {"b": "near_duplicate"}


def test_cross_split_removes_training_twin(vocab):
  rng = np.random.default_rng(6)
  a = _random_doc(rng, vocab, 300)
  docs = [("a_train", a), ("z_val", _edit(rng, a, vocab, 0.02)),
          ("m_other", _random_doc(rng, vocab, 300))]
  res = dedup.deduplicate(docs, dedup.DedupConfig(threshold=0.6, shingle="word",
                                                  shingle_size=3),
                          validation_ids=frozenset({"z_val"}))
  # Smallest id would be a_train, but the validation member must win.
  assert res.drop == {"a_train": "cross_split_duplicate"}
  assert res.clusters == [["z_val", "a_train"]]


def test_multiprocessing_signatures_match_serial(vocab):
  rng = np.random.default_rng(7)
  texts = [_random_doc(rng, vocab, 100) for _ in range(6)]
  cfg = dedup.DedupConfig(num_perm=64, processes=2, exact=False)
  serial = dedup._signatures_worker((texts, cfg.shingle, cfg.shingle_size, 64, 0))
  d = dedup.Deduplicator(cfg)
  for i, t in enumerate(texts):
    d.add(str(i), t)
  d._flush()
  d.close()
  np.testing.assert_array_equal(np.concatenate(d.sigs), serial)


def test_empty_and_tiny_docs_do_not_crash():
  res = dedup.deduplicate([("a", ""), ("b", "..."), ("c", "one"), ("d", "one")],
                          dedup.DedupConfig())
  assert res.drop == {"d": "exact_duplicate"}


def test_bad_config_names_field():
  with pytest.raises(ValueError, match="prepare.dedup.threshold"):
    dedup.DedupConfig(threshold=1.5).validate()


def test_minhash_signature_is_the_per_function_minimum():
  """Against the formula computed the plain way (shift every hash, then take the minimum),
  across several 8192-shingle chunks, and for the empty set."""
  rng = np.random.default_rng(8)
  mh = dedup.MinHasher(32, seed=9)
  for n in (1, 7, 3 * dedup.MinHasher.CHUNK + 5):
    x = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    with np.errstate(over="ignore"):
      ref = ((x[:, None] * mh.a[None, :] + mh.b[None, :]) >> np.uint64(32)).min(axis=0)
    np.testing.assert_array_equal(mh.signature(x), ref.astype(np.uint32))
  assert (mh.signature(np.zeros(0, np.uint64)) == 0xFFFFFFFF).all()


def test_bands_rows_config():
  assert dedup.DedupConfig().lsh_shape() == (85, 3)
  assert dedup.DedupConfig(bands=16, rows=8).lsh_shape() == (16, 8)
  for bad in ({"bands": 16}, {"bands": 64, "rows": 5}, {"rows": -1}):
    with pytest.raises(ValueError, match="prepare.dedup"):
      dedup.DedupConfig(**bad).validate()
