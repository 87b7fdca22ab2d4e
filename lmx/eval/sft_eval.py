"""Held-out generation scores for SFT: greedy-decode the final assistant turn, then compare.

Each held-out conversation (split exactly as the train loop splits it, lmx.train.sources)
becomes a prompt `<s> <|user|> ... <|end|> <|assistant|>` (the ids encode_conversation gives
that prefix); the model continues greedily until `<|end|>`, and the decoded text is scored
against the reference turn:

    exact_match  pred.strip() == ref.strip()  (case and spacing inside matter: the tasks are
                 Python signatures and names, where they change the meaning)
    token_f1     SQuAD-style F1 over the multisets of tokens `\\w+|[^\\w\\s]` -- words and
                 single punctuation marks, case kept, punctuation kept: in `def f(a, *b):`
                 the `(`, `,`, `*` and `:` are part of the answer, not noise to strip
(both from lmx.eval.metrics, shared with `lmx evaluate`'s generation tasks)

    python -m lmx.eval.sft_eval --config=experiments/sft_lora.py --base --limit 60
    python -m lmx.eval.sft_eval --config=experiments/sft_lora.py   # the fine-tuned run
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.data import sft
from lmx.eval.metrics import exact_match, token_f1  # noqa: F401 (re-exported)
from lmx.model.transformer import KVCache


def _last_assistant(messages: Sequence[dict[str, str]]) -> int:
  for i in range(len(messages) - 1, -1, -1):
    if messages[i]["role"] == "assistant":
      return i
  raise ValueError("the conversation has no assistant turn to predict")


def prompt_ids(tok, messages: Sequence[dict[str, str]]) -> list[int]:
  """`[bos] + turns + [<|assistant|>]`: the turns before the final assistant turn (turns after
  it are dropped), rendered as `encode_conversation` renders them, so the ids equal its
  prefix up to and including that turn's role token. `tok` must have the chat tokens."""
  context = list(messages[:_last_assistant(messages)])
  ids, _ = sft.encode_conversation(tok, context)  # [bos] + turns + [eos]
  return ids[:-1].tolist() + [sft.chat_token_ids(tok)["<|assistant|>"]]


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _greedy_step(graphdef, state, tokens, cache: KVCache):
  """tokens (B,) at slot cache.index of every row -> argmax next tokens (B,), cache + 1."""
  model = nnx.merge(graphdef, state)
  positions = jnp.full((tokens.shape[0], 1), cache.index, jnp.int32)  # (B, 1)
  logits, cache = model.decode(tokens[:, None], positions, cache)  # (B, 1, V)
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


def greedy_decode(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                  stop_ids: Sequence[int] = (), batch_size: int = 32) -> list[list[int]]:
  """Greedy continuations of prompts of ANY lengths: per prompt, up to `max_new_tokens` new
  ids, ending before the first of `stop_ids` (not included) -- what
  `generate(model, p, max_new_tokens, temperature=0, eos_id=...)` returns for each p.

  Why not generate(): it prefills equal-length rows in one call and compiles per prompt
  length and cache size. Held-out prompts come in dozens of lengths, and on CPU each compile
  (2-4 s) costs ~100x the decoding itself (60 default-model prompts: 127 s that way, 15 s
  here, same predictions). Here every row feeds one token a step -- its prompt token while
  it has one, then its own last prediction -- so all rows stay at the same slot, any lengths
  share a batch, and one (batch_size, cache) shape compiles once. Prompts run in length
  order so a batch's rows finish their prompts at about the same step.
  """
  if not prompts:
    return []
  if max_new_tokens < 1 or any(len(p) < 1 for p in prompts):
    raise ValueError("greedy_decode: needs max_new_tokens >= 1 and non-empty prompts")
  graphdef, state = nnx.split(model)
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  width = min(batch_size, len(prompts))
  cache_len = max(len(p) for p in prompts) + max_new_tokens
  stops = np.asarray(list(stop_ids), np.int32)
  out: list[list[int]] = [[] for _ in prompts]
  for s in range(0, len(order), width):
    rows = order[s:s + width]
    rows += [rows[-1]] * (width - len(rows))  # a full batch: the same shape, no new compile
    lens = np.asarray([len(prompts[i]) for i in rows])
    buf = np.zeros((width, lens.max() + max_new_tokens), np.int32)  # (B, T) prompt + new
    for b, i in enumerate(rows):
      buf[b, :lens[b]] = prompts[i]
    n_new = np.zeros(width, np.int64)
    finished = np.zeros(width, bool)
    cache = model.init_cache(width, cache_len)
    for t in range(buf.shape[1] - 1):
      nxt, cache = _greedy_step(graphdef, state, jnp.asarray(buf[:, t]), cache)
      nxt = np.asarray(nxt)
      live = (t + 1 >= lens) & ~finished  # rows whose slot t + 1 is a prediction
      stop = np.isin(nxt, stops)
      keep = live & ~stop
      buf[keep, t + 1] = nxt[keep]
      n_new += keep
      finished |= (live & stop) | (n_new >= max_new_tokens)
      if finished.all():
        break
    for b, i in enumerate(rows):
      out[i] = buf[b, lens[b]:lens[b] + n_new[b]].tolist()
  return out


def generation_scores(model, tok, conversations: Sequence[Sequence[dict[str, str]]], *,
                      max_new_tokens: int = 48, limit: int | None = None) -> dict[str, Any]:
  """Greedy-decode the final assistant turn of each conversation (the first `limit`).

  Decoding stops at `<|end|>`, or at `</s>` (a base model that never saw the chat template
  ends documents that way). Returns {'exact_match', 'token_f1' (means over n), 'n',
  'examples': the first 3 as (prompt text, reference, prediction)}.
  """
  convs = list(conversations)[:limit]
  if not convs:
    raise ValueError("generation_scores: no conversations to score")
  end_id = sft.chat_token_ids(tok)[sft.END_TOKEN]
  prompts = [prompt_ids(tok, c) for c in convs]
  new = greedy_decode(model, prompts, max_new_tokens, stop_ids=(end_id, tok.eos_id))
  refs = [c[_last_assistant(c)]["content"] for c in convs]
  preds = [tok.decode(ids) for ids in new]
  return {
      "exact_match": float(np.mean([exact_match(p, r) for p, r in zip(preds, refs)])),
      "token_f1": float(np.mean([token_f1(p, r) for p, r in zip(preds, refs)])),
      "n": len(convs),
      "examples": [(tok.decode(prompts[i]), refs[i], preds[i]) for i in range(min(3, len(convs)))],
  }


def cli_main(argv: Sequence[str]) -> int:
  """`python -m lmx.eval.sft_eval --config=... [--base] [--limit N]`: held-out exact match
  and token F1 of the fine-tuned run (or, with --base, of its train.init_from model)."""
  import argparse

  from lmx.data.tokenizer import load_or_train_tokenizer
  from lmx.experiment import load_experiment, split_config_args
  from lmx.model import Transformer
  from lmx.train.checkpoint import restore_params
  from lmx.train.init_from import base_params, grown_rows
  from lmx.train.sources import sft_conversations

  cfg_args, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog="python -m lmx.eval.sft_eval", description=cli_main.__doc__)
  parser.add_argument("--base", action="store_true",
                      help="score the train.init_from model (before fine-tuning)")
  parser.add_argument("--limit", type=int, default=None, help="held-out conversations to score")
  parser.add_argument("--max_new_tokens", type=int, default=48)
  parser.add_argument("--checkpoint", default=None,
                      help="run directory of the fine-tuned model (default: run_dir)")
  args = parser.parse_args(rest)
  if (args.limit is not None and args.limit < 1) or args.max_new_tokens < 1:
    parser.error("--limit and --max_new_tokens must be >= 1")
  exp, _ = load_experiment(cfg_args)
  if exp.data.format != "sft":
    parser.error(f"data.format is {exp.data.format!r}; this evaluates an SFT experiment")
  if args.base and not exp.train.init_from:
    parser.error("--base needs train.init_from in the experiment")

  start = time.time()
  tok = load_or_train_tokenizer(exp)  # the base tokenizer plus the chat tokens
  convs, _ = sft_conversations(exp)
  _, held = sft.split_conversations(convs, exp.data.sft_heldout, exp.data.shuffle_seed)
  model = Transformer(exp.model, rngs=nnx.Rngs(params=exp.seed))
  if args.base:
    # The weights fine-tuning starts from, embedding grown for the chat tokens as in training.
    base, source = base_params(exp.train.init_from, nnx.state(model, nnx.Param),
                               grown_rows(exp))
    nnx.update(model, base)
  else:
    source = restore_params(exp, model, args.checkpoint)["source"]
  scores = generation_scores(model, tok, held, max_new_tokens=args.max_new_tokens,
                             limit=args.limit)
  for prompt, ref, pred in scores.pop("examples"):
    print(f"--- prompt: {prompt!r}\n    reference: {ref!r}\n    prediction: {pred!r}",
          file=sys.stderr)
  print(f"sft_eval: {time.time() - start:.1f} s", file=sys.stderr)
  print(json.dumps({**scores, "which": "base" if args.base else "finetuned",
                    "checkpoint": source}))
  return 0


if __name__ == "__main__":
  sys.exit(cli_main(sys.argv[1:]))
