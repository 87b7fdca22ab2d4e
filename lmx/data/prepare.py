"""`lmx data prepare`: clean, filter, scrub, deduplicate a corpus and report what was removed.

    lmx data prepare --config=experiments/data_prepare.py [--config.prepare.output_dir=DIR]

Passes (each streams documents; only per-document hashes/signatures stay in memory):
  A  read (lmx.data.corpus) -> normalize (NFC, control chars, HTML) -> language id ->
     heuristic filters -> PII scrub -> work/stage1.jsonl; count boilerplate lines (sketch)
  B  stage1 -> strip boilerplate lines -> exact hash + MinHash signature -> work/stage2.jsonl
  C  dedup clusters (union-find); optional quality scores on the survivors -> threshold
  D  stage2 minus dropped -> OUT/shard-NNNNN.jsonl ({"id","text","source","split","lang"})
Reports: OUT/reports/<stage>.json, OUT/summary.json (with the output's sha256; re-running on
the same input gives the same hash) and a table on the terminal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
import sys
import time
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

from lmx.data import boilerplate as bp
from lmx.data import clean, dedup, langid, pii, quality
from lmx.data.pii import PiiConfig  # NOTE: inside PrepareConfig, `pii` is the bool field


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  output_dir: str = "data/prepared"
  shard_docs: int = 2000  # documents per output JSONL shard.
  strip_html: bool = True  # strip markup from documents that look like HTML.
  pii: bool = False  # scrub e-mails, phone numbers and IPs.
  pii_rules: PiiConfig = PiiConfig()  # phone regions, national IDs.
  max_examples: int = 3  # removed examples kept per reason in each report.
  filters: clean.FilterConfig = clean.FilterConfig()
  boilerplate: bp.BoilerplateConfig = bp.BoilerplateConfig()
  langid: langid.LangIdConfig = langid.LangIdConfig()
  dedup: dedup.DedupConfig = dedup.DedupConfig()
  quality: quality.QualityConfig = quality.QualityConfig()


_SUBSECTIONS = {"filters": clean.FilterConfig, "boilerplate": bp.BoilerplateConfig,
                "langid": langid.LangIdConfig, "dedup": dedup.DedupConfig,
                "quality": quality.QualityConfig, "pii_rules": PiiConfig}
# Reader counters (lmx.data.corpus.CorpusStats) of input that never became a document, with
# their names on the terminal; invalid UTF-8 is repaired and kept, so it is shown apart.
_READ_SKIPPED = (("bad_json_lines", "bad_json"), ("missing_field_lines", "missing_text"),
                 ("binary_files", "binary"), ("empty_docs", "empty"))


def _build(cls, values: dict[str, Any], where: str):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  out = {}
  for k, v in values.items():
    if k not in fields:
      raise ValueError(f"Invalid config: `{where}.{k}` is not a known key; valid keys are "
                       f"{', '.join(sorted(fields))}.")
    if k in _SUBSECTIONS and cls is PrepareConfig:
      v = _build(_SUBSECTIONS[k], dict(v or {}), f"{where}.{k}")
    elif isinstance(v, list):
      v = tuple(v)
    out[k] = v
  obj = cls(**out)
  return obj.validate() if hasattr(obj, "validate") else obj


def prepare_config(values: dict[str, Any] | None) -> PrepareConfig:
  """Validated PrepareConfig from the experiment's `prepare` dict (raises ConfigError)."""
  from lmx.config import ConfigError
  try:
    cfg = _build(PrepareConfig, dict(values or {}), "prepare")
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from None
  if not isinstance(cfg.shard_docs, int) or cfg.shard_docs < 1:
    raise ConfigError(f"Invalid config: `prepare.shard_docs` is {cfg.shard_docs!r}; it must be "
                      "a positive integer.")
  return cfg


def _read_jsonl(path: pathlib.Path) -> Iterator[dict]:
  with open(path, encoding="utf-8") as f:
    for line in f:
      yield json.loads(line)


def _write(f, rec: dict) -> None:
  f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def run_prepare(pcfg: PrepareConfig, documents: Iterable, validation_fraction: float = 0.02,
                read_stats: Callable[[], dict] | None = None, verbose: bool = True) -> dict[str, Any]:
  """Run every stage over `documents` (objects with .id/.text/.source, or (id, text) tuples).

  Returns the summary dict that is also written to OUT/summary.json.
  """
  from lmx.data.corpus import is_validation

  out = pathlib.Path(pcfg.output_dir)
  work = out / ".work"
  if out.exists():  # NOTE: stale shards from an earlier run would change the output hash.
    for p in out.glob("shard-*.jsonl"):
      p.unlink()
  shutil.rmtree(work, ignore_errors=True)
  (out / "reports").mkdir(parents=True, exist_ok=True)
  work.mkdir(parents=True)
  mk = lambda name: clean.StageReport(name, pcfg.max_examples)
  rep = {k: mk(k) for k in ("normalize", "langid", "filters", "pii", "boilerplate", "dedup",
                            "quality")}
  lang_counts: Counter[str] = Counter()
  counter = bp.BoilerplateCounter(pcfg.boilerplate)
  t_start = time.perf_counter()

  # ---- pass A
  n_read = 0
  with open(work / "stage1.jsonl", "w", encoding="utf-8") as f1:
    for doc in documents:
      doc_id, text, source = ((doc.id, doc.text, doc.source) if hasattr(doc, "id")
                              else (doc[0], doc[1], doc[2] if len(doc) > 2 else ""))
      n_read += 1
      t0 = time.perf_counter()
      r = rep["normalize"]
      r.docs_in += 1
      if isinstance(text, bytes):
        text, bad = clean.decode_utf8(text)
        if bad:
          r.count("invalid_utf8_chars_replaced", bad)
      if not isinstance(text, str):
        r.count("not_text", 1, doc_id, repr(text))
        continue
      text, n_ctrl = clean.normalize_text(text)
      if n_ctrl:
        r.count("control_chars_removed", n_ctrl)
      if "\ufffd" in text:
        r.count("docs_with_replacement_chars", 1, doc_id, text)
      if pcfg.strip_html and clean.looks_like_html(text):
        text = clean.strip_html(text)
        r.count("html_stripped", 1, doc_id, text)
      if not text.strip():
        r.count("empty", 1, doc_id, text)
        continue
      r.docs_out += 1
      t1 = time.perf_counter()
      r.seconds += t1 - t0

      lang = "und"
      if pcfg.langid.enabled:
        r = rep["langid"]
        r.docs_in += 1
        lang, _ = langid.identify(text, doc_id, pcfg.langid)
        lang_counts[lang] += 1
        t2 = time.perf_counter()
        r.seconds += t2 - t1
        t1 = t2
        if not langid.keep_language(lang, pcfg.langid):
          r.count(f"dropped_{lang}", 1, doc_id, text)
          continue
        r.docs_out += 1

      r = rep["filters"]
      r.docs_in += 1
      reason = clean.heuristic_reason(text, pcfg.filters)
      t2 = time.perf_counter()
      r.seconds += t2 - t1
      if reason is not None:
        r.count(reason, 1, doc_id, text)
        continue
      r.docs_out += 1

      if pcfg.pii:
        r = rep["pii"]
        r.docs_in += 1
        r.docs_out += 1
        kinds: Counter[str] = Counter()
        scrubbed = pii.scrub_pii(text, kinds, pcfg.pii_rules)
        for k, v in kinds.items():
          r.count(k, v)
        if kinds:
          r.count("docs_scrubbed", 1, doc_id, scrubbed)
        text = scrubbed
        r.seconds += time.perf_counter() - t2
        t2 = time.perf_counter()
      if pcfg.boilerplate.enabled:
        counter.add(text)
        rep["boilerplate"].seconds += time.perf_counter() - t2
      _write(f1, {"id": doc_id, "text": text, "source": source, "lang": lang})

  # ---- pass B
  deduper = dedup.Deduplicator(pcfg.dedup)
  removed_lines: Counter[str] = Counter()
  rb, rd = rep["boilerplate"], rep["dedup"]
  is_val: dict[str, bool] = {}
  with open(work / "stage2.jsonl", "w", encoding="utf-8") as f2:
    for rec in _read_jsonl(work / "stage1.jsonl"):
      t0 = time.perf_counter()
      rb.docs_in += 1
      if pcfg.boilerplate.enabled:
        new, lines = bp.strip_boilerplate(rec["text"], counter)
        if lines:
          rb.count("lines_removed", len(lines))
          rb.count("docs_changed", 1, rec["id"], "\n".join(lines))
          for ln in lines:
            if len(removed_lines) < 100_000 or ln.strip() in removed_lines:
              removed_lines[ln.strip()] += 1
          if len(new.strip()) < pcfg.filters.min_chars:
            rb.count("docs_dropped_too_short_after", 1, rec["id"], new)
            rb.seconds += time.perf_counter() - t0
            continue
          rec["text"] = new
      rb.docs_out += 1
      t1 = time.perf_counter()
      rb.seconds += t1 - t0
      rd.docs_in += 1
      val = is_validation(rec["id"], validation_fraction)
      is_val[rec["id"]] = val
      if pcfg.dedup.exact or pcfg.dedup.near:
        deduper.add(rec["id"], rec["text"], val)
      rd.seconds += time.perf_counter() - t1
      _write(f2, rec)
  rb.extra["threshold_docs"] = counter.threshold
  rb.extra["top_removed_lines"] = [{"line": k, "docs": v} for k, v in
                                   sorted(removed_lines.items(), key=lambda x: (-x[1], x[0]))[:15]]

  # ---- pass C
  t0 = time.perf_counter()
  result = deduper.finalize()
  rd.seconds += time.perf_counter() - t0
  drops = dict(result.drop)
  for reason in sorted(set(drops.values())):
    rd.count(reason, sum(1 for v in drops.values() if v == reason))
  rd.docs_out = rd.docs_in - len(drops)
  rd.extra.update({"clusters": len(result.clusters), "bands": result.bands,
                   "rows": result.rows, "threshold": pcfg.dedup.threshold,
                   "shingle": f"{pcfg.dedup.shingle}{pcfg.dedup.shingle_size}",
                   "num_perm": pcfg.dedup.num_perm,
                   "largest_clusters": result.clusters[:10],
                   "cross_split_removed": sum(v == "cross_split_duplicate"
                                              for v in drops.values())})
  for cluster in result.clusters[:pcfg.max_examples]:
    rd.examples.setdefault("clusters", []).append({"id": cluster[0], "text": ", ".join(cluster)})

  if pcfg.quality.enabled:
    _quality_pass(pcfg, work / "stage2.jsonl", drops, rep["quality"], verbose)

  # ---- pass D
  shards, digest, n_out = [], hashlib.sha256(), 0
  f = None
  for rec in _read_jsonl(work / "stage2.jsonl"):
    if rec["id"] in drops:
      continue
    if n_out % pcfg.shard_docs == 0:
      if f:
        f.close()
      shards.append(out / f"shard-{len(shards):05d}.jsonl")
      f = open(shards[-1], "w", encoding="utf-8")
    rec["split"] = "validation" if is_val[rec["id"]] else "train"
    line = json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n"
    f.write(line)
    digest.update(line.encode())
    n_out += 1
  if f:
    f.close()
  shutil.rmtree(work, ignore_errors=True)
  total_s = time.perf_counter() - t_start

  rep["langid"].extra["languages"] = dict(sorted(lang_counts.items(), key=lambda x: -x[1]))
  read = {"stage": "read", "docs_out": n_read, **(read_stats() if read_stats else {})}
  if read_stats:
    read["skipped"] = {name: read.get(key, 0) for key, name in _READ_SKIPPED}
    read["docs_in"] = n_read + sum(read["skipped"].values())
  reports = {"read": read}
  for name, r in rep.items():
    if r.docs_in:
      reports[name] = r.to_json()
  for name, body in reports.items():
    (out / "reports" / f"{name}.json").write_text(json.dumps(body, indent=2, ensure_ascii=False))
  summary = {"docs_in": n_read, "docs_out": n_out, "shards": [p.name for p in shards],
             "output_sha256": digest.hexdigest(), "seconds": round(total_s, 2),
             "docs_per_s": round(n_read / max(total_s, 1e-9), 1),
             "stages": {k: {kk: v.get(kk) for kk in ("docs_in", "docs_out", "counts")}
                        for k, v in reports.items()}}
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  if verbose:
    print(format_table(reports, summary))
  return summary


def _reference_texts(q, stage2: pathlib.Path, survivors: list[str]) -> list[str]:
  """Reference documents (first `max_chars` each): `reference_docs` evenly spaced survivors,
  or a hash-sample of the `reference` corpus ('stdlib' or a path)."""
  if not q.reference:
    step = max(1, len(survivors) // max(1, q.reference_docs))
    ref_ids = set(survivors[::step])
    return [rec["text"][:q.max_chars] for rec in _read_jsonl(stage2) if rec["id"] in ref_ids]
  from lmx.config import DataConfig
  from lmx.data.corpus import iter_documents
  try:
    docs = iter_documents(DataConfig(corpus=q.reference))
  except FileNotFoundError as e:
    raise ValueError(f"Invalid config: `prepare.quality.reference`: {e}.") from None
  return quality.reference_sample(((d.id, d.text[:q.max_chars]) for d in docs),
                                  q.reference_docs)


def _quality_pass(pcfg, stage2: pathlib.Path, drops: dict[str, str], r, verbose: bool) -> None:
  """Score the survivors, drop the worst `drop_fraction` (adds to `drops`)."""
  q = pcfg.quality
  t0 = time.perf_counter()
  survivors = [rec["id"] for rec in _read_jsonl(stage2) if rec["id"] not in drops]
  ref_texts = _reference_texts(q, stage2, survivors)
  info: dict[str, Any] = {}
  if q.scorer == "lmx_model":
    model, tok, info = quality.train_reference_model(ref_texts, q, stage2.parent / "quality")
    scorer = quality.lmx_model_scorer(model, tok, q.seq_len, q.batch_size)
  else:
    scorer = quality.CharNgramScorer(q.order).fit(ref_texts)
  t_fit = time.perf_counter()
  ids, texts = [], []
  for rec in _read_jsonl(stage2):
    if rec["id"] not in drops:
      ids.append(rec["id"])
      texts.append(rec["text"][:q.max_chars])
  scores = []
  for i in range(0, len(texts), 256):  # bounded memory; the lmx scorer batches inside
    scores += scorer(texts[i:i + 256])
  thr = quality.quality_threshold(scores, q.drop_fraction)
  r.docs_in = len(ids)
  worst = sorted(zip(scores, ids), reverse=True)
  for s, i in worst:
    if s > thr:
      drops[i] = "low_quality"
      r.count("low_quality", 1, i, f"{s:.3f} bits/byte")
  r.docs_out = r.docs_in - r.counts["low_quality"]
  r.extra.update({"threshold_bits_per_byte": thr, "scorer": q.scorer,
                  "reference": q.reference or "input", "reference_docs": len(ref_texts),
                  "median_bits_per_byte": float(sorted(scores)[len(scores) // 2]) if scores
                  else None,
                  "fit_seconds": round(t_fit - t0, 2),
                  "score_seconds": round(time.perf_counter() - t_fit, 2)})
  if info:  # the run folder lives under .work/, which is deleted at the end
    r.extra["model"] = {k: v for k, v in info.items() if k != "checkpoint"}
  r.seconds = time.perf_counter() - t0
  if verbose:
    size = (f", model d{info['d_model']}x{info['n_layers']} ({info['params']} params, "
            f"{info['reference_tokens']} reference tokens)" if info else "")
    print(f"quality: {q.scorer}{size}; threshold {thr:.3f} bits/byte, dropped "
          f"{r.counts['low_quality']} of {len(ids)}", file=sys.stderr)


def format_table(reports: dict[str, dict], summary: dict) -> str:
  rows = [("stage", "in", "out", "removed", "details")]
  for name, body in reports.items():
    counts = body.get("counts") or {k: v for k, v in body.items()
                                    if isinstance(v, int) and k not in ("docs_out",)}
    detail = ", ".join(f"{k}={v}" for k, v in list(counts.items())[:5] if v)
    if name == "read" and "skipped" in body:
      # Every kind, zeros included: "nothing was skipped" is worth seeing too.
      detail = ("skipped " + ", ".join(f"{k}={v}" for k, v in body["skipped"].items())
                + f"; invalid_utf8={body.get('invalid_utf8_docs', 0)} (repaired, kept)"
                + f"; files={body.get('files', 0)}, mb={body.get('bytes', 0) / 1e6:.1f}")
    if name == "dedup":
      detail += f", clusters={body.get('clusters')}"
    if name == "langid":
      detail = ", ".join(f"{k}={v}" for k, v in list(body["languages"].items())[:5])
    din, dout = body.get("docs_in", ""), body.get("docs_out", "")
    removed = din - dout if isinstance(din, int) and isinstance(dout, int) else ""
    rows.append((name, str(din), str(dout), str(removed), detail))
  w = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ["  ".join(r[i].ljust(w[i]) for i in range(4)) + "  " + r[4] for r in rows]
  lines.insert(1, "-" * (sum(w) + 8 + 40))
  lines.append(f"{summary['docs_in']} -> {summary['docs_out']} documents in "
               f"{summary['seconds']} s ({summary['docs_per_s']} docs/s); output sha256 "
               f"{summary['output_sha256'][:16]}...")
  return "\n".join(lines)


def cli_main(argv: list[str]) -> int:
  """`lmx data prepare --config=...`."""
  from lmx.config import ConfigError, from_config_dict
  from lmx.data.corpus import CorpusStats, iter_documents
  from lmx.experiment import load_config_dict

  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  if argv[0] != "prepare":
    print(f"lmx data: unknown subcommand {argv[0]!r}; expected 'prepare'", file=sys.stderr)
    return 2
  cd = load_config_dict(argv[1:])
  d = cd.to_dict()
  pcfg = prepare_config(d.pop("prepare", None))
  exp = from_config_dict(d)
  stats = CorpusStats()
  run_prepare(pcfg, iter_documents(exp.data, stats), exp.data.validation_fraction,
              read_stats=stats.as_dict)
  return 0
