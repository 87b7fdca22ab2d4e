"""Supervised fine-tuning of the default model on instruction data derived from the corpus.

Launch:   lmx train --config=experiments/sft.py
          (trains experiments/default.py first if runs/default has no checkpoint, ~11 min)
Data:     'stdlib_tasks' -- 2,000 instruction records derived offline from the stdlib
          (docstring -> `def name(args):` signature; docstring -> function name;
          lmx/data/sft_tasks.py), rendered with the chat template (role tokens added to the
          tokenizer: vocab 4096 + 5), loss on the assistant's tokens only, best-fit packed.
          Or your own JSONL: --config.data.sft_path=chat.jsonl.
Expect:   see docs/post_training.md for held-out exact match before/after.
Variants: experiments/sft_lora.py, sft_qlora.py (PEFT), distill.py (distillation).
"""

from lmx.experiment import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, "default")
  c.name = "sft" if not arg else f"sft_{arg}"
  c.run_dir = "runs/sft"
  c.model.vocab_size = 4096 + 5  # the base vocabulary + <|system|> <|user|> <|assistant|> <|tool|> <|end|>

  d = c.data
  d.format = "sft"
  d.sft_path = "stdlib_tasks"  # or a JSONL file of instruction / chat records
  d.sft_records = 2000
  d.sft_packing = "best_fit"
  d.sft_heldout = 0.05  # held-out conversations (by content hash)
  d.epochs = 0  # repeat until train.steps

  t = c.train
  t.init_from = "experiments/default.py"  # its run directory; trained first if missing
  t.steps = 300
  t.learning_rate = 1e-3
  t.warmup_steps = 30
  t.eval_every = 100
  t.eval_batches = 4
  t.log_every = 10
  c.checkpoint.every = 100
  return c
