"""Golden logits: lmx with Hugging Face weights equals transformers' own forward pass.

Needs the `reference` extra (torch 2.13.0 CPU + transformers), which `make test` installs.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from lmx.config import ModelConfig
from lmx.interop import hf
from lmx.model.transformer import Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _np_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
@pytest.mark.parametrize("n_kv_heads, tie", [(2, False), (4, True), (1, False)])
def test_llama_logits_match_transformers(n_kv_heads, tie):
  cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                    d_ff=96, mlp="swiglu", norm="rmsnorm", norm_eps=1e-6, position="rope",
                    rope_theta=500.0, max_seq_len=32, tie_embeddings=tie).validate()
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head, rms_norm_eps=1e-6,
      rope_theta=500.0, max_position_embeddings=32, tie_word_embeddings=tie,
      attention_bias=False, mlp_bias=False)).eval()
  for p in ref.parameters():  # norms start at 1; randomize so the test sees their mapping
    if p.ndim == 1:
      torch.nn.init.uniform_(p, 0.5, 1.5)
  model = Transformer(cfg, rngs=nnx.Rngs(1))
  hf.assign_params(model, hf.llama_from_hf(_np_state_dict(ref), cfg))

  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  got = np.asarray(model(tokens))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)

  # And back: lmx -> HF names reproduces the original state dict.
  back = hf.llama_to_hf(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
  sd = _np_state_dict(ref)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_gpt2_logits_match_transformers(tmp_path):
  cfg = ModelConfig(vocab_size=101, d_model=48, n_layers=2, n_heads=4, d_ff=192, mlp="gelu",
                    norm="layernorm", norm_eps=1e-5, position="learned", max_seq_len=24,
                    use_bias=True, tie_embeddings=True).validate()
  torch.manual_seed(0)
  ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
      n_positions=cfg.max_seq_len, activation_function="gelu_new",
      layer_norm_epsilon=1e-5)).eval()
  for p in ref.parameters():
    if p.ndim == 1:
      torch.nn.init.uniform_(p, -0.5, 1.5)
  # Round-trip through a real .safetensors file, as a user importing weights would.
  path = tmp_path / "gpt2.safetensors"
  sd = {k: v for k, v in _np_state_dict(ref).items() if not k.endswith(".attn.bias")
        and k != "lm_head.weight"}
  hf.save_safetensors(sd, str(path))
  model = Transformer(cfg, rngs=nnx.Rngs(1))
  hf.assign_params(model, hf.gpt2_from_hf(hf.load_safetensors(str(path)), cfg))

  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(tokens)), want, rtol=2e-4, atol=2e-4)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_assign_params_rejects_wrong_shapes():
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=8).validate()
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tree["embed"] = np.zeros((33, 16), np.float32)
  with pytest.raises(ValueError, match="embed has shape"):
    hf.assign_params(model, tree)
  tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  del tree["final_norm"]
  with pytest.raises(ValueError, match="missing"):
    hf.assign_params(model, tree)


