"""The Grain input pipeline: pre-tokenized documents -> packed (B_local, T) numpy batches.

    shards (ArrayRecord, one record per document)
      -> MapDataset: train: global shuffle (data.shuffle_seed; a new order every epoch) and
         repeat forever; validation: one pass in corpus order
      -> ds[process_index::process_count]   host i reads documents i, i+n, ... of the global
         stream, so the hosts' streams are disjoint and their union is the 1-host stream
      -> [bos] + ids + [eos] -> PackRows (below) -> batch(B_local)

PackRows turns documents into rows of T (input, target) pairs. A document of L tokens gives
L-1 pairs (inputs = tokens[:-1], targets = tokens[1:]); it is cut into segments of at most T
pairs, i.e. chunks of at most T+1 tokens that overlap by one token, so every token but the
first of each document is a target exactly once and nothing is lost at a cut.
  packing=True:  segments fill each row completely (segment ids 1, 2, ...; positions restart
                 at 0 per segment); a document that does not fit continues in the next row.
                 Only the last validation row is padded.
  packing=False: one segment per row, the rest padded with pad_id, segment id 0, mask 0.

Checkpointing: `it.get_state()` is a JSON-able dict; `it.set_state(s)` on a fresh iterator
of the same dataset resumes at exactly the next batch. With Orbax:
    mngr.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(it)))
(the handler writes `process_{i}-of-{n}.json` per host, using jax.process_index()).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from lmx.data import shards

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class _PackRowsIterator(grain.DatasetIterator):
  """Rows of `seq_len` (input, target) pairs cut from a stream of token arrays."""

  def __init__(self, parent, seq_len: int, packing: bool, pad_id: int, min_rows: int):
    super().__init__(parent)
    self._t, self._packing, self._pad, self._min_rows = seq_len, packing, pad_id, min_rows
    self._reset()

  def _reset(self):
    self._doc: np.ndarray | None = None  # the document being cut, or None
    self._doc_state = None  # parent state just before self._doc
    self._off = 0  # pairs of self._doc already emitted
    self._rows = 0  # rows emitted so far (padding rows up to min_rows included)

  def _next_doc(self) -> bool:
    state = self._parent.get_state()
    try:
      doc = next(self._parent)
    except StopIteration:
      return False
    self._doc, self._doc_state, self._off = doc, state, 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    t = self._t
    inputs = np.full((t,), self._pad, np.int32)
    targets = np.full((t,), self._pad, np.int32)
    segment_ids = np.zeros((t,), np.int32)
    positions = np.zeros((t,), np.int32)
    filled, seg = 0, 0
    while filled < t:
      if self._doc is None and not self._next_doc():
        break
      doc, off = self._doc, self._off
      k = min(len(doc) - 1 - off, t - filled)  # pairs that go into this row
      inputs[filled:filled + k] = doc[off:off + k]
      targets[filled:filled + k] = doc[off + 1:off + k + 1]
      seg += 1
      segment_ids[filled:filled + k] = seg
      positions[filled:filled + k] = np.arange(k, dtype=np.int32)
      filled += k
      self._off += k
      if self._off >= len(doc) - 1:
        self._doc = None
      if not self._packing:
        break
    if filled == 0 and self._rows >= self._min_rows:
      raise StopIteration
    self._rows += 1
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "loss_mask": (segment_ids > 0).astype(np.float32)}

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "offset": 0, "rows": self._rows}
    return {"parent": self._doc_state, "offset": self._off, "rows": self._rows}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._reset()
    self._rows = state["rows"]
    if state["offset"]:
      self._next_doc()
      self._off = state["offset"]


class PackRowsIterDataset(grain.IterDataset):
  """Documents (int32 token arrays incl. bos/eos) -> dict rows of length `seq_len`.

  `min_rows`: after the input ends, emit all-padding rows until this many rows were emitted
  (keeps every host's finite validation stream the same length).
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int, packing: bool = True,
               pad_id: int = 0, min_rows: int = 0):
    super().__init__(parent)
    self._args = (seq_len, packing, pad_id, min_rows)

  def __iter__(self) -> _PackRowsIterator:
    return _PackRowsIterator(self._parent.__iter__(), *self._args)


def rows_needed(lengths: np.ndarray, seq_len: int, packing: bool) -> int:
  """Rows PackRows emits for documents with these token counts (bos/eos NOT included)."""
  pairs = lengths.astype(np.int64) + 1  # L+2 tokens with bos/eos -> L+1 pairs
  if packing:
    return int(-(-pairs.sum() // seq_len))
  return int((-(-pairs // seq_len)).sum())


def document_dataset(data_cfg, tokenizer, split: str, process_index: int = 0,
                     process_count: int = 1, seed_offset: int = 0) -> grain.MapDataset:
  """This host's documents of `split` as int32 `[bos] + ids + [eos]` arrays."""
  folder = shards.build_shards(data_cfg, tokenizer)
  n = shards.shard_index(folder)["splits"][split]["documents"]
  if n == 0:
    raise ValueError(f"the {split} split of data.corpus={data_cfg.corpus!r} has no documents; "
                     "raise data.max_docs or data.validation_fraction")
  ds = grain.MapDataset.source(
      grain.sources.ArrayRecordDataSource([str(shards.split_path(folder, split))]))
  if split == "train":
    ds = ds.shuffle(seed=(data_cfg.shuffle_seed + seed_offset) % 2**32).repeat(None)
  ds = ds[process_index::process_count]
  bos = np.array([tokenizer.bos_id], np.int32)
  eos = np.array([tokenizer.eos_id], np.int32)
  return ds.map(lambda rec: np.concatenate([bos, shards.decode_record(rec), eos]))


def _check_hosts(data_cfg, process_index: int, process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index is {process_index}; it must be in [0, {process_count})")
  if data_cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={data_cfg.batch_size} must be divisible by the "
                     f"process count {process_count}")
  return data_cfg.batch_size // process_count


def _stack(rows: Sequence[dict[str, np.ndarray]], batch: int, seq_len: int, pad_id: int):
  """Stack rows into a (batch, T) dict; a short final batch is filled with padding rows."""
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  missing = batch - len(rows)
  if missing:
    for k, v in out.items():
      fill = pad_id if k in ("inputs", "targets") else 0
      out[k] = np.concatenate([v, np.full((missing,) + v.shape[1:], fill, v.dtype)])
  return out


def packed_rows(data_cfg, tokenizer, split: str, process_index: int = 0,
                process_count: int = 1, seed_offset: int = 0) -> grain.IterDataset:
  """This host's stream of single rows (before batching)."""
  batch = _check_hosts(data_cfg, process_index, process_count)
  docs = document_dataset(data_cfg, tokenizer, split, process_index, process_count,
                          seed_offset)
  min_rows = 0
  if split == "validation":  # every host emits the same number of full batches
    lengths = shards.split_lengths(shards.shard_dir(data_cfg, tokenizer), split)
    per_host = [rows_needed(lengths[h::process_count], data_cfg.seq_len, data_cfg.packing)
                for h in range(process_count)]
    min_rows = -(-max(per_host) // batch) * batch
  return PackRowsIterDataset(docs.to_iter_dataset(), data_cfg.seq_len, data_cfg.packing,
                             tokenizer.pad_id, min_rows)


def batch_rows(rows: grain.IterDataset, batch: int, seq_len: int, pad_id: int,
               drop_remainder: bool) -> grain.IterDataset:
  return rows.batch(batch, drop_remainder=drop_remainder,
                    batch_fn=lambda rs: _stack(rs, batch, seq_len, pad_id))


def make_dataset(exp, tokenizer, split: str, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Batches `{'inputs','targets','segment_ids','positions': int32, 'loss_mask': float32}`,
  each (batch_size / process_count, seq_len). Train repeats forever (and mixes
  `data.mixture` if set); validation is one deterministic pass padded to whole batches.
  """
  d = exp.data
  if split not in shards.SPLITS:
    raise ValueError(f"split is {split!r}; it must be one of {', '.join(shards.SPLITS)}")
  batch = _check_hosts(d, process_index, process_count)
  if split == "train" and d.mixture:
    from lmx.data import mixing
    return mixing.make_mixed_dataset(exp, tokenizer, mixing.parse_mixture(d.mixture),
                                     process_index, process_count)
  rows = packed_rows(d, tokenizer, split, process_index, process_count)
  return batch_rows(rows, batch, d.seq_len, tokenizer.pad_id, drop_remainder=False)


def replace_corpus(data_cfg, corpus: str):
  return dataclasses.replace(data_cfg, corpus=corpus, mixture="")
