"""Tokenizers of Hugging Face model directories, behind lmx's Tokenizer interface.

`load_tokenizer(dir)` returns an object with what lmx's commands use -- `encode(text)`
(ids without special tokens), `encode_batch`, `decode(ids)`, `vocab_size`, `bos_id`,
`eos_id`, `pad_id`, `unk_id`, `id_to_piece`, `path`, `sha256`:

* `tokenizer.model` (SentencePiece; LLaMA 1/2, Mistral): `SentencePieceTokenizer`, lmx's
  own Tokenizer (lossless when the model has byte-fallback pieces, as LLaMA's has).
* otherwise `tokenizer.json` (the `tokenizers` library; GPT-2, Llama 3): `JsonTokenizer`.
  Special ids come from tokenizer_config.json's bos/eos/pad/unk tokens, else config.json's
  *_token_id (when inside the vocabulary); a missing bos or pad is the eos id (GPT-2's one <|endoftext|>). Encoding adds
  no special tokens (lmx's generate prepends `bos_id` itself);
  decoding skips them. Byte-level BPE (GPT-2, Llama 3) round-trips any string.

Chat templates (tokenizer_config.json `chat_template`) are not read.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Iterable, Sequence

import sentencepiece as spm

from lmx.data.tokenizer import Tokenizer


class SentencePieceTokenizer(Tokenizer):
  """An HF directory's tokenizer.model: lmx's Tokenizer, also when the model has no
  byte-fallback pieces (then characters outside the vocabulary decode as unk, and
  `byte_fallback` is False), with pad falling back to eos where the model has none
  (LLaMA's pad id is -1, which the batcher cannot write)."""

  def __init__(self, model_proto: bytes, path: str | None = None):
    try:
      super().__init__(model_proto, path)
      self.byte_fallback = True
    except ValueError:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
      self.model_proto, self.path, self.byte_fallback = model_proto, path, False

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  def encode(self, text: str) -> list[int]:
    return super().encode(text) if self.byte_fallback else self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    if self.byte_fallback:
      return super().encode_batch(texts, num_threads)
    return self._sp.encode(list(texts), num_threads=num_threads or os.cpu_count())


def _token_content(value) -> str | None:
  """tokenizer_config.json spells a special token as a string or {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


class JsonTokenizer:
  """A `tokenizers` tokenizer.json with lmx's Tokenizer interface (see the module doc)."""

  def __init__(self, path: str | os.PathLike):
    from tokenizers import Tokenizer as HFTokenizer
    path = pathlib.Path(path)
    self.path = str(path)
    self._raw = path.read_bytes()
    self._tok = HFTokenizer.from_str(self._raw.decode("utf-8"))
    directory = path.parent
    tok_cfg = _read_json(directory / "tokenizer_config.json")
    model_cfg = _read_json(directory / "config.json")
    ids = {}
    for name in ("bos", "eos", "pad", "unk"):
      content = _token_content(tok_cfg.get(f"{name}_token"))
      i = self._tok.token_to_id(content) if content else None
      if i is None:
        i = model_cfg.get(f"{name}_token_id")
        i = i[0] if isinstance(i, list) and i else i
        # GPT2Config's defaults (50256) survive in configs of smaller vocabularies.
        i = i if isinstance(i, int) and 0 <= i < self.vocab_size else None
      ids[name] = i
    if ids["eos"] is None:
      raise ValueError(f"{directory} names no eos token (tokenizer_config.json eos_token or "
                       "config.json eos_token_id); lmx needs one to stop generation.")
    # GPT-2 style: one <|endoftext|> serves as bos and eos.
    self._ids = {"bos": ids["bos"] if ids["bos"] is not None else ids["eos"],
                 "eos": ids["eos"],
                 "pad": ids["pad"] if ids["pad"] is not None else ids["eos"],
                 "unk": ids["unk"] if ids["unk"] is not None else -1}

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    return self._ids["bos"]

  @property
  def eos_id(self) -> int:
    return self._ids["eos"]

  @property
  def pad_id(self) -> int:
    return self._ids["pad"]

  @property
  def unk_id(self) -> int:
    return self._ids["unk"]

  @property
  def sha256(self) -> str:
    return hashlib.sha256(self._raw).hexdigest()

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def bytes_per_token(self, texts: Iterable[str]) -> float:
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return n_bytes / max(sum(len(x) for x in self.encode_batch(texts)), 1)


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer of a Hugging Face model directory (or a tokenizer.model / tokenizer.json
  file): SentencePiece when tokenizer.model is present, else tokenizer.json."""
  path = pathlib.Path(path)
  if path.is_dir():
    sp, js = path / "tokenizer.model", path / "tokenizer.json"
    path = sp if sp.exists() else js
    if not path.exists():
      raise FileNotFoundError(f"{path.parent} has no tokenizer.model or tokenizer.json.")
  elif not path.exists():
    raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist.")
  if path.suffix == ".json":
    return JsonTokenizer(path)
  return SentencePieceTokenizer(path.read_bytes(), str(path))
