"""Test setup: 8 fake CPU devices and strict dtype promotion, before JAX initializes."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


_WORDS = "def return self the a of to is hello world how do I sort list use sorted ok".split()


@pytest.fixture(scope="session")
def chat_tokenizer():
  """A tiny SentencePiece model (vocab 300) plus the chat role tokens (lmx.data.sft)."""
  import random
  from lmx.data import sft, tokenizer as tk
  rng = random.Random(0)
  texts = [" ".join(rng.choice(_WORDS) for _ in range(60)) + "\n" for _ in range(60)]
  return sft.add_chat_tokens(tk.train_tokenizer(texts, None, vocab_size=300))


class CharTokenizer:
  """Stand-in for the SentencePiece tokenizer in CLI tests: one id per character (ids
  4..63); bos 2, eos 3."""
  bos_id, eos_id, vocab_size = 2, 3, 64

  def encode(self, text):
    return [4 + ord(c) % 60 for c in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def hf_llama_dir(path, texts):
  """A small random Hugging Face LlamaForCausalLM (GQA, untied, vocab 320) saved to `path`
  with a byte-level BPE tokenizer.json trained on `texts` (eos `<|endoftext|>`); returns
  the torch model. Needs the reference extra (torch, transformers) and `tokenizers`."""
  import json

  import tokenizers
  import torch
  import transformers
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)).eval()
  ref.save_pretrained(path)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(list(texts) * 10, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  return ref


def random_lm_batches(n, vocab_size, batch, seq):
  """n random LM batches (inputs, targets, positions, segment_ids, ~90% loss_mask), seed 0."""
  import numpy as np
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    toks = rng.integers(0, vocab_size, size=(batch, seq + 1)).astype(np.int32)
    out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
                "segment_ids": np.ones((batch, seq), np.int32),
                "loss_mask": (rng.random((batch, seq)) > 0.1).astype(np.float32)})
  return out


# The longest modules (per-module sums of a full run's --durations=0, 2 workers on 2 cores,
# longest first) start first. pytest-xdist's loadscope hands a worker one whole module at a time, by
# default the modules with the most tests first: these few-test, minute-long modules came
# last, and the worker that drew one kept running while the other sat idle.
_LONGEST_MODULES = (
    "test_multihost_failure.py", "test_train_step.py", "test_train_loop.py",
    "test_parallel_layouts.py", "test_moe_parallel.py", "test_pipeline_parallel.py",
    "test_serve.py", "test_interop_convert.py", "test_decode_layout.py", "test_engine_rows.py",
    "test_multiprocess.py",
    "test_model.py", "test_memory_plan.py", "test_attention.py", "test_quality_lmx.py",
    "test_stack.py", "test_peft.py", "test_moe_model.py", "test_engine.py",
    "test_objectives.py", "test_pipeline_tp.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """The modules in _LONGEST_MODULES first, in that order; the rest after, as collected."""
  rank = {name: i for i, name in enumerate(_LONGEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
