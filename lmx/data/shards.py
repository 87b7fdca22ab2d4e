"""Pre-tokenized shards: each split tokenized ONCE into an ArrayRecord file under the cache.

Layout, under `data.cache_dir/shards/<key>/` where key hashes (corpus identity, max_docs,
text_field, validation_fraction, tokenizer model bytes):
  train.array_record, validation.array_record   one record per document: its token ids as
                                                little-endian int32 bytes (no bos/eos)
  train.lengths.npy, validation.lengths.npy     int32 token count per record
  index.json                                    counts, content hashes, CorpusStats; written
                                                last, so its presence marks a complete build
The folder is built under a temporary name and renamed into place, so concurrent builders
(several hosts sharing a filesystem) never see a half-written shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import socket
from typing import Any

import numpy as np

from lmx.data import corpus

SPLITS = ("train", "validation")
TOKEN_DTYPE = np.dtype("<i4")
_VERSION = 1
_ENCODE_BATCH = 256  # documents per SentencePiece batch call


def shard_key(data_cfg, tokenizer) -> str:
  ident = {"corpus": corpus.corpus_identity(data_cfg.corpus), "max_docs": data_cfg.max_docs,
           "text_field": data_cfg.text_field, "val": data_cfg.validation_fraction,
           "tokenizer": tokenizer.sha256, "v": _VERSION}
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def shard_dir(data_cfg, tokenizer) -> pathlib.Path:
  return pathlib.Path(data_cfg.cache_dir, "shards", shard_key(data_cfg, tokenizer))


def _write_shards(data_cfg, tokenizer, out: pathlib.Path) -> dict[str, Any]:
  from array_record.python.array_record_module import ArrayRecordWriter
  # group_size:1 keeps every record separately addressable: the train split is read in a
  # globally shuffled order.
  writers = {s: ArrayRecordWriter(str(out / f"{s}.array_record"), "group_size:1")
             for s in SPLITS}
  lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
  hashes = {s: hashlib.sha256() for s in SPLITS}
  stats = corpus.CorpusStats()

  def flush(batch):
    ids = tokenizer.encode_batch([d.text for d in batch])
    for doc, x in zip(batch, ids):
      split = "validation" if corpus.is_validation(doc.id, data_cfg.validation_fraction) \
          else "train"
      data = np.asarray(x, TOKEN_DTYPE).tobytes()
      writers[split].write(data)
      hashes[split].update(data)
      lengths[split].append(len(x))

  batch = []
  for doc in corpus.iter_documents(data_cfg, stats):
    batch.append(doc)
    if len(batch) == _ENCODE_BATCH:
      flush(batch)
      batch = []
  flush(batch)
  for w in writers.values():
    w.close()
  index: dict[str, Any] = {"corpus": data_cfg.corpus, "tokenizer_sha256": tokenizer.sha256,
                           "corpus_stats": stats.as_dict(), "splits": {}}
  for s in SPLITS:
    arr = np.asarray(lengths[s], np.int32)
    np.save(out / f"{s}.lengths.npy", arr)
    index["splits"][s] = {"documents": int(arr.size), "tokens": int(arr.sum()),
                          "content_sha256": hashes[s].hexdigest()}
  return index


def build_shards(data_cfg, tokenizer) -> pathlib.Path:
  """The shard folder for this corpus + tokenizer, tokenizing the corpus if not cached."""
  final = shard_dir(data_cfg, tokenizer)
  if (final / "index.json").exists():
    return final
  tmp = final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    index = _write_shards(data_cfg, tokenizer, tmp)
    (tmp / "index.json").write_text(json.dumps(index, indent=2))
    try:
      os.replace(tmp, final)
    except OSError:  # another process finished first; its shards are identical.
      if not (final / "index.json").exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def shard_index(folder: pathlib.Path) -> dict[str, Any]:
  return json.loads((folder / "index.json").read_text())


def split_path(folder: pathlib.Path, split: str) -> pathlib.Path:
  if split not in SPLITS:
    raise ValueError(f"split is {split!r}; it must be one of {', '.join(SPLITS)}")
  return folder / f"{split}.array_record"


def split_lengths(folder: pathlib.Path, split: str) -> np.ndarray:
  """Token count of every document of `split`, in record order. int32 (N,)."""
  return np.load(folder / f"{split}.lengths.npy")


def decode_record(data: bytes) -> np.ndarray:
  return np.frombuffer(data, TOKEN_DTYPE).astype(np.int32)
