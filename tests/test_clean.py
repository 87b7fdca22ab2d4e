"""Cleaning: normalization, HTML, each heuristic filter on hand-made docs, boilerplate, langid."""

import unicodedata

import pytest

from lmx.data import boilerplate as bp
from lmx.data import corpus
from lmx.data import clean, langid

PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch.\n"
         "Later that evening the rain began, and everyone went inside to read by the fire.\n"
         "Nobody expected the storm to last until the following morning, but it did.\n")
CFG = clean.FilterConfig(min_chars=50, min_words=5, max_top_ngram_fraction=0.3,
                         max_dup_ngram_fraction=0.5)


def test_normalize_nfc_controls_and_newlines():
  decomposed = "cafe\u0301\r\nline\x00two\x07\tend\u200b\ufeff"
  out, n = clean.normalize_text(decomposed)
  assert out == "caf\u00e9\nlinetwo\tend"
  assert unicodedata.is_normalized("NFC", out)
  assert n == 4  # \x00, \x07, zero-width space, BOM


def test_decode_counts_invalid_utf8_only():
  text, bad = clean.decode_utf8(b"ok \xff\xfe and \xef\xbf\xbd kept")  # one real U+FFFD
  assert bad == 2 and text.count("\ufffd") == 3
  assert clean.normalize_text("a\ud800b")[0] == "a?b" or "\ud800" not in clean.normalize_text(
      "a\ud800b")[0]


def test_html_detected_and_stripped():
  page = ("<!DOCTYPE html><html><head><title>t</title><style>p{color:red}</style></head>"
          "<body><div><p>Hello &amp; welcome</p><script>var x = 1;</script>"
          "<p>Second paragraph</p></div></body></html>")
  assert clean.looks_like_html(page)
  assert clean.strip_html(page) == "Hello & welcome\n\nSecond paragraph"
  code = 'import html\nparser.feed("<p>x</p>")\n'
  assert not clean.looks_like_html(code)


def test_clean_prose_passes():
  assert clean.heuristic_reason(PROSE, CFG) is None


@pytest.mark.parametrize("text,reason", [
    ("short", "too_short_chars"),
    ("x" * 200, "too_few_words"),
    ("a\nb\nc\nd\ne\nf\ng\nh\ni\nj\nk\nl\nm\nn\no\np\nq\nr\ns\nt\nu\nv\nw\nx\ny\nz\n" * 2,
     "mean_line_too_short"),
    (("word " * 100 + "\n") * 3, "mean_line_too_long"),
    ("ok words here and there\n" + "{}[]()<>=+-*/%$#@!~;:\n" * 20, "symbol_ratio"),
    (PROSE + "Buy now, limited offer!\n" * 20, "duplicated_lines"),
    (PROSE + "click here " * 60, "top_ngram"),
])
def test_each_filter_fires(text, reason):
  cfg = clean.FilterConfig(min_chars=50, min_words=5, max_mean_line_chars=300.0)
  assert clean.heuristic_reason(text, cfg) == reason


def test_repeated_ngrams_filter():
  # A repeated 12-word passage (no single dominant 2..4-gram) trips only the dup-n-gram rule.
  passage = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
             "mike november oscar papa quebec romeo sierra tango uniform victor whiskey ")
  text = PROSE + "\n".join([passage] * 3)
  cfg = clean.FilterConfig(min_chars=50, min_words=5, max_top_ngram_fraction=1.0,
                           max_dup_line_fraction=1.0, max_dup_ngram_fraction=0.3,
                           max_mean_line_chars=500.0)
  assert clean.heuristic_reason(text, cfg) == "repeated_ngrams"


def test_ngram_fractions_against_hand_counts():
  w = "a b c a b c a b c d e f g h".split()  # 14 word chars
  assert clean.top_ngram_fraction(w, 2) == pytest.approx(3 * 2 / 14)  # 'a b' x3
  # repeated 2-grams start at 3..7 -> words 3..8 covered -> 6 chars
  assert clean.dup_ngram_fraction(w, 2) == pytest.approx(6 / 14)
  assert clean.dup_line_fraction(["x = 1", "", "x = 1", "y"]) == pytest.approx(5 / 11)


def test_boilerplate_header_removed_across_docs():
  header = ["# Copyright (C) 2001-2006 Example Software Foundation",
            "# Licensed to the Foundation under a Contributor Agreement."]
  docs = []
  for i in range(30):
    year_header = [header[0].replace("2006", str(2000 + i % 9)), header[1]]  # years vary
    name = "".join("abcdefghij"[int(c)] for c in f"{i:02d}")  # digits would normalize alike
    body = [f"def function_{name}(x):", f"  return x * {name}_scale + offset_{name}_value"]
    docs.append("\n".join(year_header + [""] + body) + "\n")
  counter = bp.BoilerplateCounter(bp.BoilerplateConfig(min_docs=10, sketch_width=1 << 12))
  for d in docs:
    counter.add(d)
  for i, d in enumerate(docs):
    new, removed = bp.strip_boilerplate(d, counter)
    assert len(removed) == 2 and all(ln.startswith("#") for ln in removed)
    assert new.startswith("def function_") and new.count("\n") == 2


def test_boilerplate_keeps_rare_and_interior_lines():
  common = "# this shared comment line appears in every document"
  docs = [f"x_{i} = {i}\n{common}\ny_{i} = {i}\n" for i in range(25)]  # interior, not an edge
  counter = bp.BoilerplateCounter(bp.BoilerplateConfig(min_docs=10, sketch_width=1 << 12))
  for d in docs:
    counter.add(d)
  assert counter.doc_count([bp.normalize_line(common)])[0] >= 25
  assert bp.strip_boilerplate(docs[0], counter) == (docs[0], [])
  anywhere = bp.BoilerplateCounter(bp.BoilerplateConfig(min_docs=10, scope="anywhere",
                                                        sketch_width=1 << 12))
  for d in docs:
    anywhere.add(d)
  assert bp.strip_boilerplate(docs[0], anywhere)[1] == [common]


def test_stdlib_license_boilerplate_found():
  """On a slice of the real stdlib (the email package) the PSF header lines are found."""
  docs = [d for d in corpus.stdlib_documents() if d.id.startswith("stdlib/email/")][:40]
  assert len(docs) >= 20
  cfg = bp.BoilerplateConfig(min_docs=5, line_prefixes=("#",))
  counter = bp.BoilerplateCounter(cfg)
  for d in docs:
    counter.add(d.text)
  removed = [ln for d in docs for ln in bp.strip_boilerplate(d.text, counter)[1]]
  assert any("Python Software Foundation" in ln for ln in removed)
  assert all(ln.lstrip().startswith("#") for ln in removed)


def test_langid_routes_prose_and_skips_code():
  cfg = langid.LangIdConfig(keep=("en",))
  assert langid.identify(PROSE, "a.txt", cfg)[0] == "en"
  fr = "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde."
  lang, _ = langid.identify(fr, "b.txt", cfg)
  assert lang == "fr" and not langid.keep_language(lang, cfg)
  assert langid.identify("Le renard brun saute.", "mod.py", cfg)[0] == "code"
  with pytest.raises(ValueError, match="prepare.langid.keep"):
    langid.LangIdConfig(keep=("xx",)).validate()
