"""SentencePiece tokenizer: lossless on any Unicode string, trained once per corpus and cached.

Settings that make `decode(encode(s)) == s` for every string (tested with hypothesis):
identity normalization, no whitespace collapsing, no dummy prefix, byte fallback (any
character outside the vocabulary becomes its UTF-8 bytes). Newlines and tabs are ordinary
characters to the trainer, so pieces like '):\\n' or '\\n\\n' are learned; runs of spaces are
whole pieces (`allow_whitespace_only_pieces`), which matters for indented code.

NOTE: SentencePiece reads a literal U+2581 ('▁') in the input as its own space marker, so
`Tokenizer.encode` spells that one character with its byte-fallback tokens.

Ids are fixed: pad=0, unk=1, bos=2, eos=3.

    lmx tokenizer train --input stdlib --vocab_size 4096 --output /tmp/tok
    lmx tokenizer encode --model /tmp/tok.model 'def f(x):'
    echo 610 76 | lmx tokenizer decode --model /tmp/tok.model
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import io
import json
import os
import pathlib
import sys
import time
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from lmx.data import corpus

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_SPACE_MARK = "\u2581"
_SENTENCE_BYTES = 4096  # trainer input is cut at line ends into pieces of about this size
_MAX_SENTENCE_BYTES = 1 << 16  # a single longer line is hard-split
_CACHE_VERSION = 1  # bump when training settings change, to invalidate cached models


class Tokenizer:
  """A SentencePiece model with lossless encode/decode and the lmx special ids."""

  def __init__(self, model_proto: bytes, path: str | None = None):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.path = path
    self._mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode()]
    if any(i == self._sp.unk_id() for i in self._mark_ids):
      raise ValueError(f"tokenizer {path or ''} has no byte-fallback pieces; lmx needs "
                       "byte_fallback=True so every string round-trips")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    p = pathlib.Path(path)
    if not p.exists():
      raise FileNotFoundError(f"tokenizer model {str(p)!r} does not exist")
    return cls(p.read_bytes(), str(p))

  def save(self, path: str | os.PathLike) -> None:
    _atomic_write(pathlib.Path(path), self.model_proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def sha256(self) -> str:
    return hashlib.sha256(self.model_proto).hexdigest()

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def encode(self, text: str) -> list[int]:
    if _SPACE_MARK not in text:
      return self._sp.encode(text)
    out: list[int] = []
    for k, part in enumerate(text.split(_SPACE_MARK)):
      if k:
        out += self._mark_ids
      out += self._sp.encode(part)
    return out

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """`[encode(t) for t in texts]`, with SentencePiece's C++ threads doing the plain ones."""
    plain = [i for i, t in enumerate(texts) if _SPACE_MARK not in t]
    out: list[list[int] | None] = [None] * len(texts)
    ids = self._sp.encode([texts[i] for i in plain], num_threads=num_threads or os.cpu_count())
    for i, x in zip(plain, ids):
      out[i] = x
    for i, t in enumerate(texts):
      if out[i] is None:
        out[i] = self.encode(t)
    return out  # type: ignore[return-value]

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def bytes_per_token(self, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts` (higher = better compression)."""
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    n_tokens = sum(len(x) for x in self.encode_batch(texts))
    return n_bytes / max(n_tokens, 1)


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _sentences(texts: Iterable[str], sample_bytes: int) -> Iterator[str]:
  """Cut texts at line ends into trainer 'sentences', stopping after `sample_bytes`."""
  budget = sample_bytes
  for text in texts:
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
      n = len(line.encode("utf-8", "surrogatepass"))
      if size + n > _SENTENCE_BYTES and buf:
        yield "".join(buf)
        budget -= size
        buf, size = [], 0
        if budget <= 0:
          return
      if n > _MAX_SENTENCE_BYTES:  # minified / data lines: cut blindly.
        line = line[:_MAX_SENTENCE_BYTES // 4]
        n = len(line.encode("utf-8", "surrogatepass"))
      buf.append(line)
      size += n
    if buf:
      yield "".join(buf)
      budget -= size
    if budget <= 0:
      return


def train_tokenizer(texts: Iterable[str], model_prefix: str | None, vocab_size: int,
                    model_type: str = "bpe", character_coverage: float = 0.9995,
                    byte_fallback: bool = True, user_defined_symbols: Sequence[str] = (),
                    sample_bytes: int = 8 << 20, num_threads: int = 0) -> Tokenizer:
  """Train SentencePiece on `texts` (at most `sample_bytes` of them) and return the Tokenizer.

  Writes `{model_prefix}.model` when `model_prefix` is given. The vocabulary may come out
  smaller than `vocab_size` when the text is too small to support it (never larger).
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type is {model_type!r}; it must be 'bpe' or 'unigram'")
  if not byte_fallback:
    raise ValueError("byte_fallback=False would make some strings impossible to round-trip; "
                     "lmx requires byte_fallback=True")
  min_vocab = 4 + 256 + len(user_defined_symbols) + 1
  if vocab_size < min_vocab:
    raise ValueError(f"vocab_size is {vocab_size}; it must be >= {min_vocab} (4 special ids, "
                     "256 byte-fallback pieces and the user-defined symbols)")
  if not 0.0 < character_coverage <= 1.0:
    raise ValueError(f"character_coverage is {character_coverage!r}; it must be in (0, 1]")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts, sample_bytes), model_writer=model,
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, add_dummy_prefix=False,
        normalization_rule_name="identity", user_defined_symbols=list(user_defined_symbols),
        max_sentence_length=_MAX_SENTENCE_BYTES, hard_vocab_limit=False,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:  # SentencePiece reports bad settings / empty input this way.
    raise ValueError(f"SentencePiece training failed: {e}") from e
  path = None
  if model_prefix:
    path = f"{model_prefix}.model"
    _atomic_write(pathlib.Path(path), model.getvalue())
  return Tokenizer(model.getvalue(), path)


def sample_train_texts(data_cfg, sample_bytes: int) -> list[str]:
  """A deterministic ~`sample_bytes` sample of TRAIN documents: those with the smallest id hash.

  Streams the corpus once and keeps at most the budget in memory (bottom-k by hash), so the
  sample is spread over the whole corpus rather than its first files.
  """
  heap: list[tuple[int, str, str]] = []  # (-hash, id, text): the largest hash sits on top
  total = 0
  for doc in corpus.iter_documents(data_cfg):
    if corpus.is_validation(doc.id, data_cfg.validation_fraction):
      continue
    h = int.from_bytes(hashlib.sha256(doc.id.encode("utf-8", "surrogatepass")).digest()[:8],
                       "big")
    if total >= sample_bytes and h > -heap[0][0]:
      continue
    heapq.heappush(heap, (-h, doc.id, doc.text))
    total += len(doc.text)
    while total - len(heap[0][2]) >= sample_bytes:  # drop what the budget no longer needs
      total -= len(heapq.heappop(heap)[2])
  return [text for _, _, text in sorted(heap, reverse=True)]


def tokenizer_cache_key(data_cfg, vocab_size: int) -> str:
  ident = {"corpus": corpus.corpus_identity(data_cfg.corpus), "vocab": vocab_size,
           "type": data_cfg.tokenizer_type, "sample_mb": data_cfg.tokenizer_sample_mb,
           "max_docs": data_cfg.max_docs, "text_field": data_cfg.text_field,
           "val": data_cfg.validation_fraction, "v": _CACHE_VERSION}
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def load_or_train_tokenizer(exp, *, base: bool = False) -> Tokenizer:
  """`data.tokenizer_path` if set; else the cached (or newly trained) model for this corpus.

  An SFT run (`data.format='sft'`) gets the base tokenizer -- the one its pretraining run
  used, with model.vocab_size minus the chat role tokens -- plus those tokens
  (lmx.data.sft.add_chat_tokens); base=True returns it without them.
  """
  if exp.data.format == "sft":
    import dataclasses
    from lmx.data.sft import ROLE_TOKENS, add_chat_tokens
    model = dataclasses.replace(exp.model, vocab_size=exp.model.vocab_size - len(ROLE_TOKENS))
    inner = dataclasses.replace(exp, model=model,
                                data=dataclasses.replace(exp.data, format="text"))
    tok = load_or_train_tokenizer(inner)
    return tok if base else add_chat_tokens(tok)
  d = exp.data
  if d.tokenizer_path and (os.path.isdir(d.tokenizer_path) or d.tokenizer_path.endswith(".json")):
    # A Hugging Face model directory or tokenizer.json (`lmx convert --from_hf` points here).
    from lmx.interop.hf_tokenizer import load_tokenizer
    tok = load_tokenizer(d.tokenizer_path)
  elif d.tokenizer_path:
    tok = Tokenizer.load(d.tokenizer_path)
  else:
    path = pathlib.Path(d.cache_dir, "tokenizers",
                        f"{d.tokenizer_type}{exp.model.vocab_size}-"
                        f"{tokenizer_cache_key(d, exp.model.vocab_size)}.model")
    if path.exists():
      tok = Tokenizer.load(path)
    else:
      sample = d.tokenizer_sample_mb << 20
      tok = train_tokenizer(sample_train_texts(d, sample), str(path)[:-len(".model")],
                            exp.model.vocab_size, d.tokenizer_type, sample_bytes=sample)
  if tok.vocab_size > exp.model.vocab_size:
    raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces; model.vocab_size="
                     f"{exp.model.vocab_size} must be at least that")
  return tok


# ----------------------------------------------------------------------------------- CLI


def _cli_train(args) -> int:
  from lmx.config import DataConfig
  if args.vocab_size <= 0 or args.sample_mb <= 0:
    raise ValueError("--vocab_size and --sample_mb must be positive")
  cfg = DataConfig(corpus=args.input, text_field=args.text_field, max_docs=args.max_docs,
                   validation_fraction=args.validation_fraction).validate()
  t0 = time.perf_counter()
  texts = sample_train_texts(cfg, args.sample_mb << 20)
  t1 = time.perf_counter()
  symbols = [s for s in args.user_defined_symbols.split(",") if s]
  tok = train_tokenizer(texts, args.output, args.vocab_size, args.model_type,
                        args.character_coverage, user_defined_symbols=symbols,
                        sample_bytes=args.sample_mb << 20)
  t2 = time.perf_counter()
  held_out = [d.text for d in corpus.iter_documents(cfg)
              if corpus.is_validation(d.id, cfg.validation_fraction)]
  print(json.dumps({
      "model": tok.path, "vocab_size": tok.vocab_size, "model_type": args.model_type,
      "sample_bytes": sum(len(t.encode("utf-8", "surrogatepass")) for t in texts),
      "sample_seconds": round(t1 - t0, 2), "train_seconds": round(t2 - t1, 2),
      "heldout_docs": len(held_out),
      "heldout_bytes_per_token": round(tok.bytes_per_token(held_out), 4) if held_out else None,
  }))
  return 0


def _read_arg_or_stdin(values: list[str]) -> str:
  return " ".join(values) if values else sys.stdin.read()


def cli_main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="lmx tokenizer", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train", help="train a SentencePiece model on a corpus' train split")
  t.add_argument("--input", default="stdlib", help="'stdlib' or a corpus path")
  t.add_argument("--vocab_size", type=int, default=4096)
  t.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
  t.add_argument("--output", required=True, help="model prefix; writes PREFIX.model")
  t.add_argument("--user_defined_symbols", default="", help="comma-separated pieces")
  t.add_argument("--character_coverage", type=float, default=0.9995)
  t.add_argument("--sample_mb", type=int, default=8)
  t.add_argument("--max_docs", type=int, default=0)
  t.add_argument("--text_field", default="text")
  t.add_argument("--validation_fraction", type=float, default=0.02)
  e = sub.add_parser("encode", help="print the ids of TEXT (or stdin) as a JSON list")
  e.add_argument("--model", required=True)
  e.add_argument("text", nargs="*")
  d = sub.add_parser("decode", help="print the text of IDS (or whitespace-separated stdin)")
  d.add_argument("--model", required=True)
  d.add_argument("ids", nargs="*")
  args = p.parse_args(argv)
  try:
    if args.cmd == "train":
      return _cli_train(args)
    tok = Tokenizer.load(args.model)
    if args.cmd == "encode":
      print(json.dumps(tok.encode(_read_arg_or_stdin(args.text))))
      return 0
    raw = _read_arg_or_stdin(args.ids).replace(",", " ").strip("[] \n")
    ids = [int(x) for x in raw.split()]
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
      raise ValueError(f"id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})")
    sys.stdout.write(tok.decode(ids))
    return 0
  except ValueError as err:
    print(f"lmx tokenizer: {err}", file=sys.stderr)
    return 2
