"""A CPU-sized IsoFLOP sweep on the embedded stdlib corpus: 3 FLOP budgets x 4-5 model sizes.

Launch:   lmx sweep run --config=experiments/isoflop.py     (plans, trains, resumes, fits)
          lmx sweep plan --config=experiments/isoflop.py    (plan only; see runs/isoflop/plan)
Runs on:  2 CPU cores in about 12 minutes (measured 11.5 min on a shared machine: 14 runs of
          12k-163k parameters, 33M tokens, ~6e12 FLOPs in all), plus ~1 min of fits.
          Interrupt and re-run to resume: finished runs are skipped, an interrupted run
          continues from its checkpoint.
Expect:   runs/isoflop/results.jsonl and runs/isoflop/fits/ (Approach 1, 2, 3 JSON + PNGs).
          Measured: Approach 2 a = 0.64 [0.36, 1.68], ~130 tokens/parameter at 9e11 FLOPs;
          noisy at this scale -- docs/scaling.md compares with Chinchilla's a ~ b ~ 0.5 and
          ~20 tokens/parameter and explains the gap.
"""

import ml_collections

from lmx.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.sweep_dir = "runs/isoflop"  # plan/, runs/, results.jsonl, fits/
  c.budgets = [1e11, 3e11, 9e11]  # training FLOPs C = 6 N D per run
  # Non-embedding sizes per budget, 2x apart around each budget's optimum. NOTE: at this scale
  # the optimum sits at tiny sizes (runs are step-limited); 4k is the smallest swiglu model.
  c.sizes = [[4e3, 8e3, 16e3, 32e3],
             [4e3, 8e3, 16e3, 32e3, 64e3],
             [8e3, 16e3, 32e3, 64e3, 128e3]]
  c.aspect_ratio = 32.0  # d_model / n_layers preferred by the shape rule (tiny models)
  c.learning_rate = 1e-2  # peak LR at lr_ref_width (short runs of tiny models want it high)
  c.lr_ref_width = 64  # width at which learning_rate applies
  c.lr_width_exponent = 0.5  # lr = learning_rate * (lr_ref_width / d_model)^exponent
  c.warmup_fraction = 0.05  # warmup steps as a share of each run's steps
  c.evals_per_run = 6  # validations per run (Approach 1 curves)
  c.min_steps = 40  # a (budget, size) giving fewer steps is a config error

  b = base_config()
  b.model.vocab_size = 512  # small vocab keeps embeddings from dominating tiny models
  b.model.max_seq_len = 128
  b.model.mlp = "swiglu"
  b.data.corpus = "stdlib"  # embedded corpus
  b.data.seq_len = 128  # tokens per row
  b.data.batch_size = 8  # 1,024 tokens per step: more updates for the same tokens
  b.train.min_lr_ratio = 0.1  # cosine to 10% of peak over each run's own steps
  b.train.eval_batches = 4  # validation batches per evaluation
  b.train.log_every = 50
  b.train.progress_bar = False
  b.checkpoint.every = 0  # save at the end or on SIGTERM/SIGINT only
  b.checkpoint.keep = 1
  b.checkpoint.async_save = False
  c.base = b  # every run starts from this; plan overrides model shape and train schedule
  return c
