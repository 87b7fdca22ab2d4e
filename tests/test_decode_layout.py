"""`model.decode_layers`: the decode loops run the layers scanned over the stacked weights
and cache, or unrolled with each layer's weights and cache as separate buffers
(lmx.model.stack.UnrolledLayers, the CPU default). Both must give the same tokens and
log-probs for every loop that decodes: the engine (greedy and sampled, ragged), beam
search and speculative decoding with a dense stack; greedy with an MoE stack of groups and
with an int8 KV cache. Correctness against a full forward pass is tested in test_engine.py (which runs
the CPU default, unrolled); this file pins the two layouts to each other."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ConfigError, MoEConfig, ModelConfig
from lmx.infer.beam import beam_search
from lmx.infer.engine import SamplingOptions, decode
from lmx.infer.speculative import prompt_lookup_decode
from lmx.model import Transformer
from lmx.model.stack import LayerStack, UnrolledLayers

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   max_seq_len=64, position="rope")
PROMPTS = [[5, 9, 2], [1, 1, 30, 7, 8, 9, 10], [3, 4, 5, 6, 7]]  # ragged
CASES = {
    "dense": BASE,
    "int8_cache": dataclasses.replace(BASE, kv_cache_dtype="int8"),
    "moe_groups": dataclasses.replace(BASE, n_layers=4, moe=MoEConfig(
        num_experts=4, top_k=2, every_n_layers=2)),
}


def twins(cfg: ModelConfig) -> dict[str, Transformer]:
  """The same weights (std 0.2 normal: peaky logits, no near-ties) under both layouts."""
  out = {}
  for layout in ("scan", "unrolled"):
    m = Transformer(dataclasses.replace(cfg, decode_layers=layout), rngs=nnx.Rngs(params=0))
    rng = np.random.default_rng(0)
    nnx.update(m, jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape),
                                                      x.dtype), nnx.state(m, nnx.Param)))
    out[layout] = m
  return out


@pytest.mark.slow  # compiles each case's loops twice
@pytest.mark.parametrize("case", sorted(CASES))
def test_scan_and_unrolled_decode_alike(case):
  models = twins(CASES[case])
  assert isinstance(models["unrolled"].layers.decoder(), UnrolledLayers)
  assert isinstance(models["scan"].layers.decoder(), LayerStack)
  sampled = SamplingOptions(temperature=1.0, top_k=8, seed=3)
  for opts in (SamplingOptions(temperature=0.0),) + ((sampled,) if case == "dense" else ()):
    got = {k: decode(m, PROMPTS, 8, opts) for k, m in models.items()}
    assert got["scan"].tokens == got["unrolled"].tokens
    np.testing.assert_allclose(np.concatenate(got["scan"].logprobs),
                               np.concatenate(got["unrolled"].logprobs), atol=1e-5)
  if case != "dense":
    return
  beams = {k: beam_search(m, PROMPTS, 6, beams=3, stop_ids=(0,)) for k, m in models.items()}
  assert [[t for t, _ in row] for row in beams["scan"]] == \
      [[t for t, _ in row] for row in beams["unrolled"]]
  np.testing.assert_allclose([s for row in beams["scan"] for _, s in row],
                             [s for row in beams["unrolled"] for _, s in row], atol=1e-5)
  spec = {k: prompt_lookup_decode(m, PROMPTS, 8, SamplingOptions(temperature=0.0), k=3)
          for k, m in models.items()}
  assert spec["scan"].tokens == spec["unrolled"].tokens


def test_auto_is_unrolled_on_cpu_and_bad_values_fail_in_one_sentence():
  made = []  # traced abstractly: the layout is chosen without computing any weight
  jax.eval_shape(lambda: made.append(Transformer(BASE, rngs=nnx.Rngs(0)).layers.decoder()))
  assert isinstance(made[0], UnrolledLayers)  # CI and this suite run on CPU
  with pytest.raises(ConfigError, match=r"model.decode_layers.*auto.*scan.*unrolled"):
    dataclasses.replace(BASE, decode_layers="loop").validate()
