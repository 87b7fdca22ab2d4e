"""Typed, validated configuration.

Experiments are `ml_collections.ConfigDict`s (see `experiments/`). Code never reads the
ConfigDict directly: `from_config_dict` turns each section into a frozen dataclass and
validates it, so a bad value fails here -- before any compilation -- with one sentence that
names the field and its valid range.

Sections: `model` (ModelConfig, the only thing layers see), `data` (DataConfig), `train`
(TrainConfig), `mesh` (MeshConfig), `checkpoint` (CheckpointConfig), `sample`
(SampleConfig). `run_dir`, `seed` and `name` sit at top level. Periodic validation settings
live in `train` (eval_every, eval_batches).
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

import ml_collections


class ConfigError(ValueError):
  """An invalid configuration value; the message names the field and the valid range."""


def _fail(field: str, msg: str) -> None:
  raise ConfigError(f"Invalid config: `{field}` {msg}.")


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    _fail(field, f"is {value!r}; it must be one of {', '.join(map(repr, allowed))}")


def _positive(field: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    _fail(field, f"is {value!r}; it must be a positive integer")


def _nonneg_float(field: str, value: Any) -> None:
  if not isinstance(value, (int, float)) or value < 0:
    _fail(field, f"is {value!r}; it must be a number >= 0")


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


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from and how they are batched."""

  corpus: str = "stdlib"  # 'stdlib' (embedded default) or a path: folder of .txt, .jsonl, .array_record
  text_field: str = "text"  # JSONL field holding the document text.
  tokenizer_path: str = ""  # '' trains (or reuses the cached) tokenizer for the corpus.
  tokenizer_type: str = "bpe"  # bpe | unigram
  tokenizer_sample_mb: int = 8  # MB of training text given to SentencePiece.
  cache_dir: str = ".cache/lmx"  # tokenizers and pre-tokenized shards live here.
  validation_fraction: float = 0.02  # share of documents (by hash) held out.
  seq_len: int = 256
  batch_size: int = 16  # global batch, in sequences.
  packing: bool = True  # False: one document per row, padded and masked.
  shuffle_seed: int = 0
  max_docs: int = 0  # 0 = all documents; >0 caps the corpus (tests, smoke runs).
  mixture: str = ""  # train-only mix 'CORPUS=WEIGHT,...' by token share; '' = data.corpus alone.
  # 'text': documents from `corpus` (pretraining). 'sft': conversations from `sft_path`
  # (lmx/data/sft.py), rendered with the chat template, loss on assistant tokens only; the
  # tokenizer is still the one `corpus` gives, plus the chat role tokens.
  format: str = "text"
  sft_path: str = ""  # instruction/chat JSONL; 'stdlib_tasks' derives tasks from the corpus
  sft_packing: str = "best_fit"  # best_fit | first_fit | pad (one conversation per row)
  sft_records: int = 2000  # 'stdlib_tasks' only: how many records to derive
  epochs: int = 0  # sft: passes over the training conversations; 0 repeats until train.steps
  sft_heldout: float = 0.05  # sft: share of conversations held out (by content hash)

  def validate(self) -> "DataConfig":
    _positive("data.seq_len", self.seq_len)
    _positive("data.batch_size", self.batch_size)
    _choice("data.tokenizer_type", self.tokenizer_type, ("bpe", "unigram"))
    if not 0.0 < self.validation_fraction < 1.0:
      _fail("data.validation_fraction", f"is {self.validation_fraction!r}; it must be in (0, 1)")
    if self.max_docs < 0:
      _fail("data.max_docs", f"is {self.max_docs!r}; it must be >= 0")
    if self.tokenizer_sample_mb <= 0:
      _fail("data.tokenizer_sample_mb", f"is {self.tokenizer_sample_mb!r}; it must be > 0")
    _choice("data.format", self.format, ("text", "sft"))
    _choice("data.sft_packing", self.sft_packing, ("best_fit", "first_fit", "pad"))
    if self.format == "sft" and not self.sft_path:
      _fail("data.sft_path", "is empty; data.format='sft' needs a JSONL file or 'stdlib_tasks'")
    if not 0.0 < self.sft_heldout < 1.0:
      _fail("data.sft_heldout", f"is {self.sft_heldout!r}; it must be in (0, 1)")
    for f in ("epochs", "sft_records"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 0:
        _fail(f"data.{f}", f"is {v!r}; it must be an integer >= 0")
    for part in filter(None, self.mixture.split(",")):
      name, sep, w = part.rpartition("=")
      try:
        ok = bool(sep and name) and float(w) > 0
      except ValueError:
        ok = False
      if not ok:
        _fail("data.mixture", f"has entry {part!r}; entries must be CORPUS=WEIGHT, WEIGHT > 0")
    return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule, precision and loop settings."""

  steps: int = 1000
  learning_rate: float = 3e-3  # peak LR after warmup.
  min_lr_ratio: float = 0.1  # the schedule ends at learning_rate * min_lr_ratio.
  schedule: str = "cosine"  # cosine | wsd (warmup, stable at the peak, linear decay)
  decay_fraction: float = 0.2  # wsd only: share of `steps` spent in the final decay.
  warmup_steps: int = 100  # capped at `steps` (a short run of a long preset still warms up)
  weight_decay: float = 0.1
  beta1: float = 0.9
  beta2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0  # global-norm clip; 0 disables.
  precision: str = "float32"  # float32 | bfloat16 | float16 (fp16 uses dynamic loss scaling)
  grad_accum_steps: int = 1  # microbatches per optimizer step.
  # ZeRO stage over the `data` mesh axis (lmx/parallel/zero.py): 0 replicates the state on
  # it; 1 shards the Adam moments; 2 also reduce-scatters the gradients; 3 also shards the
  # parameters (= FSDP over `data`). The `fsdp` axis always shards all three.
  zero_stage: int = 0
  # Pipeline schedule when mesh.pipeline > 1 (grad_accum_steps microbatches flow through
  # the stages): 1f1b holds O(stages) microbatch inputs per stage, gpipe all of them.
  pipeline_schedule: str = "1f1b"  # 1f1b | gpipe
  # ZeRO-Offload: 'pinned_host' keeps the optimizer state in host memory where the backend
  # has memory kinds (TPU/GPU); '' keeps it on the device. Not available on CPU.
  optimizer_memory: str = ""
  z_loss: float = 0.0  # weight of the log(Z)^2 auxiliary loss (PaLM); 0 disables.
  # The loss the step optimizes (lmx/train/objectives.py): 'lm' (pretraining and SFT) or
  # 'distill' (the `distill` section's teacher).
  objective: str = "lm"
  # Regular expression over parameter paths ('layers.block.attn.wq'); only matches train
  # and get optimizer state. '' trains everything unless `peft.method` sets it (lmx/peft).
  trainable: str = ""
  # A run directory (or checkpoint folder) whose parameters initialize this run (fine-tuning);
  # '' starts from random weights. A resumed run ignores it.
  init_from: str = ""
  # Tokens (batch rows x sequence positions) per chunk of the LM head + softmax; the full
  # (B, T, V) logits are never held. 0: one pass over the full logits.
  loss_chunk_tokens: int = 512
  log_every: int = 10
  eval_every: int = 100  # 0 disables periodic validation.
  eval_batches: int = 8
  early_stopping_patience: int = 0  # evals without improvement before stopping; 0 disables.
  max_bad_steps: int = 5  # consecutive non-finite steps before the run stops.
  progress_bar: bool = True
  loss_scale_init: float = 32768.0  # fp16 only: starting dynamic loss scale (2^15).
  loss_scale_period: int = 2000  # fp16 only: finite steps before the loss scale doubles.

  def validate(self) -> "TrainConfig":
    _positive("train.steps", self.steps)
    _positive("train.grad_accum_steps", self.grad_accum_steps)
    _positive("train.max_bad_steps", self.max_bad_steps)
    _positive("train.log_every", self.log_every)
    _choice("train.precision", self.precision, ("float32", "bfloat16", "float16"))
    _choice("train.schedule", self.schedule, ("cosine", "wsd"))
    if self.zero_stage not in (0, 1, 2, 3):
      _fail("train.zero_stage", f"is {self.zero_stage!r}; it must be 0, 1, 2 or 3")
    _choice("train.optimizer_memory", self.optimizer_memory, ("", "pinned_host"))
    _choice("train.pipeline_schedule", self.pipeline_schedule, ("1f1b", "gpipe"))
    _choice("train.objective", self.objective, ("lm", "distill"))
    if self.trainable:
      import re
      try:
        re.compile(self.trainable)
      except re.error as e:
        _fail("train.trainable", f"is {self.trainable!r}, not a valid regular expression ({e})")
    if not (isinstance(self.decay_fraction, (int, float)) and 0.0 < self.decay_fraction <= 1.0):
      _fail("train.decay_fraction", f"is {self.decay_fraction!r}; it must be in (0, 1]")
    if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
      _fail("train.learning_rate", f"is {self.learning_rate!r}; it must be > 0")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      _fail("train.min_lr_ratio", f"is {self.min_lr_ratio!r}; it must be in [0, 1]")
    if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
      _fail("train.warmup_steps", f"is {self.warmup_steps!r}; it must be an integer >= 0")
    for f in ("beta1", "beta2"):
      if not 0.0 <= getattr(self, f) < 1.0:
        _fail(f"train.{f}", f"is {getattr(self, f)!r}; it must be in [0, 1)")
    for f in ("weight_decay", "grad_clip", "z_loss"):
      _nonneg_float(f"train.{f}", getattr(self, f))
    _positive("train.loss_scale_period", self.loss_scale_period)
    if not (isinstance(self.loss_scale_init, (int, float)) and self.loss_scale_init >= 1):
      _fail("train.loss_scale_init", f"is {self.loss_scale_init!r}; it must be >= 1")
    for f in ("eval_every", "eval_batches", "early_stopping_patience", "loss_chunk_tokens"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 0:
        _fail(f"train.{f}", f"is {v!r}; it must be an integer >= 0")
    return self


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Knowledge distillation (train.objective='distill', lmx/train/distill.py): a frozen
  teacher run's soft next-token distribution, mixed with the hard labels."""

  teacher_config: str = ""  # experiment file of the teacher, e.g. 'experiments/default.py'
  teacher_run: str = ""  # its run directory; '' = the teacher experiment's run_dir
  temperature: float = 2.0
  alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha on the hard labels
  top_k: int = 0  # > 0: the teacher's k most likely tokens per position only

  def validate(self) -> "DistillConfig":
    if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
      _fail("distill.temperature", f"is {self.temperature!r}; it must be > 0")
    if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
      _fail("distill.alpha", f"is {self.alpha!r}; it must be in [0, 1]")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      _fail("distill.top_k", f"is {self.top_k!r}; it must be an integer >= 0")
    return self


PEFT_METHODS = ("", "lora", "qlora", "bitfit", "prompt", "prefix", "adapter")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient fine-tuning (lmx/peft): which small modules to add and train.

  method '' trains the model as it is. Every method freezes the base model; what trains is
  the added modules (all under `*_peft` names) -- `train.trainable` is set from it.
  """

  method: str = ""  # '' | lora | qlora | bitfit | prompt | prefix | adapter
  # LoRA / QLoRA: comma-separated projection names (wq, wk, wv, wo, w_gate, w_up, w_down)
  # or 'all'.
  targets: str = "wq,wk,wv,wo"
  rank: int = 8
  alpha: float = 16.0  # the update is (alpha / rank) * x A B
  dropout: float = 0.0  # LoRA / QLoRA: dropout on the adapter's input, training steps only
  num_virtual_tokens: int = 16  # prompt / prefix tuning
  adapter_dim: int = 32  # bottleneck adapters: D -> adapter_dim -> D after attention and MLP
  quant_group: int = 64  # QLoRA: NF4 block size of the frozen base weights

  def validate(self) -> "PeftConfig":
    _choice("peft.method", self.method, PEFT_METHODS)
    for f in ("rank", "num_virtual_tokens", "adapter_dim", "quant_group"):
      _positive(f"peft.{f}", getattr(self, f))
    if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
      _fail("peft.alpha", f"is {self.alpha!r}; it must be > 0")
    if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
      _fail("peft.dropout", f"is {self.dropout!r}; it must be in [0, 1)")
    return self


MESH_AXES = ("data", "fsdp", "tensor", "pipeline", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; one axis may be -1 (takes the remaining devices). 1 turns an axis off.

  `data`...`expert` are the sizes within one slice (ICI, the fast interconnect); the `dcn_*`
  factors multiply them across slices (DCN) on multi-slice TPU (or across processes
  elsewhere), so the mesh axis `data` has data * dcn_data devices.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  pipeline: int = 1
  expert: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1
  dcn_pipeline: int = 1
  dcn_expert: int = 1
  # Logical-axis rules (lmx/parallel/rules.py): '' or a named set ('default',
  # 'sequence_parallel'), optionally followed by overrides 'name=axis+axis;name=' that
  # replace single rules, e.g. 'default;mlp=tensor+fsdp' or 'vocab='.
  rules: str = ""

  def validate(self) -> "MeshConfig":
    sizes = [getattr(self, a) for a in MESH_AXES]
    for a, s in zip(MESH_AXES, sizes):
      if not isinstance(s, int) or (s < 1 and s != -1):
        _fail(f"mesh.{a}", f"is {s!r}; it must be a positive integer or -1")
    if sizes.count(-1) > 1:
      _fail("mesh", "has more than one axis set to -1; at most one axis may take the rest")
    for a in MESH_AXES:
      s = getattr(self, f"dcn_{a}")
      if not isinstance(s, int) or isinstance(s, bool) or s < 1:
        _fail(f"mesh.dcn_{a}", f"is {s!r}; it must be a positive integer (1 = one slice)")
    from lmx.parallel.rules import parse_rules  # validates names and mesh axes
    try:
      parse_rules(self.rules)
    except ValueError as e:
      _fail("mesh.rules", f"is {self.rules!r}; {e}")
    return self


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 200  # steps between saves; 0 saves only at the end / on signal.
  keep: int = 3  # newest checkpoints kept (the best one by validation loss is kept too).
  async_save: bool = True

  def validate(self) -> "CheckpointConfig":
    if self.every < 0:
      _fail("checkpoint.every", f"is {self.every!r}; it must be >= 0")
    _positive("checkpoint.keep", self.keep)
    return self


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  prompt: str = "def "
  max_new_tokens: int = 64
  temperature: float = 0.8  # 0 means greedy.
  top_k: int = 0  # 0 disables.
  top_p: float = 1.0  # 1.0 disables.
  seed: int = 0

  def validate(self) -> "SampleConfig":
    _positive("sample.max_new_tokens", self.max_new_tokens)
    _nonneg_float("sample.temperature", self.temperature)
    if self.top_k < 0:
      _fail("sample.top_k", f"is {self.top_k!r}; it must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      _fail("sample.top_p", f"is {self.top_p!r}; it must be in (0, 1]")
    return self


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "sample": SampleConfig,
    "peft": PeftConfig,
    "distill": DistillConfig,
}
TOP_LEVEL = {"run_dir": str, "seed": int, "name": str}


def _section_from_dict(name: str, cls: type, values: dict[str, Any]):
  hints = get_type_hints(cls)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    _fail(f"{name}.{unknown[0]}", f"is not a known key; valid keys of `{name}` are "
          f"{', '.join(sorted(known))}")
  out = {}
  for k, v in values.items():
    t = hints[k]
    if dataclasses.is_dataclass(t) and isinstance(t, type):  # a nested section (model.moe)
      if isinstance(v, t):
        out[k] = v
        continue
      if not isinstance(v, dict):
        _fail(f"{name}.{k}", f"is {v!r}; it must be a section of settings")
      out[k] = _section_from_dict(f"{name}.{k}", t, v)
      continue
    if t is float and isinstance(v, int) and not isinstance(v, bool):
      v = float(v)
    if t is int and isinstance(v, float) and v.is_integer():
      v = int(v)
    if t in (int, float, str, bool) and not isinstance(v, t):
      _fail(f"{name}.{k}", f"is {v!r} of type {type(v).__name__}; it must be a {t.__name__}")
    if t is int and isinstance(v, bool):
      _fail(f"{name}.{k}", f"is {v!r}; it must be an int")
    out[k] = v
  return cls(**out).validate()


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The whole validated experiment: one frozen dataclass per section."""

  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig
  checkpoint: CheckpointConfig
  sample: SampleConfig
  peft: PeftConfig = PeftConfig()
  distill: DistillConfig = DistillConfig()
  run_dir: str = "runs/default"
  seed: int = 0
  name: str = "default"


def from_config_dict(cfg: ml_collections.ConfigDict | dict) -> Experiment:
  """Validate a ConfigDict and turn it into typed sections. Raises ConfigError."""
  d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  extra = sorted(set(d) - set(SECTIONS) - set(TOP_LEVEL))
  if extra:
    _fail(extra[0], f"is not a known top-level key; valid keys are "
          f"{', '.join(sorted(set(SECTIONS) | set(TOP_LEVEL)))}")
  kwargs: dict[str, Any] = {}
  for name, cls in SECTIONS.items():
    kwargs[name] = _section_from_dict(name, cls, d.get(name, {}) or {})
  for k, t in TOP_LEVEL.items():
    if k in d:
      if not isinstance(d[k], t):
        _fail(k, f"is {d[k]!r}; it must be a {t.__name__}")
      kwargs[k] = d[k]
  # The compute dtype has one source, train.precision; model.dtype follows it, so train,
  # evaluate and generate all run the model in the same dtype.
  precision = kwargs["train"].precision
  given = (d.get("model") or {}).get("dtype")
  if given is not None and given != precision:
    _fail("model.dtype", f"is {given!r} but train.precision is {precision!r}; the compute dtype "
          "is set by train.precision alone (leave model.dtype unset)")
  kwargs["model"] = dataclasses.replace(kwargs["model"], dtype=precision)
  if kwargs["peft"].method:
    from lmx.peft import trainable_pattern  # what the method adds is what trains
    given = kwargs["train"].trainable
    if given:
      _fail("train.trainable", f"is {given!r} but peft.method={kwargs['peft'].method!r} "
            "already decides what trains; leave train.trainable unset")
    kwargs["train"] = dataclasses.replace(kwargs["train"],
                                          trainable=trainable_pattern(kwargs["peft"]))
  if kwargs["train"].objective == "distill":
    if not kwargs["distill"].teacher_config:
      _fail("distill.teacher_config", "is empty; train.objective='distill' needs the teacher's "
            "experiment file (e.g. 'experiments/default.py')")
    if kwargs["peft"].method:
      _fail("peft.method", "must be '' with train.objective='distill' (the student trains whole)")
    if not kwargs["train"].trainable:  # the teacher rides along frozen (lmx.train.objectives)
      kwargs["train"] = dataclasses.replace(kwargs["train"], trainable=r"^(?!teacher\.)")
  exp = Experiment(**kwargs)
  if exp.model.moe.num_experts:  # MoE x mesh (lmx/model/moe.py)
    m = exp.mesh
    if m.pipeline > 1 or m.dcn_pipeline > 1:
      _fail("mesh.pipeline", f"is {m.pipeline} but MoE models do not run pipelined yet (the "
            "pipeline drops the router losses); use mesh.pipeline=1")
    if exp.peft.method:
      _fail("peft.method", f"is {exp.peft.method!r} but PEFT does not reach MoE experts yet; "
            "use peft.method='' (or train.trainable to freeze parts) with model.moe")
    ep = m.expert * m.dcn_expert
    if ep > 0 and exp.model.moe.num_experts % ep:
      _fail("model.moe.num_experts", f"is {exp.model.moe.num_experts}; it must be a multiple "
            f"of the expert mesh axis size {ep} (mesh.expert x mesh.dcn_expert)")
  if exp.data.seq_len > exp.model.max_seq_len and exp.model.position == "learned":
    _fail("data.seq_len", f"is {exp.data.seq_len}; with learned positions it must be <= "
          f"model.max_seq_len={exp.model.max_seq_len}")
  if exp.data.batch_size % exp.train.grad_accum_steps:
    _fail("train.grad_accum_steps", f"is {exp.train.grad_accum_steps}; it must divide "
          f"data.batch_size={exp.data.batch_size}")
  return exp


def to_config_dict(exp_section) -> ml_collections.ConfigDict:
  """A dataclass section as a ConfigDict (used by experiments to start from defaults)."""
  return ml_collections.ConfigDict(dataclasses.asdict(exp_section))


def base_config() -> ml_collections.ConfigDict:
  """Every section at its defaults; experiments start here and override fields."""
  c = ml_collections.ConfigDict()
  for name, cls in SECTIONS.items():
    c[name] = to_config_dict(cls())
  del c.model["dtype"]  # follows train.precision (see from_config_dict)
  c.run_dir = "runs/default"
  c.seed = 0
  c.name = "default"
  return c
