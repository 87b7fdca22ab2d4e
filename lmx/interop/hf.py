"""Hugging Face weights in and out: LLaMA-family and GPT-2 checkpoints <-> lmx parameters.

Weights travel as `{name: numpy array}` dicts in Hugging Face naming, read from and written
to `.safetensors` files with the `safetensors` library. Layout differences:

* HF `nn.Linear` stores (out, in); lmx stores (in, out) and splits heads:
  q_proj (H*Dh, D) -> wq (D, H, Dh); o_proj (D, H*Dh) -> wo (H, Dh, D).
* GPT-2 uses Conv1D, already (in, out), with q, k, v fused in `c_attn` (D, 3D).
* Both use the rotate-half RoPE convention lmx uses, so q/k need no permutation.
* HF names each layer (`model.layers.{i}.`, `h.{i}.`); lmx stacks the L layers into one
  tree under `layers.block` with a leading L axis (lmx.model.stack): import `np.stack`s the
  per-layer arrays, export takes them apart again.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from lmx.config import ModelConfig


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(path)


def save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


def _strip(sd: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {(k[len(prefix):] if k.startswith(prefix) else k): np.asarray(v, np.float32)
          for k, v in sd.items()}


def _stack_layers(per_layer: list[dict]) -> dict:
  """L per-layer trees of arrays -> the stack's tree `{"block": ...}`, each leaf (L, ...)."""
  return {"block": jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}


def _layer(tree: dict, i: int) -> dict:
  """Layer i's tree of arrays from an lmx parameter tree (the inverse of `_stack_layers`)."""
  return jax.tree.map(lambda x: np.asarray(x)[i], tree["layers"]["block"])


def llama_from_hf(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF LlamaForCausalLM state dict -> lmx parameter tree (nested dict of arrays)."""
  sd = _strip(sd, "model.")
  d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
  blocks = []
  for i in range(cfg.n_layers):
    p = f"layers.{i}."
    blocks.append({
        "attn": {
            "wq": sd[p + "self_attn.q_proj.weight"].T.reshape(d, h, hd),
            "wk": sd[p + "self_attn.k_proj.weight"].T.reshape(d, kv, hd),
            "wv": sd[p + "self_attn.v_proj.weight"].T.reshape(d, kv, hd),
            "wo": sd[p + "self_attn.o_proj.weight"].T.reshape(h, hd, d),
        },
        "mlp": {
            "w_gate": sd[p + "mlp.gate_proj.weight"].T,
            "w_up": sd[p + "mlp.up_proj.weight"].T,
            "w_down": sd[p + "mlp.down_proj.weight"].T,
        },
        "attn_norm": {"scale": sd[p + "input_layernorm.weight"]},
        "mlp_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
    })
  tree = {"embed": sd["embed_tokens.weight"], "layers": _stack_layers(blocks),
          "final_norm": {"scale": sd["norm.weight"]}}
  if not cfg.tie_embeddings:
    tree["lm_head"] = sd["lm_head.weight"].T
  return tree


def llama_to_hf(tree: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """lmx parameter tree (LLaMA-style config) -> HF LlamaForCausalLM state dict."""
  d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
  out = {"model.embed_tokens.weight": tree["embed"],
         "model.norm.weight": tree["final_norm"]["scale"]}
  for i in range(cfg.n_layers):
    b, p = _layer(tree, i), f"model.layers.{i}."
    out[p + "self_attn.q_proj.weight"] = b["attn"]["wq"].reshape(d, h * hd).T
    out[p + "self_attn.k_proj.weight"] = b["attn"]["wk"].reshape(d, kv * hd).T
    out[p + "self_attn.v_proj.weight"] = b["attn"]["wv"].reshape(d, kv * hd).T
    out[p + "self_attn.o_proj.weight"] = b["attn"]["wo"].reshape(h * hd, d).T
    out[p + "mlp.gate_proj.weight"] = b["mlp"]["w_gate"].T
    out[p + "mlp.up_proj.weight"] = b["mlp"]["w_up"].T
    out[p + "mlp.down_proj.weight"] = b["mlp"]["w_down"].T
    out[p + "input_layernorm.weight"] = b["attn_norm"]["scale"]
    out[p + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"]
  out["lm_head.weight"] = (tree["embed"] if cfg.tie_embeddings else tree["lm_head"].T)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def gpt2_from_hf(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF GPT2LMHeadModel state dict -> lmx parameter tree."""
  sd = _strip(sd, "transformer.")
  d, h, hd = cfg.d_model, cfg.n_heads, cfg.dim_per_head
  blocks = []
  for i in range(cfg.n_layers):
    p = f"h.{i}."
    w_qkv, b_qkv = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]  # (D, 3D), (3D,)
    wq, wk, wv = np.split(w_qkv, 3, axis=1)
    bq, bk, bv = np.split(b_qkv, 3)
    blocks.append({
        "attn": {
            "wq": wq.reshape(d, h, hd), "wk": wk.reshape(d, h, hd), "wv": wv.reshape(d, h, hd),
            "bq": bq.reshape(h, hd), "bk": bk.reshape(h, hd), "bv": bv.reshape(h, hd),
            "wo": sd[p + "attn.c_proj.weight"].reshape(h, hd, d),
            "bo": sd[p + "attn.c_proj.bias"],
        },
        "mlp": {
            "w_up": sd[p + "mlp.c_fc.weight"], "b_up": sd[p + "mlp.c_fc.bias"],
            "w_down": sd[p + "mlp.c_proj.weight"], "b_down": sd[p + "mlp.c_proj.bias"],
        },
        "attn_norm": {"scale": sd[p + "ln_1.weight"], "bias": sd[p + "ln_1.bias"]},
        "mlp_norm": {"scale": sd[p + "ln_2.weight"], "bias": sd[p + "ln_2.bias"]},
    })
  return {"embed": sd["wte.weight"], "pos_embed": {"table": sd["wpe.weight"]},
          "layers": _stack_layers(blocks),
          "final_norm": {"scale": sd["ln_f.weight"], "bias": sd["ln_f.bias"]}}


def assign_params(model: nnx.Module, tree: dict) -> None:
  """Copy a nested dict of arrays into the model's nnx.Params, checking every shape.

  Every parameter of the model must be present in `tree` and vice versa.
  """
  state = nnx.state(model, nnx.Param)
  flat_model = dict(nnx.to_flat_state(state))
  flat_tree = {}

  def walk(node, path):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, path + (k,))
    else:
      flat_tree[path] = node

  walk(tree, ())
  missing = sorted(set(flat_model) - set(flat_tree), key=str)
  extra = sorted(set(flat_tree) - set(flat_model), key=str)
  if missing or extra:
    raise ValueError(f"assign_params: weights do not match the model: missing {missing[:3]}, "
                     f"unexpected {extra[:3]}.")
  for path, var in flat_model.items():
    arr = flat_tree[path]
    if tuple(arr.shape) != tuple(var.get_value().shape):
      raise ValueError(f"assign_params: {'.'.join(map(str, path))} has shape {arr.shape}, "
                       f"the model expects {var.get_value().shape}.")
    var.set_value(jax.numpy.asarray(arr, var.get_value().dtype))
  nnx.update(model, state)
