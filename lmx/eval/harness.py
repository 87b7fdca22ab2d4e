"""`lmx evaluate`: perplexity / bits per byte, multiple-choice log-likelihood and generation
tasks, as one JSON line of results (stdout) and a table (stderr).

    lmx evaluate --config=experiments/default.py                       # ppl (the default)
    lmx evaluate --config=experiments/default.py --tasks=next_line,docstring_name_mc,docstring_name
    lmx evaluate --config=... --tasks=ppl,my_task.jsonl --limit 100 [--checkpoint DIR | --init]
    lmx evaluate --hf DIR --config=... --tasks=next_line               # a Hugging Face model

Tasks (lmx.eval.tasks): `ppl`, the shipped sets, or paths to JSONL task files.
  ppl         the experiment's validation split (data section: stdlib, a folder, JSONL, ...),
              or with --corpus PATH every document of PATH, tokenized with the model's
              tokenizer -> val_loss, val_ppl, val_bpb, unigram_ppl (lmx.eval.perplexity)
  multiple    row = [bos] + encode(context + choice); the choice's tokens are those after the
  choice      longest prefix shared with encode(context) (so a token that merges across the
              boundary is scored with the choice, as lm-eval-harness does); the score of a
              choice is sum log p(choice tokens | the tokens before). acc: the highest score is
              the label. acc_norm: the highest score / len(choice in UTF-8 bytes) is the
              label (lm-eval-harness's acc_norm, byte-normalized, so tokenizers compare).
              Rows are right-padded into (batch, width) blocks, one forward each; padding
              sits after every scored token, so causal attention never sees it.
  generation  prompt = [bos] + prompt ids, greedy (lmx.infer.generate.generate, temperature
              0) until eos or max_new_tokens, the text cut at the record's first stop
              string; exact_match, token_f1 (max over the answers), accuracy (an answer is
              contained in the prediction, case- and spacing-insensitive), BLEU and
              ROUGE-1/2/L against the first answer (lmx.eval.metrics).
`--init` scores the freshly initialized model (seed from the config) instead of a
checkpoint: the chance baseline.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.eval import metrics
from lmx.eval.tasks import GEN, MC, Task, load_task
from lmx.train.loss import seq_chunk

_WIDTH_BUCKET = 32  # MC row widths round up to a power of two >= this: few shapes compile
_HEAD_CHUNK_TOKENS = 2048  # (row, position) pairs per LM-head chunk in MC scoring


@functools.partial(jax.jit, static_argnames=("graphdef", "step"))
def _continuation_logprobs(graphdef, state, inputs, targets, mask, step):
  """inputs/targets int32 (B, W), mask float32 (B, W) -> (B,) float32 sums over the masked
  positions of log p(target | inputs up to there). The LM head runs `step` positions at a
  time (a scan), so no (B, W, V) logits exist at once (lmx.train.loss does the same)."""
  from lmx.model.transformer import head_logits
  model = nnx.merge(graphdef, state)
  hidden = model.hidden(inputs)  # (B, W, D)
  head = model.head_weight()  # (D, V)
  b, w = inputs.shape

  def chunks(x):  # (B, W, ...) -> (W/step, B, step, ...)
    return jnp.moveaxis(x.reshape(b, w // step, step, *x.shape[2:]), 1, 0)

  def one(total, chunk):
    h, tg, m = chunk
    logp = jax.nn.log_softmax(head_logits(h, head), axis=-1)  # (B, step, V) float32
    tgt = jnp.take_along_axis(logp, tg[..., None], axis=-1)[..., 0]  # (B, step)
    return total + jnp.sum(tgt * m, axis=-1), None

  total, _ = jax.lax.scan(one, jnp.zeros((b,), jnp.float32),
                          (chunks(hidden), chunks(targets), chunks(mask)))
  return total


def score_continuations(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_size: int = 32, max_len: int | None = None) -> np.ndarray:
  """sum log p(cont | ctx) for each (ctx ids, cont ids) pair -> float64 (N,).

  ctx must be non-empty (it holds at least the bos id) and cont non-empty. A row longer
  than `max_len` + 1 tokens (default model.max_seq_len) loses tokens from the left of the
  context. Rows are sorted by length and cut into blocks of `batch_size`; a block is
  right-padded to its longest row rounded up to a power of two >= 32 (a short last block is
  filled with empty rows), so one compile serves many blocks.
  """
  max_len = max_len or model.cfg.max_seq_len
  rows = []
  for ctx, cont in pairs:
    if not len(ctx) or not len(cont):
      raise ValueError("score_continuations: context and continuation need >= 1 token each")
    ids = (list(ctx) + list(cont))[-(max_len + 1):]
    rows.append((ids, min(len(cont), len(ids) - 1)))
  out = np.zeros(len(rows))
  if not rows:
    return out
  graphdef, state = nnx.split(model)
  order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
  width_b = min(batch_size, len(rows))
  for s in range(0, len(order), width_b):
    block = order[s:s + width_b]
    longest = max(len(rows[i][0]) - 1 for i in block)
    w = min(max(_WIDTH_BUCKET, 1 << (longest - 1).bit_length()), max_len)
    inputs = np.zeros((width_b, w), np.int32)  # (B, W)
    targets = np.zeros((width_b, w), np.int32)
    mask = np.zeros((width_b, w), np.float32)
    for b, i in enumerate(block):
      ids, n_cont = rows[i]
      n = len(ids) - 1
      inputs[b, :n] = ids[:-1]
      targets[b, :n] = ids[1:]
      mask[b, n - n_cont:n] = 1.0  # the continuation's targets
    step = seq_chunk(width_b, w, _HEAD_CHUNK_TOKENS)
    sums = _continuation_logprobs(graphdef, state, jnp.asarray(inputs), jnp.asarray(targets),
                                  jnp.asarray(mask), step)
    out[block] = np.asarray(sums, np.float64)[:len(block)]
  return out


def _bos(tok) -> list[int]:
  bos = getattr(tok, "bos_id", None)
  return [] if bos is None or bos < 0 else [int(bos)]


def split_continuation(tok, context: str, choice: str) -> tuple[list[int], list[int]]:
  """([bos] + context ids, choice ids) with encode(context + choice) = their concatenation:
  the choice gets the tokens after the longest prefix shared with encode(context), and at
  least one (the last); the context keeps at least one (bos, or the first token)."""
  whole = _bos(tok) + tok.encode(context + choice)
  ctx = _bos(tok) + tok.encode(context)
  n = 0
  while n < min(len(ctx), len(whole)) and ctx[n] == whole[n]:
    n += 1
  n = max(1, min(n, len(whole) - 1))
  if len(whole) < 2:
    raise ValueError(f"context {context!r:.40} + choice {choice!r:.40} is a single token; "
                     "a tokenizer without a bos id needs a non-empty context")
  return whole[:n], whole[n:]


def evaluate_mc(model, tok, task: Task, batch_size: int = 32) -> dict[str, Any]:
  """acc and acc_norm (module docstring) over the task's records."""
  pairs, spans = [], []
  for r in task.records:
    spans.append((len(pairs), len(r["choices"])))
    pairs += [split_continuation(tok, r["context"], c) for c in r["choices"]]
  scores = score_continuations(model, pairs, batch_size)
  acc, acc_norm = [], []
  for r, (lo, k) in zip(task.records, spans):
    s = scores[lo:lo + k]
    nbytes = np.asarray([len(c.encode("utf-8")) for c in r["choices"]], np.float64)
    acc.append(int(np.argmax(s)) == r["label"])
    acc_norm.append(int(np.argmax(s / nbytes)) == r["label"])
  n = len(acc)
  a = metrics.accuracy(acc)
  return {"acc": a, "acc_stderr": math.sqrt(a * (1 - a) / max(n - 1, 1)),
          "acc_norm": metrics.accuracy(acc_norm),
          "chance": float(np.mean([1 / len(r["choices"]) for r in task.records])),
          "n": n, "skipped": task.skipped}


def evaluate_gen(model, tok, task: Task, max_new_tokens: int = 16,
                 batch_size: int = 32) -> dict[str, Any]:
  """Greedy generations scored by exact match, token F1, accuracy, BLEU and ROUGE."""
  from lmx.infer.generate import generate, truncate_at_stop
  keep = model.cfg.max_seq_len - max_new_tokens
  if keep < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                     f"model.max_seq_len={model.cfg.max_seq_len}")
  prompts = [(_bos(tok) + tok.encode(r["prompt"]))[-keep:] for r in task.records]
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  preds = [""] * len(prompts)
  eos = getattr(tok, "eos_id", None)
  for s in range(0, len(order), batch_size):
    block = order[s:s + batch_size]
    new = generate(model, [prompts[i] for i in block], max_new_tokens, temperature=0.0,
                   eos_id=eos if eos is not None and eos >= 0 else None)
    for i, ids in zip(block, new):
      preds[i] = truncate_at_stop(tok.decode(ids), task.records[i]["stop"])[0]
  refs = [r["answers"] for r in task.records]
  first = [a[0] for a in refs]
  out = {
      "exact_match": metrics.accuracy([any(metrics.exact_match(p, a) for a in rs)
                                       for p, rs in zip(preds, refs)]),
      "token_f1": float(np.mean([max(metrics.token_f1(p, a) for a in rs)
                                 for p, rs in zip(preds, refs)])),
      "accuracy": metrics.accuracy([any(metrics.contains(p, a) for a in rs)
                                    for p, rs in zip(preds, refs)]),
      "bleu": metrics.bleu(preds, first),
      **metrics.rouge(preds, first),
      "n": len(preds), "skipped": task.skipped,
  }
  out["examples"] = [{"prompt": task.records[i]["prompt"][-80:], "answer": first[i],
                      "prediction": preds[i]} for i in range(min(3, len(preds)))]
  return out


def _table(results: dict[str, Any]) -> str:
  lines = [f"{'task':20s} {'metric':12s} {'value':>10s} {'n':>6s}"]
  if "val_loss" in results:
    for k in ("val_loss", "val_ppl", "val_bpb", "unigram_ppl"):
      if k in results:
        lines.append(f"{'ppl':20s} {k:12s} {results[k]:10.4f} {int(results['val_tokens']):6d}")
  for name, r in results.get("tasks", {}).items():
    for k, v in r.items():
      if k not in ("n", "skipped", "examples", "kind", "source") and isinstance(v, float):
        lines.append(f"{name:20s} {k:12s} {v:10.4f} {r['n']:6d}")
  return "\n".join(lines)


def _load_model(args, exp):
  """(experiment, model, tokenizer, source info) from a Hugging Face directory (the
  experiment's model section becomes the HF model's config), a checkpoint, or --init."""
  import dataclasses

  from lmx.data.tokenizer import load_or_train_tokenizer
  from lmx.model import Transformer
  if args.hf:
    from lmx.interop.hf import from_pretrained, load_tokenizer
    tok = load_tokenizer(args.hf)
    model, hf_cfg = from_pretrained(args.hf, dtype=exp.train.precision)
    exp = dataclasses.replace(exp, model=dataclasses.replace(
        hf_cfg, quant=exp.model.quant, quant_group=exp.model.quant_group).validate())
    info = {"source": str(args.hf), "step": None}
  else:
    tok = load_or_train_tokenizer(exp)
    model = Transformer(exp.model, rngs=nnx.Rngs(params=exp.seed))
    if args.init:
      info = {"source": "init", "step": 0}
    else:
      from lmx.train.checkpoint import restore_params
      info = restore_params(exp, model, args.checkpoint)
  if exp.model.quant:  # weight-only quantization for inference (lmx.quant.apply)
    from lmx.quant.apply import quantize_model, report_bytes
    report_bytes("lmx evaluate", exp.model.quant,
                 quantize_model(model, exp.model.quant, exp.model.quant_group))
  return exp, model, tok, info


def cli_main(argv: Sequence[str]) -> int:
  """`lmx evaluate --config=EXP [--tasks=ppl,next_line,FILE.jsonl] [--limit N]
  [--checkpoint DIR | --init | --hf DIR]`: one JSON line of results, a table on stderr."""
  from lmx.experiment import load_experiment, split_config_args
  from lmx.parallel.mesh import make_mesh, make_rules, use_mesh

  cfg_args, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog="lmx evaluate", description=cli_main.__doc__)
  parser.add_argument("--tasks", default="ppl",
                      help="comma-separated: ppl, shipped task names (next_line, "
                           "docstring_name, docstring_name_mc) or JSONL paths (default ppl)")
  parser.add_argument("--checkpoint", default=None, help="run directory (default: run_dir)")
  parser.add_argument("--init", action="store_true",
                      help="score the untrained model (config seed), not a checkpoint")
  parser.add_argument("--hf", default=None,
                      help="a Hugging Face model directory (config.json + safetensors + "
                           "tokenizer, lmx.interop.hf) instead; --config is then optional "
                           "(its data section feeds ppl)")
  parser.add_argument("--limit", type=int, default=0,
                      help="first N records of each MC / generation task (default 0: all)")
  parser.add_argument("--batches", type=int, default=0,
                      help="ppl: validation batches to use (default 0: the whole split)")
  parser.add_argument("--corpus", default=None,
                      help="ppl: every document of this corpus (a folder, .txt/.py/.md, "
                           ".jsonl or .array_record) instead of the validation split, "
                           "tokenized with the model's tokenizer")
  parser.add_argument("--batch_size", type=int, default=32,
                      help="MC rows per forward / prompts per generate call (default 32)")
  parser.add_argument("--max_new_tokens", type=int, default=16,
                      help="generation tasks: tokens per answer (default 16)")
  parser.add_argument("--write_tasks", default=None,
                      help="also write each task's records as DIR/NAME.jsonl")
  args = parser.parse_args(rest)
  for flag in ("limit", "batches"):
    if getattr(args, flag) < 0:
      parser.error(f"--{flag} is {getattr(args, flag)}; it must be >= 0")
  for flag in ("batch_size", "max_new_tokens"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} is {getattr(args, flag)}; it must be >= 1")
  if sum(map(bool, (args.init, args.hf, args.checkpoint))) > 1:
    parser.error("give at most one of --checkpoint, --init and --hf")
  names = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if not names:
    parser.error("--tasks is empty; name at least one task (e.g. ppl)")
  if args.hf and not cfg_args:
    from lmx.config import base_config, from_config_dict
    exp = from_config_dict(base_config())  # the stdlib corpus, default split
  else:
    exp, _ = load_experiment(cfg_args)
  start = time.time()
  tasks = [load_task(n, exp.data.validation_fraction) for n in names if n != "ppl"]
  for t in tasks:
    if args.limit:
      t.records = t.records[:args.limit]
    if args.write_tasks:
      t.write_jsonl(f"{args.write_tasks}/{t.name}.jsonl")

  results: dict[str, Any] = {}
  mesh = make_mesh(exp.mesh)
  with use_mesh(mesh, make_rules(exp.mesh)):
    exp, model, tok, info = _load_model(args, exp)
    print(f"lmx evaluate: {info['source']} (step {info['step']})", file=sys.stderr)
    if "ppl" in names:  # (with --hf the corpus is tokenized, and cached, with its tokenizer)
      from lmx.eval.perplexity import perplexity_results
      results.update(perplexity_results(exp, tok, model, mesh, args.batches or None,
                                        args.corpus))
      if args.corpus:
        results["corpus"] = args.corpus
  per_task = {}
  for t in tasks:
    if t.kind == MC:
      r = evaluate_mc(model, tok, t, args.batch_size)
    else:
      assert t.kind == GEN
      r = evaluate_gen(model, tok, t, args.max_new_tokens, args.batch_size)
      for ex in r.pop("examples"):
        print(f"lmx evaluate: {t.name}: {json.dumps(ex)}", file=sys.stderr)
    per_task[t.name] = {"kind": t.kind, "source": t.source, **r}
  if per_task:
    results["tasks"] = per_task
  results.update(checkpoint=info["source"], step=info["step"])
  print(_table(results), file=sys.stderr)
  print(f"lmx evaluate: {time.time() - start:.1f} s", file=sys.stderr)
  print(json.dumps(results))
  return 0
