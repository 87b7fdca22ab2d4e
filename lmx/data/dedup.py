"""Exact and near-duplicate removal: content hashes, then MinHash signatures + LSH banding.

Near-duplicates (Broder 1997): a document is a set of shingles (character, word or byte
n-grams); the Jaccard similarity of two sets is estimated by the share of equal entries in two
MinHash signatures. LSH cuts a signature into `b` bands of `r` rows; two documents become
candidates when any band is identical, which happens with probability 1 - (1 - J^r)^b -- an
S-curve that `choose_bands` places for recall just above the configured threshold. Candidates
are verified on the full signature, joined by union-find, and each cluster keeps one document.

Shingles (`shingle='auto'`, the default): n-grams of Unicode characters in every script. A
Han, Kana or Hangul character counts as one unit like a Latin letter, so Chinese text without
spaces gets as many shingles as it has characters -- word n-grams would make a whole clause
one "word". Word n-grams stay available (`'word'`), but the measured curve in docs/data.md
shows why they are not the default for any script: a ~5% character edit touches ~25% of
English words, so word-shingle Jaccard of such near-copies falls to ~0.1.

Everything is numpy-vectorized: shingles are hashed with a polynomial rolling hash over the
code points (or bytes; uint64 arithmetic wraps mod 2^64), mixed with splitmix64, and the
`num_perm` hash functions are multiply-shift maps h_i(x) = ((a_i x + b_i) mod 2^64) >> 32
(Dietzfelbinger et al. 1997) applied to all shingles at once. Signatures are 4 bytes per
permutation, so one process holds ~1 KB per document at num_perm=256; docs/data.md explains
how to shard it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import re
from typing import Sequence

import numpy as np

_P = 0x100000001B3 | 1  # odd multiplier of the rolling hash (invertible mod 2^64)
_Q = pow(_P, -1, 1 << 64)
_R = 0x9E3779B97F4A7C15  # combines word hashes into word n-gram hashes
_U64 = np.uint64
_WORD_BYTE = np.zeros(256, bool)
_WORD_BYTE[[*b"0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]] = True
_WORD_BYTE[0x80:] = True  # UTF-8 bytes of non-ASCII letters belong to words
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32
_SPACE_RE = re.compile(r"\s+")


SHINGLES = ("auto", "char", "word", "byte")


@dataclasses.dataclass(frozen=True)
class DedupConfig:
  exact: bool = True
  near: bool = True
  # Defaults from the precision/recall curve in docs/data.md (planted ~5%-character-edit
  # copies in English, code, Chinese, mixed markdown and templated text).
  threshold: float = 0.4  # Jaccard similarity at or above which two documents are near-dups.
  num_perm: int = 256  # MinHash permutations (signature length).
  shingle: str = "auto"  # auto | char | word | byte; see `shingle_hashes`.
  shingle_size: int = 6  # characters (words, bytes) per shingle.
  bands: int = 0  # LSH bands x rows <= num_perm; 0 and 0 = `choose_bands` (85 x 3 here).
  rows: int = 0
  seed: int = 0
  processes: int = 1  # >1 computes signatures in a multiprocessing pool.

  def validate(self) -> "DedupConfig":
    if not 0.0 < self.threshold < 1.0:
      raise ValueError(f"Invalid config: `prepare.dedup.threshold` is {self.threshold!r}; it "
                       "must be in (0, 1).")
    if self.shingle not in SHINGLES:
      raise ValueError(f"Invalid config: `prepare.dedup.shingle` is {self.shingle!r}; it must "
                       f"be one of {', '.join(repr(k) for k in SHINGLES)}.")
    for f in ("num_perm", "shingle_size", "processes"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"Invalid config: `prepare.dedup.{f}` is {v!r}; it must be a "
                         "positive integer.")
    for f in ("bands", "rows"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 0:
        raise ValueError(f"Invalid config: `prepare.dedup.{f}` is {v!r}; it must be an "
                         "integer >= 0.")
    if (self.bands == 0) != (self.rows == 0) or self.bands * self.rows > self.num_perm:
      raise ValueError(f"Invalid config: `prepare.dedup.bands` x `rows` is {self.bands} x "
                       f"{self.rows}; set both (product <= num_perm={self.num_perm}) or "
                       "neither.")
    return self

  def lsh_shape(self) -> tuple[int, int]:
    """(bands, rows): the configured ones, else derived from the threshold."""
    if self.bands:
      return self.bands, self.rows
    return choose_bands(self.threshold, self.num_perm)


def exact_key(text: str) -> bytes:
  """Hash of the text with whitespace runs collapsed (reformatting is not a new document)."""
  return hashlib.blake2b(_SPACE_RE.sub(" ", text).strip().encode(), digest_size=16).digest()


# ---------------------------------------------------------------- shingles

def _mix64(z: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer: spreads the rolling hash's low-entropy bits over all 64."""
  z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
  return z ^ (z >> _U64(31))


_pow_cache = {"p": np.ones(1, np.uint64), "q": np.ones(1, np.uint64)}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
  """P^j and Q^j = P^-j (mod 2^64) for j < n; grown geometrically and cached."""
  if len(_pow_cache["p"]) < n:
    m = max(n, 2 * len(_pow_cache["p"]))
    with np.errstate(over="ignore"):
      for k, base in (("p", _P), ("q", _Q)):
        arr = np.full(m, base, np.uint64)
        arr[0] = 1
        _pow_cache[k] = np.cumprod(arr, dtype=np.uint64)  # wraps mod 2^64
  return _pow_cache["p"][:n], _pow_cache["q"][:n]


def _span_hashes(b: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """Polynomial hash of each byte span b[s:e], all spans at once via prefix sums.

  hash(s, e) = sum_{j=s}^{e-1} (b_j + 1) P^(e-1-j) = P^(e-1) * (S[e] - S[s]),
  with S[i] = sum_{j<i} (b_j + 1) Q^j and Q = P^-1 mod 2^64.
  """
  ppow, qpow = _powers(len(b))
  s = np.zeros(len(b) + 1, np.uint64)
  np.cumsum((b.astype(np.uint64) + _U64(1)) * qpow, out=s[1:])
  return ppow[ends - 1] * (s[ends] - s[starts])


def _codepoints(text: str) -> np.ndarray:
  """Whitespace-collapsed, lowercased text as (C,) uint32 Unicode code points."""
  t = _SPACE_RE.sub(" ", text).strip().lower()
  return np.frombuffer(t.encode("utf-32-le", "replace"), np.uint32)


def _ngram_hashes(units: np.ndarray, size: int) -> np.ndarray:
  if len(units) == 0:
    return np.zeros(0, np.uint64)
  k = min(size, len(units))
  starts = np.arange(len(units) - k + 1)
  return np.unique(_mix64(_span_hashes(units, starts, starts + k)))


def shingle_hashes(text: str, kind: str = "auto", size: int = 6) -> np.ndarray:
  """Unique 64-bit hashes of the document's shingles, (S,) uint64, sorted. Case-insensitive.

  kind: 'auto' = 'char' = n-grams of Unicode characters of the whitespace-collapsed text (any
  script; a Han character is one unit); 'byte' = n-grams of its UTF-8 bytes (what 'char' meant
  before the multilingual defaults; a Han character is three units); 'word' = n-grams of runs of letters,
  digits and '_' (a Chinese clause is one word). A text shorter than `size` units is one
  shingle.
  """
  with np.errstate(over="ignore"):
    if kind in ("auto", "char"):
      return _ngram_hashes(_codepoints(text), size)
    if kind == "byte":
      return _ngram_hashes(_LOWER[np.frombuffer(
          _SPACE_RE.sub(" ", text).strip().encode("utf-8", "replace"), np.uint8)], size)
    b = _LOWER[np.frombuffer(text.encode("utf-8", "replace"), np.uint8)]
    word = _WORD_BYTE[b]
    if not word.any():
      return np.zeros(0, np.uint64)
    edge = np.diff(word.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)  # (M,) words
    wh = _mix64(_span_hashes(b, starts, ends))
    k = min(size, len(wh))
    n = len(wh) - k + 1
    sh = np.zeros(n, np.uint64)
    for t in range(k):  # word n-gram hash: sum_t wh[i+t] R^(k-1-t)
      sh = sh * _U64(_R) + wh[t:t + n]
    return np.unique(_mix64(sh))


# ---------------------------------------------------------------- MinHash

class MinHasher:
  """`num_perm` multiply-shift hash functions; signature = per-function minimum, uint32."""

  CHUNK = 8192  # shingles per step: a (P, C) uint64 buffer, 16 MB at P=256, made once

  def __init__(self, num_perm: int = 128, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * _U64(2) + _U64(1)  # odd
    self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    self.num_perm = num_perm
    self._buf = np.empty((num_perm, self.CHUNK), np.uint64)

  def signature(self, shingles: np.ndarray) -> np.ndarray:
    """(S,) uint64 shingle hashes -> (P,) uint32; an empty set gives all 0xFFFFFFFF."""
    lo = np.full(self.num_perm, np.iinfo(np.uint64).max, np.uint64)
    a, b = self.a[:, None], self.b[:, None]
    with np.errstate(over="ignore"):
      for i in range(0, len(shingles), self.CHUNK):
        x = shingles[None, i:i + self.CHUNK]  # (1, C)
        h = self._buf[:, :x.shape[1]]  # (P, C)
        np.multiply(a, x, out=h)
        np.add(h, b, out=h)
        np.minimum(lo, h.min(axis=1), out=lo)
    # `>> 32` is monotone, so the minimum of the high halves is the high half of the minimum:
    # one shift per function instead of one per (shingle, function).
    return (lo >> _U64(32)).astype(np.uint32)


def _signatures_worker(args) -> np.ndarray:
  texts, kind, size, num_perm, seed = args
  mh = MinHasher(num_perm, seed)
  out = np.empty((len(texts), num_perm), np.uint32)
  for i, t in enumerate(texts):
    out[i] = mh.signature(shingle_hashes(t, kind, size))
  return out


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
  return float(np.mean(sig_a == sig_b))


def choose_bands(threshold: float, num_perm: int, margin: float = 0.05,
                 recall: float = 0.95) -> tuple[int, int]:
  """(bands, rows) for LSH: the most rows r (fewest chance candidates) such that
  b = num_perm // r bands make a pair with Jaccard `threshold + margin` a candidate with
  probability 1 - (1 - J^r)^b >= `recall`.

  Recall first, because LSH only proposes: every candidate is then verified on the full
  signature, so a false candidate costs one signature comparison while a missed pair is lost.
  (0.45 / 128 -> 42 x 3; 0.5 / 256 -> 64 x 4; 0.7 / 128 -> 21 x 6.)
  """
  j = min(1.0, threshold + margin)
  for r in range(num_perm, 0, -1):
    b = num_perm // r
    if 1.0 - (1.0 - j**r) ** b >= recall:
      return b, r
  return num_perm, 1


class UnionFind:
  def __init__(self, n: int):
    self.parent = list(range(n))

  def find(self, i: int) -> int:
    while self.parent[i] != i:
      self.parent[i] = self.parent[self.parent[i]]
      i = self.parent[i]
    return i

  def union(self, i: int, j: int) -> None:
    ri, rj = self.find(i), self.find(j)
    if ri != rj:
      self.parent[max(ri, rj)] = min(ri, rj)


def lsh_pairs(sigs: np.ndarray, threshold: float, bands: int, rows: int,
              verify: bool = True) -> list[tuple[int, int]]:
  """Candidate pairs (i, j) sharing a band, verified on the full signature. sigs: (N, P)."""
  n = len(sigs)
  pairs: set[tuple[int, int]] = set()
  if n < 2:
    return []
  with np.errstate(over="ignore"):
    for band in range(bands):
      cols = sigs[:, band * rows:(band + 1) * rows].astype(np.uint64)  # (N, r)
      key = np.zeros(n, np.uint64)
      for c in range(rows):
        key = _mix64(key * _U64(_R) + cols[:, c])
      order = np.argsort(key, kind="stable")
      k = key[order]
      bounds = np.flatnonzero(np.diff(k) != 0) + 1
      for group in np.split(order, bounds):
        if len(group) < 2:
          continue
        group = np.sort(group)
        if len(group) > 64:  # huge bucket: compare with its first member only
          sims = (sigs[group] == sigs[group[0]]).mean(axis=1)
          cand = [(int(group[0]), int(j)) for j, s in zip(group[1:], sims[1:])
                  if not verify or s >= threshold]
        else:
          g = sigs[group]
          sims = (g[:, None, :] == g[None, :, :]).mean(axis=-1)  # (m, m)
          ii, jj = np.nonzero(np.triu(sims >= threshold if verify else sims >= 0, k=1))
          cand = [(int(group[a]), int(group[c])) for a, c in zip(ii, jj)]
        pairs.update(cand)
  return sorted(pairs)


@dataclasses.dataclass
class DedupResult:
  drop: dict[str, str]  # doc id -> exact_duplicate | near_duplicate | cross_split_duplicate
  clusters: list[list[str]]  # clusters of >= 2 documents; the kept one first
  bands: int
  rows: int


class Deduplicator:
  """Streaming collector: `add` documents (keeps 16 B hash + 4*num_perm B signature each),
  then `finalize` clusters them. Representative: the smallest validation id if the cluster
  has one (so no validation document keeps a twin in training), else the smallest id."""

  def __init__(self, cfg: DedupConfig):
    self.cfg = cfg.validate()
    self.hasher = MinHasher(cfg.num_perm, cfg.seed)
    self.ids: list[str] = []
    self.is_val: list[bool] = []
    self.exact_first: dict[bytes, int] = {}
    self.exact_edges: list[tuple[int, int]] = []
    self.exact_group: list[int] = []  # index of the first document with the same exact hash
    self.sig_rows: list[int] = []  # doc index of each signature
    self.sigs: list[np.ndarray] = []
    self._pending: list[tuple[int, str]] = []
    self._pool = None

  def add(self, doc_id: str, text: str, is_validation: bool = False) -> None:
    i = len(self.ids)
    self.ids.append(doc_id)
    self.is_val.append(is_validation)
    first = i
    if self.cfg.exact:
      first = self.exact_first.setdefault(exact_key(text), i)
      if first != i:
        self.exact_edges.append((first, i))
        self.exact_group.append(first)
        return  # an exact copy needs no signature: it joins its twin's cluster
    self.exact_group.append(first)
    if self.cfg.near:
      self._pending.append((i, text))
      if len(self._pending) >= 256 * self.cfg.processes:
        self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    idx, texts = zip(*self._pending)
    self._pending = []
    c = self.cfg
    if c.processes > 1:
      if self._pool is None:  # spawn: never fork a process that may hold JAX threads
        self._pool = multiprocessing.get_context("spawn").Pool(c.processes)
      step = -(-len(texts) // c.processes)
      jobs = [(texts[k:k + step], c.shingle, c.shingle_size, c.num_perm, c.seed)
              for k in range(0, len(texts), step)]
      sigs = np.concatenate(self._pool.map(_signatures_worker, jobs))
    else:
      sigs = _signatures_worker((texts, c.shingle, c.shingle_size, c.num_perm, c.seed))
    self.sig_rows.extend(idx)
    self.sigs.append(sigs)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.close()
      self._pool.join()
      self._pool = None

  def finalize(self) -> DedupResult:
    self._flush()
    self.close()
    n = len(self.ids)
    uf = UnionFind(n)
    for i, j in self.exact_edges:
      uf.union(i, j)
    bands, rows = self.cfg.lsh_shape()
    if self.cfg.near and self.sigs:
      sigs = np.concatenate(self.sigs)  # (N_unique, P)
      empty = (sigs == np.iinfo(np.uint32).max).all(axis=1)  # no shingles: never a near-dup
      keep_rows = np.flatnonzero(~empty)
      for a, b in lsh_pairs(sigs[keep_rows], self.cfg.threshold, bands, rows):
        uf.union(self.sig_rows[keep_rows[a]], self.sig_rows[keep_rows[b]])
    members: dict[int, list[int]] = {}
    for i in range(n):
      members.setdefault(uf.find(i), []).append(i)
    drop: dict[str, str] = {}
    clusters: list[list[str]] = []
    for group in members.values():
      if len(group) < 2:
        continue
      val = [i for i in group if self.is_val[i]]
      rep = min(val or group, key=lambda i: self.ids[i])
      for i in group:
        if i == rep:
          continue
        if val and not self.is_val[i]:
          drop[self.ids[i]] = "cross_split_duplicate"
        elif self.exact_group[i] == self.exact_group[rep]:
          drop[self.ids[i]] = "exact_duplicate"
        else:
          drop[self.ids[i]] = "near_duplicate"
      clusters.append([self.ids[rep]] + sorted(self.ids[i] for i in group if i != rep))
    clusters.sort(key=lambda c: (-len(c), c[0]))
    return DedupResult(drop=drop, clusters=clusters, bands=bands, rows=rows)


def deduplicate(docs: Sequence[tuple[str, str]], cfg: DedupConfig,
                validation_ids: frozenset[str] = frozenset()) -> DedupResult:
  """Convenience for in-memory lists of (id, text)."""
  d = Deduplicator(cfg)
  for doc_id, text in docs:
    d.add(doc_id, text, doc_id in validation_ids)
  return d.finalize()
