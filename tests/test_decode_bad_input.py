"""Bad decoding input fails with one sentence before anything compiles: every call here gets
an ABSTRACT model (shapes only, no arrays), so reaching a compile would fail differently."""

import dataclasses

import pytest
from flax import nnx

from lmx.config import ModelConfig
from lmx.infer.beam import beam_search
from lmx.infer.engine import SamplingOptions, decode
from lmx.infer.generate import generate
from lmx.infer.speculative import speculative_decode
from lmx.model import Transformer

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)


def abstract(cfg=CFG):
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))


@pytest.mark.parametrize("prompts,match", [
    ([], "prompt"), ([[1, 2], []], "prompt"), ([[1, 64]], r"\[0, 64\)"), ([[-1]], r"\[0, 64\)"),
])
def test_generate_rejects_bad_prompts(prompts, match):
  with pytest.raises(ValueError, match=match):
    generate(abstract(), prompts, 4)


def test_prompt_plus_new_tokens_beyond_the_position_table():
  m = abstract(dataclasses.replace(CFG, position="learned"))
  # The engine's own sentence (init_cache would also refuse, less precisely).
  with pytest.raises(ValueError, match=r"prompt length 10 \+ max_new_tokens 7 = 17 exceeds "
                                       r"model.max_seq_len=16"):
    decode(m, [[1] * 10], 7, SamplingOptions())


def test_beam_width_below_one():
  with pytest.raises(ValueError, match=r"beams \(0\)"):
    beam_search(abstract(), [[1, 2]], 4, beams=0)


def test_draft_with_another_vocabulary():
  draft = abstract(dataclasses.replace(CFG, vocab_size=32))
  with pytest.raises(ValueError, match="vocab_size"):
    speculative_decode(abstract(), draft, [[1, 2]], 4, SamplingOptions())


@pytest.mark.parametrize("opts,match", [
    (SamplingOptions(temperature=(0.0, 1.0)), r"per-row settings \(temperature\)"),
    (SamplingOptions(repetition_penalty=1.3), "penalties are not supported"),
])
def test_speculative_refuses_what_its_verifier_cannot_follow(opts, match):
  with pytest.raises(ValueError, match=match):
    speculative_decode(abstract(), abstract(), [[1, 2], [3]], 4, opts)
