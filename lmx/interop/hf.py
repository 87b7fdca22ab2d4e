"""Hugging Face checkpoints in and out: LLaMA-family, Mistral, Mixtral and GPT-2 <-> lmx models.

    model, cfg = from_pretrained("path/to/hf_dir")          # config.json + safetensors
    to_pretrained(model, cfg, "out_dir", dtype="bfloat16")  # transformers loads this
    tok = load_tokenizer("path/to/hf_dir")                  # tokenizer.model or .json

Weights travel as `{name: numpy array}` dicts in Hugging Face naming, read from and written
to `.safetensors` files with the `safetensors` library. Layout differences:

* HF `nn.Linear` stores (out, in); lmx stores (in, out) and splits heads:
  q_proj (H*Dh, D) -> wq (D, H, Dh); o_proj (D, H*Dh) -> wo (H, Dh, D).
* GPT-2 uses Conv1D, already (in, out), with q, k, v fused in `c_attn` (D, 3D).
* Both use the rotate-half RoPE convention lmx uses, so q/k need no permutation.
* HF names each layer (`model.layers.{i}.`, `h.{i}.`); lmx stacks the L layers into one
  tree under `layers.block` with a leading L axis (lmx.model.stack): import `np.stack`s the
  per-layer arrays, export takes them apart again.
* Mixtral's experts: the Hub files hold one (out, in) Linear per expert
  (`block_sparse_moe.experts.{e}.w1` gate, `w3` up, `w2` down) and the router as
  `block_sparse_moe.gate` (E, D); lmx stacks them as w_gate / w_up (E, D, F), w_down (E, F, D),
  router (D, E). transformers 5 holds them fused in memory (`mlp.experts.gate_up_proj`
  (E, 2F, D), gate rows first; `mlp.experts.down_proj` (E, D, F)), which a raw state-dict
  save writes; both spellings are read, the Hub one is written.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.config import ModelConfig
from lmx.interop import safetensors_io
from lmx.interop.hf_config import UnsupportedModel, arch_of, hf_config, model_config
from lmx.interop.hf_tokenizer import load_tokenizer  # noqa: F401  (re-exported)
from lmx.interop.safetensors_io import TensorError

__all__ = ["from_pretrained", "to_pretrained", "load_tokenizer", "TensorError",
           "UnsupportedModel"]


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of one .safetensors file (float32 / float16 / bfloat16 kept as stored)."""
  return safetensors_io.read_file(path)


def save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
  safetensors_io.write_file(tensors, path)


def _strip(sd: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {(k[len(prefix):] if k.startswith(prefix) else k): np.asarray(v, np.float32)
          for k, v in sd.items()}


def _stack_layers(per_layer: list[dict]) -> dict:
  """L per-layer trees of arrays -> the stack's tree `{"block": ...}`, each leaf (L, ...)."""
  return {"block": jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}


def _layer(tree: dict, i: int) -> dict:
  """Layer i's tree of arrays from an lmx parameter tree (the inverse of `_stack_layers`)."""
  return jax.tree.map(lambda x: np.asarray(x)[i], tree["layers"]["block"])


def _fused_experts(sd: dict) -> bool:
  """Whether a Mixtral state dict spells its experts the transformers-5 fused way."""
  return any(k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj") for k in sd)


def _mlp_from_hf(sd: dict[str, np.ndarray], p: str, cfg: ModelConfig) -> dict:
  """Layer prefix `p`'s MLP: LLaMA's dense one, or Mixtral's experts (either spelling)."""
  if not cfg.moe.num_experts:
    return {"w_gate": sd[p + "mlp.gate_proj.weight"].T, "w_up": sd[p + "mlp.up_proj.weight"].T,
            "w_down": sd[p + "mlp.down_proj.weight"].T}
  if _fused_experts(sd):
    gate_up = sd[p + "mlp.experts.gate_up_proj"]  # (E, 2F, D): gate rows, then up rows
    f = gate_up.shape[1] // 2
    return {"router": sd[p + "mlp.gate.weight"].T,  # (E, D) -> (D, E)
            "w_gate": gate_up[:, :f].transpose(0, 2, 1),  # (E, D, F)
            "w_up": gate_up[:, f:].transpose(0, 2, 1),
            "w_down": sd[p + "mlp.experts.down_proj"].transpose(0, 2, 1)}  # (E, D, F) -> (E, F, D)
  q = p + "block_sparse_moe."
  ex = range(cfg.moe.num_experts)
  return {"router": sd[q + "gate.weight"].T,
          "w_gate": np.stack([sd[f"{q}experts.{e}.w1.weight"].T for e in ex]),  # (E, D, F)
          "w_up": np.stack([sd[f"{q}experts.{e}.w3.weight"].T for e in ex]),
          "w_down": np.stack([sd[f"{q}experts.{e}.w2.weight"].T for e in ex])}  # (E, F, D)


def _mlp_to_hf(m: dict, p: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The inverse of `_mlp_from_hf`, writing Mixtral's experts in the Hub spelling."""
  if not cfg.moe.num_experts:
    return {p + "mlp.gate_proj.weight": m["w_gate"].T, p + "mlp.up_proj.weight": m["w_up"].T,
            p + "mlp.down_proj.weight": m["w_down"].T}
  q = p + "block_sparse_moe."
  out = {q + "gate.weight": m["router"].T}
  for e in range(cfg.moe.num_experts):
    out[f"{q}experts.{e}.w1.weight"] = m["w_gate"][e].T  # (F, D)
    out[f"{q}experts.{e}.w3.weight"] = m["w_up"][e].T
    out[f"{q}experts.{e}.w2.weight"] = m["w_down"][e].T  # (D, F)
  return out


def llama_from_hf(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """HF LlamaForCausalLM (Mistral, Mixtral) state dict -> lmx parameter tree (nested dict
  of arrays)."""
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
        "mlp": _mlp_from_hf(sd, p, cfg),
        "attn_norm": {"scale": sd[p + "input_layernorm.weight"]},
        "mlp_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
    })
  tree = {"embed": sd["embed_tokens.weight"], "layers": _stack_layers(blocks),
          "final_norm": {"scale": sd["norm.weight"]}}
  if not cfg.tie_embeddings:
    tree["lm_head"] = sd["lm_head.weight"].T
  return tree


def llama_to_hf(tree: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """lmx parameter tree (LLaMA-style config) -> HF LlamaForCausalLM (Mistral, Mixtral)
  state dict."""
  d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
  out = {"model.embed_tokens.weight": tree["embed"],
         "model.norm.weight": tree["final_norm"]["scale"]}
  for i in range(cfg.n_layers):
    b, p = _layer(tree, i), f"model.layers.{i}."
    out[p + "self_attn.q_proj.weight"] = b["attn"]["wq"].reshape(d, h * hd).T
    out[p + "self_attn.k_proj.weight"] = b["attn"]["wk"].reshape(d, kv * hd).T
    out[p + "self_attn.v_proj.weight"] = b["attn"]["wv"].reshape(d, kv * hd).T
    out[p + "self_attn.o_proj.weight"] = b["attn"]["wo"].reshape(h * hd, d).T
    out.update(_mlp_to_hf(b["mlp"], p, cfg))
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
  tree = {"embed": sd["wte.weight"], "pos_embed": {"table": sd["wpe.weight"]},
          "layers": _stack_layers(blocks),
          "final_norm": {"scale": sd["ln_f.weight"], "bias": sd["ln_f.bias"]}}
  if not cfg.tie_embeddings:
    tree["lm_head"] = sd["lm_head.weight"].T
  return tree


def gpt2_to_hf(tree: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """lmx parameter tree (GPT-2-style config) -> HF GPT2LMHeadModel state dict."""
  d, h, hd = cfg.d_model, cfg.n_heads, cfg.dim_per_head
  out = {"transformer.wte.weight": tree["embed"],
         "transformer.wpe.weight": tree["pos_embed"]["table"],
         "transformer.ln_f.weight": tree["final_norm"]["scale"],
         "transformer.ln_f.bias": tree["final_norm"]["bias"]}
  for i in range(cfg.n_layers):
    b, p = _layer(tree, i), f"transformer.h.{i}."
    a, m = b["attn"], b["mlp"]
    out[p + "attn.c_attn.weight"] = np.concatenate(
        [np.asarray(a[w]).reshape(d, h * hd) for w in ("wq", "wk", "wv")], axis=1)  # (D, 3D)
    out[p + "attn.c_attn.bias"] = np.concatenate(
        [np.asarray(a[w]).reshape(h * hd) for w in ("bq", "bk", "bv")])
    out[p + "attn.c_proj.weight"] = a["wo"].reshape(h * hd, d)
    out[p + "attn.c_proj.bias"] = a["bo"]
    out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = m["w_up"], m["b_up"]
    out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = m["w_down"], m["b_down"]
    out[p + "ln_1.weight"], out[p + "ln_1.bias"] = b["attn_norm"]["scale"], b["attn_norm"]["bias"]
    out[p + "ln_2.weight"], out[p + "ln_2.bias"] = b["mlp_norm"]["scale"], b["mlp_norm"]["bias"]
  out["lm_head.weight"] = tree["embed"] if cfg.tie_embeddings else tree["lm_head"].T
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def expected_shapes(cfg: ModelConfig, arch: str,
                    fused: bool = False) -> dict[str, tuple[int, ...]]:
  """Every tensor (HF name -> shape) a checkpoint of `arch` with config `cfg` holds;
  `fused`: Mixtral's experts in transformers 5's in-memory spelling (module docstring)."""
  v, d, f, n_l = cfg.vocab_size, cfg.d_model, cfg.ff_dim, cfg.n_layers
  if arch == "gpt2":
    out = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (cfg.max_seq_len, d),
           "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    per = {"attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
           "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,), "mlp.c_fc.weight": (d, f),
           "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, d), "mlp.c_proj.bias": (d,),
           "ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,)}
    prefix = "transformer.h."
  else:
    qd, kd = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    per = {"self_attn.q_proj.weight": (qd, d), "self_attn.k_proj.weight": (kd, d),
           "self_attn.v_proj.weight": (kd, d), "self_attn.o_proj.weight": (d, qd),
           "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
           "mlp.down_proj.weight": (d, f), "input_layernorm.weight": (d,),
           "post_attention_layernorm.weight": (d,)}
    if arch == "mixtral":
      from lmx.model.moe import expert_ff
      e, f = cfg.moe.num_experts, expert_ff(cfg)
      for k in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        del per[k]
      if fused:
        per.update({"mlp.gate.weight": (e, d), "mlp.experts.gate_up_proj": (e, 2 * f, d),
                    "mlp.experts.down_proj": (e, d, f)})
      else:
        per["block_sparse_moe.gate.weight"] = (e, d)
        for j in range(e):
          per.update({f"block_sparse_moe.experts.{j}.w1.weight": (f, d),
                      f"block_sparse_moe.experts.{j}.w3.weight": (f, d),
                      f"block_sparse_moe.experts.{j}.w2.weight": (d, f)})
    prefix = "model.layers."
  for i in range(n_l):
    out.update({f"{prefix}{i}.{k}": s for k, s in per.items()})
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = (v, d)
  return out


def _canonical(name: str, arch: str) -> str:
  """Add the base-model prefix a headless save (GPT2Model, LlamaModel) leaves out."""
  prefix = "transformer." if arch == "gpt2" else "model."
  return name if name.startswith(prefix) or name == "lm_head.weight" else prefix + name


def _ignorable(name: str, cfg: ModelConfig) -> bool:
  """Buffers older transformers saved (RoPE inv_freq, GPT-2's causal-mask `attn.bias`) and a
  tied head's copy of the embedding: present in some files, never weights of their own."""
  return (name.endswith("rotary_emb.inv_freq") or name.endswith(".attn.masked_bias")
          or (name.endswith(".attn.bias") and ".h." in name)
          or (name == "lm_head.weight" and cfg.tie_embeddings))


def check_tensors(sd: dict[str, np.ndarray], cfg: ModelConfig, arch: str,
                  where: str = "checkpoint") -> dict[str, np.ndarray]:
  """`sd` with canonical names, checked against `expected_shapes`: raises TensorError with a
  sentence naming the first missing, unexpected, wrongly shaped or non-float tensor."""
  want = expected_shapes(cfg, arch, fused=arch == "mixtral" and _fused_experts(sd))
  sd = {_canonical(k, arch): v for k, v in sd.items()}
  sd = {k: v for k, v in sd.items() if k in want or not _ignorable(k, cfg)}
  missing = [k for k in want if k not in sd]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise TensorError(f"{where} is missing tensor {missing[0]!r}{more}, which config.json "
                      f"implies for {arch} with {cfg.n_layers} layers.")
  extra = [k for k in sd if k not in want]
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise TensorError(f"{where} has tensor {extra[0]!r}{more}, which a {arch} model with this "
                      "config.json does not have.")
  for k, shape in want.items():
    a = sd[k]
    if tuple(a.shape) != shape:
      raise TensorError(f"tensor {k!r} in {where} has shape {tuple(a.shape)}, but config.json "
                        f"implies {shape}.")
    if a.dtype not in safetensors_io.DTYPES.values():
      raise TensorError(f"tensor {k!r} in {where} has dtype {a.dtype}; lmx reads float32, "
                        "float16 or bfloat16 weights.")
  return sd


def from_pretrained(path: str | os.PathLike, *,
                    dtype: str | None = None) -> tuple[nnx.Module, ModelConfig]:
  """An lmx Transformer and its ModelConfig from a local Hugging Face model directory.

  Reads config.json and model.safetensors (or the shards of model.safetensors.index.json);
  tensors may be float32, float16 or bfloat16 and become lmx's float32 parameters.
  `dtype`: the compute dtype (ModelConfig.dtype: 'float32', 'bfloat16', 'float16'); None
  keeps float32 whatever the file's dtype. Raises UnsupportedModel for architectures lmx
  cannot run exactly, TensorError naming the tensor for missing, unexpected, misshapen or
  non-float weights, and refuses pickled (.bin) weights without opening them.
  """
  from lmx.model.transformer import Transformer
  path = pathlib.Path(path)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"{path} has no config.json; from_pretrained needs a Hugging Face "
                            "model directory (config.json + model.safetensors).")
  hf_cfg = json.loads((path / "config.json").read_text())
  cfg = model_config(hf_cfg, dtype="float32" if dtype is None else jnp.dtype(dtype).name)
  arch = hf_cfg["model_type"]
  sd = check_tensors(safetensors_io.read_dir(path), cfg, arch, where=str(path))
  tree = gpt2_from_hf(sd, cfg) if arch == "gpt2" else llama_from_hf(sd, cfg)
  # Abstract first: no random init of weights that are overwritten at once.
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  assign_params(model, tree)
  _zero_abstract(model)
  return model, cfg


def _zero_abstract(model: nnx.Module) -> None:
  """Give the non-parameter variables `nnx.eval_shape` left abstract (an MoE stack's
  `moe_aux` statistics of the last forward pass) zero values, so the model can be split and
  jitted before its first forward pass."""
  state = nnx.state(model, nnx.Not(nnx.Param))
  for _, var in nnx.to_flat_state(state):
    v = var.get_value()
    if isinstance(v, jax.ShapeDtypeStruct):
      var.set_value(jnp.zeros(v.shape, v.dtype))
  nnx.update(model, state)


def params_to_hf(tree: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """An lmx parameter tree -> the HF state dict of `arch_of(cfg)` (float32, tied head
  omitted, as save_pretrained writes it)."""
  arch = arch_of(cfg)  # refuses, naming the field, what no HF architecture computes
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  peft = [jax.tree_util.keystr(p) for p, _ in flat if "_peft" in jax.tree_util.keystr(p)]
  if peft:
    raise UnsupportedModel(f"the parameters hold PEFT modules ({peft[0]}); export the base "
                           "model (merge LoRA into it first) -- Hugging Face has no place "
                           "for them.")
  sd = gpt2_to_hf(tree, cfg) if arch == "gpt2" else llama_to_hf(tree, cfg)
  if cfg.tie_embeddings:
    sd.pop("lm_head.weight")
  return sd


def to_pretrained(model: nnx.Module | dict, cfg: ModelConfig, path: str | os.PathLike, *,
                  dtype: str = "float32", max_shard_bytes: int = 0) -> list[str]:
  """Write config.json + model.safetensors (sharded above `max_shard_bytes` if > 0) that
  transformers' AutoModelForCausalLM.from_pretrained loads: LLaMA (Mistral when
  model.sliding_window > 0), Mixtral (model.moe; a capacity model is written as its dropless
  twin, Mixtral having no capacity) or GPT-2. `model`: a Transformer or its parameter tree.
  `dtype`: the stored dtype, float32 | float16 | bfloat16. Returns the files written."""
  names = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}
  if dtype not in names:
    raise ValueError(f"to_pretrained: dtype is {dtype!r}; it must be one of {', '.join(names)}.")
  tree = model if isinstance(model, dict) else nnx.to_pure_dict(nnx.state(model, nnx.Param))
  sd = {k: np.asarray(v, np.float32).astype(names[dtype])
        for k, v in params_to_hf(tree, cfg).items()}
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  files = safetensors_io.write_dir(sd, path, max_shard_bytes)
  (path / "config.json").write_text(json.dumps(hf_config(cfg, torch_dtype=dtype), indent=2))
  return ["config.json"] + files


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
