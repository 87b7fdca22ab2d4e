"""Throughput of the data stages on the embedded stdlib corpus; prints one JSON object.

    python benchmarks/data_throughput.py [--max-docs N] [--processes P] [--loader-batches B]

- clean_docs_per_s: normalize + heuristic filters (pass A without langid/PII).
- dedup_docs_per_s: exact hash + MinHash signatures + LSH clustering (num_perm=128).
- loader_tokens_per_s: batches/s * tokens per batch of `lmx.data.pipeline.make_dataset`
  (skipped, with the reason, if the pipeline or tokenizer cannot be built). Compare it with
  the trainer's tokens/s from `lmx train` logs: the loader must be faster.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--max-docs", type=int, default=0, help="0 = the whole corpus")
  ap.add_argument("--processes", type=int, default=1, help="MinHash signature processes")
  ap.add_argument("--loader-batches", type=int, default=50)
  args = ap.parse_args()

  from lmx.data import clean, dedup
  from lmx.data.corpus import stdlib_documents

  docs = []
  for d in stdlib_documents():
    docs.append(d)
    if args.max_docs and len(docs) >= args.max_docs:
      break
  n_bytes = sum(len(d.text.encode()) for d in docs)
  out = {"docs": len(docs), "mb": round(n_bytes / 1e6, 2)}

  fcfg = clean.FilterConfig(max_mean_line_chars=160.0, max_top_ngram_fraction=0.4,
                            max_dup_ngram_fraction=0.8)
  t0 = time.perf_counter()
  kept = []
  for d in docs:
    text, _ = clean.normalize_text(d.text)
    if clean.heuristic_reason(text, fcfg) is None:
      kept.append((d.id, text))
  dt = time.perf_counter() - t0
  out.update(clean_docs_per_s=round(len(docs) / dt, 1), clean_mb_per_s=round(n_bytes / 1e6 / dt, 2))

  t0 = time.perf_counter()
  dd = dedup.Deduplicator(dedup.DedupConfig(processes=args.processes))
  for doc_id, text in kept:
    dd.add(doc_id, text)
  res = dd.finalize()
  dt = time.perf_counter() - t0
  out.update(dedup_docs_per_s=round(len(kept) / dt, 1), dedup_removed=len(res.drop),
             dedup_clusters=len(res.clusters), processes=args.processes)
  out.update(_loader(args.loader_batches))
  print(json.dumps(out))


def _loader(n_batches: int) -> dict:
  try:
    from lmx.config import base_config, from_config_dict
    from lmx.data.pipeline import make_dataset
    from lmx.data.tokenizer import load_or_train_tokenizer
    exp = from_config_dict(base_config())
    tok = load_or_train_tokenizer(exp)
    it = iter(make_dataset(exp, tok, "train"))
    next(it)  # warm-up: first batch pays for tokenizing / opening shards
    t0 = time.perf_counter()
    for _ in range(n_batches):
      batch = next(it)
    dt = time.perf_counter() - t0
    tokens = batch["inputs"].size * n_batches
    return {"loader_tokens_per_s": round(tokens / dt, 1), "loader_batches": n_batches}
  except Exception as e:  # NOTE: report, don't fail: the cleaning numbers stand on their own.
    return {"loader_tokens_per_s": None, "loader_error": f"{type(e).__name__}: {e}"[:300]}


if __name__ == "__main__":
  main()
