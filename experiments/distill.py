"""Knowledge distillation: a 2-block, 96-wide student learns from the default model.

Launch:   lmx train --config=experiments/distill.py
          (trains experiments/default.py first if runs/default has no checkpoint)
Compare:  the same student on hard labels alone:
          lmx train --config=experiments/distill.py:hard
"""

from lmx.experiment import sibling_config


def get_config(arg: str | None = None):
  c = sibling_config(__file__, "default")
  hard = arg == "hard"
  c.name = "distill_hard" if hard else "distill"
  c.run_dir = "runs/distill_hard" if hard else "runs/distill"
  c.model.d_model = 96
  c.model.n_layers = 2
  c.model.n_heads = 3
  c.model.n_kv_heads = 1
  t = c.train
  t.steps = 400
  t.eval_every = 100
  t.eval_batches = 8
  c.checkpoint.every = 200
  if not hard:
    t.objective = "distill"
    d = c.distill
    d.teacher_config = "experiments/default.py"
    d.temperature = 2.0
    d.alpha = 0.5
  return c
