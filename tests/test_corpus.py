"""Corpus readers: the embedded stdlib corpus, folders / JSONL / ArrayRecord, the hash split."""

import json

import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from lmx.config import DataConfig
from lmx.data import corpus


def test_stdlib_corpus_is_large_and_stable():
  docs = list(corpus.stdlib_documents())
  assert len(docs) > 1000
  ids = [d.id for d in docs]
  assert len(set(ids)) == len(ids)
  assert ids == [d.id for d in corpus.stdlib_documents()]  # same order every time
  py = [i for i in ids if i.startswith("stdlib/")]
  assert py == sorted(py)  # sorted by relative path
  assert not any("site-packages" in i for i in ids)
  assert any(i.startswith("pydoc/") for i in ids)
  assert "stdlib/json/__init__.py" in ids
  by_id = {d.id: d for d in docs}
  assert "def dumps(" in by_id["stdlib/json/__init__.py"].text
  assert sum(len(d.text) for d in docs) > 10_000_000


def test_iter_documents_respects_max_docs():
  docs = list(corpus.iter_documents(DataConfig(max_docs=7)))
  assert [d.id for d in docs] == [d.id for d in corpus.stdlib_documents()][:7]


def test_validation_split_is_deterministic_and_sized():
  ids = [f"doc-{i}" for i in range(20000)]
  a = [corpus.is_validation(i, 0.1) for i in ids]
  assert a == [corpus.is_validation(i, 0.1) for i in ids]
  # Binomial(20000, 0.1): sd = 42 docs; allow 5 sd.
  assert abs(sum(a) - 2000) < 5 * 42
  # A larger fraction holds out a superset (thresholding one hash).
  b = [corpus.is_validation(i, 0.3) for i in ids]
  assert all(y for x, y in zip(a, b) if x)
  assert abs(sum(b) - 6000) < 5 * 65


def _write_array_record(path, records):
  w = ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    w.write(r)
  w.close()


def test_malformed_input_is_counted_and_skipped(tmp_path):
  (tmp_path / "a_good.txt").write_text("hello world\n")
  (tmp_path / "b_bad_utf8.txt").write_bytes(b"caf\xe9 \xff\xfe ok")  # 3 invalid bytes
  (tmp_path / "c_empty.txt").write_bytes(b"")
  (tmp_path / "d_blank.md").write_text("  \n\t\n")
  (tmp_path / "e_binary.py").write_bytes(b"x = 1\x00\x01\x02")
  (tmp_path / "f_ignored.bin").write_bytes(b"not a corpus file")
  lines = [json.dumps({"text": "first"}), "{not json", json.dumps([1, 2]), "",
           json.dumps({"body": "no text field"}), json.dumps({"text": 5}),
           json.dumps({"text": "second"})]
  sub = tmp_path / "sub"
  sub.mkdir()
  (sub / "g.jsonl").write_text("\n".join(lines) + "\n")
  _write_array_record(sub / "h.array_record", [b"rec zero", b"\xc3(bad", b"", b"bin\x00"])
  stats = corpus.CorpusStats()
  docs = list(corpus.iter_documents(DataConfig(corpus=str(tmp_path)), stats))
  assert [(d.id, d.text) for d in docs] == [
      ("a_good.txt", "hello world\n"),
      ("b_bad_utf8.txt", "caf\ufffd \ufffd\ufffd ok"),
      ("sub/g.jsonl:1", "first"),
      ("sub/g.jsonl:7", "second"),
      ("sub/h.array_record#0", "rec zero"),
      ("sub/h.array_record#1", "\ufffd(bad"),
  ]
  assert stats.documents == 6
  assert stats.invalid_utf8_docs == 2 and stats.replaced_chars == 4
  assert stats.bad_json_lines == 2  # '{not json' and a JSON list
  assert stats.missing_field_lines == 2
  assert stats.empty_docs == 3  # empty .txt, blank .md, empty record
  assert stats.binary_files == 2  # .py with NUL and the NUL record
  assert stats.files == 7  # the .bin file is not a corpus file
  assert stats.bytes == sum(len(d.text.encode()) for d in docs)


def test_jsonl_file_and_text_field(tmp_path):
  p = tmp_path / "x.jsonl"
  p.write_text(json.dumps({"content": "a"}) + "\n" + json.dumps({"content": "b"}) + "\n")
  docs = list(corpus.iter_documents(DataConfig(corpus=str(p), text_field="content")))
  assert [d.text for d in docs] == ["a", "b"]
  assert [d.id for d in docs] == ["x.jsonl:1", "x.jsonl:2"]


def test_missing_path_names_it(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    corpus.iter_documents(DataConfig(corpus=missing))  # raises before iteration
