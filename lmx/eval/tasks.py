"""Evaluation tasks: the shipped sets derived from the embedded corpus, and JSONL task files.

Two kinds of record (one kind per task):
  multiple choice  {"context": str, "choices": [str, ...] (>= 2), "label": int}
                   the lm-eval-harness convention: each choice is scored as a continuation
                   of the context (lmx.eval.harness)
  generation       {"prompt": str, "answer": str} or {"prompt": str, "answers": [str, ...]},
                   optionally "stop": [str, ...] (default: stop at a newline)
A JSONL file's kind is that of its first valid record. Lines that do not parse, records of
the other kind or with missing / mistyped fields, an out-of-range label, fewer than two
choices or an empty choice are counted in `Task.skipped` and left out, never a crash.

Shipped sets (`shipped_task(name, validation_fraction)`), derived from the held-out stdlib
`.py` files only -- those `lmx.data.corpus.is_validation` puts in the validation split for
the experiment's `data.validation_fraction` (the split the data pipeline uses), so a model
trained on the stdlib corpus never saw them. Same Python, same fraction -> same records:
orders come from sha256 of ids and `random.Random` with fixed seeds, never from hash().
  next_line           MC, 4 choices: the real next line of code after up to 8 lines of
                      context, against 3 lines of about its length drawn from other
                      held-out files, re-indented like the answer
  docstring_name      generation: `# <docstring first paragraph>\\ndef` -> ` name` (stops
                      at `(`; exact match strips the space)
  docstring_name_mc   MC, 4 choices: the same prompt, the real name against 3 other
                      held-out functions' names of about its length (each choice is ` name(`)
"""

from __future__ import annotations

import ast
import bisect
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import pathlib
import random
from typing import Any, Iterable, Sequence

from lmx.data import corpus

MC, GEN = "mc", "gen"
SEED = 0  # shipped sets are fixed; change it only to make a different set on purpose
NEXT_LINE_ITEMS, NAME_ITEMS = 200, 100
_PER_DOC = 8  # items one file may give next_line, so no single file dominates
_CONTEXT_LINES, _MAX_CONTEXT_CHARS = 8, 600
_LINE_CHARS = (10, 100)  # stripped length of an answer or distractor line
_DOC_CHARS = (20, 300)  # docstring first paragraphs outside this say too little / too much
_TEST_PARTS = ("test/", "tests/", "idle_test/")


@dataclasses.dataclass
class Task:
  name: str
  kind: str  # MC or GEN
  records: list[dict[str, Any]]
  skipped: int = 0  # malformed records left out
  source: str = "shipped"  # 'shipped' or the file path

  def write_jsonl(self, path: str | os.PathLike) -> None:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records),
                 encoding="utf-8")


def _str_list(x: Any) -> bool:
  return isinstance(x, list) and all(isinstance(s, str) for s in x)


def parse_record(obj: Any) -> tuple[str, dict[str, Any]] | None:
  """(kind, normalized record), or None for a malformed one (see the module docstring)."""
  if not isinstance(obj, dict):
    return None
  if "choices" in obj:
    ctx, choices, label = obj.get("context"), obj.get("choices"), obj.get("label")
    if (not isinstance(ctx, str) or not _str_list(choices) or len(choices) < 2
        or any(not c for c in choices) or isinstance(label, bool)
        or not isinstance(label, int) or not 0 <= label < len(choices)):
      return None
    return MC, {"context": ctx, "choices": list(choices), "label": label}
  if "prompt" in obj:
    prompt = obj.get("prompt")
    answers = obj.get("answers", [obj["answer"]] if "answer" in obj else None)
    stop = obj.get("stop", ["\n"])
    if (not isinstance(prompt, str) or not prompt or not _str_list(answers) or not answers
        or not _str_list(stop)):
      return None
    return GEN, {"prompt": prompt, "answers": list(answers), "stop": list(stop)}
  return None


def parse_records(lines: Iterable[str], name: str, source: str) -> Task:
  """A Task from JSONL lines; blank lines are ignored, malformed ones counted."""
  kind, records, skipped = None, [], 0
  for line in lines:
    if not line.strip():
      continue
    try:
      parsed = parse_record(json.loads(line))
    except ValueError:
      parsed = None
    if parsed is None or (kind is not None and parsed[0] != kind):
      skipped += 1
      continue
    kind = parsed[0]
    records.append(parsed[1])
  if not records:
    raise ValueError(f"task file {source} has no valid records ({skipped} malformed); each "
                     'line must be {"context", "choices", "label"} or {"prompt", "answer"}')
  return Task(name, kind, records, skipped, source)


def read_task_file(path: str | os.PathLike) -> Task:
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"task file {str(p)!r} does not exist (shipped tasks: "
                            f"{', '.join(SHIPPED)})")
  with open(p, encoding="utf-8", errors="replace") as f:
    return parse_records(f, p.stem, str(p))


# ------------------------------------------------------------------------- shipped tasks


def _key(*parts: Any) -> bytes:
  return hashlib.sha256("\n".join(map(str, parts)).encode("utf-8", "surrogatepass")).digest()


@functools.lru_cache(maxsize=4)
def held_out_sources(validation_fraction: float) -> tuple[corpus.Document, ...]:
  """The stdlib `.py` documents of the validation split, in a fixed hashed order."""
  docs = [d for d in corpus.stdlib_documents()
          if d.source == "stdlib" and corpus.is_validation(d.id, validation_fraction)]
  return tuple(sorted(docs, key=lambda d: _key(SEED, d.id)))


def _length_matched(rng: random.Random, pool: list[str], target: str, exclude, k: int = 3):
  """k distinct strings of `pool` (sorted by (len, text); repeats kept, so common strings
  are drawn as often as they occur) within about 10% of the length of `target`, none in
  `exclude`: a model that only counts tokens (an untrained one) cannot tell the answer by
  its length."""
  lengths = [len(p) for p in pool]
  tol = max(2, len(target) // 10)
  while True:
    lo = bisect.bisect_left(lengths, len(target) - tol)
    hi = bisect.bisect_right(lengths, len(target) + tol)
    ok = sorted({pool[j] for j in range(lo, hi)} - set(exclude) - {target})
    if len(ok) >= 4 * k or (lo == 0 and hi == len(pool)):
      break
    tol *= 2
  out: list[str] = []
  while len(out) < k:
    cand = pool[rng.randrange(lo, hi)]
    if cand not in exclude and cand != target and cand not in out:
      out.append(cand)
  return out


def _good_line(line: str) -> bool:
  s = line.strip()
  return _LINE_CHARS[0] <= len(s) <= _LINE_CHARS[1] and not s.startswith("#")


def next_line_records(docs: Sequence[corpus.Document], limit: int = NEXT_LINE_ITEMS) -> list[dict]:
  pool: list[str] = []  # every answer-like line, stripped (the distractors' population)
  sites = []  # (doc index, line index)
  for k, d in enumerate(docs):
    lines = d.text.splitlines()
    for i, line in enumerate(lines):
      if _good_line(line):
        pool.append(line.strip())
        ctx = lines[max(0, i - _CONTEXT_LINES):i]
        if i >= 3 and sum(bool(c.strip()) for c in ctx) >= 3:
          sites.append((k, i))
  rng = random.Random(SEED)
  per_doc: dict[int, list[int]] = {}
  for k, i in sites:
    per_doc.setdefault(k, []).append(i)
  chosen = []
  for k in sorted(per_doc):
    idx = per_doc[k]
    chosen += [(k, i) for i in sorted(rng.sample(idx, min(_PER_DOC, len(idx))))]
  rng.shuffle(chosen)
  lines_of = {k: docs[k].text.splitlines() for k in per_doc}
  pool.sort(key=lambda x: (len(x), x))
  out = []
  for k, i in chosen[:limit]:
    lines = lines_of[k]
    ctx = lines[max(0, i - _CONTEXT_LINES):i]
    while sum(len(c) + 1 for c in ctx) > _MAX_CONTEXT_CHARS and len(ctx) > 1:
      ctx = ctx[1:]
    answer = lines[i]
    indent = answer[:len(answer) - len(answer.lstrip())]
    own = {s.strip() for s in lines}  # distractors come from other files
    # Distractors take the answer's indentation: the choice is about the code, not the
    # whitespace (and an untrained model cannot prefer the answer by its token count).
    distractors = [indent + d for d in _length_matched(rng, pool, answer.strip(), own)]
    label = rng.randrange(4)
    choices = distractors[:label] + [answer] + distractors[label:]
    out.append({"context": "\n".join(ctx) + "\n", "choices": [c + "\n" for c in choices],
                "label": label})
  return out


def _documented_functions(text: str) -> list[tuple[str, str]]:
  """(docstring first paragraph, name) of the public documented functions of a source."""
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return []
  out = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
      doc = ast.get_docstring(node, clean=False)
      para = inspect.cleandoc(doc).split("\n\n", 1)[0].strip() if doc else ""
      if _DOC_CHARS[0] <= len(para) <= _DOC_CHARS[1]:
        out.append((para, node.name))
  return out


def _name_prompt(para: str) -> str:
  # No trailing space: the tokenizer attaches spaces to the word after them, so a prompt
  # ending in "def " would ask the model for an unusual split ("def", " ", "name").
  return "".join(f"# {line}".rstrip() + "\n" for line in para.splitlines()) + "def"


def _functions(docs: Sequence[corpus.Document]) -> list[tuple[str, str]]:
  seen: dict[tuple[str, str], None] = {}
  for d in docs:
    if not any(p in d.id for p in _TEST_PARTS):
      for f in _documented_functions(d.text):
        seen.setdefault(f, None)
  funcs = list(seen)
  random.Random(SEED).shuffle(funcs)
  return funcs


def docstring_name_records(docs, limit: int = NAME_ITEMS) -> list[dict]:
  return [{"prompt": _name_prompt(para), "answer": name, "stop": ["(", "\n"]}
          for para, name in _functions(docs)[:limit]]


def docstring_name_mc_records(docs, limit: int = NAME_ITEMS) -> list[dict]:
  funcs = _functions(docs)
  names = sorted(dict.fromkeys(name for _, name in funcs), key=lambda x: (len(x), x))
  rng = random.Random(SEED + 1)
  out = []
  for para, name in funcs[:limit]:
    distractors = _length_matched(rng, names, name, {name})
    label = rng.randrange(4)
    choices = distractors[:label] + [name] + distractors[label:]
    out.append({"context": _name_prompt(para), "choices": [f" {c}(" for c in choices],
                "label": label})
  return out


SHIPPED = {
    "next_line": (MC, next_line_records),
    "docstring_name": (GEN, docstring_name_records),
    "docstring_name_mc": (MC, docstring_name_mc_records),
}


def shipped_task(name: str, validation_fraction: float) -> Task:
  if name not in SHIPPED:
    raise ValueError(f"unknown task {name!r}; shipped tasks are {', '.join(SHIPPED)} "
                     "(or give a path to a .jsonl file)")
  kind, make = SHIPPED[name]
  records = [parse_record(r) for r in make(held_out_sources(validation_fraction))]
  assert all(r is not None and r[0] == kind for r in records), name
  return Task(name, kind, [r[1] for r in records])


def load_task(spec: str, validation_fraction: float) -> Task:
  """A shipped task by name, or a JSONL task file by path."""
  if spec in SHIPPED:
    return shipped_task(spec, validation_fraction)
  if spec.endswith(".jsonl") or os.sep in spec or pathlib.Path(spec).exists():
    return read_task_file(spec)
  return shipped_task(spec, validation_fraction)  # raises, listing the names
