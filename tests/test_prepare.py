"""`lmx data prepare` end to end: reports, planted dups/PII, malformed input, determinism."""

import json

import numpy as np
import pytest

from lmx.data import corpus, prepare, quality

WORDS = ("river mountain village teacher garden window morning story music letter bridge "
         "forest market winter summer doctor kitchen harbor island lantern meadow candle "
         "journey silver orchard valley thunder painter sailor stone").split()


def _prose(rng, n_sent=12):
  sents = []
  for _ in range(n_sent):
    w = list(rng.choice(WORDS, int(rng.integers(6, 12))))
    sents.append("The " + " ".join(w) + ".")
  return "\n".join(" ".join(sents[i:i + 3]) for i in range(0, len(sents), 3)) + "\n"


def _corpus(seed=0):
  rng = np.random.default_rng(seed)
  header = "# Copyright (C) 2001-2006 Example Foundation. All rights reserved.\n"
  docs = [(f"d{i:03d}.txt", header + _prose(rng)) for i in range(40)]
  docs.append(("e000.txt", docs[3][1]))  # exact copy
  w = docs[5][1].split(" ")
  w[10] = "changed"
  docs.append(("n000.txt", " ".join(w)))  # near copy
  docs.append(("p000.txt", _prose(rng) + "Write to jane.doe@example.com or 192.168.0.7.\n"))
  docs.append(("s000.txt", "tiny"))
  return docs


def _cfg(tmp_path, name="out", **over):
  values = {"output_dir": str(tmp_path / name), "pii": True,
            "filters": {"min_chars": 30, "max_top_ngram_fraction": 1.0, "max_mean_line_chars": 500.0,
                        "max_dup_ngram_fraction": 1.0},
            "boilerplate": {"min_docs": 10, "sketch_width": 1 << 14},
            "langid": {"keep": ("en",)}}  # dedup: the shipped defaults
  values.update(over)
  return prepare.prepare_config(values)


def test_end_to_end_reports_and_output(tmp_path):
  summary = prepare.run_prepare(_cfg(tmp_path), _corpus(), verbose=False)
  out = tmp_path / "out"
  recs = [json.loads(l) for s in summary["shards"] for l in open(out / s)]
  ids = {r["id"] for r in recs}
  assert "e000.txt" not in ids and "n000.txt" not in ids and "s000.txt" not in ids
  assert not any("Copyright" in r["text"] for r in recs)
  scrubbed = next(r for r in recs if r["id"] == "p000.txt")["text"]
  assert "<EMAIL>" in scrubbed and "<IP>" in scrubbed and "@" not in scrubbed
  reports = {p.stem: json.loads(p.read_text()) for p in (out / "reports").glob("*.json")}
  assert reports["dedup"]["counts"] == {"exact_duplicate": 1, "near_duplicate": 1}
  assert reports["boilerplate"]["top_removed_lines"][0]["docs"] >= 40
  assert reports["pii"]["counts"]["email"] == 1 and reports["pii"]["counts"]["ipv4"] == 1
  assert reports["filters"]["counts"] == {"too_short_chars": 1}
  assert reports["langid"]["languages"]["en"] >= 40
  assert summary["docs_out"] == len(recs) == 41
  assert {r["split"] for r in recs} <= {"train", "validation"}


def test_pii_rules_reach_the_scrubber(tmp_path):
  rng = np.random.default_rng(5)
  text = _prose(rng) + "Beijing office 010-6552-9981, ID 11010519491231002X.\n"
  cfg = _cfg(tmp_path, "cn", langid={"enabled": False},
             pii_rules={"phone_regions": ["CN"], "national_ids": True})
  s = prepare.run_prepare(cfg, [("a.txt", text)], verbose=False)
  out = json.loads((tmp_path / "cn" / s["shards"][0]).read_text())["text"]
  assert "<PHONE>" in out and "<ID>" in out
  cfg = _cfg(tmp_path, "us", langid={"enabled": False}, pii_rules={"phone_regions": ["US"]})
  s = prepare.run_prepare(cfg, [("a.txt", text)], verbose=False)
  out = json.loads((tmp_path / "us" / s["shards"][0]).read_text())["text"]
  assert "010-6552-9981" in out and "11010519491231002X" in out


def test_rerun_is_deterministic(tmp_path):
  a = prepare.run_prepare(_cfg(tmp_path, "a"), _corpus(), verbose=False)
  b = prepare.run_prepare(_cfg(tmp_path, "b"), _corpus(), verbose=False)
  c = prepare.run_prepare(_cfg(tmp_path, "a"), _corpus(), verbose=False)  # same dir again
  assert a["output_sha256"] == b["output_sha256"] == c["output_sha256"]
  d = prepare.run_prepare(_cfg(tmp_path, "d"), _corpus(seed=1), verbose=False)
  assert d["output_sha256"] != a["output_sha256"]


def test_malformed_input_counted_not_crashing(tmp_path, capsys):
  from lmx.config import DataConfig
  src = tmp_path / "src"
  src.mkdir()
  rng = np.random.default_rng(3)
  lines = [json.dumps({"text": _prose(rng)}) for _ in range(5)]
  lines += ["{not json", json.dumps([1, 2]), json.dumps({"body": "no text field"})]
  (src / "a.jsonl").write_text("\n".join(lines) + "\n")
  (src / "empty.txt").write_text("")
  (src / "blob.txt").write_bytes(b"\x00\x01\x02binary")
  (src / "latin1.txt").write_bytes(_prose(rng).encode() + b"caf\xe9 \xff\n")
  stats = corpus.CorpusStats()
  docs = corpus.iter_documents(DataConfig(corpus=str(src)), stats)
  summary = prepare.run_prepare(_cfg(tmp_path, langid={"enabled": False}), docs,
                                read_stats=stats.as_dict, verbose=True)
  read = json.loads((tmp_path / "out" / "reports" / "read.json").read_text())
  assert read["bad_json_lines"] == 2 and read["missing_field_lines"] == 1
  assert read["empty_docs"] == 1 and read["binary_files"] == 1 and read["invalid_utf8_docs"] == 1
  assert summary["docs_in"] == 6
  # The terminal table's read row: every skipped kind, and 6 + 5 skipped records in.
  assert read["skipped"] == {"bad_json": 2, "missing_text": 1, "binary": 1, "empty": 1}
  row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("read "))
  assert row.split()[1:4] == ["11", "6", "5"]
  for kind in ("bad_json=2", "missing_text=1", "binary=1", "empty=1", "invalid_utf8=1"):
    assert kind in row
  norm = json.loads((tmp_path / "out" / "reports" / "normalize.json").read_text())
  assert norm["counts"]["docs_with_replacement_chars"] == 1
  # Bytes and non-text documents handed in directly are counted too.
  s2 = prepare.run_prepare(_cfg(tmp_path, "o2", langid={"enabled": False}),
                           [("x", b"ok \xff " + _prose(rng).encode()), ("y", None), ("z", "")],
                           verbose=False)
  norm = json.loads((tmp_path / "o2" / "reports" / "normalize.json").read_text())
  assert norm["counts"]["invalid_utf8_chars_replaced"] == 1
  assert norm["counts"]["not_text"] == 1 and norm["counts"]["empty"] == 1
  assert s2["docs_out"] == 1


def test_quality_threshold_drops_exactly_the_worst():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=100).tolist()
  thr = quality.quality_threshold(scores, 0.05)
  assert sum(s > thr for s in scores) == 5
  assert set(np.argsort(scores)[-5:]) == {i for i, s in enumerate(scores) if s > thr}
  assert quality.quality_threshold(scores, 0.0) == float("inf")


def test_char_ngram_scorer_flags_junk(tmp_path):
  rng = np.random.default_rng(1)
  docs = [(f"d{i:03d}", _prose(rng)) for i in range(57)]
  junk = ["".join(rng.choice(list("qzxj0987$%^&*QZXKV"), 600)) for _ in range(3)]
  docs += [(f"j{i}", "\n".join(j[k:k + 60] for k in range(0, 600, 60))) for i, j in enumerate(junk)]
  cfg = _cfg(tmp_path, pii=False, langid={"enabled": False},
             filters={"min_chars": 30, "min_words": 1, "max_symbol_ratio": 1.0,
               "max_top_ngram_fraction": 1.0, "max_mean_line_chars": 500.0,
               "max_dup_ngram_fraction": 1.0},
             quality={"enabled": True, "drop_fraction": 0.05, "reference_docs": 10})
  # Reference = every 6th survivor (d000, d006, ..., d054): the junk is not in it.
  prepare.run_prepare(cfg, docs, verbose=False)
  rep = json.loads((tmp_path / "out" / "reports" / "quality.json").read_text())
  dropped = {e["id"] for e in rep["examples"]["low_quality"]}
  assert rep["counts"]["low_quality"] == 3 and dropped == {"j0", "j1", "j2"}
  # The scorer itself: in-domain prose costs fewer bits per byte than the junk.
  sc = quality.CharNgramScorer(4).fit([t for _, t in docs[:40]])
  assert max(sc([t for _, t in docs[40:57]])) < min(sc([t for _, t in docs[57:]]))


def test_bad_prepare_config_names_field():
  from lmx.config import ConfigError
  with pytest.raises(ConfigError, match="prepare.dedup.bogus"):
    prepare.prepare_config({"dedup": {"bogus": 1}})
  with pytest.raises(ConfigError, match="prepare.dedup.shingle"):
    prepare.prepare_config({"dedup": {"shingle": "words"}})
  with pytest.raises(ConfigError, match="prepare.pii_rules.phone_regions"):
    prepare.prepare_config({"pii_rules": {"phone_regions": ["CN", "XX"]}})
  with pytest.raises(ConfigError, match="prepare.filters.max_symbol_ratio"):
    prepare.prepare_config({"filters": {"max_symbol_ratio": 2.0}})


def test_cli_on_a_folder(tmp_path, capsys):
  src = tmp_path / "src"
  src.mkdir()
  rng = np.random.default_rng(2)
  for i in range(5):
    (src / f"f{i}.txt").write_text(_prose(rng))
  rc = prepare.cli_main(["prepare", "--config=experiments/data_prepare.py",
                         f"--config.data.corpus={src}",
                         f"--config.prepare.output_dir={tmp_path / 'o'}",
                         "--config.prepare.quality.enabled=False",
                         "--config.prepare.filters.max_mean_line_chars=500.0"])
  assert rc == 0
  out = capsys.readouterr().out
  assert "dedup" in out and "output sha256" in out
  assert json.loads((tmp_path / "o" / "summary.json").read_text())["docs_out"] == 5
