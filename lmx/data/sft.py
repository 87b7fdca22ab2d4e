"""Supervised fine-tuning data: JSONL conversations -> masked, packed (B, T) batches.

Records (one JSON object a line; both kinds may be mixed in one file):
    {"instruction": str, "input": str (optional), "output": str}
        -> user = instruction + ("\\n\\n" + input if input), assistant = output
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
Malformed records never raise: each is skipped and counted under one reason in `SkipReport`.

Chat template. `add_chat_tokens(tok)` appends `ROLE_TOKENS` to the SentencePiece model as
USER_DEFINED pieces (one id each; every old id keeps its meaning). A conversation becomes

    <s> <|user|> How do I ...? <|end|> <|assistant|> Use ... <|end|> </s>
    0   0        0  0  0 0 0   0       0             1   1   1       0      loss_weight

Loss weight 1 sits exactly on the tokens the model must PRODUCE in a trained turn
(`train_on`, default assistant only): its content and its closing `<|end|>`, so it learns to
stop. bos, role tokens, the final eos and system/user/tool content weigh 0: the role token is
the prompt a caller writes before sampling, never something the model chooses. Each piece
(role token, content, `<|end|>`) is tokenized on its own, so weights align with ids exactly
(tokenizing the whole rendered string could merge text across a boundary).
NOTE: content that spells a role token literally (e.g. '<|end|>' in a code snippet) is
encoded as ordinary text, never as the special id, so data cannot forge turn boundaries.

Batches follow the lmx LM convention (lmx/data/pipeline.py): a conversation of n ids is one
segment of n-1 (input, target) pairs, `inputs = ids[:-1]`, `targets = ids[1:]`, and
`loss_mask[t] = weight(ids[t+1])`, i.e. the mask is aligned with the targets. Segment ids
are 1..k per row (0 = padding), positions restart at 0 per segment, and no target crosses a
segment boundary. A conversation longer than T+1 ids keeps its first T+1 (counted).
Packing modes: 'best_fit' (best-fit decreasing bin packing), 'first_fit' (arrival order,
first row with room; the baseline) and 'pad' (one conversation per row).

    convs, report = read_conversations("chat.jsonl"); print(report.summary())
    tok = add_chat_tokens(tok)  # model.vocab_size must cover tok.vocab_size (+5)
    examples = [encode_conversation(tok, c) for c in convs]
    it = iter(make_sft_dataset(examples, batch_size=8, seq_len=1024, mode="best_fit",
                               epochs=3, shuffle_seed=0, split="train"))
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Any, Iterable, Sequence

import grain
import numpy as np
from sentencepiece import sentencepiece_model_pb2

from lmx.data import pipeline
from lmx.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
END_TOKEN = "<|end|>"
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES) + (END_TOKEN,)
PACK_MODES = ("best_fit", "first_fit", "pad")
_ROLE_TOKEN_RE = re.compile("|".join(re.escape(t) for t in ROLE_TOKENS))

Example = tuple[np.ndarray, np.ndarray]  # (ids int32[n], loss_weight float32[n])

# ------------------------------------------------------------------------------- records


@dataclasses.dataclass
class SkipReport:
  """What `read_conversations` read, kept, and skipped (one reason per skipped record)."""

  read: int = 0  # non-blank records seen
  kept: int = 0  # conversations returned
  invalid_json: int = 0  # not JSON, or JSON that is not an object
  unknown_format: int = 0  # neither `messages` (a list) nor `instruction`/`output`
  missing_role: int = 0  # a message that is not an object or has no string `role`
  unknown_role: int = 0  # a role outside ROLES
  bad_content: int = 0  # empty, missing or non-string content / instruction / input
  missing_output: int = 0  # instruction record without a non-empty string `output`
  no_assistant_turn: int = 0  # chat record without any assistant message

  @property
  def skipped(self) -> int:
    return self.read - self.kept

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    reasons = {k: v for k, v in self.as_dict().items() if k not in ("read", "kept") and v}
    why = ", ".join(f"{k}={v}" for k, v in reasons.items())
    return f"sft records: read {self.read}, kept {self.kept}, skipped {self.skipped}" + (
        f" ({why})" if why else "")


def _nonempty_str(x: Any) -> bool:
  return isinstance(x, str) and bool(x.strip())


def _parse_record(obj: Any) -> tuple[list[dict[str, str]] | None, str]:
  """(messages, '') for a good record, else (None, the SkipReport field to count)."""
  if not isinstance(obj, dict):
    return None, "invalid_json"
  if "messages" in obj:
    if not isinstance(obj["messages"], list):
      return None, "unknown_format"
    messages = []
    for m in obj["messages"]:
      if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        return None, "missing_role"
      if m["role"] not in ROLES:
        return None, "unknown_role"
      if not _nonempty_str(m.get("content")):
        return None, "bad_content"
      messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
      return None, "no_assistant_turn"
    return messages, ""
  if "instruction" in obj or "output" in obj:
    extra = obj.get("input", "")
    if not _nonempty_str(obj.get("instruction")) or not isinstance(extra, str):
      return None, "bad_content"
    if not _nonempty_str(obj.get("output")):
      return None, "missing_output"
    user = obj["instruction"] + ("\n\n" + extra if extra else "")
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": obj["output"]}], ""
  return None, "unknown_format"


def read_conversations(path_or_lines: str | os.PathLike | Iterable[str | bytes | dict]
                       ) -> tuple[list[list[dict[str, str]]], SkipReport]:
  """Conversations (lists of `{'role', 'content'}`) from a JSONL file or its lines.

  `path_or_lines`: a path, or an iterable of JSON lines (str/bytes) or already-parsed
  records (dicts). Blank lines are ignored; bad records are counted, never raised.
  """
  if isinstance(path_or_lines, (str, os.PathLike)):
    lines: Iterable = pathlib.Path(path_or_lines).read_bytes().splitlines()
  else:
    lines = path_or_lines
  report, out = SkipReport(), []
  for line in lines:
    if isinstance(line, (str, bytes)):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except (ValueError, UnicodeDecodeError):
        obj = None  # counted as invalid_json below
    else:
      obj = line
    report.read += 1
    messages, reason = _parse_record(obj)
    if messages is None:
      setattr(report, reason, getattr(report, reason) + 1)
    else:
      out.append(messages)
      report.kept += 1
  return out, report


def split_conversations(convs: Sequence[list[dict[str, str]]], fraction: float,
                        seed: int = 0) -> tuple[list, list]:
  """(train, held_out): a conversation is held out when a hash of its content and `seed`
  falls in the bottom `fraction` -- stable across runs and file orders, and exact
  duplicates always land on the same side (no train/validation leak through copies).
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction is {fraction!r}; it must be in [0, 1]")
  train, held = [], []
  for c in convs:
    key = f"{seed}\n" + json.dumps(c, sort_keys=True, ensure_ascii=False)
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    (held if h < fraction * 2.0**64 else train).append(c)
  return train, held


# ------------------------------------------------------------------------- chat template


def add_chat_tokens(tok: Tokenizer) -> Tokenizer:
  """A new Tokenizer with ROLE_TOKENS appended as USER_DEFINED pieces (idempotent).

  Old ids keep their pieces, so a model trained with `tok` keeps its embeddings; the new
  ids are `tok.vocab_size ...`. The result has no `path`: `save()` it next to checkpoints.
  """
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tok.model_proto)
  user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  have = {p.piece: p for p in proto.pieces}
  for t in ROLE_TOKENS:
    if t in have:
      have[t].type = user_defined  # same id; make sure it matches as one piece
    else:
      p = proto.pieces.add()
      p.piece, p.type, p.score = t, user_defined, 0.0
  return Tokenizer(proto.SerializeToString())


def chat_token_ids(tok: Tokenizer) -> dict[str, int]:
  """`{'<|system|>': id, ..., '<|end|>': id}`; raises if `tok` lacks them."""
  out = {}
  for t in ROLE_TOKENS:
    ids = tok.encode(t)
    if len(ids) != 1 or tok.id_to_piece(ids[0]) != t:
      raise ValueError(f"tokenizer has no single piece for {t!r}; call add_chat_tokens(tok)")
    out[t] = ids[0]
  return out


def _encode_content(tok: Tokenizer, text: str) -> list[int]:
  """tok.encode(text), except literal role-token strings become ordinary text ids."""
  out, last = [], 0
  for m in _ROLE_TOKEN_RE.finditer(text):
    # '<' and '|end|>' encoded apart cannot match the whole user-defined piece.
    out += tok.encode(text[last:m.start()]) + tok.encode("<") + tok.encode(m.group()[1:])
    last = m.end()
  return out + tok.encode(text[last:])


def render_conversation(messages: Sequence[dict[str, str]]) -> str:
  """The text of a conversation in the chat template (what `decode` of its ids gives)."""
  return "".join(f"<|{m['role']}|>{m['content']}{END_TOKEN}" for m in messages)


def encode_conversation(tok: Tokenizer, messages: Sequence[dict[str, str]], *,
                        train_on: Sequence[str] = ("assistant",)) -> Example:
  """(ids int32[n], loss_weight float32[n]) of `[bos] + turns + [eos]` (see module doc).

  Weight 1 on the content and closing `<|end|>` of every turn whose role is in `train_on`.
  """
  bad = set(train_on) - set(ROLES)
  if bad:
    raise ValueError(f"train_on has unknown roles {sorted(bad)}; roles are {ROLES}")
  special = chat_token_ids(tok)
  ids, weights = [tok.bos_id], [0.0]
  for m in messages:
    body = _encode_content(tok, m["content"]) + [special[END_TOKEN]]
    ids.append(special[f"<|{m['role']}|>"])
    weights.append(0.0)
    ids += body
    weights += [1.0 if m["role"] in train_on else 0.0] * len(body)
  ids.append(tok.eos_id)
  weights.append(0.0)
  return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


# ------------------------------------------------------------------------------- packing


@dataclasses.dataclass
class PackStats:
  conversations: int
  rows: int
  truncated: int  # conversations cut to their first seq_len + 1 ids
  no_loss: int  # conversations with no weighted target left (after truncation)
  target_tokens: int  # (input, target) pairs placed
  loss_tokens: float  # sum of loss_mask
  padding_fraction: float  # padding slots / (rows * seq_len)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _best_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable on ties
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (room left, row) of open rows, sorted
  for i in order:
    j = bisect.bisect_left(free, (lengths[i], -1))  # the tightest row that still fits
    if j < len(free):
      room, r = free.pop(j)
    else:
      room, r = seq_len, len(rows)
      rows.append([])
    rows[r].append(i)
    if room - lengths[i] > 0:
      bisect.insort(free, (room - lengths[i], r))
  return rows


def _first_fit(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
  """First fit in O(n log n): a max-tree over the room left in rows 0..n-1, where unused
  rows have full room, so the leftmost row that fits is either open or the next new one."""
  size = 1
  while size < max(len(lengths), 1):
    size *= 2
  room = [seq_len] * (2 * size)  # room[1] is the root, leaves at size..2*size-1
  rows: list[list[int]] = []
  for i, n in enumerate(lengths):
    node = 1
    while node < size:
      node = 2 * node if room[2 * node] >= n else 2 * node + 1
    r = node - size
    if r == len(rows):
      rows.append([])
    rows[r].append(i)
    room[node] -= n
    node //= 2
    while node:
      room[node] = max(room[2 * node], room[2 * node + 1])
      node //= 2
  return rows


def pack(examples: Sequence[Example], seq_len: int, mode: str = "best_fit", *,
         pad_id: int = 0) -> tuple[dict[str, np.ndarray], PackStats]:
  """Pack (ids, weights) examples into rows: `{key: (R, seq_len)}` with pipeline.BATCH_KEYS."""
  if mode not in PACK_MODES:
    raise ValueError(f"mode is {mode!r}; it must be one of {', '.join(PACK_MODES)}")
  if seq_len < 1:
    raise ValueError(f"seq_len is {seq_len}; it must be positive")
  clipped, truncated = [], 0
  for k, (ids, w) in enumerate(examples):
    if len(ids) != len(w) or len(ids) < 2:
      raise ValueError(f"example {k} has {len(ids)} ids and {len(w)} weights; it needs "
                       "equal counts and at least 2 ids")
    truncated += len(ids) > seq_len + 1
    clipped.append((np.asarray(ids[:seq_len + 1], np.int32),
                    np.asarray(w[:seq_len + 1], np.float32)))
  pairs = [len(ids) - 1 for ids, _ in clipped]
  if mode == "best_fit":
    layout = _best_fit_decreasing(pairs, seq_len)
  elif mode == "first_fit":
    layout = _first_fit(pairs, seq_len)
  else:
    layout = [[i] for i in range(len(clipped))]
  shape = (len(layout), seq_len)
  rows = {"inputs": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
          "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32),
          "loss_mask": np.zeros(shape, np.float32)}
  for r, members in enumerate(layout):
    filled = 0
    for seg, i in enumerate(members, start=1):
      ids, w = clipped[i]
      k = pairs[i]
      span = slice(filled, filled + k)
      rows["inputs"][r, span] = ids[:-1]
      rows["targets"][r, span] = ids[1:]
      rows["loss_mask"][r, span] = w[1:]  # weight of the target token
      rows["segment_ids"][r, span] = seg
      rows["positions"][r, span] = np.arange(k, dtype=np.int32)
      filled += k
  n_pairs, slots = sum(pairs), len(layout) * seq_len
  stats = PackStats(
      conversations=len(clipped), rows=len(layout), truncated=truncated,
      no_loss=sum(not w[1:].any() for _, w in clipped), target_tokens=n_pairs,
      loss_tokens=float(rows["loss_mask"].sum()),
      padding_fraction=(slots - n_pairs) / slots if slots else 0.0)
  return rows, stats


# ------------------------------------------------------------------------------- dataset


class _Rows:
  """The packed rows as a random-access source of `{key: (seq_len,)}` dicts for Grain."""

  def __init__(self, rows: dict[str, np.ndarray]):
    self._rows = rows

  def __len__(self) -> int:
    return len(self._rows["inputs"])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in self._rows.items()}


def _pad_rows(rows: dict[str, np.ndarray], multiple: int, pad_id: int) -> dict[str, np.ndarray]:
  """Append all-padding rows (mask 0) until the row count is a multiple of `multiple`."""
  missing = -len(rows["inputs"]) % multiple
  if not missing:
    return rows
  out = {}
  for k, v in rows.items():
    fill = pad_id if k in ("inputs", "targets") else 0
    out[k] = np.concatenate([v, np.full((missing,) + v.shape[1:], fill, v.dtype)])
  return out


def make_sft_dataset(examples_or_rows: Sequence[Example] | dict[str, np.ndarray],
                     batch_size: int, seq_len: int, mode: str = "best_fit", *,
                     epochs: int = 1, shuffle_seed: int = 0, split: str = "train",
                     pad_id: int = 0, process_index: int = 0,
                     process_count: int = 1) -> grain.IterDataset:
  """Batches like `pipeline.make_dataset`: BATCH_KEYS, int32 / float32 loss_mask, each
  (batch_size / process_count, seq_len). `examples_or_rows`: (ids, weights) examples, packed
  here with `mode`, or the rows `pack` returned.

  train: rows shuffled by `shuffle_seed` (a new order every epoch), `epochs` passes (0 =
  forever); `iter(ds)` has the checkpointable `get_state()/set_state()` of the LM path.
  validation: one pass in row order; the last batch is filled with all-zero-mask rows.
  Host i reads rows i, i+n, ...; rows are padded so every host sees the same batch count.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"split is {split!r}; it must be 'train' or 'validation'")
  if epochs < 0:
    raise ValueError(f"epochs is {epochs}; it must be >= 0 (0 = forever)")
  if not 0 <= process_index < process_count or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must divide over {process_count} processes "
                     f"and process_index={process_index} lie in [0, {process_count})")
  if isinstance(examples_or_rows, dict):
    rows = examples_or_rows
    if rows["inputs"].shape[1:] != (seq_len,):
      raise ValueError(f"rows have shape {rows['inputs'].shape}; seq_len is {seq_len}")
  else:
    rows, _ = pack(examples_or_rows, seq_len, mode, pad_id=pad_id)
  if not len(rows["inputs"]):
    raise ValueError("no SFT rows: the example list is empty")
  local = batch_size // process_count
  rows = _pad_rows(rows, batch_size if split == "validation" else process_count, pad_id)
  ds = grain.MapDataset.source(_Rows(rows))
  if split == "train":
    ds = ds.shuffle(seed=shuffle_seed % 2**32).repeat(epochs or None)
  ds = ds[process_index::process_count]
  # The rows are in memory: prefetch threads would only contend for the GIL.
  rows_it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return pipeline.batch_rows(rows_it, local, seq_len, pad_id, drop_remainder=False)
