"""Autoregressive generation with a KV cache, and the `lmx generate` command.

    prefill: the whole prompt (B, T) in one `model.decode` call fills cache slots 0..T-1
    step:    one token (B, 1) at position cache.index, appended to the cache

Both are jitted once per (model structure, batch, lengths, sampling settings); the loop over
new tokens is a Python loop so generation can stop as soon as every row has emitted EOS.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.infer.sampling import check_sampling_args, sample_token
from lmx.model.transformer import KVCache, Transformer

_STATIC = ("graphdef", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill(graphdef, state, tokens, cache: KVCache, rng, *, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits, cache = model.decode(tokens, positions, cache)  # (B, T, V)
  return sample_token(rng, logits[:, -1], temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _step(graphdef, state, token, cache: KVCache, rng, *, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  positions = jnp.full((token.shape[0], 1), cache.index, jnp.int32)  # (B, 1)
  logits, cache = model.decode(token[:, None], positions, cache)  # (B, 1, V)
  return sample_token(rng, logits[:, 0], temperature, top_k, top_p), cache


def _as_batch(prompt_ids) -> np.ndarray:
  """One prompt (list of ints) or rows of equal length -> int32 (B, T)."""
  expect = ("generate: prompt_ids must be a non-empty list of ints or an integer (B, T) "
            "array with T >= 1 and rows of equal length")
  try:
    arr = np.asarray(prompt_ids)
  except ValueError:
    raise ValueError(f"{expect}; got rows of different lengths.") from None
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{expect}; got shape {arr.shape} and dtype {arr.dtype}.")
  return arr.astype(np.int32)


def generate(model: Transformer, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> list[list[int]]:
  """Continue each prompt row by up to `max_new_tokens` tokens.

  prompt_ids: one prompt (list of ints) or an int (B, T) array. Returns, per row, the new
  tokens only; a row stops at its first `eos_id`, which is not included. temperature 0 is
  greedy decoding. The same seed gives the same tokens.
  """
  tokens = _as_batch(prompt_ids)
  batch, prompt_len = tokens.shape
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens is {max_new_tokens!r}; it must be an int >= 1.")
  check_sampling_args(temperature, top_k, top_p)
  vocab = model.cfg.vocab_size
  if tokens.min() < 0 or tokens.max() >= vocab:
    raise ValueError(f"generate: prompt token ids must be in [0, {vocab}) (model.vocab_size); "
                     f"got values in [{tokens.min()}, {tokens.max()}].")
  total = prompt_len + max_new_tokens
  if model.cfg.position == "learned" and total > model.cfg.max_seq_len:
    raise ValueError(f"generate: prompt length {prompt_len} + max_new_tokens {max_new_tokens} "
                     f"= {total} exceeds model.max_seq_len={model.cfg.max_seq_len} (learned "
                     "position table).")

  graphdef, state = nnx.split(model)
  opts = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  rng = jax.random.key(seed)
  cache = model.init_cache(batch, total)

  rng, sub = jax.random.split(rng)
  token, cache = _prefill(graphdef, state, jnp.asarray(tokens), cache, sub, **opts)
  out = [token]
  done = np.zeros(batch, bool)
  for _ in range(max_new_tokens - 1):
    if eos_id is not None:
      done |= np.asarray(token) == eos_id
      if done.all():
        break
    rng, sub = jax.random.split(rng)
    token, cache = _step(graphdef, state, token, cache, sub, **opts)
    out.append(token)

  new = np.stack([np.asarray(t) for t in out], axis=1)  # (B, n_generated)
  rows = []
  for row in new.tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    rows.append(row)
  return rows


def cli_main(argv: Sequence[str]) -> int:
  """`lmx generate --config=... [--prompt TEXT] [--checkpoint DIR] [--max_new_tokens N]`.

  Sampling settings come from the config's `sample` section (override with
  `--config.sample.temperature=0.5` etc.).
  """
  from lmx.data.tokenizer import load_or_train_tokenizer
  from lmx.experiment import load_experiment, split_config_args
  from lmx.train.checkpoint import restore_params

  cfg_args, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog="lmx generate", description=cli_main.__doc__)
  parser.add_argument("--prompt", default=None, help="text to continue (default: sample.prompt)")
  parser.add_argument("--checkpoint", default=None,
                      help="checkpoint directory (default: the run_dir of the config)")
  parser.add_argument("--max_new_tokens", type=int, default=None,
                      help="tokens to generate (default: sample.max_new_tokens)")
  args = parser.parse_args(rest)
  exp, _ = load_experiment(cfg_args)
  s = exp.sample
  prompt = s.prompt if args.prompt is None else args.prompt
  max_new = s.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
  if max_new < 1:
    parser.error(f"--max_new_tokens is {max_new}; it must be >= 1")

  tokenizer = load_or_train_tokenizer(exp)
  model = Transformer(exp.model, rngs=nnx.Rngs(exp.seed))
  info = restore_params(exp, model, directory=args.checkpoint)  # in place
  print(f"lmx generate: restored {info['source']} (step {info['step']})", file=sys.stderr)
  # Training documents are packed as [bos] + ids + [eos] (lmx.data.pipeline).
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  [new] = generate(model, ids, max_new, temperature=s.temperature, top_k=s.top_k,
                   top_p=s.top_p, seed=s.seed, eos_id=tokenizer.eos_id)
  print(prompt + tokenizer.decode(new))
  return 0
