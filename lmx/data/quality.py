"""Model-based quality filter: score documents by perplexity under a reference model, drop the
worst fraction.

The stage only needs `score_fn(texts) -> scores` (higher = worse, e.g. bits per byte); two are
provided:
- `CharNgramScorer`: an interpolated (Witten-Bell) byte n-gram model fitted on reference text
  in numpy with hashed count tables. Cheap, no accelerator, good at flagging text unlike the
  reference (encoded blobs, tables of numbers, other languages).
- `lmx_model_scorer(model, tokenizer)`: bits per byte under a small trained lmx Transformer
  (the CCNet/Wenzek et al. recipe with lmx's own model instead of KenLM).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

ScoreFn = Callable[[list[str]], list[float]]
_U64 = np.uint64


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  enabled: bool = False
  drop_fraction: float = 0.05  # share of documents with the worst score that is dropped.
  scorer: str = "char_ngram"  # char_ngram | lmx_model
  order: int = 5  # byte n-gram order of the char_ngram scorer.
  reference_docs: int = 500  # documents (a hash-sample of the input) the scorer is fitted on.
  max_chars: int = 4000  # only the first characters of a document are scored.

  def validate(self) -> "QualityConfig":
    if not 0.0 <= self.drop_fraction < 1.0:
      raise ValueError(f"Invalid config: `prepare.quality.drop_fraction` is "
                       f"{self.drop_fraction!r}; it must be in [0, 1).")
    if self.scorer not in ("char_ngram", "lmx_model"):
      raise ValueError(f"Invalid config: `prepare.quality.scorer` is {self.scorer!r}; it must "
                       "be 'char_ngram' or 'lmx_model'.")
    if not 1 <= self.order <= 8:
      raise ValueError(f"Invalid config: `prepare.quality.order` is {self.order!r}; it must be "
                       "in [1, 8].")
    return self


class CharNgramScorer:
  """Byte n-gram LM with Witten-Bell interpolation down to a uniform 1/256.

  p_k(c | h) = (C(h c) + T(h) p_{k-1}(c | h')) / (C(h) + T(h)), T(h) = distinct bytes seen
  after h. Counts live in hashed tables of `table_size` entries (collisions only add a little
  probability mass, never crash).
  """

  def __init__(self, order: int = 5, table_size: int = 1 << 20):
    if table_size & (table_size - 1):
      raise ValueError(f"CharNgramScorer table_size is {table_size}; it must be a power of 2.")
    self.order, self.size = order, table_size
    self.c_hc = [np.zeros(table_size, np.float32) for _ in range(order)]  # C(h c) per order
    self.c_h = [np.zeros(table_size, np.float32) for _ in range(order)]  # C(h)
    self.t_h = [np.zeros(table_size, np.float32) for _ in range(order)]  # T(h)

  def _keys(self, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashed ids of (context of k-1 bytes) and (context + byte) at every position, (N,)."""
    n = len(b)
    padded = np.concatenate([np.zeros(k, np.uint64), b.astype(np.uint64) + _U64(1)])
    h = np.full(n, _U64(k))
    with np.errstate(over="ignore"):
      for j in range(k - 1, 0, -1):  # bytes i-j .. i-1
        h = (h * _U64(0x100000001B3)) ^ padded[k - j:k - j + n]
      hc = (h * _U64(0x100000001B3)) ^ padded[k:k + n]
      mix = lambda z: ((z ^ (z >> _U64(29))) * _U64(0xBF58476D1CE4E5B9)) >> _U64(20)
      mask = _U64(self.size - 1)  # table_size is a power of two
      return (mix(h) & mask).astype(np.int64), (mix(hc) & mask).astype(np.int64)

  def fit(self, texts: Sequence[str]) -> "CharNgramScorer":
    b = np.frombuffer("\n".join(texts).encode("utf-8", "replace"), np.uint8)
    for k in range(1, self.order + 1):
      h, hc = self._keys(b, k)
      np.add.at(self.c_hc[k - 1], hc, 1)
      np.add.at(self.c_h[k - 1], h, 1)
      pairs = np.unique(h * self.size + hc)  # distinct (context, next byte) ids
      np.add.at(self.t_h[k - 1], pairs // self.size, 1)
    return self

  def bits_per_byte(self, text: str) -> float:
    b = np.frombuffer(text.encode("utf-8", "replace"), np.uint8)
    if len(b) == 0:
      return 8.0
    p = np.full(len(b), 1.0 / 256, np.float64)
    for k in range(1, self.order + 1):
      h, hc = self._keys(b, k)
      ch, th = self.c_h[k - 1][h], self.t_h[k - 1][h]
      seen = ch > 0
      p = np.where(seen, (self.c_hc[k - 1][hc] + th * p) / np.maximum(ch + th, 1), p)
    return float(-np.log2(p).mean())

  def __call__(self, texts: list[str]) -> list[float]:
    return [self.bits_per_byte(t) for t in texts]


def quality_threshold(scores: Sequence[float], drop_fraction: float) -> float:
  """Largest score that is kept: documents scoring above it (the worst
  floor(drop_fraction * N)) are dropped. Ties at the threshold are kept."""
  n = len(scores)
  k = int(drop_fraction * n + 1e-9)  # documents to drop
  if n == 0 or k == 0:
    return math.inf
  return float(np.sort(np.asarray(scores, np.float64))[n - k - 1])


def lmx_model_scorer(model, tokenizer, seq_len: int = 256, batch: int = 8) -> ScoreFn:
  """Bits per UTF-8 byte of each text under an lmx Transformer (`model(tokens) -> logits`).

  NOTE: imports JAX lazily so the rest of `lmx data prepare` runs without it.
  """
  import jax
  import jax.numpy as jnp

  @jax.jit
  def nll(tokens, mask):  # (B, T) int32, (B, T) float32 -> (B,) summed nats
    logits = model(tokens[:, :-1])  # (B, T-1, V)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # (B, T-1)
    return -(tok * mask[:, 1:]).sum(axis=1)

  def score(texts: list[str]) -> list[float]:
    out = []
    for i in range(0, len(texts), batch):
      chunk = texts[i:i + batch]
      toks = np.full((batch, seq_len), tokenizer.pad_id, np.int32)
      mask = np.zeros((batch, seq_len), np.float32)
      nbytes = []
      for r, t in enumerate(chunk):
        ids = [tokenizer.bos_id] + tokenizer.encode(t)[:seq_len - 1]
        toks[r, :len(ids)] = ids
        mask[r, :len(ids)] = 1.0
        nbytes.append(max(1, len(tokenizer.decode(ids[1:]).encode())))
      nats = np.asarray(nll(jnp.asarray(toks), jnp.asarray(mask)))
      out += [float(nats[r]) / math.log(2) / nbytes[r] for r in range(len(chunk))]
    return out

  return score
