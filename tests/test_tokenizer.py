"""SentencePiece wrapper: lossless round-trip, fixed special ids, caching, CLI."""

import dataclasses
import json
import os

import pytest
from hypothesis import given, settings, strategies as st

from lmx.config import base_config, from_config_dict
from lmx.data import corpus, tokenizer as tk

_WORDS = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "None",
          "x", "y", "value", "(", ")", ":", "=", "+", "[", "]", "0", "1", "42"]


def _code_like_text(n_lines: int, seed: int) -> str:
  import random
  rng = random.Random(seed)
  lines = []
  for _ in range(n_lines):
    indent = "    " * rng.randrange(3)
    lines.append(indent + " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(1, 9))))
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
  texts = [_code_like_text(200, s) for s in range(20)] + ["héllo wörld ünïcode\tτεστ\n"]
  prefix = str(tmp_path_factory.mktemp("tok") / "tiny")
  return tk.train_tokenizer(texts, prefix, vocab_size=400)


def test_special_ids_and_vocab(tiny_tok):
  assert (tiny_tok.pad_id, tiny_tok.unk_id, tiny_tok.bos_id, tiny_tok.eos_id) == (0, 1, 2, 3)
  assert 260 < tiny_tok.vocab_size <= 400
  assert os.path.exists(tiny_tok.path)
  again = tk.Tokenizer.load(tiny_tok.path)
  text = "def f(x):\n    return 42\n"
  assert again.encode(text) == tiny_tok.encode(text)


@pytest.mark.parametrize("text", [
    "", " ", "  leading and trailing  ", "\n", "\n\n\tindented\n", "a\r\nb", "\x00\x01",
    "日本語のテキスト", "emoji 😀👍🏽", "e\u0301 combining",
    "\u2581 literal space mark \u2581\u2581",
    "\ufeffbom", "zero\u200bwidth", "\U0010ffff", "def f(x):\n    return x  # 注释\n",
])
def test_round_trip_examples(tiny_tok, text):
  ids = tiny_tok.encode(text)
  assert all(0 <= i < tiny_tok.vocab_size for i in ids)
  assert tiny_tok.decode(ids) == text
  assert tiny_tok.encode_batch([text, "x"]) == [ids, tiny_tok.encode("x")]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_round_trip_any_unicode(tiny_tok, text):
  assert tiny_tok.decode(tiny_tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["\n", "\t", " ", "  ", "x", "é", "中", "🙂", "\u2581", "\r"]),
                max_size=40))
def test_round_trip_whitespace_heavy(tiny_tok, parts):
  text = "".join(parts)
  assert tiny_tok.decode(tiny_tok.encode(text)) == text


def test_newlines_are_learned_not_byte_fallback(tiny_tok):
  # '\n' is frequent in the training text, so it must be an ordinary piece (one token),
  # and indentation runs compress: a 4-space indent is a single piece.
  assert tiny_tok.encode("\n") == [tiny_tok._sp.piece_to_id("\n")]
  assert len(tiny_tok.encode("    ")) == 1


def test_user_defined_symbols_are_single_pieces(tmp_path):
  tok = tk.train_tokenizer([_code_like_text(100, 1)], None, vocab_size=350,
                           user_defined_symbols=("<|sep|>", "@@"))
  ids = tok.encode("x<|sep|>y@@")
  assert tok.id_to_piece(ids[1]) == "<|sep|>" and tok.decode(ids) == "x<|sep|>y@@"


def test_bytes_per_token(tiny_tok):
  held_out = _code_like_text(100, 999)
  bpt = tiny_tok.bytes_per_token([held_out])
  assert bpt == pytest.approx(len(held_out.encode()) / len(tiny_tok.encode(held_out)))
  assert bpt > 1.5  # learned merges compress in-distribution text


def test_bad_arguments():
  with pytest.raises(ValueError, match="vocab_size"):
    tk.train_tokenizer(["abc"], None, vocab_size=100)
  with pytest.raises(ValueError, match="model_type"):
    tk.train_tokenizer(["abc"], None, vocab_size=300, model_type="wordpiece")
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tk.Tokenizer.load("/nonexistent/missing.model")


def _exp(tmp_path, **data):
  c = base_config()
  c.model.vocab_size = 400
  c.data.cache_dir = str(tmp_path / "cache")
  c.data.tokenizer_sample_mb = 1
  for k, v in data.items():
    c.data[k] = v
  return from_config_dict(c)


def _corpus_dir(tmp_path, n=30):
  d = tmp_path / "corpus"
  d.mkdir(exist_ok=True)
  for i in range(n):
    (d / f"f{i:03d}.py").write_text(_code_like_text(30, i))
  return str(d)


def test_load_or_train_caches(tmp_path):
  exp = _exp(tmp_path, corpus=_corpus_dir(tmp_path))
  tok = tk.load_or_train_tokenizer(exp)
  assert tok.path.startswith(exp.data.cache_dir) and tok.vocab_size <= 400
  mtime = os.stat(tok.path).st_mtime_ns
  again = tk.load_or_train_tokenizer(exp)
  assert again.path == tok.path and os.stat(tok.path).st_mtime_ns == mtime
  assert again.model_proto == tok.model_proto
  # A different vocabulary size is a different cache entry.
  other = tk.load_or_train_tokenizer(
      dataclasses.replace(exp, model=dataclasses.replace(exp.model, vocab_size=380)))
  assert other.path != tok.path and other.vocab_size <= 380
  # An explicit tokenizer_path wins.
  explicit = tk.load_or_train_tokenizer(_exp(tmp_path, corpus=exp.data.corpus,
                                             tokenizer_path=tok.path))
  assert explicit.model_proto == tok.model_proto


def test_train_sample_excludes_validation_docs(tmp_path):
  exp = _exp(tmp_path, corpus=_corpus_dir(tmp_path), validation_fraction=0.3)
  texts = set(tk.sample_train_texts(exp.data, 1 << 20))
  docs = list(corpus.iter_documents(exp.data))
  val = {d.text for d in docs if corpus.is_validation(d.id, 0.3)}
  assert val and not texts & val
  assert texts == {d.text for d in docs} - val  # the budget covers the whole train split


def test_cli_train_encode_decode(tmp_path, capsys, monkeypatch):
  prefix = str(tmp_path / "cli")
  rc = tk.cli_main(["train", "--input", _corpus_dir(tmp_path), "--vocab_size", "320",
                    "--output", prefix, "--validation_fraction", "0.2"])
  assert rc == 0
  report = json.loads(capsys.readouterr().out)
  assert report["model"] == prefix + ".model" and report["vocab_size"] <= 320
  assert report["heldout_bytes_per_token"] > 1.0
  assert tk.cli_main(["encode", "--model", prefix + ".model", "def x(): ▁"]) == 0
  ids = json.loads(capsys.readouterr().out)
  assert tk.cli_main(["decode", "--model", prefix + ".model"] + [str(i) for i in ids]) == 0
  assert capsys.readouterr().out == "def x(): ▁"
  assert tk.cli_main(["decode", "--model", prefix + ".model", "999999"]) == 2
  assert "outside the vocabulary" in capsys.readouterr().err
