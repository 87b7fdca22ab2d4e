"""from_pretrained / to_pretrained against transformers (torch CPU): random small LLaMA (GQA,
untied; Llama 3 rope scaling), Mistral (sliding window) and GPT-2 models saved with
save_pretrained -- fp32, sharded, bf16 -- must give transformers' logits and greedy tokens.

Needs the `reference` extra (torch + transformers). The HF models are built once per module.
"""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from lmx.interop import hf
from lmx.infer.generate import generate
from lmx.model.transformer import Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # torch + compiles

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 24)).astype(np.int32)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _randomize(ref):
  torch.manual_seed(1)
  for p in ref.parameters():  # norms start at 1; randomize so the test sees their mapping
    if p.ndim == 1:
      torch.nn.init.uniform_(p, 0.5, 1.5)
  return ref.eval()


def _llama(**kw):
  torch.manual_seed(0)
  args = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
              max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6)
  return _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**args, **kw})))


def _mistral():
  torch.manual_seed(0)
  return _randomize(transformers.MistralForCausalLM(transformers.MistralConfig(
      vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, sliding_window=5,
      max_position_embeddings=64, attn_implementation="eager")))


def _gpt2():
  torch.manual_seed(0)
  return _randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=48, resid_pdrop=0.0,
      embd_pdrop=0.0, attn_pdrop=0.0)))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
  """name -> (transformers model, saved directory)."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name, make, kw in (("llama", _llama, {}),
                         ("llama_sharded", _llama, {"max_shard_size": "20KB"}),
                         ("llama3", lambda: _llama(rope_scaling=LLAMA3), {}),
                         ("mistral", _mistral, {}), ("gpt2", _gpt2, {})):
    ref = make()
    ref.save_pretrained(root / name, **kw)
    out[name] = (ref, root / name)
  return out


def _hf_logits(ref, tokens=TOKENS):
  with torch.no_grad():
    return ref(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _hf_greedy(ref, prompt, n):
  ref.generation_config.eos_token_id = None
  ref.generation_config.pad_token_id = 0
  with torch.no_grad():
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama", "llama_sharded", "llama3", "mistral", "gpt2"])
def test_logits_and_greedy_tokens_match_transformers(refs, name):
  ref, path = refs[name]
  if name == "llama_sharded":
    assert (path / "model.safetensors.index.json").exists()
  model, cfg = hf.from_pretrained(path)
  got = np.asarray(model(TOKENS))
  np.testing.assert_allclose(got, _hf_logits(ref), rtol=0, atol=1e-4)
  prompt = TOKENS[0, :6].tolist()
  assert generate(model, prompt, 14, temperature=0.0)[0] == _hf_greedy(ref, prompt, 14)
  if cfg.sliding_window:  # the window in jax.nn.dot_product_attention too (CPU 'auto' blocks)
    cfg = dataclasses.replace(cfg, attention_impl="jax")
    other = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    hf.assign_params(other, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(np.asarray(other(TOKENS)), got, rtol=0, atol=1e-5)


def test_config_mapping(refs):
  assert hf.from_pretrained(refs["llama3"][1])[1].rope_scaling == "llama3"
  cfg = hf.from_pretrained(refs["mistral"][1])[1]
  assert (cfg.sliding_window, cfg.kv_heads, cfg.tie_embeddings) == (5, 1, False)
  cfg = hf.from_pretrained(refs["gpt2"][1], dtype="bfloat16")[1]
  assert (cfg.position, cfg.use_bias, cfg.tie_embeddings, cfg.dtype) == (
      "learned", True, True, "bfloat16")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bfloat16_files(refs, tmp_path, name):
  """A bf16 save loads exactly: lmx's float32 upcast equals transformers run in float32 on
  the same bf16-rounded weights."""
  ref, _ = refs[name]
  ref16 = type(ref)(ref.config).eval()
  ref16.load_state_dict(ref.state_dict())
  ref16.to(torch.bfloat16).save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  model, _ = hf.from_pretrained(tmp_path)
  ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  np.testing.assert_allclose(np.asarray(model(TOKENS)), _hf_logits(ref32.eval()), atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "llama3", "mistral", "gpt2"])
def test_to_pretrained_round_trip(refs, tmp_path, name):
  ref, path = refs[name]
  model, cfg = hf.from_pretrained(path)
  hf.to_pretrained(model, cfg, tmp_path / "out", max_shard_bytes=30_000)
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(back) is type(ref)
  np.testing.assert_allclose(_hf_logits(back), np.asarray(model(TOKENS)), rtol=0, atol=1e-4)
  # Exactly the weights that went in.
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  for k, v in back.state_dict().items():
    if k in sd:
      np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)


def test_to_pretrained_bfloat16(refs, tmp_path):
  """A bf16 export: stored as BF16, and transformers (run in float32) and lmx read the same
  rounded weights."""
  model, cfg = hf.from_pretrained(refs["gpt2"][1])
  hf.to_pretrained(model, cfg, tmp_path, dtype="bfloat16")
  raw = (tmp_path / "model.safetensors").read_bytes()
  header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])  # the format's header
  assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  rounded, _ = hf.from_pretrained(tmp_path)
  got = np.asarray(rounded(TOKENS))
  np.testing.assert_allclose(_hf_logits(back.eval()), got, rtol=0, atol=1e-4)
  assert 0 < np.abs(got - np.asarray(model(TOKENS))).max() < 0.05  # rounded, only slightly


def test_bad_inputs(refs, tmp_path):
  ref, path = refs["llama"]
  # Pickles only: refused without being opened.
  bins = tmp_path / "bins"
  bins.mkdir()
  (bins / "config.json").write_text((path / "config.json").read_text())
  (bins / "pytorch_model.bin").write_bytes(b"not opened")
  with pytest.raises(hf.TensorError, match="pickle.*never unpickles.*safetensors"):
    hf.from_pretrained(bins)
  sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
  # A wrongly shaped tensor is named.
  bad = tmp_path / "shape"
  bad.mkdir()
  (bad / "config.json").write_text((path / "config.json").read_text())
  hf.save_safetensors({**sd, "model.layers.1.mlp.up_proj.weight": np.zeros((95, 64),
                                                                           np.float32)},
                      str(bad / "model.safetensors"))
  with pytest.raises(hf.TensorError, match=r"'model.layers.1.mlp.up_proj.weight'.*shape "
                                           r"\(95, 64\).*implies \(96, 64\)"):
    hf.from_pretrained(bad)
  # A missing tensor is named.
  del sd["model.layers.0.self_attn.k_proj.weight"]
  hf.save_safetensors(sd, str(bad / "model.safetensors"))
  with pytest.raises(hf.TensorError, match="missing tensor 'model.layers.0.self_attn.k_proj"):
    hf.from_pretrained(bad)
  # An architecture lmx does not run.
  (bad / "config.json").write_text(json.dumps({"model_type": "falcon",
                                               "architectures": ["FalconForCausalLM"]}))
  with pytest.raises(hf.UnsupportedModel, match="FalconForCausalLM"):
    hf.from_pretrained(bad)
