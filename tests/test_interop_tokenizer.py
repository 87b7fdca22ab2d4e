"""load_tokenizer on Hugging Face directories: tokenizer.json through the `tokenizers`
library, tokenizer.model through SentencePiece (with or without byte fallback)."""

import dataclasses
import io
import json

import pytest
import sentencepiece as spm

from lmx.data.tokenizer import Tokenizer, load_or_train_tokenizer
from lmx.interop import hf
from lmx.interop.hf_tokenizer import JsonTokenizer, SentencePieceTokenizer

tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint('héllo wörld')\n"] * 20


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory):
  """A byte-level BPE tokenizer.json (GPT-2 style: <|endoftext|> is the only special)."""
  d = tmp_path_factory.mktemp("tokjson")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS, trainer)
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  # GPT2Config's default ids, outside this small vocabulary: must not be used.
  (d / "config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}))
  return d


def _sp_model(byte_fallback: bool) -> bytes:
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=out,
                                 vocab_size=300 if byte_fallback else 60,
                                 byte_fallback=byte_fallback, minloglevel=2,
                                 hard_vocab_limit=False)
  return out.getvalue()


def test_tokenizer_json(json_dir):
  tok = hf.load_tokenizer(json_dir)
  assert isinstance(tok, JsonTokenizer)
  ref = tokenizers.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
  s = "def g(y):\n  return 'ünïcode ✓'\n"
  assert tok.encode(s) == ref.encode(s, add_special_tokens=False).ids
  assert tok.decode(tok.encode(s)) == s  # byte-level BPE round-trips anything
  eot = ref.token_to_id("<|endoftext|>")
  assert tok.eos_id == tok.bos_id == tok.pad_id == eot  # GPT-2's one token serves all
  assert tok.decode([eot] + tok.encode("x")) == "x"  # specials are skipped
  assert tok.vocab_size == ref.get_vocab_size()
  assert tok.encode_batch([s, "x"]) == [tok.encode(s), tok.encode("x")]


def test_sentencepiece_preferred_and_plain(json_dir, tmp_path):
  (tmp_path / "tokenizer.json").write_bytes((json_dir / "tokenizer.json").read_bytes())
  (tmp_path / "tokenizer.model").write_bytes(_sp_model(byte_fallback=True))
  tok = hf.load_tokenizer(tmp_path)
  assert isinstance(tok, SentencePieceTokenizer) and tok.byte_fallback  # tokenizer.model wins
  s = "def f(x):\n  return 'ünïcode ✓'\n"
  assert tok.encode(s) == Tokenizer(tok.model_proto).encode(s)  # lmx's own class
  (tmp_path / "tokenizer.model").write_bytes(plain := _sp_model(byte_fallback=False))
  tok = hf.load_tokenizer(tmp_path)
  assert isinstance(tok, SentencePieceTokenizer) and not tok.byte_fallback
  ref = spm.SentencePieceProcessor(model_proto=plain)
  assert tok.encode("def f(x):") == ref.encode("def f(x):")
  assert (tok.bos_id, tok.eos_id) == (ref.bos_id(), ref.eos_id())
  assert ref.pad_id() == -1 and tok.pad_id == tok.eos_id  # the batcher needs a real pad id


def test_experiment_tokenizer_path_reads_hf_dirs(json_dir):
  """`data.tokenizer_path` = an HF directory (what `lmx convert --from_hf` writes)."""
  from lmx.config import base_config, from_config_dict
  c = base_config()
  c.data.tokenizer_path = str(json_dir)
  exp = from_config_dict(c)
  assert isinstance(load_or_train_tokenizer(exp), JsonTokenizer)
  small = dataclasses.replace(exp, model=dataclasses.replace(exp.model, vocab_size=100))
  with pytest.raises(ValueError, match="model.vocab_size=100"):
    load_or_train_tokenizer(small)
  with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
    hf.load_tokenizer(json_dir.parent)
