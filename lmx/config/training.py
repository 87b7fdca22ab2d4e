"""`data`, `train`, `distill` and `peft`: what a run trains on and how."""

from __future__ import annotations

import dataclasses

from lmx.config.checks import _choice, _fail, _nonneg_float, _positive

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

  # The teacher: its experiment file (e.g. 'experiments/default.py') and/or its run directory
  # ('' = that experiment's run_dir). A run directory alone is enough when it records its
  # experiment (RUN_DIR/config.json from `lmx train`, experiment.py from `lmx convert`).
  teacher_config: str = ""
  teacher_run: str = ""
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
