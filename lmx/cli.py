"""The `lmx` command. Each subcommand lives beside the code it drives.

    lmx train     --config=experiments/default.py [--config.x.y=v ...]
    lmx generate  --config=... [--prompt TEXT] [--checkpoint DIR]
    lmx evaluate  --config=...
    lmx info      --config=...
    lmx convert   --from_hf DIR --to RUN_DIR | --from RUN_DIR --to_hf DIR
    lmx serve     --config=... [--port N]
    lmx data ...  / lmx tokenizer ... / lmx sweep ... / lmx scaling ...

`lmx train` records its experiment as RUN_DIR/config.json; train, generate, evaluate, serve
and info then take `--run RUN_DIR` in place of `--config=FILE` (overrides still apply).
"""

from __future__ import annotations

import importlib
import sys

from lmx.config import ConfigError
from lmx.runtime import keep_host_memory

# subcommand -> "module:function"; the function takes argv (after the subcommand) and
# returns an exit code. Imported lazily so `lmx info` does not pay for the trainer.
COMMANDS = {
    "train": ("lmx.train.loop:cli_main", "train a model from an experiment config"),
    "generate": ("lmx.infer.generate:cli_main", "sample a continuation from a checkpoint"),
    "evaluate": ("lmx.eval.harness:cli_main", "perplexity, bits/byte, multiple-choice and generation tasks"),
    "convert": ("lmx.interop.convert:cli_main", "Hugging Face checkpoints in (--from_hf) and out (--to_hf)"),
  "serve": ("lmx.serve.server:cli_main", "OpenAI-compatible HTTP server for a checkpoint"),
  "info": ("lmx.info:cli_main", "parameter, FLOP and memory accounting as one JSON line"),
    "data": ("lmx.data.prepare:cli_main", "clean, deduplicate and tokenize a corpus"),
    "tokenizer": ("lmx.data.tokenizer:cli_main", "train / encode / decode SentencePiece"),
    "sweep": ("lmx.scaling.sweep:cli_main", "plan and run IsoFLOP sweeps"),
    "scaling": ("lmx.scaling.cli:cli_main", "fit Kaplan / Chinchilla scaling laws"),
}

# Commands that run on every host of a multi-process job (docs/multihost.md).
DISTRIBUTED_COMMANDS = ("train", "evaluate", "generate")


def _usage() -> str:
  lines = ["usage: lmx COMMAND [args]", "", "commands:"]
  lines += [f"  {name:10s} {doc}" for name, (_, doc) in COMMANDS.items()]
  lines += ["", "The experiment: --config=FILE [--config.x.y=v ...], or --run RUN_DIR (the "
            "config.json lmx train recorded there) with the same overrides."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"lmx: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module, fn = COMMANDS[name][0].split(":")
  keep_host_memory()  # before JAX starts its CPU threads (see lmx/runtime.py)
  try:
    if name in DISTRIBUTED_COMMANDS:
      # Before any other JAX use: jax.distributed must start before the backends exist.
      from lmx.parallel.distributed import initialize_from_env
      initialize_from_env()
    return int(getattr(importlib.import_module(module), fn)(rest) or 0)
  except ConfigError as e:
    print(f"lmx {name}: {e}", file=sys.stderr)
    return 2
  except FileNotFoundError as e:
    print(f"lmx {name}: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # in a multi-process job, tell the other processes before dying
    if name in DISTRIBUTED_COMMANDS:
      from lmx.parallel.distributed import fail_fast
      fail_fast(e)  # exits in a multi-process run; returns otherwise
    raise


if __name__ == "__main__":
  sys.exit(main())
