"""Hugging Face `config.json` <-> lmx ModelConfig, for the architectures lmx can run exactly.

Supported `model_type`s: 'llama' (LLaMA 1-3, GQA, Llama 3.1 `rope_scaling`), 'mistral'
(LLaMA blocks + `sliding_window`), 'mixtral' (Mistral blocks whose MLPs are top-k routed
SwiGLU experts: lmx's `model.moe` with a softmax router, dropless) and 'gpt2'. Anything whose
forward pass lmx would compute differently (biases on LLaMA projections, other activations,
other RoPE scalings) is refused with one sentence rather than imported approximately. Both
the transformers 4 spelling (`rope_theta`, `rope_scaling`) and the 5 one (`rope_parameters`)
are read.
"""

from __future__ import annotations

from lmx.config import ModelConfig, MoEConfig

ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}
# GPT-2's tanh-approximated gelu is lmx's 'gelu' (jax.nn.gelu, approximate=True).
_GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class UnsupportedModel(ValueError):
  """A checkpoint lmx cannot run exactly; the message says what and why."""


def _rope(hf: dict) -> tuple[float, dict]:
  """(rope_theta, scaling dict or {}) from either spelling."""
  params = hf.get("rope_parameters") or {}
  theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  scaling = hf.get("rope_scaling") or params
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  return float(theta), ({} if kind in ("default", None) else dict(scaling, rope_type=kind))


def model_config(hf: dict, *, dtype: str = "float32") -> ModelConfig:
  """The ModelConfig equal to a Hugging Face config.json (as a dict). Raises
  UnsupportedModel with one sentence for architectures or settings lmx cannot run exactly."""
  kind = hf.get("model_type")
  if kind not in ARCHS:
    archs = hf.get("architectures") or [kind]
    raise UnsupportedModel(f"config.json describes {archs[0]!r} (model_type {kind!r}); lmx "
                           f"imports only {', '.join(ARCHS.values())}.")
  if kind == "gpt2":
    return _gpt2_config(hf, dtype)
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedModel(f"config.json has hidden_act={act!r}; lmx's LLaMA/Mistral blocks "
                           "use silu (swiglu) only.")
  for f in ("attention_bias", "mlp_bias"):
    if hf.get(f):
      raise UnsupportedModel(f"config.json has {f}=true; lmx's LLaMA blocks have no biases.")
  theta, scaling = _rope(hf)
  rope = {}
  if scaling:
    if scaling["rope_type"] != "llama3":
      raise UnsupportedModel(f"config.json has rope scaling {scaling['rope_type']!r}; lmx "
                             "supports Llama 3's 'llama3' scaling only.")
    rope = dict(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_len=int(scaling["original_max_position_embeddings"]))
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  window = hf.get("sliding_window") if kind in ("mistral", "mixtral") else None
  if kind == "llama" and hf.get("use_sliding_window"):
    raise UnsupportedModel("config.json sets use_sliding_window for a llama model, which "
                           "lmx does not import; use model_type 'mistral'.")
  return ModelConfig(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
      n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or d // heads, d_ff=hf["intermediate_size"], mlp="swiglu",
      norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope",
      rope_theta=theta, max_seq_len=hf.get("max_position_embeddings", 2048),
      use_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      sliding_window=int(window or 0), dtype=dtype, **rope,
      moe=_mixtral_moe(hf) if kind == "mixtral" else MoEConfig()).validate()


def _mixtral_moe(hf: dict) -> MoEConfig:
  """lmx's `model.moe` equal to a Mixtral config.json: every layer MoE, softmax router with
  the top-k weights renormalized, dropless (Mixtral drops nothing), no shared experts; each
  expert as wide as `intermediate_size` (ModelConfig.d_ff)."""
  e, k = int(hf.get("num_local_experts", 8)), int(hf.get("num_experts_per_tok", 2))
  if k == 1 and e > 1:
    raise UnsupportedModel("config.json has num_experts_per_tok=1, for which Mixtral weights "
                           "each token's expert by 1 while lmx's softmax router keeps its "
                           "probability (Switch), so the outputs would differ.")
  if not 1 <= k <= e:
    raise UnsupportedModel(f"config.json has num_experts_per_tok={k}; it must be between 1 "
                           f"and num_local_experts={e}.")
  # HF's balance loss counts each of the k choices (its shares sum to k), lmx's averages
  # them (shares sum to 1): the same loss needs lmx's coefficient k times HF's.
  return MoEConfig(num_experts=e, top_k=k, capacity_factor=0.0, shared_experts=0,
                   every_n_layers=1, router="softmax", router_z_loss=0.0,
                   aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)) * k)


def _gpt2_config(hf: dict, dtype: str) -> ModelConfig:
  act = hf.get("activation_function", "gelu_new")
  if act not in _GPT2_GELU:
    raise UnsupportedModel(f"config.json has activation_function={act!r}; lmx's GPT-2 uses "
                           f"the tanh gelu ({', '.join(_GPT2_GELU)}).")
  for f in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
    if hf.get(f):
      raise UnsupportedModel(f"config.json has {f}=true, which lmx's GPT-2 does not implement.")
  if hf.get("scale_attn_weights", True) is False:
    raise UnsupportedModel("config.json has scale_attn_weights=false; lmx always scales "
                           "attention scores by 1/sqrt(head_dim).")
  d = hf["n_embd"]
  return ModelConfig(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
      d_ff=hf.get("n_inner") or 4 * d, mlp="gelu", norm="layernorm",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position="learned",
      max_seq_len=hf.get("n_positions", 1024), use_bias=True,
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), dtype=dtype).validate()


def arch_of(cfg: ModelConfig) -> str:
  """'llama', 'mistral', 'mixtral' or 'gpt2': the HF model_type whose forward pass equals
  `cfg`'s. Raises UnsupportedModel naming the first setting no exported architecture has."""
  checks_llama = {"mlp": "swiglu", "norm": "rmsnorm", "position": "rope", "use_bias": False,
                  "norm_position": "pre"}
  checks_gpt2 = {"mlp": "gelu", "norm": "layernorm", "position": "learned", "use_bias": True,
                 "norm_position": "pre"}
  if cfg.moe.num_experts:
    _check_mixtral(cfg, checks_llama)
    return "mixtral"
  for name, checks in (("llama", checks_llama), ("gpt2", checks_gpt2)):
    if all(getattr(cfg, k) == v for k, v in checks.items()):
      if name == "gpt2" and cfg.sliding_window:
        break
      return "mistral" if name == "llama" and cfg.sliding_window else name
  want = checks_llama if cfg.position == "rope" else checks_gpt2
  bad = next((k for k, v in want.items() if getattr(cfg, k) != v), "sliding_window")
  raise UnsupportedModel(f"model.{bad}={getattr(cfg, bad)!r} has no Hugging Face equivalent: "
                         "export needs a LLaMA-style (swiglu, rmsnorm, rope, no biases, pre-norm) "
                         "or GPT-2-style (gelu, layernorm, learned positions, biases, pre-norm) "
                         "model.")


def _check_mixtral(cfg: ModelConfig, checks_llama: dict) -> None:
  """Refuse (one sentence naming the field) an MoE model Mixtral cannot express. A capacity
  model (capacity_factor > 0) passes: Mixtral is its dropless twin, which is also what lmx
  decodes with."""
  m = cfg.moe
  bad = next((k for k, v in checks_llama.items() if getattr(cfg, k) != v), None)
  if bad:
    raise UnsupportedModel(f"model.{bad}={getattr(cfg, bad)!r} has no Mixtral equivalent: an "
                           "MoE export needs swiglu experts, rmsnorm, rope, no biases and "
                           "pre-norm.")
  want = {"router": "softmax", "every_n_layers": 1, "shared_experts": 0}
  bad = next((k for k, v in want.items() if getattr(m, k) != v), None)
  if bad:
    raise UnsupportedModel(f"model.moe.{bad}={getattr(m, bad)!r} has no Mixtral equivalent "
                           f"(Mixtral has {bad}={want[bad]!r}).")
  if m.top_k == 1 and m.num_experts > 1:
    raise UnsupportedModel("model.moe.top_k=1 has no Mixtral equivalent: lmx then weights the "
                           "expert by its router probability, Mixtral renormalizes it to 1.")


def hf_config(cfg: ModelConfig, *, torch_dtype: str = "float32") -> dict:
  """The config.json of `cfg` for transformers (`arch_of` picks the architecture)."""
  kind = arch_of(cfg)
  if kind == "gpt2":
    return {"architectures": [ARCHS[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.ff_dim, "n_positions": cfg.max_seq_len,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "dtype": torch_dtype, "torch_dtype": torch_dtype}
  out = {"architectures": [ARCHS[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim,
         "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
         "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
         "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
         "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
         "attention_dropout": 0.0, "dtype": torch_dtype, "torch_dtype": torch_dtype}
  if kind == "llama":
    out["mlp_bias"] = False
  else:
    out["sliding_window"] = cfg.sliding_window or None  # Mixtral's default: none
  if kind == "mixtral":
    from lmx.model.moe import expert_ff
    m = cfg.moe
    out.update(intermediate_size=expert_ff(cfg), num_local_experts=m.num_experts,
               num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coef / m.top_k,
               router_jitter_noise=0.0, output_router_logits=False)
  if cfg.rope_scaling == "llama3":
    out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                           "low_freq_factor": cfg.rope_low_freq_factor,
                           "high_freq_factor": cfg.rope_high_freq_factor,
                           "original_max_position_embeddings": cfg.rope_original_max_len}
  return out
