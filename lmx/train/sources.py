"""What the train loop reads: text documents (pretraining) or conversations (SFT).

    data.format='text'  lmx.data.pipeline.make_dataset over `data.corpus`
    data.format='sft'   `data.sft_path` JSONL -> chat template -> packed, masked rows
                        (lmx.data.sft); the corpus's tokenizer plus the chat role tokens

Both yield the same batch keys (inputs, targets, positions, segment_ids, loss_mask), so the
objective and the step do not know which one they train on.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Any

import numpy as np

from lmx.data.pipeline import make_dataset


@dataclasses.dataclass
class Sources:
  """The tokenizer, a resumable train iterator, validation batches and a report."""
  tokenizer: Any
  train: Any  # iterator with get_state / set_state
  validation: list[dict[str, np.ndarray]]
  report: dict[str, Any]


def sft_conversations(exp):
  """(conversations, SkipReport) of `data.sft_path` (or the derived stdlib tasks)."""
  from lmx.data import sft, sft_tasks
  d = exp.data
  if d.sft_path == "stdlib_tasks":
    records = sft_tasks.derived_task_records(d.sft_records, seed=d.shuffle_seed)
    return sft.read_conversations(records)
  return sft.read_conversations(d.sft_path)


def sft_sources(exp, tok, process_index: int, process_count: int, eval_limit) -> Sources:
  from lmx.data import sft
  d = exp.data
  tok = sft.add_chat_tokens(tok)
  if tok.vocab_size > exp.model.vocab_size:
    raise ValueError(f"data.format='sft' adds the chat role tokens: the tokenizer has "
                     f"{tok.vocab_size} ids but model.vocab_size={exp.model.vocab_size}; set "
                     f"model.vocab_size >= {tok.vocab_size}")
  convs, skipped = sft_conversations(exp)
  train_c, held_c = sft.split_conversations(convs, d.sft_heldout, d.shuffle_seed)
  enc = lambda cs: [sft.encode_conversation(tok, c) for c in cs]
  train_x, held_x = enc(train_c), enc(held_c)
  train_rows, stats = sft.pack(train_x, d.seq_len, d.sft_packing, pad_id=tok.pad_id)
  held_rows, _ = sft.pack(held_x, d.seq_len, d.sft_packing, pad_id=tok.pad_id)
  common = dict(pad_id=tok.pad_id, process_index=process_index, process_count=process_count)
  train = iter(sft.make_sft_dataset(train_rows, d.batch_size, d.seq_len, d.sft_packing,
                                    epochs=d.epochs, shuffle_seed=d.shuffle_seed, split="train",
                                    **common))
  val = list(itertools.islice(iter(sft.make_sft_dataset(
      held_rows, d.batch_size, d.seq_len, d.sft_packing, split="validation", **common)),
      eval_limit))
  report = {"sft_skipped": skipped.as_dict(), "sft_train_conversations": len(train_c),
            "sft_heldout_conversations": len(held_c),
            "sft_padding_fraction": stats.padding_fraction, "sft_truncated": stats.truncated}
  print(f"lmx train: sft data: {skipped.summary()}; {len(train_c)} train / {len(held_c)} "
        f"held-out conversations, {d.sft_packing} packing, padding "
        f"{stats.padding_fraction:.1%}, {stats.truncated} truncated", file=sys.stderr)
  return Sources(tok, train, val, report)


def make_sources(exp, tok, process_index: int, process_count: int,
                 eval_limit: int | None) -> Sources:
  """The run's data; `eval_limit` validation batches (None: the whole split)."""
  if exp.data.format == "sft":
    return sft_sources(exp, tok, process_index, process_count, eval_limit)
  train = iter(make_dataset(exp, tok, "train", process_index, process_count))
  val = []
  if eval_limit != 0:
    ds = make_dataset(exp, tok, "validation", process_index, process_count)
    val = list(itertools.islice(iter(ds), eval_limit))
  return Sources(tok, train, val, {})
