"""Documents: the embedded `stdlib` corpus and readers for text folders, JSONL and ArrayRecord.

`iter_documents(data_cfg)` yields `Document(id, text, source)` in a deterministic order for
`data.corpus`:
  'stdlib'            every `.py` file of the running interpreter's standard library (sorted by
                      relative path; site-/dist-packages skipped; `test/` packages INCLUDED --
                      they are ~60% of the code and without them the corpus has < 1000 files),
                      then one document per pydoc topic (`pydoc_data.topics`). ~32 MB on 3.11.
  a folder            recursively, sorted: .txt/.py/.md files are one document each; .jsonl
                      files give one document per line (field `data.text_field`); .array_record
                      files give one document per record (UTF-8 bytes).
  a file              any of the above file kinds on its own.

Malformed input never raises: non-UTF-8 bytes are replaced by U+FFFD, files with NUL bytes
are skipped as binary, empty (whitespace-only) documents and bad JSON lines are skipped, and
all of it is counted in `CorpusStats`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".py", ".md")
CORPUS_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".array_record")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Document:
  id: str  # stable across runs: relative path, `path:line` for JSONL, `path#record`.
  text: str
  source: str  # 'stdlib', 'pydoc', or the corpus-relative file path.


@dataclasses.dataclass
class CorpusStats:
  """Counters of what was read and what was skipped or repaired."""

  files: int = 0  # files opened
  documents: int = 0  # documents yielded
  bytes: int = 0  # UTF-8 bytes of yielded documents (after repair)
  invalid_utf8_docs: int = 0  # documents with bytes that were not UTF-8 (kept, repaired)
  replaced_chars: int = 0  # U+FFFD introduced by the repair
  bad_json_lines: int = 0  # JSONL lines that did not parse or were not an object
  missing_field_lines: int = 0  # JSON objects without a string `data.text_field`
  empty_docs: int = 0  # empty or whitespace-only documents (skipped)
  binary_files: int = 0  # files or records with NUL bytes (skipped)

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def is_validation(doc_id: str, fraction: float) -> bool:
  """True for the held-out share of documents: a stable hash of the id (not Python's hash())."""
  h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")
  return h < fraction * 2.0**64


def _decode(data: bytes, stats: CorpusStats) -> str | None:
  """UTF-8 text of `data`, or None (counted) for binary/empty input."""
  if b"\x00" in data:
    stats.binary_files += 1
    return None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    text = data.decode("utf-8", errors="replace")
    stats.invalid_utf8_docs += 1
    # Count only the replacements the repair introduced, not U+FFFD already in the data.
    stats.replaced_chars += text.count("\ufffd") - data.count("\ufffd".encode())
  if not text.strip():
    stats.empty_docs += 1
    return None
  return text


def _emit(doc_id: str, text: str, source: str, stats: CorpusStats) -> Document:
  stats.documents += 1
  stats.bytes += len(text.encode("utf-8", "surrogatepass"))
  return Document(doc_id, text, source)


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[pathlib.Path]:
  root = stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    out += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py")]
  return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(stats: CorpusStats | None = None) -> Iterator[Document]:
  """The embedded default corpus: stdlib `.py` sources, then the pydoc topics."""
  stats = CorpusStats() if stats is None else stats
  root = stdlib_root()
  for path in _stdlib_files():
    rel = path.relative_to(root).as_posix()
    stats.files += 1
    text = _decode(path.read_bytes(), stats)
    if text is not None:
      yield _emit(f"stdlib/{rel}", text, "stdlib", stats)
  try:
    from pydoc_data.topics import topics
  except ImportError:  # some distributions strip pydoc_data; the sources are enough.
    topics = {}
  for name in sorted(topics):
    text = _decode(topics[name].encode("utf-8", "surrogatepass"), stats)
    if text is not None:
      yield _emit(f"pydoc/{name}", text, "pydoc", stats)


def _jsonl_documents(path: pathlib.Path, rel: str, field: str,
                     stats: CorpusStats) -> Iterator[Document]:
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw.decode("utf-8", errors="replace"))
      except ValueError:
        stats.bad_json_lines += 1
        continue
      if not isinstance(obj, dict):
        stats.bad_json_lines += 1
        continue
      text = obj.get(field)
      if not isinstance(text, str):
        stats.missing_field_lines += 1
        continue
      # JSON escapes may carry lone surrogates; repair them like invalid UTF-8.
      text = _decode(text.encode("utf-8", "surrogatepass"), stats)
      if text is not None:
        # A record's own `id` (e.g. from `lmx data prepare`) keeps the train/validation split
        # -- decided by id hash -- identical to the one its dedup was run against.
        doc_id = obj["id"] if isinstance(obj.get("id"), str) and obj["id"] else f"{rel}:{line_no}"
        yield _emit(doc_id, text, rel, stats)


def _array_record_documents(path: pathlib.Path, rel: str,
                            stats: CorpusStats) -> Iterator[Document]:
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(str(path))
  try:
    n = reader.num_records()
    for start in range(0, n, 1024):
      for i, data in enumerate(reader.read(start, min(n, start + 1024)), start=start):
        text = _decode(data, stats)
        if text is not None:
          yield _emit(f"{rel}#{i}", text, rel, stats)
  finally:
    reader.close()


def _file_documents(path: pathlib.Path, rel: str, field: str,
                    stats: CorpusStats) -> Iterator[Document]:
  stats.files += 1
  if path.suffix == ".jsonl":
    yield from _jsonl_documents(path, rel, field, stats)
  elif path.suffix == ".array_record":
    yield from _array_record_documents(path, rel, stats)
  else:
    text = _decode(path.read_bytes(), stats)
    if text is not None:
      yield _emit(rel, text, rel, stats)


def corpus_files(corpus: str) -> list[pathlib.Path]:
  """The files a path corpus reads, in reading order. Raises FileNotFoundError naming it."""
  root = pathlib.Path(corpus).expanduser()
  if not root.exists():
    raise FileNotFoundError(f"data.corpus path {str(root)!r} does not exist (use 'stdlib' for "
                            "the embedded corpus, or a folder / .jsonl / .array_record file)")
  if root.is_file():
    return [root]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
    files += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(CORPUS_SUFFIXES)]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _path_documents(corpus: str, field: str, stats: CorpusStats) -> Iterator[Document]:
  root = pathlib.Path(corpus).expanduser()
  for path in corpus_files(corpus):
    rel = path.name if root.is_file() else path.relative_to(root).as_posix()
    yield from _file_documents(path, rel, field, stats)


def corpus_identity(corpus: str) -> str:
  """A string that changes when the corpus content may have changed (cache keys)."""
  if corpus == "stdlib":
    return f"stdlib:{sys.version}:{stdlib_root()}"
  parts = [str(pathlib.Path(corpus).expanduser().resolve())]
  for p in corpus_files(corpus):
    st = p.stat()
    parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def iter_documents(data_cfg, stats: CorpusStats | None = None) -> Iterator[Document]:
  """Documents of `data_cfg.corpus`, in a fixed order, capped at `data_cfg.max_docs` (0 = all).

  Pass a `CorpusStats` to collect counts of repaired / skipped input.
  """
  stats = CorpusStats() if stats is None else stats
  if data_cfg.corpus == "stdlib":
    docs = stdlib_documents(stats)
  else:
    corpus_files(data_cfg.corpus)  # raise FileNotFoundError now, not on first next().
    docs = _path_documents(data_cfg.corpus, data_cfg.text_field, stats)
  return _take(docs, data_cfg.max_docs)


def _take(docs: Iterator[Document], limit: int) -> Iterator[Document]:
  for n, doc in enumerate(docs, start=1):
    yield doc
    if limit and n >= limit:
      return
