"""Load an experiment file plus `--config.a.b=value` overrides into a validated Experiment.

Uses ml-collections' config flags, so the override syntax is the standard one:
    lmx train --config=experiments/default.py --config.train.steps=200
    lmx train --config=experiments/llama.py:150m     (the part after ':' is get_config's arg)
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

from lmx.config import ConfigError, Experiment, from_config_dict


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separate `--config...` arguments (for ml-collections) from the rest (for argparse)."""
  cfg_args, rest = [], []
  it = iter(argv)
  for a in it:
    if a.startswith("--config"):
      if "=" not in a:  # `--config path` form
        a = f"{a}={next(it, '')}"
      cfg_args.append(a)
    else:
      rest.append(a)
  return cfg_args, rest


def load_config_dict(argv: Sequence[str]) -> ConfigDict:
  """Parse `--config=FILE[:arg]` and overrides into a ConfigDict (raises ConfigError)."""
  cfg_args, _ = split_config_args(argv)
  if not any(a.startswith("--config=") for a in cfg_args):
    raise ConfigError("Missing `--config=experiments/NAME.py`: every command needs an "
                      "experiment file.")
  path = next(a for a in cfg_args if a.startswith("--config="))[len("--config="):]
  if not os.path.exists(path.split(":")[0]):
    raise ConfigError(f"Invalid config: experiment file {path.split(':')[0]!r} does not exist.")
  base_args = [a for a in cfg_args if a.startswith("--config=")]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True,
                                  sys_argv=["lmx", *base_args])
  try:
    fv(["lmx", *base_args])
  except Exception as e:  # the experiment file itself failed to load
    raise ConfigError(f"Invalid config: experiment {path!r} failed to load: {e}") from None
  for a in cfg_args:  # name the unknown key instead of a bare KeyError
    if a.startswith("--config."):
      dotted = a[len("--config."):].split("=", 1)[0]
      node = fv.config
      if dotted == "model.dtype":
        raise ConfigError("Invalid config: `model.dtype` is set by train.precision (float32 | "
                          "bfloat16 | float16), the one source of the compute dtype; override "
                          "--config.train.precision instead.")
      for i, part in enumerate(dotted.split(".")):
        if not isinstance(node, ConfigDict) or part not in node:
          where = ".".join(dotted.split(".")[:i]) or "top level"
          valid = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else "none"
          raise ConfigError(f"Invalid config: `{dotted}` is not a known key; valid keys at "
                            f"{where} are {valid}.")
        node = node[part]
  fv = flags.FlagValues()
  # sys_argv: ml-collections would otherwise read overrides from the process's sys.argv.
  config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True,
                                  sys_argv=["lmx", *cfg_args])
  try:
    fv(["lmx", *cfg_args])
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"Invalid config override: {msg}") from None
  return fv.config


def load_experiment(argv: Sequence[str]) -> tuple[Experiment, ConfigDict]:
  cd = load_config_dict(argv)
  return from_config_dict(cd), cd


def sibling_config(here: str, name: str, arg: str | None = None):
  """`get_config(arg)` of the experiment file `name`.py in the folder of `here` (an
  experiment's `__file__`): how one experiment builds on another without the experiments
  folder being importable."""
  import importlib.util
  import pathlib
  path = pathlib.Path(here).with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"lmx_experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
