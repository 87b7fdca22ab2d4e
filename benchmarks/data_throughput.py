"""Throughput of the data stages on the embedded stdlib corpus; prints one JSON object.

    python benchmarks/data_throughput.py [--max-docs N] [--processes P] [--loader-batches B]
    python benchmarks/data_throughput.py --curve [--seeds 5]    # dedup precision/recall sweep

- clean_docs_per_s: normalize + heuristic filters (pass A without langid/PII).
- dedup_docs_per_s: exact hash + MinHash signatures + LSH clustering (the shipped defaults).
- minhash: lmx's numpy MinHash next to `datasketch` (MinHash + MinHashLSH) on the same
  documents, the same shingle sets and the same num_perm / bands x rows: documents/s of each
  (text -> signature), and whether the two find the same candidate pairs up to sampling error
  (see `_vs_datasketch`). Skipped, with the reason, if datasketch is not installed.
- loader_tokens_per_s: batches/s * tokens per batch of `lmx.data.pipeline.make_dataset`
  (skipped, with the reason, if the pipeline or tokenizer cannot be built). Compare it with
  the trainer's tokens/s from `lmx train` logs: the loader must be faster.
- --curve: pair precision/recall of near-duplicate detection on the planted sets of
  tests/test_dedup_multilingual.py (English prose, Python code, Chinese, mixed markdown,
  templated English; ~5% character edits) for each shingle kind/size, threshold and num_perm,
  plus how many stdlib documents each setting drops as near-duplicates (real code, where
  distinct modules can look alike). docs/data.md has the table and the choice of defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

import numpy as np


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--max-docs", type=int, default=0, help="0 = the whole corpus")
  ap.add_argument("--processes", type=int, default=1, help="MinHash signature processes")
  ap.add_argument("--loader-batches", type=int, default=50, help="0 = skip the loader")
  ap.add_argument("--curve", action="store_true", help="dedup precision/recall sweep instead")
  ap.add_argument("--seeds", type=int, default=5, help="--curve: planted sets per language")
  args = ap.parse_args()
  if args.curve:
    print(json.dumps(dedup_curve(args.seeds)))
    return

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

  cfg = dedup.DedupConfig(processes=args.processes)
  t0 = time.perf_counter()
  dd = dedup.Deduplicator(cfg)
  for doc_id, text in kept:
    dd.add(doc_id, text)
  res = dd.finalize()
  dt = time.perf_counter() - t0
  out.update(dedup_docs_per_s=round(len(kept) / dt, 1), dedup_removed=len(res.drop),
             dedup_clusters=len(res.clusters), processes=args.processes)
  out["minhash"] = _vs_datasketch([t for _, t in kept], cfg)
  out.update(_loader(args.loader_batches))
  print(json.dumps(out))


# ---------------------------------------------------------------- lmx vs datasketch

def _vs_datasketch(texts: list[str], cfg) -> dict:
  """Both libraries on the same documents: lmx text -> `shingle_hashes` -> `MinHasher`;
  datasketch text -> the same n-grams as UTF-8 strings -> `MinHash.update_batch` (its SHA-1
  input hash, then affine permutations), and `MinHashLSH(params=(bands, rows))` for the
  candidates. Different random functions, so candidate sets agree only up to sampling error:
  for a pair of exact Jaccard s each library proposes it with probability
  p = 1 - (1 - s^r)^b independently, so among pairs that either proposes we expect
  sum 2p(1-p) / (1 - (1-p)^2) to be proposed by exactly one.
  """
  try:
    import datasketch
  except ImportError as e:
    return {"skipped": f"{type(e).__name__}: {e}"}
  from lmx.data import dedup

  kind = "char" if cfg.shingle == "auto" else cfg.shingle
  if kind != "char":
    return {"skipped": f"the comparison builds character n-grams; shingle is {cfg.shingle!r}"}
  n, perm = cfg.shingle_size, cfg.num_perm
  bands, rows = cfg.lsh_shape()
  texts = [t for t in texts if len(dedup._codepoints(t)) >= n]  # both need >= 1 shingle
  res = {"docs": len(texts), "num_perm": perm, "bands": bands, "rows": rows,
         "shingle": f"{kind}{n}", "datasketch_version": datasketch.__version__}

  # Wall and CPU seconds: both libraries run single-threaded here, so CPU time is the fair
  # number on a shared machine.
  w0, c0 = time.perf_counter(), time.process_time()
  mh = dedup.MinHasher(perm, cfg.seed)
  ours = np.stack([mh.signature(dedup.shingle_hashes(t, kind, n)) for t in texts])  # (N, P)
  w_ours, c_ours = time.perf_counter() - w0, time.process_time() - c0

  def grams(t: str) -> set[bytes]:  # the strings lmx hashes: collapsed, lowercased
    s = dedup._SPACE_RE.sub(" ", t).strip().lower()
    return {s[i:i + n].encode("utf-8", "replace") for i in range(len(s) - n + 1)}

  w0, c0 = time.perf_counter(), time.process_time()
  shingles = [grams(t) for t in texts]
  c1 = time.process_time()
  theirs = datasketch.MinHash.bulk(shingles, num_perm=perm, seed=1)
  w2, c2 = time.perf_counter(), time.process_time()
  per_s = lambda sec: round(len(texts) / max(sec, 1e-9), 1)
  res["lmx"] = {"seconds": round(w_ours, 2), "cpu_seconds": round(c_ours, 2),
                "docs_per_s": per_s(w_ours), "docs_per_cpu_s": per_s(c_ours)}
  res["datasketch"] = {"seconds": round(w2 - w0, 2), "cpu_seconds": round(c2 - c0, 2),
                       "docs_per_s": per_s(w2 - w0), "docs_per_cpu_s": per_s(c2 - c0),
                       "minhash_only_docs_per_cpu_s": per_s(c2 - c1)}

  t0 = time.perf_counter()
  ours_c = set(dedup.lsh_pairs(ours, cfg.threshold, bands, rows, verify=False))
  res["lmx"]["lsh_seconds"] = round(time.perf_counter() - t0, 2)
  t0 = time.perf_counter()
  lsh = datasketch.MinHashLSH(num_perm=perm, params=(bands, rows))
  for i, m in enumerate(theirs):
    lsh.insert(i, m)
  theirs_c = {(min(i, j), max(i, j)) for i, m in enumerate(theirs) for j in lsh.query(m) if j != i}
  res["datasketch"]["lsh_seconds"] = round(time.perf_counter() - t0, 2)

  union = ours_c | theirs_c
  expected = 0.0
  only = []
  for i, j in union:
    s = len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j])
    p = 1.0 - (1.0 - s**rows) ** bands
    expected += 2 * p * (1 - p) / max(1e-12, 1 - (1 - p) ** 2)
    if ((i, j) in ours_c) != ((i, j) in theirs_c):
      only.append(s)
  res["candidates"] = {"lmx": len(ours_c), "datasketch": len(theirs_c),
                       "both": len(ours_c & theirs_c), "in_one_only": len(only),
                       "in_one_only_expected": round(expected, 1),
                       "in_one_only_jaccard_range": [round(min(only), 3), round(max(only), 3)]
                       if only else None}
  ver = lambda pairs, sim: {p for p in pairs if sim(*p) >= cfg.threshold}
  ours_v = ver(ours_c, lambda i, j: float(np.mean(ours[i] == ours[j])))
  theirs_v = ver(theirs_c, lambda i, j: theirs[i].jaccard(theirs[j]))
  # Same shingles and the same estimator: on the pairs both keep, the two Jaccard estimates
  # differ only by sampling noise (mean difference within a few standard errors of 0). One
  # pair per document: pairs inside one big cluster (52 stdlib codecs) share their errors.
  used: set[int] = set()
  diff = []
  for i, j in sorted(ours_v & theirs_v):
    if i not in used and j not in used:
      used |= {i, j}
      diff.append(theirs[i].jaccard(theirs[j]) - float(np.mean(ours[i] == ours[j])))
  res["verified"] = {"lmx": len(ours_v), "datasketch": len(theirs_v),
                     "both": len(ours_v & theirs_v),
                     "estimate_diff_pairs": len(diff),
                     "estimate_diff_mean": round(float(np.mean(diff)), 4) if diff else None,
                     "estimate_diff_se": round(float(np.std(diff) / np.sqrt(len(diff))), 4)
                     if len(diff) > 1 else None}
  return res


# ---------------------------------------------------------------- precision/recall curve

def _planted_module():
  """tests/test_dedup_multilingual.py holds the planted-set builders the tests assert on."""
  path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "test_dedup_multilingual.py"
  spec = importlib.util.spec_from_file_location("planted", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _cluster_pairs(ids, exact_of, sigs, threshold, bands, rows):
  """The Deduplicator's clustering on precomputed signatures (one row per unique text)."""
  from lmx.data import dedup
  uf = dedup.UnionFind(len(ids))
  for i, first in enumerate(exact_of):
    uf.union(i, first)
  uniq = sorted(set(exact_of))
  for a, b in dedup.lsh_pairs(sigs, threshold, bands, rows):
    uf.union(uniq[a], uniq[b])
  groups: dict[int, list[str]] = {}
  for i in range(len(ids)):
    groups.setdefault(uf.find(i), []).append(ids[i])
  return dedup.DedupResult({}, [g for g in groups.values() if len(g) > 1], bands, rows)


def dedup_curve(n_seeds: int) -> dict:
  from lmx.data import dedup
  from lmx.data.corpus import stdlib_documents

  planted = _planted_module()
  sets = {}
  for lang in planted.BUILDERS:
    for seed in range(n_seeds):
      docs, groups = planted.planted_set(lang, seed)
      first: dict[bytes, int] = {}
      exact_of = [first.setdefault(dedup.exact_key(t), i) for i, (_, t) in enumerate(docs)]
      sets[lang, seed] = ([d for d, _ in docs], [t for _, t in docs], exact_of, groups)
  seen, stdlib = set(), []  # what reaches dedup in `lmx data prepare`, roughly: >= 100 chars
  for d in stdlib_documents():
    k = dedup.exact_key(d.text)
    if len(d.text) >= 100 and k not in seen:
      seen.add(k)
      stdlib.append(d.text)

  grid = ([("word", 5, t, 128) for t in (0.5, 0.7)] + [("byte", 5, t, 128) for t in (0.5, 0.7)]
          + [("char", n, t, p) for p in (128, 256) for n in (4, 5, 6, 7, 8)
             for t in (0.35, 0.4, 0.45, 0.5, 0.55)])
  rows_out = []
  sig_cache: dict = {}
  for kind, n, t, perm in grid:
    key = (kind, n, perm)
    if key not in sig_cache:
      mh = dedup.MinHasher(perm, 0)
      sig = lambda texts: np.stack([mh.signature(dedup.shingle_hashes(x, kind, n)) for x in texts])
      sig_cache = {key: (
          {k: sig([v[1][i] for i in sorted(set(v[2]))]) for k, v in sets.items()},
          sig(stdlib))}
    planted_sigs, stdlib_sigs = sig_cache[key]
    bands, rows = dedup.choose_bands(t, perm)
    row = {"shingle": kind, "size": n, "threshold": t, "num_perm": perm, "bands": bands,
           "rows": rows}
    for lang in planted.BUILDERS:
      ps, rs = [], []
      for seed in range(n_seeds):
        ids, _, exact_of, groups = sets[lang, seed]
        res = _cluster_pairs(ids, exact_of, planted_sigs[lang, seed], t, bands, rows)
        p, r = planted.pair_scores(res, groups)
        ps.append(p)
        rs.append(r)
      row[lang] = {"precision": round(float(np.mean(ps)), 3), "precision_min": min(ps),
                   "recall": round(float(np.mean(rs)), 3), "recall_min": min(rs)}
    res = _cluster_pairs(list(range(len(stdlib))), list(range(len(stdlib))), stdlib_sigs, t,
                         bands, rows)
    row["stdlib_near_dropped"] = sum(len(c) - 1 for c in res.clusters)
    rows_out.append(row)
  return {"seeds": n_seeds, "planted_docs_per_set": len(sets["english", 0][0]),
          "stdlib_docs": len(stdlib), "curve": rows_out}


def _loader(n_batches: int) -> dict:
  if n_batches <= 0:
    return {}
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
