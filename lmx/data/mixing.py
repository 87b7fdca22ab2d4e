"""Weighted mixtures of several corpora for training.

Each corpus is tokenized (with the one shared tokenizer), shuffled and packed into rows on
its own; the row streams are then interleaved by `grain.IterDataset.mix`, which picks
sources in a fixed deterministic pattern matching the weights. Mixing packed rows (rather
than documents) makes the weights TOKEN proportions: every packed train row holds exactly
seq_len tokens, whatever the corpora's document lengths.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grain
import numpy as np

from lmx.data import pipeline


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """'stdlib=0.7,/data/web=0.3' -> [('stdlib', 0.7), ('/data/web', 0.3)]."""
  out = []
  for part in filter(None, spec.split(",")):
    name, _, w = part.rpartition("=")
    out.append((name, float(w)))
  return out


def make_mixed_dataset(exp, tokenizer, sources: Sequence[tuple[str, float]],
                       process_index: int = 0, process_count: int = 1,
                       with_source: bool = False) -> grain.IterDataset:
  """Infinite train batches drawn from `sources` [(corpus, weight), ...] by token share.

  `with_source=True` adds an int32 (B_local,) key 'source' (index into `sources`) per row,
  for `measure_mixture`; leave it off for training (the batch contract has five keys).
  """
  if not sources:
    raise ValueError("sources is empty; give at least one (corpus, weight) pair")
  for name, w in sources:
    if not w > 0:
      raise ValueError(f"mixture weight of {name!r} is {w!r}; it must be > 0")
  d = exp.data
  streams = []
  for k, (name, _) in enumerate(sources):
    rows = pipeline.packed_rows(pipeline.replace_corpus(d, name), tokenizer, "train",
                                process_index, process_count, seed_offset=k)
    if with_source:
      rows = rows.map(lambda r, k=k: {**r, "source": np.int32(k)})
    streams.append(rows)
  mixed = grain.IterDataset.mix(streams, [w for _, w in sources])
  batch = d.batch_size // process_count
  return pipeline.batch_rows(mixed, batch, d.seq_len, tokenizer.pad_id, drop_remainder=True)


def measure_mixture(batches: Iterator[dict[str, np.ndarray]], num_batches: int,
                    num_sources: int) -> np.ndarray:
  """Share of non-padding target tokens from each source over `num_batches` batches.

  `batches` must come from `make_mixed_dataset(..., with_source=True)`. float64 (S,).
  """
  counts = np.zeros((num_sources,), np.float64)
  for _ in range(num_batches):
    b = next(batches)
    per_row = b["loss_mask"].sum(axis=1)  # (B,)
    np.add.at(counts, b["source"], per_row)
  return counts / max(counts.sum(), 1.0)
