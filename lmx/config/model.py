"""`model`: the architecture (ModelConfig, the only config the layers see) and its MoE
section (`model.moe`)."""

from __future__ import annotations

import dataclasses

from lmx.config.checks import _choice, _fail, _nonneg_float, _positive, _section_from_dict

@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-Experts MLPs (lmx/model/moe.py); `num_experts=0` keeps every MLP dense."""

  num_experts: int = 0
  top_k: int = 2  # experts each token is routed to
  # 0: dropless dispatch (tokens sorted by expert, grouped matmul); > 0: each expert takes at
  # most capacity_factor * tokens * top_k / num_experts tokens, the rest are dropped (counted).
  capacity_factor: float = 0.0
  shared_experts: int = 0  # always-on experts added to the routed output (DeepSeek style)
  every_n_layers: int = 1  # 1: every layer is MoE; n: layers n-1, 2n-1, ... are MoE, others dense
  router: str = "softmax"  # softmax (top-k of a softmax) | sigmoid (bias-balanced, aux-loss-free)
  router_z_loss: float = 1e-3  # coefficient of the router z-loss (ST-MoE)
  aux_loss_coef: float = 1e-2  # coefficient of the switch-transformer load-balancing loss
  d_ff: int = 0  # hidden size of one expert; 0 means model.ff_dim

  def validate(self) -> "MoEConfig":
    for f in ("num_experts", "shared_experts", "d_ff"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        _fail(f"model.moe.{f}", f"is {v!r}; it must be an integer >= 0")
    if not self.num_experts:
      return self
    _positive("model.moe.top_k", self.top_k)
    if self.top_k > self.num_experts:
      _fail("model.moe.top_k", f"is {self.top_k}; it must be <= model.moe.num_experts="
            f"{self.num_experts}")
    _positive("model.moe.every_n_layers", self.every_n_layers)
    if not isinstance(self.capacity_factor, (int, float)) or self.capacity_factor < 0:
      _fail("model.moe.capacity_factor", f"is {self.capacity_factor!r}; it must be > 0 "
            "(capacity-based dispatch) or 0 (dropless)")
    _choice("model.moe.router", self.router, ("softmax", "sigmoid"))
    _nonneg_float("model.moe.router_z_loss", self.router_z_loss)
    _nonneg_float("model.moe.aux_loss_coef", self.aux_loss_coef)
    return self


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and switches of a decoder-only Transformer. Layers see only this."""

  vocab_size: int = 4096
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 0  # 0 means n_heads (MHA); 1 is MQA; anything between is GQA.
  head_dim: int = 0  # 0 means d_model // n_heads.
  d_ff: int = 0  # 0 means 4*d_model (gelu/relu) or the LLaMA 8/3*d_model rounded to 64 (gated).
  mlp: str = "swiglu"  # relu | gelu | swiglu | geglu
  norm: str = "rmsnorm"  # rmsnorm | layernorm
  norm_eps: float = 1e-5
  norm_position: str = "pre"  # pre | post
  position: str = "rope"  # rope | learned | sinusoidal
  rope_theta: float = 10000.0
  # '' (plain RoPE) | 'llama3': Llama 3.1's frequency-dependent scaling, with the four
  # numbers of HF's `rope_scaling` dict (factor, low/high_freq_factor, original max length).
  rope_scaling: str = ""
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  # 0: full causal attention; w > 0: each query sees itself and the w-1 keys before it
  # (Mistral's sliding window, HF `sliding_window`).
  sliding_window: int = 0
  max_seq_len: int = 256
  use_bias: bool = False  # biases on projections; LayerNorm gets a bias iff this is set.
  tie_embeddings: bool = True
  # Compute dtype: float32 | bfloat16 | float16; params stay float32. In experiments it is
  # not set here but follows `train.precision` (from_config_dict): one source for every command.
  dtype: str = "float32"
  remat: str = "none"  # none | full | save_dots
  # True: one jax.lax.scan over the stacked layers (compile time flat in depth); False: the
  # same stacked parameters run unrolled (XLA sees every layer; see docs/benchmarks.md).
  scan_layers: bool = True
  # auto: query-blocked causal attention on CPU (skips the masked upper triangle; measured
  # 13% faster per train step there), jax.nn.dot_product_attention elsewhere (cuDNN on GPU).
  attention_impl: str = "auto"  # auto | jax | blocked
  init_std: float = 0.02
  # Weight-only quantization of the layer stack's projections for `lmx generate` and
  # `lmx evaluate` (lmx.quant.apply; training ignores it): '' | int8 | int4 | nf4.
  quant: str = ""
  quant_group: int = 64  # int4/nf4: weights per scale along the contraction axis
  kv_cache_dtype: str = ""  # '' keeps the KV cache in the compute dtype; 'int8' quantizes it
  # The decode loops (lmx.infer): 'scan' the stacked layers every token, or 'unrolled' with
  # each layer's weights and cache as separate buffers, sliced once per call (XLA:CPU copies
  # a scanned weight slice every token; docs/decoding.md). auto = unrolled on CPU.
  decode_layers: str = "auto"  # auto | scan | unrolled
  moe: MoEConfig = MoEConfig()  # `model.moe.*` in experiments

  def __post_init__(self):
    if isinstance(self.moe, dict):  # ModelConfig(**asdict(cfg)) and ConfigDict round trips
      object.__setattr__(self, "moe", _section_from_dict("model.moe", MoEConfig, self.moe))

  # Derived sizes -- use these, never the raw 0 sentinels.
  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def gated(self) -> bool:
    return self.mlp in ("swiglu", "geglu")

  @property
  def ff_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.gated:  # LLaMA: 2/3 of 4*d, rounded up to a multiple of 64.
      return 64 * -(-(8 * self.d_model // 3) // 64)
    return 4 * self.d_model

  def validate(self) -> "ModelConfig":
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
      _positive(f"model.{f}", getattr(self, f))
    for f in ("n_kv_heads", "head_dim", "d_ff"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 0:
        _fail(f"model.{f}", f"is {v!r}; it must be an integer >= 0 (0 picks the default)")
    _choice("model.mlp", self.mlp, ("relu", "gelu", "swiglu", "geglu"))
    _choice("model.norm", self.norm, ("rmsnorm", "layernorm"))
    _choice("model.norm_position", self.norm_position, ("pre", "post"))
    _choice("model.position", self.position, ("rope", "learned", "sinusoidal"))
    _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
    _choice("model.remat", self.remat, ("none", "full", "save_dots"))
    _choice("model.attention_impl", self.attention_impl, ("auto", "jax", "blocked"))
    if not isinstance(self.scan_layers, bool):
      _fail("model.scan_layers", f"is {self.scan_layers!r}; it must be True or False")
    if not self.head_dim and self.d_model % self.n_heads:
      _fail("model.n_heads", f"is {self.n_heads}; it must divide model.d_model={self.d_model} "
            "(or set model.head_dim explicitly)")
    if self.n_kv_heads and (self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads):
      _fail("model.n_heads", f"is {self.n_heads}; it must be a multiple of "
            f"model.n_kv_heads={self.n_kv_heads} (valid n_kv_heads: divisors of n_heads)")
    if self.position == "rope" and self.dim_per_head % 2:
      _fail("model.head_dim", f"is {self.dim_per_head}; RoPE needs an even head dimension")
    if self.position == "rope" and self.rope_theta <= 0:
      _fail("model.rope_theta", f"is {self.rope_theta!r}; it must be > 0")
    if self.norm_eps <= 0:
      _fail("model.norm_eps", f"is {self.norm_eps!r}; it must be > 0")
    _choice("model.rope_scaling", self.rope_scaling, ("", "llama3"))
    if self.rope_scaling:
      for f in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
        if not getattr(self, f) > 0:
          _fail(f"model.{f}", f"is {getattr(self, f)!r}; it must be > 0")
      _positive("model.rope_original_max_len", self.rope_original_max_len)
    if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
      _fail("model.sliding_window", f"is {self.sliding_window!r}; it must be an integer >= 0 "
            "(0 = full causal attention)")
    if not isinstance(self.moe, MoEConfig):
      _fail("model.moe", f"is {self.moe!r}; it must be a section of MoE settings")
    self.moe.validate()
    if self.moe.num_experts and self.n_layers % self.moe.every_n_layers:
      _fail("model.moe.every_n_layers", f"is {self.moe.every_n_layers}; it must divide "
            f"model.n_layers={self.n_layers}")
    if self.moe.num_experts and self.use_bias:
      _fail("model.use_bias", "is True but MoE experts have no biases; set model.use_bias=False "
            "or model.moe.num_experts=0")
    if self.moe.num_experts and self.quant:
      _fail("model.quant", f"is {self.quant!r} but quantizing MoE expert weights is not "
            "supported yet; use model.quant='' with model.moe.num_experts > 0")
    _choice("model.quant", self.quant, ("", "int8", "int4", "nf4"))
    _choice("model.kv_cache_dtype", self.kv_cache_dtype, ("", "int8"))
    _choice("model.decode_layers", self.decode_layers, ("auto", "scan", "unrolled"))
    if self.quant in ("int4", "nf4"):
      g = self.quant_group
      if not isinstance(g, int) or isinstance(g, bool) or g < 2 or g % 2:
        _fail("model.quant_group", f"is {g!r}; it must be a positive even integer "
              "(4-bit codes are packed in pairs)")
      # The contraction sizes: d_model (wq/wk/wv/w_up/w_gate), N*H (wo), ff_dim (w_down).
      for name, k in (("model.d_model", self.d_model),
                      ("model.n_heads * head_dim", self.n_heads * self.dim_per_head),
                      ("model.ff_dim", self.ff_dim)):
        if k % g:
          _fail("model.quant_group", f"is {g}; it must divide {name}={k}, the contraction "
                "size of a projection")
    return self
