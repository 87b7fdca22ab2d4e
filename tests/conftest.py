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
