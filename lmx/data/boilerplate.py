"""Cross-document boilerplate: lines that recur in many documents (license headers, footers).

Two passes over the corpus. Pass 1 (`BoilerplateCounter.add`) counts, for each normalized line,
in how many documents it appears -- in a count-min sketch, so memory is fixed
(`depth * width * 4` bytes) however large the corpus. Pass 2 (`strip_boilerplate`) removes the
lines whose count reaches `min_docs` (and `min_fraction` of all documents).

Normalization lowercases, collapses whitespace and maps digits to 0, so `Copyright (C)
2001-2006 Python Software Foundation` and `... 2001-2007 ...` count as one line.

NOTE: by default only the document's edges are looked at: the run of frequent (or blank)
lines at the top and at the bottom, up to `edge_lines` lines each. License headers and web
footers live there; frequent *code* lines in the middle of a file (`if __name__ ==
"__main__":`) are content, and removing them would corrupt the program; for code corpora also
set `line_prefixes=('#',)` so only comment lines qualify. `scope="anywhere"` strips every
frequent line (for web text with repeated navigation menus).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

_SPACE_RE = re.compile(r"\s+")
_DIGIT_RE = re.compile(r"\d")


@dataclasses.dataclass(frozen=True)
class BoilerplateConfig:
  enabled: bool = True
  min_docs: int = 20  # a line is boilerplate if it occurs in at least this many documents...
  min_fraction: float = 0.0  # ...and in at least this fraction of all documents.
  min_line_chars: int = 20  # shorter lines ('import os', '}') are never boilerplate.
  scope: str = "edges"  # edges | anywhere (see module docstring)
  edge_lines: int = 60  # how deep the top/bottom runs may reach.
  sketch_width: int = 1 << 20  # count-min sketch columns; memory = 4 * 4 * width bytes.
  line_prefixes: tuple[str, ...] = ()  # if set, only lines starting so (e.g. '#') qualify.

  def validate(self) -> "BoilerplateConfig":
    if self.scope not in ("edges", "anywhere"):
      raise ValueError(f"Invalid config: `prepare.boilerplate.scope` is {self.scope!r}; it "
                       "must be 'edges' or 'anywhere'.")
    for f in ("min_docs", "min_line_chars", "edge_lines", "sketch_width"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f"Invalid config: `prepare.boilerplate.{f}` is "
                         f"{getattr(self, f)!r}; it must be a positive integer.")
    if not 0.0 <= self.min_fraction <= 1.0:
      raise ValueError(f"Invalid config: `prepare.boilerplate.min_fraction` is "
                       f"{self.min_fraction!r}; it must be in [0, 1].")
    return self


def normalize_line(line: str) -> str:
  return _DIGIT_RE.sub("0", _SPACE_RE.sub(" ", line.strip().lower()))


def line_hash(norm: str) -> int:
  """Stable 64-bit hash (Python's hash() is salted per process, so unusable across runs)."""
  return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little")


class BoilerplateCounter:
  """Document frequency of normalized lines in a count-min sketch (over-counts, never under)."""

  DEPTH = 4

  def __init__(self, cfg: BoilerplateConfig):
    self.cfg = cfg
    self.table = np.zeros((self.DEPTH, cfg.sketch_width), np.uint32)  # (D, W)
    self.num_docs = 0

  def _candidate_lines(self, text: str) -> list[str]:
    lines = text.split("\n")
    if self.cfg.scope == "edges" and len(lines) > 2 * self.cfg.edge_lines:
      lines = lines[:self.cfg.edge_lines] + lines[-self.cfg.edge_lines:]
    return [ln for ln in lines if _eligible(ln.strip(), self.cfg)]

  def _columns(self, hashes: np.ndarray) -> np.ndarray:
    """(N,) uint64 -> (D, N) columns by double hashing: (h1 + d * h2) mod W."""
    h1 = hashes & np.uint64(0xFFFFFFFF)
    h2 = (hashes >> np.uint64(32)) | np.uint64(1)
    d = np.arange(self.DEPTH, dtype=np.uint64)[:, None]
    return ((h1[None, :] + d * h2[None, :]) % np.uint64(self.cfg.sketch_width)).astype(np.int64)

  def add(self, text: str) -> None:
    self.num_docs += 1
    uniq = {line_hash(normalize_line(ln)) for ln in self._candidate_lines(text)}
    if not uniq:
      return
    cols = self._columns(np.fromiter(uniq, np.uint64, len(uniq)))
    for d in range(self.DEPTH):  # each line counted once per document
      np.add.at(self.table[d], cols[d], 1)

  def doc_count(self, norm_lines: list[str]) -> np.ndarray:
    """Estimated number of documents containing each normalized line, (N,) int64."""
    if not norm_lines:
      return np.zeros(0, np.int64)
    cols = self._columns(np.array([line_hash(s) for s in norm_lines], np.uint64))
    return self.table[np.arange(self.DEPTH)[:, None], cols].min(axis=0).astype(np.int64)

  @property
  def threshold(self) -> int:
    return max(self.cfg.min_docs, int(np.ceil(self.cfg.min_fraction * self.num_docs)))


def strip_boilerplate(text: str, counter: BoilerplateCounter) -> tuple[str, list[str]]:
  """Remove frequent lines; returns (new_text, removed_lines). Pass 2 of the module docstring."""
  cfg = counter.cfg
  lines = text.split("\n")
  norms = [normalize_line(ln) for ln in lines]
  candidate = [i for i, s in enumerate(norms) if _eligible(s, cfg)]
  if cfg.scope == "edges":
    candidate = [i for i in candidate if i < cfg.edge_lines or i >= len(lines) - cfg.edge_lines]
  counts = counter.doc_count([norms[i] for i in candidate])
  frequent = {i for i, c in zip(candidate, counts) if c >= counter.threshold}
  if not frequent:
    return text, []
  if cfg.scope == "edges":
    # Only the contiguous frequent-or-blank runs at the top and the bottom are boilerplate.
    def run(order):
      out = []
      for i in order:
        if i in frequent:
          out.append(i)
        elif norms[i] and not _is_comment_glue(norms[i]):
          break
      return out
    top = run(range(min(len(lines), cfg.edge_lines)))
    bottom = run(range(len(lines) - 1, max(-1, len(lines) - 1 - cfg.edge_lines), -1))
    frequent = set(top) | set(bottom)
    if not frequent:
      return text, []
  removed = [lines[i] for i in sorted(frequent)]
  kept = [ln for i, ln in enumerate(lines) if i not in frequent]
  return "\n".join(kept).strip("\n") + ("\n" if text.endswith("\n") else ""), removed


def _eligible(line: str, cfg: BoilerplateConfig) -> bool:
  return len(line) >= cfg.min_line_chars and (not cfg.line_prefixes
                                              or line.startswith(cfg.line_prefixes))


def _is_comment_glue(norm: str) -> bool:
  """Short comment-only lines (`#`, `# author: x`) inside a header do not end the run."""
  return norm.startswith(("#", "//", "/*", "*", "--")) and len(norm) < 20 and "=" not in norm
