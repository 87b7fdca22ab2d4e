"""Offline SFT tasks derived from the embedded stdlib corpus: no download, fully deterministic.

From every public function with a docstring (parsed with `ast`, test packages skipped):
  signature: instruction "Write the signature of the Python function described by this
             docstring.", input = the docstring's first paragraph, output = `def name(args):`
             (with `async` and a `-> return` annotation when the source has them)
  name:      instruction "Name the function: <first paragraph>", output = the name
Records use the instruction format of lmx/data/sft.py (`read_conversations` reads them).

Files are visited in an order hashed from `seed` and parsing stops once enough functions
are found (at most `max_files` files), so a few thousand records take about a second.

    records = derived_task_records(2000, seed=0)
    write_jsonl(records, "/tmp/stdlib_tasks.jsonl")
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import pathlib
import random
from typing import Iterable

from lmx.data import corpus

SIGNATURE_INSTRUCTION = "Write the signature of the Python function described by this docstring."
NAME_INSTRUCTION = "Name the function: "
_MIN_CHARS, _MAX_CHARS = 20, 600  # first paragraphs outside this range say too little / much
_TEST_PARTS = ("test/", "tests/", "idle_test/")


def _first_paragraph(doc: str) -> str:
  return inspect.cleandoc(doc).split("\n\n", 1)[0].strip()


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
  prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
  return f"{prefix} {node.name}({ast.unparse(node.args)}){ret}:"


def _functions(text: str) -> list[tuple[str, str]]:
  """(first docstring paragraph, signature line) of the public documented functions."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):  # a few stdlib files are deliberately broken (lib2to3 data)
    return []
  out = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    if node.name.startswith("_"):
      continue
    doc = ast.get_docstring(node, clean=False)
    para = _first_paragraph(doc) if doc else ""
    if _MIN_CHARS <= len(para) <= _MAX_CHARS:
      out.append((para, _signature(node)))
  return out


def _hash_key(seed: int, doc_id: str) -> bytes:
  return hashlib.sha256(f"{seed}\n{doc_id}".encode("utf-8", "surrogatepass")).digest()


def derived_task_records(limit: int, seed: int = 0, max_files: int = 400) -> list[dict[str, str]]:
  """Up to `limit` instruction records (both task kinds per function, shuffled by `seed`)."""
  if limit <= 0:
    return []
  docs = [d for d in corpus.stdlib_documents()
          if d.source == "stdlib" and not any(p in d.id for p in _TEST_PARTS)]
  docs.sort(key=lambda d: _hash_key(seed, d.id))
  seen: set[tuple[str, str]] = set()
  functions: list[tuple[str, str]] = []
  for d in docs[:max_files]:
    for f in _functions(d.text):
      if f not in seen:  # overrides often repeat a docstring verbatim
        seen.add(f)
        functions.append(f)
    if 2 * len(functions) >= limit:
      break
  records = []
  for para, sig in functions:
    name = sig.split("(", 1)[0].split()[-1]
    records.append({"instruction": SIGNATURE_INSTRUCTION, "input": para, "output": sig})
    records.append({"instruction": NAME_INSTRUCTION + para, "output": name})
  random.Random(seed).shuffle(records)
  return records[:limit]


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> int:
  """Write one JSON object a line (atomically); returns the number of records."""
  p = pathlib.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
  n = 0
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
      n += 1
  os.replace(tmp, p)
  return n
