"""Accounting against the real parameter tree of every preset, and MFU/FLOPs by hand."""

import importlib.util
import os

import pytest
from flax import nnx

from lmx.config import ModelConfig, from_config_dict
from lmx.model import Transformer, count_model_params
from lmx.scaling import accounting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                    f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


PRESETS = [("default", None), ("gpt2_124m", None), ("llama", "tiny"), ("llama", "60m"),
           ("llama", "150m"), ("llama", "1b"), ("llama", "70b")]


@pytest.mark.parametrize("name,arg", PRESETS)
def test_accounting_equals_parameter_tree(name, arg):
  cfg = from_config_dict(_experiment(name, arg)).model
  tree = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # no allocation
  assert count_model_params(tree) == accounting.count_params(cfg).params


def test_llama_70b_is_llama2_70b():
  cfg = from_config_dict(_experiment("llama", "70b")).model
  assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ff_dim, cfg.vocab_size,
          cfg.max_seq_len, cfg.tie_embeddings) == (8192, 80, 64, 8, 28672, 32000, 4096, False)
  # Llama-2-70B's published size (Touvron et al. 2023; the HF checkpoint's tensor sizes).
  assert accounting.count_params(cfg).params == 68_976_648_192


def test_isoflop_sweep_models_equal_parameter_tree(tmp_path):
  from lmx.scaling.sweep import plan_sweep
  sc = _experiment("isoflop")
  for e in plan_sweep(sc, str(tmp_path))[::4]:
    cfg = ModelConfig(**e["config"]["model"])
    tree = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert count_model_params(tree) == e["params"]


def test_flops_per_token_by_hand():
  cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, mlp="relu",
                    max_seq_len=16).validate()
  # per layer: attention 4*32*32, MLP 2*32*128, two RMSNorm scales; plus the final norm
  n = 2 * (4 * 32 * 32 + 2 * 32 * 128 + 2 * 32) + 32
  assert accounting.count_params(cfg).non_embedding_params == n
  expected = 6 * (n + 32 * 100) + 6 * 2 * 16 * 4 * 8  # causal attention at half
  assert accounting.flops_per_token(cfg, 16) == expected


def test_mfu_by_hand():
  # 1,000 tokens/s at 6e9 FLOPs/token on 4 chips of 1e13 FLOP/s: 6e12 / 4e13 = 0.15.
  assert accounting.mfu(1000.0, 6e9, 4, 1e13) == pytest.approx(0.15)
  h100 = accounting.DEVICE_PEAK_FLOPS["h100"]
  assert accounting.mfu(h100 / 6e9 * 0.5, 6e9, 1, h100) == pytest.approx(0.5)


def test_pf_days():
  assert accounting.pf_days(8.64e19) == pytest.approx(1.0)
