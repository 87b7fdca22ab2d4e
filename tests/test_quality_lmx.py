"""The lmx-model quality filter: a tiny reference model trained with the real trainer, scored
in bits/byte, ranks planted junk below held-out real text; the CLI runs it end to end."""

import base64
import dataclasses
import itertools
import json
import math
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.data import prepare, quality
from lmx.data.corpus import stdlib_documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(enabled=True, scorer="lmx_model", d_model=32, n_layers=1, vocab_size=512,
            seq_len=64, batch_size=8, steps=60, learning_rate=1e-2, max_chars=3000)


def _junk(rng: np.random.Generator, n: int) -> list[str]:
  """Random character soup, base64 blobs and repeated gibberish, `n` of each."""
  chars = np.array(list(string.ascii_letters + string.digits + string.punctuation + " \n"))
  out = []
  for _ in range(n):
    out.append("".join(rng.choice(chars, 1500)))
    out.append(base64.b64encode(rng.integers(0, 256, 1200, dtype=np.uint8).tobytes()).decode())
    word = "".join(rng.choice(list("qzxjkvwy"), int(rng.integers(4, 9))))
    out.append(" ".join([word + "".join(rng.choice(list("0123456789"), 2))
                         for _ in range(150)]))
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Reference model on a hash-sample of stdlib sources; held-out stdlib docs besides."""
  docs = [(d.id, d.text[:TINY["max_chars"]]) for d in itertools.islice(stdlib_documents(), 400)
          if len(d.text) > 500]
  ranked = quality.reference_sample(docs, len(docs))  # all of them, in hash order
  ref, held_out = ranked[:80], ranked[80:120]
  q = quality.QualityConfig(**TINY).validate()
  model, tok, info = quality.train_reference_model(ref, q, tmp_path_factory.mktemp("qref"))
  return model, tok, info, q, held_out


# The model call, jitted (one compile per window length): op by op it took most of the
# scorer test's time.
_forward = nnx.jit(lambda model, tokens: model(tokens))


def _plain_bits_per_byte(model, tok, text: str, seq_len: int) -> float:
  """One window at a time, no batching or padding: the definition, spelled out."""
  ids = [tok.bos_id] + tok.encode(text)
  nats = 0.0
  for s in range(0, len(ids) - 1, seq_len):
    w = np.asarray(ids[s:s + seq_len + 1], np.int32)
    logits = np.asarray(_forward(model, jnp.asarray(w[None, :-1])), np.float64)[0]  # (t, V)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nats += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
  return nats / math.log(2) / len(text.encode("utf-8"))


@pytest.mark.slow  # trains a reference model
def test_reference_model_trained_and_reported(trained):
  _, tok, info, q, _ = trained
  assert info["steps"] == q.steps and info["d_model"] == 32 and info["n_layers"] == 1
  assert info["vocab_size"] == tok.vocab_size <= 512
  assert info["reference_docs"] == 80 and info["reference_tokens"] > 10_000
  assert info["final_train_loss"] < math.log(tok.vocab_size) - 1.0  # it learned something
  assert info["checkpoint"].endswith(f"checkpoints/{q.steps}")


@pytest.mark.slow  # trains a reference model
def test_scorer_matches_plain_windowed_definition(trained):
  model, tok, _, q, held_out = trained
  texts = [held_out[0][:2000], "x = 1\n", held_out[1][:300], "é€ unicode ✓\n" * 20]
  assert len(tok.encode(texts[0])) > 2 * q.seq_len  # several windows
  got = quality.lmx_model_scorer(model, tok, q.seq_len, batch=3)(texts)
  want = [_plain_bits_per_byte(model, tok, t, q.seq_len) for t in texts]
  np.testing.assert_allclose(got, want, rtol=2e-4)
  assert quality.lmx_model_scorer(model, tok, q.seq_len)([""]) == [8.0]


@pytest.mark.slow  # trains a reference model
def test_planted_junk_scores_worse_and_is_dropped_first(trained):
  model, tok, _, q, held_out = trained
  junk = _junk(np.random.default_rng(0), 4)  # 12 junk documents, 40 real
  score = quality.lmx_model_scorer(model, tok, q.seq_len, q.batch_size)
  s_real, s_junk = np.array(score(held_out)), np.array(score(junk))
  assert np.median(s_junk) > np.percentile(s_real, 90)
  assert s_junk.min() > np.median(s_real)
  scores = np.concatenate([s_real, s_junk])
  thr = quality.quality_threshold(scores, len(junk) / len(scores))
  dropped = np.flatnonzero(scores > thr)
  assert len(dropped) == len(junk)
  precision = np.mean(dropped >= len(s_real))  # planted docs sit after the real ones
  assert precision == 1.0, (s_real.round(2), s_junk.round(2))


@pytest.mark.slow  # trains a reference model
def test_cli_with_lmx_model_scorer(tmp_path, capsys):
  rng = np.random.default_rng(1)
  words = ("river mountain village teacher garden window morning story music letter bridge "
           "forest market winter summer doctor kitchen harbor island lantern").split()
  src = tmp_path / "src"
  src.mkdir()
  for i in range(45):
    sents = ["The " + " ".join(rng.choice(words, int(rng.integers(6, 12)))) + "."
             for _ in range(20)]
    (src / f"d{i:02d}.txt").write_text("\n".join(sents) + "\n")
  for i, t in enumerate(_junk(rng, 2)[:5]):  # 5 planted of 50 = 10%
    (src / f"j{i}.txt").write_text(t)
  exp_file = tmp_path / "exp.py"
  exp_file.write_text(
      "import importlib.util\n"
      f"spec = importlib.util.spec_from_file_location('dp', {REPO + '/experiments/data_prepare.py'!r})\n"
      "dp = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(dp)\n"
      "def get_config(arg=None):\n"
      "  c = dp.get_config(arg)\n"
      f"  c.prepare.quality.update({dict(TINY, drop_fraction=0.1, reference_docs=50)!r})\n"
      "  c.prepare.filters.update(dict(max_symbol_ratio=1.0, max_mean_line_chars=5000.0,\n"
      "      max_top_ngram_fraction=1.0, max_dup_ngram_fraction=1.0, max_dup_line_fraction=1.0))\n"
      "  c.prepare.langid.enabled = False\n  c.prepare.max_examples = 5\n"
      # The 45 documents are random draws from one 20-word vocabulary: as character 6-grams
      # (the dedup default) they are near-duplicates of each other; this test is about the
      # quality filter, so dedup compares word 5-grams here (in which they are distinct).
      "  c.prepare.dedup.shingle = 'word'\n  c.prepare.dedup.shingle_size = 5\n"
      "  return c\n")
  out_dir = tmp_path / "o"
  rc = prepare.cli_main(["prepare", f"--config={exp_file}", f"--config.data.corpus={src}",
                         f"--config.prepare.output_dir={out_dir}"])
  assert rc == 0
  assert "quality" in capsys.readouterr().out
  rep = json.loads((out_dir / "reports" / "quality.json").read_text())
  assert rep["scorer"] == "lmx_model" and rep["model"]["d_model"] == 32
  assert rep["model"]["reference_tokens"] > 0 and rep["reference_docs"] == 50
  assert rep["docs_in"] == 50 and rep["counts"]["low_quality"] == 5
  dropped = {e["id"] for e in rep["examples"]["low_quality"]}
  worst = [float(e["text"].split()[0]) for e in rep["examples"]["low_quality"]]
  assert min(worst) > rep["threshold_bits_per_byte"] >= rep["median_bits_per_byte"]
  kept = {json.loads(l)["id"] for p in out_dir.glob("shard-*.jsonl") for l in open(p)}
  assert not {f"j{i}.txt" for i in range(5)} & kept
  assert len(kept) == 45 and not (out_dir / ".work").exists()


def test_reference_options_and_bad_config(tmp_path):
  from lmx.config import ConfigError
  src = tmp_path / "ref"
  src.mkdir()
  for i in range(30):
    (src / f"r{i:02d}.txt").write_text(f"{i:02d} reference document\n" * 3)
  q = prepare.prepare_config({"quality": {"reference": str(src), "reference_docs": 10,
                                          "max_chars": 12}}).quality
  got = prepare._reference_texts(q, tmp_path / "unused.jsonl", [])
  want = quality.reference_sample([(f"r{i:02d}.txt", f"{i:02d} reference document\n" * 3)
                                   for i in range(30)], 10)
  assert got == [t[:12] for t in want] and len(set(got)) == 10
  with pytest.raises(ValueError, match="prepare.quality.reference"):
    prepare._reference_texts(dataclasses.replace(q, reference=str(tmp_path / "nope")),
                             tmp_path / "unused.jsonl", [])
  for bad in ({"d_model": 48}, {"vocab_size": 100}, {"steps": 0}, {"seq_len": -1}):
    with pytest.raises(ConfigError, match=f"prepare.quality.{next(iter(bad))}"):
      prepare.prepare_config({"quality": bad})


def test_reference_sample_is_smallest_hashes():
  import hashlib
  items = [(f"id{i}", f"t{i}") for i in range(200)]
  h = lambda s: int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")
  want = [t for _, t in sorted(items, key=lambda x: h(x[0]))[:17]]
  assert quality.reference_sample(iter(items), 17) == want
