"""Mixtral in and out: a random small transformers `MixtralForCausalLM` (torch CPU, fp32)
saved with save_pretrained must give lmx the same logits and greedy tokens; an lmx MoE model
written by `to_pretrained` must give transformers lmx's logits; settings Mixtral cannot
express are refused in one sentence before anything is written.

The torch tests need the `reference` extra and are marked slow; the HF model is built once.
"""

import json

import numpy as np
import pytest
from flax import nnx

from lmx.config import ModelConfig, MoEConfig
from lmx.interop import convert, hf
from lmx.interop.hf_config import model_config
from lmx.model.transformer import Transformer

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 24)).astype(np.int32)
HF_CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
              num_experts_per_tok=2, max_position_embeddings=64, rope_theta=500.0,
              sliding_window=6, router_aux_loss_coef=0.02, tie_word_embeddings=False)


def _moe_cfg(**moe) -> ModelConfig:
  """A small lmx MoE model; `moe` overrides Mixtral-expressible defaults."""
  return ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     d_ff=48, max_seq_len=64, tie_embeddings=False, init_std=0.1,
                     moe=MoEConfig(**{"num_experts": 4, "top_k": 2, **moe})).validate()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """(transformers Mixtral, its save_pretrained directory). Norms and routers get larger
  random weights so that their mapping and the expert choice matter."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
      **HF_CFG, attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        torch.nn.init.uniform_(p, 0.5, 1.5)
      if name.endswith("mlp.gate.weight"):  # the router
        torch.nn.init.normal_(p, std=0.5)
  path = tmp_path_factory.mktemp("mixtral")
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def imported(ref):
  return hf.from_pretrained(ref[1])


def _hf_logits(model, tokens=TOKENS):
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _params(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.slow  # torch
def test_router_equals_mixtral_routing():
  """lmx's softmax router (top-k of the softmax over all experts, renormalized) picks the
  experts and weights transformers' MixtralTopKRouter does."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.models.mixtral import modeling_mixtral
  from lmx.model.moe import route
  cfg = transformers.MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=3)
  router = modeling_mixtral.MixtralTopKRouter(cfg)
  x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
  w = np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)
  with torch.no_grad():
    router.weight.copy_(torch.from_numpy(w))
    _, want_w, want_idx = router(torch.from_numpy(x))
  got_w, got_idx, _ = route(x @ w.T, 3, "softmax")
  np.testing.assert_array_equal(np.asarray(got_idx), want_idx.numpy())
  np.testing.assert_allclose(np.asarray(got_w), want_w.numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow  # torch + compiles
def test_from_pretrained_matches_transformers(ref, imported):
  model_hf, path = ref
  model, cfg = imported
  assert json.loads((path / "config.json").read_text())["model_type"] == "mixtral"
  m = cfg.moe
  assert (m.num_experts, m.top_k, m.capacity_factor, m.every_n_layers, m.shared_experts,
          m.router) == (4, 2, 0.0, 1, 0, "softmax")
  assert (cfg.sliding_window, cfg.d_ff, cfg.rope_theta, cfg.kv_heads) == (6, 48, 500.0, 2)
  assert m.aux_loss_coef == pytest.approx(0.04)  # HF's 0.02 counts each of the 2 choices
  # The fresh model (no forward pass yet) is usable as loaded: its MoE statistics are zeros
  # rather than the abstract shapes nnx.eval_shape leaves.
  assert {k: float(v) for k, v in model.aux_losses().items()} == {
      "moe_balance_sum": 0.0, "moe_router_z_sum": 0.0}
  from lmx.infer.generate import generate
  import torch
  prompt = TOKENS[0, :6].tolist()
  model_hf.generation_config.eos_token_id = None
  model_hf.generation_config.pad_token_id = 0
  with torch.no_grad():
    out = model_hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                            do_sample=False)
  assert generate(model, prompt, 12, temperature=0.0)[0] == out[0, 6:].tolist()
  got = np.asarray(model(TOKENS))
  want = _hf_logits(model_hf)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # measured 1.2e-7


@pytest.mark.slow  # torch
def test_fused_transformers5_spelling(ref, imported, tmp_path):
  """A raw state-dict save (transformers 5's fused `gate_up_proj` / `down_proj` experts)
  loads to exactly the parameters of the Hub-spelled save."""
  from safetensors.torch import save_file
  model_hf, path = ref
  sd = model_hf.state_dict()
  assert "model.layers.0.mlp.experts.gate_up_proj" in sd
  save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  fused, _ = hf.from_pretrained(tmp_path)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(fused, nnx.Param)),
                            nnx.to_flat_state(nnx.state(imported[0], nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                  err_msg=str(p))
  # A misshaped fused tensor is named in one sentence.
  bad = {k: v.numpy() for k, v in sd.items()}
  bad["model.layers.1.mlp.experts.down_proj"] = np.zeros((4, 32, 47), np.float32)
  hf.save_safetensors(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(hf.TensorError, match=r"'model.layers.1.mlp.experts.down_proj'.*shape "
                                           r"\(4, 32, 47\).*implies \(4, 32, 48\)"):
    hf.from_pretrained(tmp_path)


@pytest.mark.slow  # torch + compiles
def test_to_pretrained_loads_in_transformers(tmp_path):
  """A random lmx MoE model (capacity 1.0: written as its dropless twin) -> Mixtral files
  in the Hub spelling -> transformers' logits equal lmx's dropless ones; reading them back
  gives the same parameters."""
  transformers = pytest.importorskip("transformers")
  cfg = _moe_cfg(capacity_factor=1.0, aux_loss_coef=0.05)
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  files = hf.to_pretrained(model, cfg, tmp_path)
  assert files == ["config.json", "model.safetensors"]
  hf_cfg = json.loads((tmp_path / "config.json").read_text())
  assert (hf_cfg["architectures"], hf_cfg["num_local_experts"], hf_cfg["num_experts_per_tok"],
          hf_cfg["intermediate_size"], hf_cfg["sliding_window"]) == (
              ["MixtralForCausalLM"], 4, 2, 48, None)
  assert hf_cfg["router_aux_loss_coef"] == pytest.approx(0.025)
  names = hf.load_safetensors(str(tmp_path / "model.safetensors"))
  assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(back).__name__ == "MixtralForCausalLM"
  dropless = nnx.eval_shape(lambda: Transformer(_moe_cfg(), rngs=nnx.Rngs(0)))
  hf.assign_params(dropless, _params(model))
  np.testing.assert_allclose(_hf_logits(back), np.asarray(dropless(TOKENS)), rtol=0, atol=1e-5)
  again, cfg2 = hf.from_pretrained(tmp_path)
  assert cfg2.moe.capacity_factor == 0.0
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(again, nnx.Param)),
                            nnx.to_flat_state(nnx.state(model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                  err_msg=str(p))


@pytest.mark.slow  # torch, Orbax and the CLI both ways
def test_convert_cli_both_ways(ref, tmp_path, capsys):
  """`lmx convert --from_hf` a Mixtral directory -> run (experiment.py with model.moe) ->
  `lmx convert --to_hf` -> the very weights and logits of the original; then an
  experiments/moe.py run (dropless, and the capacity default exported as dropless)."""
  transformers = pytest.importorskip("transformers")
  from lmx.config import CheckpointConfig
  from lmx.experiment import load_experiment
  from lmx.train.checkpoint import Checkpointer
  model_hf, path = ref
  run = tmp_path / "run"
  assert convert.cli_main(["--from_hf", str(path), "--to", str(run)]) == 0
  exp, _ = load_experiment([f"--config={run}/experiment.py"])
  assert (exp.model.moe.num_experts, exp.model.moe.top_k, exp.model.sliding_window) == (4, 2, 6)
  out = tmp_path / "out"
  capsys.readouterr()
  assert convert.cli_main(["--from", str(run), "--to_hf", str(out), "--no_tokenizer"]) == 0
  assert "note" not in json.loads(capsys.readouterr().out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  want = model_hf.state_dict()
  for k, v in back.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)
  np.testing.assert_allclose(_hf_logits(back), _hf_logits(model_hf), rtol=0, atol=1e-5)

  # An lmx MoE run of experiments/moe.py (random weights stand in for training).
  exp, _ = load_experiment(["--config=experiments/moe.py:dropless"])
  model = Transformer(exp.model, rngs=nnx.Rngs(0))
  ckpt = Checkpointer(tmp_path / "moe", CheckpointConfig(async_save=False))
  ckpt.save_best(0, nnx.state(model, nnx.Param), 1.0)
  ckpt.wait()
  ckpt.close()
  tokens = np.random.default_rng(1).integers(0, exp.model.vocab_size, (2, 16)).astype(np.int32)
  want = np.asarray(model(tokens))
  for arg, note in (("dropless", False), ("moe", True)):
    dest = tmp_path / f"hf_{arg}"
    assert convert.cli_main(["--from", str(tmp_path / "moe"), "--to_hf", str(dest),
                             f"--config=experiments/moe.py:{arg}", "--no_tokenizer"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert ("dropless Mixtral" in summary.get("note", "")) == note
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_dropless").eval()
  np.testing.assert_allclose(_hf_logits(back, tokens), want, rtol=0, atol=1e-5)
  assert ((tmp_path / "hf_moe" / "model.safetensors").read_bytes()
          == (tmp_path / "hf_dropless" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("moe, field", [
    (dict(router="sigmoid"), "model.moe.router='sigmoid'"),
    (dict(shared_experts=1), "model.moe.shared_experts=1"),
    (dict(every_n_layers=2), "model.moe.every_n_layers=2"),
    (dict(top_k=1), "model.moe.top_k=1"),
])
def test_export_refusals(tmp_path, moe, field):
  cfg = _moe_cfg(**moe)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(hf.UnsupportedModel) as e:
    hf.to_pretrained(model, cfg, tmp_path / "out")
  assert str(e.value).startswith(field) and str(e.value).count(". ") == 0
  assert not (tmp_path / "out").exists()


def test_export_refuses_geglu_experts(tmp_path):
  import dataclasses
  cfg = dataclasses.replace(_moe_cfg(), mlp="geglu").validate()
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(hf.UnsupportedModel, match=r"^model.mlp='geglu' has no Mixtral"):
    hf.to_pretrained(model, cfg, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def _hf_dict(**kw) -> dict:
  return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **HF_CFG, **kw}


def test_import_config_refusals():
  with pytest.raises(hf.UnsupportedModel, match="num_experts_per_tok=1,"):
    model_config(_hf_dict(num_experts_per_tok=1))
  with pytest.raises(hf.UnsupportedModel, match="num_experts_per_tok=5; it must be between"):
    model_config(_hf_dict(num_experts_per_tok=5))
  with pytest.raises(hf.UnsupportedModel, match="hidden_act='gelu'"):
    model_config(_hf_dict(hidden_act="gelu"))
  cfg = model_config(_hf_dict())  # and the config export writes back what was read
  back = hf.hf_config(cfg)
  for k in ("num_local_experts", "num_experts_per_tok", "intermediate_size", "sliding_window",
            "num_key_value_heads", "rope_theta"):
    assert back[k] == HF_CFG[k], k
  assert back["router_aux_loss_coef"] == pytest.approx(0.02)


def test_import_tensor_refusals(tmp_path):
  """Missing, unexpected and misshaped expert tensors are named, one sentence each (the
  files are zeros written with lmx's own writer: no torch needed)."""
  cfg = model_config(_hf_dict())
  sd = {k: np.zeros(s, np.float32) for k, s in hf.expected_shapes(cfg, "mixtral").items()}
  assert sd["model.layers.0.block_sparse_moe.experts.2.w1.weight"].shape == (48, 32)
  assert sd["model.layers.1.block_sparse_moe.gate.weight"].shape == (4, 32)
  (tmp_path / "config.json").write_text(json.dumps(_hf_dict()))

  def refused(tensors, pattern):
    hf.save_safetensors(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf.TensorError, match=pattern):
      hf.from_pretrained(tmp_path)

  missing = dict(sd)
  del missing["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
  refused(missing, r"missing tensor 'model.layers.1.block_sparse_moe.experts.3.w3.weight'")
  refused({**sd, "model.layers.0.block_sparse_moe.experts.4.w1.weight": np.zeros(
      (48, 32), np.float32)}, r"has tensor 'model.layers.0.block_sparse_moe.experts.4.w1")
  refused({**sd, "model.layers.0.block_sparse_moe.experts.1.w2.weight": np.zeros(
      (32, 40), np.float32)}, r"'model.layers.0.block_sparse_moe.experts.1.w2.weight'.*"
                              r"\(32, 40\), but config.json implies \(32, 48\)")
