"""SFT with QLoRA: the frozen base in NF4 (double-quantized, ~4.13 bits per weight), LoRA
adapters in float32 on top.

Launch:   lmx train --config=experiments/sft_qlora.py
"""

from lmx.experiment import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, "sft_lora")
  c.name = "sft_qlora"
  c.run_dir = "runs/sft_qlora"
  c.peft.method = "qlora"
  c.peft.quant_group = 64
  return c
