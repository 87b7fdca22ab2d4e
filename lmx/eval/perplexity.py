"""Validation loss, perplexity, and the unigram baseline they should beat.

Perplexity = exp(mean next-token cross entropy in nats) over the masked-in validation
targets; bits per byte = total nats / (UTF-8 bytes of those targets * ln 2), comparable
across tokenizers. The unigram baseline predicts every token with its add-one-smoothed
frequency in the training tokens, p(v) = (count(v) + 1) / (N + V), ignoring context; a
language model that does not beat it has learned nothing beyond token frequencies.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable

import numpy as np


def unigram_perplexity(train_token_counts: np.ndarray, valid_tokens: np.ndarray,
                       vocab_size: int) -> float:
  """exp(-mean log p(t)) over `valid_tokens` with p the add-one-smoothed train unigram.

  train_token_counts: (V,) counts of each id in the training tokens.
  valid_tokens: 1-D ids scored. Ids outside [0, vocab_size) are an error.
  """
  counts = np.asarray(train_token_counts, np.float64)
  if counts.shape != (vocab_size,):
    raise ValueError(f"train_token_counts has shape {counts.shape}; it must be ({vocab_size},)")
  valid = np.asarray(valid_tokens).reshape(-1)
  if valid.size == 0:
    raise ValueError("valid_tokens is empty; need at least one validation token")
  if valid.min() < 0 or valid.max() >= vocab_size:
    raise ValueError(f"valid_tokens has ids outside [0, {vocab_size})")
  logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
  return float(np.exp(-logp[valid].mean()))


def masked_targets(batch: dict[str, np.ndarray]) -> np.ndarray:
  """The target ids that count toward the loss (loss_mask > 0), flattened."""
  return np.asarray(batch["targets"])[np.asarray(batch["loss_mask"]) > 0]


def count_targets(batches: Iterable[dict[str, np.ndarray]], vocab_size: int,
                  max_batches: int | None = None) -> np.ndarray:
  """(V,) int64 counts of masked-in targets over (at most `max_batches` of) `batches`."""
  counts = np.zeros(vocab_size, np.int64)
  for b in itertools.islice(batches, max_batches):
    counts += np.bincount(masked_targets(b), minlength=vocab_size)[:vocab_size]
  return counts


def validation_loss(eval_fn: Callable, params: Any, batches: Iterable[dict],
                    max_batches: int | None = None) -> dict[str, float]:
  """Token-weighted mean loss over the batches, via eval_fn(params, batch) -> (sum, n)."""
  total, n = 0.0, 0.0
  for b in itertools.islice(batches, max_batches):
    s, c = eval_fn(params, b)
    total += float(s)
    n += float(c)
  loss = total / max(n, 1.0)
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": n}


def token_byte_lengths(tok, vocab_size: int) -> np.ndarray:
  """(vocab_size,) int64 UTF-8 bytes each id decodes to: 1 for a byte-fallback piece
  `<0xXX>`, 0 for pad/unk/bos/eos and ids past the tokenizer, else len(decode([id])).

  With lmx's lossless SentencePiece (no dummy prefix) the sum over `encode(text)` is
  exactly the bytes of `text`, so bits per byte needs no decoding of packed rows (which cut
  documents, and byte-fallback sequences, anywhere).
  """
  n = min(vocab_size, tok.vocab_size)
  out = np.zeros(vocab_size, np.int64)
  piece = getattr(tok, "id_to_piece", None)
  specials = {getattr(tok, k, None) for k in ("pad_id", "unk_id", "bos_id", "eos_id")}
  for i in range(n):
    if i in specials:
      continue
    p = piece(i) if piece is not None else ""
    out[i] = 1 if (len(p) == 6 and p.startswith("<0x") and p.endswith(">")) else \
        len(tok.decode([i]).encode("utf-8", "surrogatepass"))
  return out


def corpus_batches(exp, tok, path: str, max_batches: int | None = None) -> list[dict]:
  """EVERY document of the corpus at `path` (what `data.corpus` accepts: a folder, a
  .txt/.py/.md, .jsonl (field data.text_field) or .array_record file), tokenized with `tok`
  as `[bos] + ids + [eos]` and packed into validation-style batches (data.seq_len,
  data.packing, data.batch_size; the last batch padded): one pass, corpus order."""
  import dataclasses

  import grain

  from lmx.data import corpus
  from lmx.data.pipeline import PackRowsIterDataset, batch_rows

  d = dataclasses.replace(exp.data, corpus=path, max_docs=0)
  texts = [doc.text for doc in corpus.iter_documents(d)]
  if not texts:
    raise ValueError(f"--corpus {path!r} has no documents")
  docs = [np.asarray([tok.bos_id] + ids + [tok.eos_id], np.int32)
          for ids in tok.encode_batch(texts)]
  rows = PackRowsIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), d.seq_len,
                             d.packing, tok.pad_id)
  batches = batch_rows(rows, d.batch_size, d.seq_len, tok.pad_id, drop_remainder=False)
  return list(itertools.islice(iter(batches), max_batches))


def perplexity_results(exp, tok, model, mesh, max_batches: int | None = None,
                       corpus_path: str | None = None) -> dict[str, Any]:
  """Validation loss / perplexity / bits per byte of `model` on the experiment's validation
  split (all of it, or its first `max_batches` batches) -- or on every document of
  `corpus_path` -- plus the unigram baseline of the experiment's training data for text
  data. Call inside `use_mesh(mesh, ...)`, with `model` built there."""
  import jax
  from flax import nnx

  from lmx.data.pipeline import make_dataset
  from lmx.eval.metrics import bits_per_byte
  from lmx.parallel.mesh import state_shardings
  from lmx.train.step import jit_eval_step, make_eval_step, put_batch

  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  # The model was built on one device; lay the params out on the mesh.
  leaves, treedef = jax.tree.flatten(params)
  params = treedef.unflatten([jax.device_put(x, s) for x, s in
                              zip(leaves, jax.tree.leaves(state_shardings(params, mesh)))])
  eval_fn = jit_eval_step(make_eval_step(graphdef, other, exp.train.loss_chunk_tokens), params,
                          mesh)
  if corpus_path:
    val = corpus_batches(exp, tok, corpus_path, max_batches)
  elif exp.data.format == "sft":  # the held-out conversations, as the train loop splits them
    from lmx.train.sources import make_sources
    val = make_sources(exp, tok, 0, 1, max_batches).validation
  else:
    val = list(itertools.islice(iter(make_dataset(exp, tok, "validation")), max_batches))
  out = validation_loss(lambda p, b: eval_fn(p, put_batch(b, mesh)), params, val)
  # Bits per byte: total nats over the bytes the scored targets decode to.
  table = token_byte_lengths(tok, exp.model.vocab_size)
  n_bytes = int(sum(table[masked_targets(b)].sum() for b in val if "targets" in b))
  out["val_bytes"] = n_bytes
  if n_bytes:
    out["val_bpb"] = bits_per_byte(out["val_loss"] * out["val_tokens"], n_bytes)
  if exp.data.format != "sft":
    train_counts = count_targets(iter(make_dataset(exp, tok, "train")), exp.model.vocab_size,
                                 max_batches=UNIGRAM_TRAIN_BATCHES)
    valid = np.concatenate([masked_targets(b) for b in val])
    out["unigram_ppl"] = unigram_perplexity(train_counts, valid, exp.model.vocab_size)
  return out


def cli_main(argv: list[str]) -> int:
  """`lmx evaluate --config=...` with only the `ppl` task: validation loss, perplexity, bits
  per byte and the unigram baseline as one JSON line (lmx.eval.harness does the rest)."""
  from lmx.eval.harness import cli_main as harness_main
  return harness_main(list(argv))


# Train batches whose targets give the unigram counts (the first ones of the train stream).
UNIGRAM_TRAIN_BATCHES = 500
