"""Model-based quality filter: score documents by perplexity under a reference model, drop the
worst fraction.

The stage only needs `score_fn(texts) -> scores` (higher = worse, e.g. bits per byte); two are
provided:
- `CharNgramScorer`: an interpolated (Witten-Bell) byte n-gram model fitted on reference text
  in numpy with hashed count tables. Cheap, no accelerator, good at flagging text unlike the
  reference (encoded blobs, tables of numbers, other languages).
- `lmx_model_scorer(model, tokenizer)`: bits per byte under a small lmx Transformer that
  `train_reference_model` trains on the reference text with the real trainer (the
  CCNet/Wenzek et al. recipe with lmx's own model instead of KenLM).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import pathlib
from typing import Callable, Iterable, Sequence

import numpy as np

ScoreFn = Callable[[list[str]], list[float]]
_U64 = np.uint64


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  enabled: bool = False
  drop_fraction: float = 0.05  # share of documents with the worst score that is dropped.
  scorer: str = "char_ngram"  # char_ngram | lmx_model
  order: int = 5  # byte n-gram order of the char_ngram scorer.
  reference: str = ""  # '' = a sample of the input itself; 'stdlib' or a corpus path.
  reference_docs: int = 500  # documents (evenly spaced / hash-sampled) the scorer is fitted on.
  max_chars: int = 4000  # only the first characters of a document are scored.
  # lmx_model only: the reference model, trained with lmx.train.loop on the reference docs.
  d_model: int = 64  # a multiple of 32 (heads of 32 dimensions).
  n_layers: int = 2
  vocab_size: int = 1024  # SentencePiece pieces; >= ~350 for the 256 byte pieces + merges.
  seq_len: int = 128  # training rows and scoring windows, in tokens.
  batch_size: int = 16  # training batch in sequences (and scoring batch in windows).
  steps: int = 300  # optimizer steps.
  learning_rate: float = 3e-3

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
    if not isinstance(self.reference, str):
      raise ValueError(f"Invalid config: `prepare.quality.reference` is {self.reference!r}; it "
                       "must be '', 'stdlib' or a corpus path.")
    for f in ("reference_docs", "max_chars", "n_layers", "seq_len", "batch_size", "steps"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"Invalid config: `prepare.quality.{f}` is {v!r}; it must be a "
                         "positive integer.")
    if not isinstance(self.d_model, int) or self.d_model < 32 or self.d_model % 32:
      raise ValueError(f"Invalid config: `prepare.quality.d_model` is {self.d_model!r}; it "
                       "must be a positive multiple of 32.")
    if not isinstance(self.vocab_size, int) or self.vocab_size < 300:
      raise ValueError(f"Invalid config: `prepare.quality.vocab_size` is {self.vocab_size!r}; "
                       "it must be an integer >= 300 (256 byte pieces + specials + merges).")
    if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
      raise ValueError(f"Invalid config: `prepare.quality.learning_rate` is "
                       f"{self.learning_rate!r}; it must be > 0.")
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


def reference_sample(texts: Iterable[tuple[str, str]], k: int) -> list[str]:
  """The `k` (id, text) pairs with the smallest id hash, in hash order: a deterministic sample
  spread over the whole stream, holding at most `k` texts in memory."""
  heap: list[tuple[int, str]] = []  # (-hash, text): the largest kept hash sits on top
  for doc_id, text in texts:
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()[:8],
                       "big")
    if len(heap) < k:
      heapq.heappush(heap, (-h, text))
    elif h < -heap[0][0]:
      heapq.heapreplace(heap, (-h, text))
  return [t for _, t in sorted(heap, reverse=True)]


def reference_experiment(q: QualityConfig, corpus_dir: str, run_dir: str):
  """The lmx Experiment that trains the reference model on the JSONL folder `corpus_dir`."""
  from lmx.config import base_config, from_config_dict
  c = base_config()
  c.model.update(vocab_size=q.vocab_size, d_model=q.d_model, n_layers=q.n_layers,
                 n_heads=q.d_model // 32, max_seq_len=q.seq_len)
  c.data.update(corpus=corpus_dir, cache_dir=str(pathlib.Path(run_dir, "cache")),
                seq_len=q.seq_len, batch_size=q.batch_size, tokenizer_sample_mb=8,
                validation_fraction=0.01)  # no evaluation: the loop never reads validation
  c.train.update(steps=q.steps, learning_rate=float(q.learning_rate),
                 warmup_steps=min(q.steps, max(1, q.steps // 10)), eval_every=0,
                 eval_batches=0, log_every=max(1, q.steps // 10), progress_bar=False)
  c.checkpoint.update(every=0, keep=1, async_save=False)
  c.run_dir = run_dir
  c.name = "quality_reference"
  return from_config_dict(c)


def train_reference_model(texts: Sequence[str], q: QualityConfig, work_dir: str | pathlib.Path):
  """Train a small lmx model on `texts` with the real trainer (lmx.train.loop.train).

  Writes the texts to `work_dir/reference/ref.jsonl` and the run to `work_dir/run/`.
  Returns (model with the trained params, tokenizer, info dict for the report).
  """
  import jax
  from flax import nnx

  from lmx.data.tokenizer import load_or_train_tokenizer
  from lmx.model import Transformer
  from lmx.train.checkpoint import restore_params
  from lmx.train.loop import train

  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("the quality reference model needs reference text; every reference "
                     "document is empty (check `prepare.quality.reference`).")
  work = pathlib.Path(work_dir)
  ref_dir = work / "reference"
  ref_dir.mkdir(parents=True, exist_ok=True)
  with open(ref_dir / "ref.jsonl", "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
  exp = reference_experiment(q, str(ref_dir), str(work / "run"))
  result = train(exp)
  tok = load_or_train_tokenizer(exp)  # the one train() just cached
  model = Transformer(exp.model, rngs=nnx.Rngs(exp.seed))
  restored = restore_params(exp, model)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  info = {"d_model": q.d_model, "n_layers": q.n_layers, "params": n_params,
          "vocab_size": tok.vocab_size, "seq_len": q.seq_len, "steps": result["step"],
          "final_train_loss": result["train_loss"],
          "reference_docs": len(texts),
          "reference_tokens": sum(len(x) for x in tok.encode_batch(texts)),
          "trained_tokens": result["step"] * q.batch_size * q.seq_len,
          "checkpoint": restored["source"]}
  return model, tok, info


def lmx_model_scorer(model, tokenizer, seq_len: int = 256, batch: int = 16) -> ScoreFn:
  """Bits per UTF-8 byte of each text under an lmx Transformer (`model(tokens) -> logits`).

  A text becomes [bos] + ids; every id is predicted once: the tokens are cut into windows of
  at most seq_len + 1 tokens overlapping by one (the cut the training pipeline makes), and
  each window starts from position 0. bits/byte = sum of token cross entropies (nats) / ln 2
  / UTF-8 bytes of the text (the tokenizer is lossless, so the bytes are exactly the text's).
  Windows of many texts share one jitted (batch, seq_len) forward.

  NOTE: imports JAX lazily so the rest of `lmx data prepare` runs without it.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, state = nnx.split(model)

  @jax.jit
  def window_nats(state, inputs, targets, mask):  # (B, T) int32 x2, (B, T) f32 -> (B,) nats
    logits = nnx.merge(graphdef, state)(inputs)  # (B, T, V) float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return -(tok * mask).sum(axis=1)

  def windows(text: str) -> list[list[int]]:
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    return [ids[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]

  def score(texts: list[str]) -> list[float]:
    nats = np.zeros(len(texts), np.float64)
    pending: list[tuple[int, list[int]]] = []  # (text index, window)

    def flush():
      inputs = np.full((batch, seq_len), tokenizer.pad_id, np.int32)
      targets = np.full((batch, seq_len), tokenizer.pad_id, np.int32)
      mask = np.zeros((batch, seq_len), np.float32)
      for r, (_, w) in enumerate(pending):
        inputs[r, :len(w) - 1], targets[r, :len(w) - 1] = w[:-1], w[1:]
        mask[r, :len(w) - 1] = 1.0
      out = np.asarray(window_nats(state, inputs, targets, mask))
      for r, (i, _) in enumerate(pending):
        nats[i] += out[r]
      pending.clear()

    for i, t in enumerate(texts):
      for w in windows(t):
        pending.append((i, w))
        if len(pending) == batch:
          flush()
    if pending:
      flush()
    nbytes = [len(t.encode("utf-8", "surrogatepass")) for t in texts]
    return [float(n) / math.log(2) / b if b else 8.0 for n, b in zip(nats, nbytes)]

  return score
