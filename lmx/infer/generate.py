"""`generate()`, the friendly front of the decode engine, and the `lmx generate` command.

generate() takes one prompt, an equal-length (B, T) array, or rows of different lengths,
and runs `lmx.infer.engine.decode` (left-padded ragged batch, prefill + one jitted
while_loop, one host sync). It returns the new tokens per row WITHOUT the stop token
(the engine's DecodeResult keeps it, for RL). Stop STRINGS are not seen by the loop, which
stops on token ids only: `truncate_at_stop` cuts the decoded text afterwards (the CLI's
`--stop`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Sequence

import numpy as np
from flax import nnx

from lmx.infer.engine import SamplingOptions, decode
from lmx.model.transformer import Transformer


def _as_rows(prompt_ids) -> list[list[int]]:
  """One prompt (list of ints), an int (B, T) array, or a list of int lists of any lengths
  -> rows of ints."""
  expect = ("generate: prompt_ids must be a non-empty list of ints, an integer (B, T) "
            "array, or a list of non-empty lists of ints")
  if hasattr(prompt_ids, "shape") or (len(prompt_ids) and np.ndim(prompt_ids[0]) == 0):
    arr = np.asarray(prompt_ids)
    arr = arr[None] if arr.ndim == 1 else arr
    rows = list(arr)
  else:
    rows = [np.asarray(r) for r in prompt_ids]
  if not rows or any(r.ndim != 1 or r.size == 0 or not np.issubdtype(r.dtype, np.integer)
                     for r in rows):
    raise ValueError(f"{expect}; got {prompt_ids!r:.200}.")
  return [r.astype(np.int64).tolist() for r in rows]


def generate(model: Transformer, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             min_new_tokens: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
             stop_ids: Sequence[int] = (), return_logprobs: bool = False) -> list:
  """Continue each prompt row by up to `max_new_tokens` tokens.

  prompt_ids: one prompt (list of ints), an int (B, T) array, or a list of prompts of
  different lengths. A row stops at its first `eos_id` or `stop_ids` token, which is not
  included; no stop id is chosen before `min_new_tokens` tokens. temperature 0 is greedy.
  The same seed gives the same tokens. Sampling order and penalties:
  `lmx.infer.engine` / `lmx.infer.sampling`.

  Returns, per row, the new token ids; with `return_logprobs`, per row a pair (ids,
  log-probs of those ids under the raw model logits).
  """
  rows = _as_rows(prompt_ids)
  vocab = model.cfg.vocab_size
  flat = [t for r in rows for t in r]
  if min(flat) < 0 or max(flat) >= vocab:
    raise ValueError(f"generate: prompt token ids must be in [0, {vocab}) (model.vocab_size); "
                     f"got values in [{min(flat)}, {max(flat)}].")
  stops = tuple(dict.fromkeys(([] if eos_id is None else [int(eos_id)])
                              + [int(t) for t in stop_ids]))
  opts = SamplingOptions(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                         min_p=float(min_p), repetition_penalty=float(repetition_penalty),
                         frequency_penalty=float(frequency_penalty),
                         presence_penalty=float(presence_penalty), stop_ids=stops,
                         min_new_tokens=int(min_new_tokens), seed=int(seed))
  try:
    res = decode(model, rows, max_new_tokens, opts)
  except ValueError as e:
    raise ValueError(str(e).replace("engine:", "generate:", 1)) from None
  out = []
  for toks, lps, why in zip(res.tokens, res.logprobs, res.finish_reason):
    if why == "stop":  # the engine keeps the stop token; generate() drops it
      toks, lps = toks[:-1], lps[:-1]
    out.append((toks, lps) if return_logprobs else toks)
  return out


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  """`text` up to (not including) the earliest occurrence of any stop string, and whether
  one occurred."""
  cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
  return (text, False) if cut < 0 else (text[:cut], True)


def _completion(tokenizer, ids: list[int], stops: Sequence[str]) -> tuple[str, list[int], bool]:
  """Decoded text cut at the first stop string, the shortest prefix of `ids` whose text
  contains it (all ids if none), and whether a stop string was hit."""
  text, hit = truncate_at_stop(tokenizer.decode(ids), stops)
  if not hit:
    return text, ids, False
  n = next(n for n in range(1, len(ids) + 1)
           if truncate_at_stop(tokenizer.decode(ids[:n]), stops)[1])
  return text, ids[:n], True


def cli_main(argv: Sequence[str]) -> int:
  """`lmx generate --config=... [--prompt TEXT | --batch_file FILE] [--checkpoint DIR |
  --hf HF_DIR] [--max_new_tokens N] [--stop STRING ...] [--beams N | --draft_config=FILE
  [--draft_checkpoint DIR] [--spec_k K] | --prompt_lookup]`.

  Sampling settings come from the config's `sample` section (override with
  `--config.sample.temperature=0.5` etc.). With --batch_file, each line of FILE is a prompt
  and each prompt gets one JSON line on stdout: {"prompt", "completion", "tokens",
  "finish_reason"} ('stop' at the EOS token or a --stop string, else 'length'). Tokens/s
  goes to stderr (the first batch includes the jit compile). `--hf HF_DIR` runs a Hugging
  Face model directory's weights and tokenizer directly (lmx.interop.hf); --config is then
  optional and only its `sample` section and train.precision are used.
  """
  from lmx.data.tokenizer import load_or_train_tokenizer
  from lmx.infer.beam import beam_search
  from lmx.infer.speculative import prompt_lookup_decode, speculative_decode
  from lmx.experiment import load_experiment, split_config_args
  from lmx.train.checkpoint import restore_params

  cfg_args, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog="lmx generate", description=cli_main.__doc__)
  parser.add_argument("--prompt", default=None, help="text to continue (default: sample.prompt)")
  parser.add_argument("--batch_file", default=None,
                      help="a file with one prompt per line; prints one JSON line per prompt")
  parser.add_argument("--batch_size", type=int, default=32,
                      help="prompts decoded together from --batch_file (default 32)")
  parser.add_argument("--stop", action="append", default=[],
                      help="cut the completion before this string (repeatable)")
  parser.add_argument("--checkpoint", default=None,
                      help="checkpoint directory (default: the run_dir of the config)")
  parser.add_argument("--max_new_tokens", type=int, default=None,
                      help="tokens to generate (default: sample.max_new_tokens)")
  parser.add_argument("--beams", type=int, default=0,
                      help="beam search of this width instead of sampling (lmx.infer.beam); "
                           "prints the best beam, and with --batch_file the n-best with "
                           "scores (default 0: sample)")
  parser.add_argument("--draft_config", default=None,
                      help="speculative decoding (lmx.infer.speculative) with this "
                           "experiment's model as the draft (same tokenizer as the target)")
  parser.add_argument("--draft_checkpoint", default=None,
                      help="the draft's checkpoint directory (default: its config's run_dir)")
  parser.add_argument("--spec_k", type=int, default=4,
                      help="tokens proposed per speculative round (default 4)")
  parser.add_argument("--prompt_lookup", action="store_true",
                      help="speculative decoding with proposals looked up in the prompt + "
                           "generated tokens (no draft model)")
  parser.add_argument("--hf", default=None,
                      help="a Hugging Face model directory (config.json + safetensors + "
                           "tokenizer) to generate from instead of an lmx checkpoint")
  args = parser.parse_args(rest)
  if args.hf is not None and args.checkpoint is not None:
    parser.error("give --hf or --checkpoint, not both")
  if args.hf is not None and not cfg_args:
    from lmx.config import base_config, from_config_dict
    exp = from_config_dict(base_config())  # sampling defaults
  else:
    exp, _ = load_experiment(cfg_args)
  s = exp.sample
  max_new = s.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
  if max_new < 1:
    parser.error(f"--max_new_tokens is {max_new}; it must be >= 1")
  if args.beams < 0:
    parser.error(f"--beams is {args.beams}; it must be >= 0")
  speculate = args.draft_config is not None or args.prompt_lookup
  if speculate and args.beams:
    parser.error("--draft_config / --prompt_lookup cannot be combined with --beams")
  if args.draft_config is not None and args.prompt_lookup:
    parser.error("give --draft_config or --prompt_lookup, not both")
  if args.spec_k < 1:
    parser.error(f"--spec_k is {args.spec_k}; it must be >= 1")
  if args.batch_size < 1:
    parser.error(f"--batch_size is {args.batch_size}; it must be >= 1")
  if args.batch_file is not None and args.prompt is not None:
    parser.error("give --prompt or --batch_file, not both")
  if args.batch_file is not None:
    with open(args.batch_file, encoding="utf-8") as f:
      prompts = [line.rstrip("\r\n") for line in f]
  else:
    prompts = [s.prompt if args.prompt is None else args.prompt]

  if args.hf is not None:
    from lmx.interop.hf import from_pretrained, load_tokenizer
    tokenizer = load_tokenizer(args.hf)
    model, hf_model = from_pretrained(args.hf, dtype=exp.train.precision)
    exp = dataclasses.replace(exp, model=dataclasses.replace(hf_model, quant=exp.model.quant,
                                                             quant_group=exp.model.quant_group
                                                             ).validate())
    print(f"lmx generate: loaded {args.hf}", file=sys.stderr)
  else:
    tokenizer = load_or_train_tokenizer(exp)
    model = Transformer(exp.model, rngs=nnx.Rngs(exp.seed))
    info = restore_params(exp, model, directory=args.checkpoint)  # in place
    print(f"lmx generate: restored {info['source']} (step {info['step']})", file=sys.stderr)
  if exp.model.quant:  # weight-only quantization for inference (lmx.quant.apply)
    from lmx.quant.apply import quantize_model, report_bytes
    report_bytes("lmx generate", exp.model.quant,
                 quantize_model(model, exp.model.quant, exp.model.quant_group))
  draft = None
  if args.draft_config is not None:
    draft_exp, _ = load_experiment([f"--config={args.draft_config}"])
    draft = Transformer(draft_exp.model, rngs=nnx.Rngs(draft_exp.seed))
    dinfo = restore_params(draft_exp, draft, directory=args.draft_checkpoint)
    print(f"lmx generate: draft restored {dinfo['source']} (step {dinfo['step']})",
          file=sys.stderr)
  spec_opts = SamplingOptions(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                              seed=s.seed, stop_ids=(tokenizer.eos_id,))
  spec_totals = np.zeros(3, np.int64)  # accepted, proposed, target calls
  kw = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
            eos_id=tokenizer.eos_id, return_logprobs=True)
  n_tokens, seconds = 0, 0.0
  for lo in range(0, len(prompts), args.batch_size):
    batch = prompts[lo:lo + args.batch_size]
    # Training documents are packed as [bos] + ids + [eos] (lmx.data.pipeline).
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in batch]
    t0 = time.perf_counter()
    if args.beams:  # best first; the stop token (kept by beam_search) is dropped
      nbest = beam_search(model, ids, max_new, beams=args.beams, stop_ids=(tokenizer.eos_id,))
      nbest = [[(t[:-1] if t and t[-1] == tokenizer.eos_id else t, sc) for t, sc in hyps]
               for hyps in nbest]
      rows = [hyps[0] for hyps in nbest]
    elif speculate:  # the stop token (kept by the engine convention) is dropped
      if draft is not None:
        res = speculative_decode(model, draft, ids, max_new, spec_opts, k=args.spec_k)
      else:
        res = prompt_lookup_decode(model, ids, max_new, spec_opts, k=args.spec_k)
      spec_totals += (res.accepted, res.proposed, res.target_calls)
      rows = [(t[:-1] if why == "stop" else t, None)
              for t, why in zip(res.tokens, res.finish_reason)]
    else:
      rows = generate(model, ids, max_new, **kw)
    seconds += time.perf_counter() - t0
    for i, (prompt, (new, _)) in enumerate(zip(batch, rows)):
      n_tokens += len(new)
      text, kept, hit = _completion(tokenizer, new, args.stop)
      why = "stop" if hit or len(new) < max_new else "length"
      if args.batch_file is None:
        print(prompt + text)
      else:
        line = {"prompt": prompt, "completion": text, "tokens": kept, "finish_reason": why}
        if args.beams:  # the n-best, best first, score = sum log-prob / length ** 1
          line["beams"] = [dict(zip(("completion", "tokens"), _completion(tokenizer, t,
                                                                          args.stop)[:2]),
                                score=sc) for t, sc in nbest[i]]
        print(json.dumps(line), flush=True)
  print(f"lmx generate: {n_tokens} new tokens in {seconds:.2f} s = "
        f"{n_tokens / max(seconds, 1e-9):.1f} tokens/s (includes the jit compile)",
        file=sys.stderr)
  if speculate:
    accepted, proposed, calls = spec_totals.tolist()
    print(f"lmx generate: speculative ({'draft' if draft is not None else 'prompt lookup'}, "
          f"k={args.spec_k}): acceptance {accepted}/{proposed} = "
          f"{accepted / max(proposed, 1):.3f}; {calls} target calls for {n_tokens} tokens "
          f"= {calls / max(n_tokens, 1):.3f} per token", file=sys.stderr)
  return 0
