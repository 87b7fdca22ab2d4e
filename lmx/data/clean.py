"""Document cleaning: text normalization, HTML stripping and Gopher-style heuristic filters.

Every function here works on one document at a time, so a stage is a generator over documents
and memory stays bounded by the largest document. Each stage keeps a `StageReport`: counts per
reason and a few short examples of what it removed, which `lmx data prepare` writes as JSON.

The heuristics follow Rae et al. 2021 (Gopher, appendix A): document length, mean line length,
symbol-to-word ratio, duplicated-line fraction and repeated n-gram fractions. The thresholds
are configurable because code and prose need different ones (see `experiments/data_prepare.py`).
"""

from __future__ import annotations

import dataclasses
import html
import html.parser
import re
import unicodedata
from collections import Counter
from typing import Any

import numpy as np

EXAMPLE_CHARS = 160  # characters of a removed document kept as an example in the report


class StageReport:
  """Counts and a few examples for one stage; `to_json()` is what lands in the report file."""

  def __init__(self, name: str, max_examples: int = 3):
    self.name = name
    self.max_examples = max_examples
    self.docs_in = 0
    self.docs_out = 0
    self.counts: Counter[str] = Counter()
    self.examples: dict[str, list[dict[str, str]]] = {}
    self.extra: dict[str, Any] = {}
    self.seconds = 0.0

  def count(self, reason: str, n: int = 1, doc_id: str | None = None, text: str | None = None):
    self.counts[reason] += n
    if text is not None and len(self.examples.setdefault(reason, [])) < self.max_examples:
      snippet = text[:EXAMPLE_CHARS] + ("..." if len(text) > EXAMPLE_CHARS else "")
      self.examples[reason].append({"id": doc_id or "", "text": snippet})

  def to_json(self) -> dict[str, Any]:
    out = {"stage": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out,
           "counts": dict(sorted(self.counts.items())), "examples": self.examples}
    out.update(self.extra)
    out["seconds"] = round(self.seconds, 3)
    if self.seconds > 0:
      out["docs_per_s"] = round(self.docs_in / self.seconds, 1)
    return out


# ---------------------------------------------------------------- normalization

# Cc (controls) except \t and \n, plus Cf format characters that are invisible in text
# (zero-width spaces, BOMs, bidi overrides); \r is turned into \n first.
_KEEP_CONTROLS = {"\t", "\n"}
_CONTROL_RE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def decode_utf8(data: bytes) -> tuple[str, int]:
  """Bytes -> text; invalid UTF-8 sequences become U+FFFD. Returns (text, n_replaced)."""
  text = data.decode("utf-8", errors="replace")
  # Count only replacements we made, not U+FFFD that was already in the input.
  n = text.count("\ufffd") - data.count("\ufffd".encode())
  return text, max(n, 0)


def normalize_text(text: str) -> tuple[str, int]:
  """NFC, \\r\\n and \\r -> \\n, control/invisible characters removed (\\n and \\t kept).

  Returns (text, n_control_chars_removed). Lone surrogates (from bad decoders) are replaced.
  """
  if any("\ud800" <= c <= "\udfff" for c in text):
    text = text.encode("utf-8", errors="replace").decode("utf-8")
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  text, n = _CONTROL_RE.subn("", text)
  return unicodedata.normalize("NFC", text), n


# ---------------------------------------------------------------- HTML

_HTML_TAG_RE = re.compile(r"<(?:!doctype\s+html|html|body|div|p|span|a\s|br|table|head|meta)"
                          r"[\s>/]", re.IGNORECASE)
_BLOCK_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table",
               "section", "article", "header", "footer", "pre", "blockquote", "ul", "ol"}


def looks_like_html(text: str, min_tags: int = 3) -> bool:
  """Heuristic: at least `min_tags` common HTML tags in the first 8 KB.

  Code that merely mentions a tag in a string (e.g. `html.parser` tests) usually has fewer.
  """
  return len(_HTML_TAG_RE.findall(text[:8192])) >= min_tags


class _TextExtractor(html.parser.HTMLParser):
  """Keeps visible text; drops script/style/head contents; block tags become newlines."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: list[str] = []
    self._skip = 0

  def handle_starttag(self, tag, attrs):
    if tag in ("script", "style", "head", "noscript"):
      self._skip += 1
    elif tag in _BLOCK_TAGS:
      self.parts.append("\n")

  def handle_endtag(self, tag):
    if tag in ("script", "style", "head", "noscript"):
      self._skip = max(0, self._skip - 1)
    elif tag in _BLOCK_TAGS:
      self.parts.append("\n")

  def handle_data(self, data):
    if not self._skip:
      self.parts.append(data)


def strip_html(text: str) -> str:
  """Visible text of an HTML document, one block element per line, blank runs collapsed."""
  parser = _TextExtractor()
  try:
    parser.feed(text)
    parser.close()
  except Exception:  # NOTE: html.parser is lenient; this is a last resort for odd markup.
    return html.unescape(re.sub(r"<[^>]*>", " ", text))
  lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in "".join(parser.parts).split("\n")]
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------- heuristic filters

@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Thresholds of the heuristic filters; a 0 (or 1.0 for fractions) turns one off."""

  min_chars: int = 50  # documents shorter than this are dropped.
  max_chars: int = 1_000_000  # 0 = no upper bound.
  min_words: int = 5
  min_mean_line_chars: float = 3.0  # mean length of non-blank lines.
  max_mean_line_chars: float = 200.0  # minified / machine-generated text has huge lines.
  max_symbol_ratio: float = 0.5  # non-alphanumeric, non-space chars / all non-space chars.
  max_dup_line_fraction: float = 0.5  # chars in non-blank lines that repeat an earlier line.
  max_top_ngram_fraction: float = 0.3  # chars covered by the most frequent word 2..4-gram.
  max_dup_ngram_fraction: float = 0.5  # chars of words inside repeated word 5..10-grams.

  def validate(self) -> "FilterConfig":
    for f in ("min_chars", "max_chars", "min_words"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 0:
        raise ValueError(f"Invalid config: `prepare.filters.{f}` is {v!r}; it must be an "
                         "integer >= 0.")
    for f in ("max_symbol_ratio", "max_dup_line_fraction", "max_top_ngram_fraction",
              "max_dup_ngram_fraction"):
      v = getattr(self, f)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"Invalid config: `prepare.filters.{f}` is {v!r}; it must be in "
                         "[0, 1] (1 disables it).")
    if self.min_mean_line_chars < 0 or self.max_mean_line_chars < self.min_mean_line_chars:
      raise ValueError("Invalid config: `prepare.filters.max_mean_line_chars` must be >= "
                       "`min_mean_line_chars` >= 0.")
    return self


_WORD_RE = re.compile(r"\w+")


def dup_line_fraction(lines: list[str]) -> float:
  """Share of characters (non-blank lines) in lines that already appeared in the document."""
  seen: set[str] = set()
  dup = total = 0
  for ln in lines:
    s = ln.strip()
    if not s:
      continue
    total += len(s)
    if s in seen:
      dup += len(s)
    seen.add(s)
  return dup / total if total else 0.0


def _gram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
  """Hash of every word n-gram of an int64 word-id sequence, (len - n + 1,) int64 (wraps)."""
  m = len(ids) - n + 1
  h = np.zeros(m, np.int64)
  with np.errstate(over="ignore"):
    for t in range(n):
      h = h * np.int64(1_000_003) + ids[t:t + m]
  return h


def _word_arrays(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(word ids, word lengths), both (W,) int64; ids are per-document, enough for counting."""
  vocab: dict[str, int] = {}
  ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.int64, len(words))
  return ids, np.fromiter(map(len, words), np.int64, len(words))


def top_ngram_fraction(words: list[str], n: int, arrays=None) -> float:
  """Characters covered by the most frequent word n-gram over all word characters (Gopher)."""
  if len(words) < n:
    return 0.0
  ids, lens = arrays or _word_arrays(words)
  uniq, first, counts = np.unique(_gram_hashes(ids, n), return_index=True, return_counts=True)
  k = int(np.argmax(counts))
  if counts[k] < 2:
    return 0.0
  gram_chars = int(lens[first[k]:first[k] + n].sum())
  return min(1.0, int(counts[k]) * gram_chars / max(1, int(lens.sum())))


def dup_ngram_fraction(words: list[str], n: int, arrays=None) -> float:
  """Characters of words that sit inside an n-gram seen earlier in the document (Gopher)."""
  if len(words) < n:
    return 0.0
  ids, lens = arrays or _word_arrays(words)
  h = _gram_hashes(ids, n)
  _, first = np.unique(h, return_index=True)
  repeat = np.ones(len(h), bool)
  repeat[first] = False  # (G,) True where the n-gram occurred before
  # Words i..i+n-1 are covered for each repeated start i: +1/-1 difference array.
  diff = np.zeros(len(words) + 1, np.int64)
  starts = np.flatnonzero(repeat)
  np.add.at(diff, starts, 1)
  np.add.at(diff, starts + n, -1)
  covered = np.cumsum(diff[:-1]) > 0
  total = int(lens.sum())
  return int(lens[covered].sum()) / total if total else 0.0


def heuristic_reason(text: str, cfg: FilterConfig) -> str | None:
  """The name of the first filter the document fails, or None if it passes them all."""
  n = len(text)
  if n < cfg.min_chars:
    return "too_short_chars"
  if cfg.max_chars and n > cfg.max_chars:
    return "too_long_chars"
  words = _WORD_RE.findall(text.lower())
  if len(words) < cfg.min_words:
    return "too_few_words"
  lines = text.split("\n")
  nonblank = [ln for ln in lines if ln.strip()]
  mean_line = sum(len(ln) for ln in nonblank) / max(1, len(nonblank))
  if mean_line < cfg.min_mean_line_chars:
    return "mean_line_too_short"
  if mean_line > cfg.max_mean_line_chars:
    return "mean_line_too_long"
  nonspace = n - text.count(" ") - text.count("\n") - text.count("\t")
  arrays = _word_arrays(words)
  alnum = int(arrays[1].sum()) - text.count("_")  # every '_' is a \w character
  if nonspace and (nonspace - alnum) / nonspace > cfg.max_symbol_ratio:
    return "symbol_ratio"
  if cfg.max_dup_line_fraction < 1.0 and dup_line_fraction(lines) > cfg.max_dup_line_fraction:
    return "duplicated_lines"
  if cfg.max_top_ngram_fraction < 1.0:
    if max(top_ngram_fraction(words, k, arrays) for k in (2, 3, 4)) > cfg.max_top_ngram_fraction:
      return "top_ngram"
  if cfg.max_dup_ngram_fraction < 1.0:
    if max(dup_ngram_fraction(words, k, arrays) for k in (5, 10)) > cfg.max_dup_ngram_fraction:
      return "repeated_ngrams"
  return None
