"""SFT with LoRA: the default model frozen, rank-8 adapters on every projection.

Launch:   lmx train --config=experiments/sft_lora.py
Checkpoints hold the adapters alone (the base is rebuilt from train.init_from).
Other PEFT methods on the same data: --config.peft.method=bitfit | adapter | prefix | prompt.
"""

from lmx.experiment import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, "sft", "lora")
  c.run_dir = "runs/sft_lora"
  p = c.peft
  p.method = "lora"
  p.targets = "all"  # wq, wk, wv, wo, w_gate, w_up, w_down
  p.rank = 8
  p.alpha = 16.0
  c.train.learning_rate = 3e-3  # adapters start at zero: a higher LR than full fine-tuning
  return c
