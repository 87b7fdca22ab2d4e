"""Validation loss, perplexity, and the unigram baseline they should beat.

Perplexity = exp(mean next-token cross entropy in nats) over the masked-in validation
targets. The unigram baseline predicts every token with its add-one-smoothed frequency in the
training tokens, p(v) = (count(v) + 1) / (N + V), ignoring context; a language model that does
not beat it has learned nothing beyond token frequencies.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, Callable, Iterable

import numpy as np


def unigram_perplexity(train_token_counts: np.ndarray, valid_tokens: np.ndarray,
                       vocab_size: int) -> float:
  """exp(-mean log p(t)) over `valid_tokens` with p the add-one-smoothed train unigram.

  train_token_counts: (V,) counts of each id in the training tokens.
  valid_tokens: 1-D ids scored. Ids outside [0, vocab_size) are an error.
  """
  counts = np.asarray(train_token_counts, np.float64)
  if counts.shape != (vocab_size,):
    raise ValueError(f"train_token_counts has shape {counts.shape}; it must be ({vocab_size},)")
  valid = np.asarray(valid_tokens).reshape(-1)
  if valid.size == 0:
    raise ValueError("valid_tokens is empty; need at least one validation token")
  if valid.min() < 0 or valid.max() >= vocab_size:
    raise ValueError(f"valid_tokens has ids outside [0, {vocab_size})")
  logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
  return float(np.exp(-logp[valid].mean()))


def masked_targets(batch: dict[str, np.ndarray]) -> np.ndarray:
  """The target ids that count toward the loss (loss_mask > 0), flattened."""
  return np.asarray(batch["targets"])[np.asarray(batch["loss_mask"]) > 0]


def count_targets(batches: Iterable[dict[str, np.ndarray]], vocab_size: int,
                  max_batches: int | None = None) -> np.ndarray:
  """(V,) int64 counts of masked-in targets over (at most `max_batches` of) `batches`."""
  counts = np.zeros(vocab_size, np.int64)
  for b in itertools.islice(batches, max_batches):
    counts += np.bincount(masked_targets(b), minlength=vocab_size)[:vocab_size]
  return counts


def validation_loss(eval_fn: Callable, params: Any, batches: Iterable[dict],
                    max_batches: int | None = None) -> dict[str, float]:
  """Token-weighted mean loss over the batches, via eval_fn(params, batch) -> (sum, n)."""
  total, n = 0.0, 0.0
  for b in itertools.islice(batches, max_batches):
    s, c = eval_fn(params, b)
    total += float(s)
    n += float(c)
  loss = total / max(n, 1.0)
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": n}


def cli_main(argv: list[str]) -> int:
  """`lmx evaluate --config=...`: restore the best (else latest) checkpoint of run_dir and
  print validation loss, perplexity and the unigram baseline as one JSON line."""
  import argparse

  import jax
  from flax import nnx

  from lmx.data.pipeline import make_dataset
  from lmx.data.tokenizer import load_or_train_tokenizer
  from lmx.experiment import load_experiment, split_config_args
  from lmx.model import Transformer
  from lmx.parallel.mesh import make_mesh, make_rules, state_shardings, use_mesh
  from lmx.train.checkpoint import restore_params
  from lmx.train.step import jit_eval_step, make_eval_step, put_batch

  _, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog="lmx evaluate")
  parser.add_argument("--checkpoint", default=None, help="run directory (default: run_dir)")
  parser.add_argument("--batches", type=int, default=0,
                      help="validation batches to use (default 0: the whole split)")
  args = parser.parse_args(rest)
  exp, _ = load_experiment(argv)
  mesh = make_mesh(exp.mesh)
  tok = load_or_train_tokenizer(exp)
  with use_mesh(mesh, make_rules(exp.mesh)):
    model = Transformer(exp.model, rngs=nnx.Rngs(params=exp.seed))
    src = restore_params(exp, model, args.checkpoint)
    if exp.model.quant:  # weight-only quantization for inference (lmx.quant.apply)
      from lmx.quant.apply import quantize_model, report_bytes
      report_bytes("lmx evaluate", exp.model.quant,
                   quantize_model(model, exp.model.quant, exp.model.quant_group))
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    # The model was built on one device; lay the restored params out on the mesh.
    leaves, treedef = jax.tree.flatten(params)
    params = treedef.unflatten([jax.device_put(x, s) for x, s in
                                zip(leaves, jax.tree.leaves(state_shardings(params, mesh)))])
    eval_fn = jit_eval_step(make_eval_step(graphdef, other, exp.train.loss_chunk_tokens), params,
                            mesh)
    n = args.batches or None
    if exp.data.format == "sft":  # the held-out conversations, as the train loop splits them
      from lmx.train.sources import make_sources
      val = make_sources(exp, tok, 0, 1, n).validation
    else:
      val = list(itertools.islice(iter(make_dataset(exp, tok, "validation")), n))
    out = validation_loss(lambda p, b: eval_fn(p, put_batch(b, mesh)), params, val)
  if exp.data.format == "sft":
    out.update(checkpoint=src["source"], step=src["step"])
    print(json.dumps(out))
    return 0
  train_counts = count_targets(iter(make_dataset(exp, tok, "train")), exp.model.vocab_size,
                               max_batches=UNIGRAM_TRAIN_BATCHES)
  valid = np.concatenate([masked_targets(b) for b in val])
  out["unigram_ppl"] = unigram_perplexity(train_counts, valid, exp.model.vocab_size)
  out.update(checkpoint=src["source"], step=src["step"])
  print(json.dumps(out))
  return 0


# Train batches whose targets give the unigram counts (the first ones of the train stream).
UNIGRAM_TRAIN_BATCHES = 500
