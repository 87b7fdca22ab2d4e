"""Load an experiment file plus `--config.a.b=value` overrides into a validated Experiment.

Uses ml-collections' config flags, so the override syntax is the standard one:
    lmx train --config=experiments/default.py --config.train.steps=200
    lmx train --config=experiments/llama.py:150m     (the part after ':' is get_config's arg)

Every `lmx train` records its experiment as RUN_DIR/config.json, so any command can take
`--run RUN_DIR` instead of `--config=FILE` (overrides still apply on top):
    lmx generate --run runs/default --prompt 'def '
    lmx train --run runs/default --config.train.steps=3000      (resume, extended)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

from lmx.config import ConfigError, Experiment, from_config_dict

RUN_CONFIG = "config.json"  # in every run directory `lmx train` wrote


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separate `--config...` and `--run` arguments (the experiment) from the rest (for
  argparse). `--run DIR` comes back as `--run=DIR`."""
  cfg_args, rest = [], []
  it = iter(argv)
  for a in it:
    if a.startswith("--config") or a == "--run" or a.startswith("--run="):
      if "=" not in a:  # `--config path` form
        a = f"{a}={next(it, '')}"
      cfg_args.append(a)
    else:
      rest.append(a)
  return cfg_args, rest


def _check_override_keys(cfg_args: Sequence[str], config: ConfigDict) -> None:
  """Name an unknown override key (instead of a bare KeyError) and refuse model.dtype."""
  for a in cfg_args:
    if a.startswith("--config."):
      dotted = a[len("--config."):].split("=", 1)[0]
      node = config
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


def _parse_overrides(fv: flags.FlagValues, cfg_args: Sequence[str]) -> ConfigDict:
  try:
    fv(["lmx", *cfg_args])
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f"Invalid config override: {msg}") from None
  return fv.config


def load_config_dict(argv: Sequence[str]) -> ConfigDict:
  """Parse `--config=FILE[:arg]` (or `--run=RUN_DIR`) and overrides into a ConfigDict
  (raises ConfigError)."""
  cfg_args, _ = split_config_args(argv)
  runs = [a[len("--run="):] for a in cfg_args if a.startswith("--run=")]
  files = [a for a in cfg_args if a.startswith("--config=")]
  if runs and files:
    raise ConfigError("Give the experiment as `--config=FILE` or as `--run RUN_DIR`, not both.")
  if runs:
    return _load_run_overrides(runs[-1], [a for a in cfg_args if not a.startswith("--run=")])
  if not files:
    raise ConfigError("Missing `--config=experiments/NAME.py` (or `--run RUN_DIR`): every "
                      "command needs an experiment.")
  path = files[0][len("--config="):]
  if not os.path.exists(path.split(":")[0]):
    raise ConfigError(f"Invalid config: experiment file {path.split(':')[0]!r} does not exist.")
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True,
                                  sys_argv=["lmx", *files])
  try:
    fv(["lmx", *files])
  except Exception as e:  # the experiment file itself failed to load
    raise ConfigError(f"Invalid config: experiment {path!r} failed to load: {e}") from None
  _check_override_keys(cfg_args, fv.config)
  fv = flags.FlagValues()
  # sys_argv: ml-collections would otherwise read overrides from the process's sys.argv.
  config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True,
                                  sys_argv=["lmx", *cfg_args])
  return _parse_overrides(fv, cfg_args)


def _load_run_overrides(run_dir: str, cfg_args: list[str]) -> ConfigDict:
  """RUN_DIR's recorded experiment with `--config.x=v` overrides applied."""
  base = recorded_config_dict(run_dir)
  if base is None:
    raise ConfigError(f"Invalid --run: {run_dir!r} has no {RUN_CONFIG} (written by lmx train) "
                      "and no experiment.py (written by lmx convert --from_hf).")
  _check_override_keys(cfg_args, base)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", base, flag_values=fv, lock_config=True,
                                  sys_argv=["lmx", *cfg_args])
  return _parse_overrides(fv, cfg_args)


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


def run_config_dict(exp: Experiment) -> dict[str, Any]:
  """`exp` as the plain dict `from_config_dict` turns back into an equal Experiment.

  NOTE: not plain `asdict`: from_config_dict derives model.dtype (from train.precision) and
  train.trainable (from peft.method, or the distillation default) and refuses them as
  inputs, so both are left as a user would write them. Raises ValueError when the round
  trip is not exact (an Experiment edited past validation).
  """
  d = dataclasses.asdict(exp)
  del d["model"]["dtype"]  # follows train.precision
  if d["train"]["trainable"]:  # blank it where from_config_dict derives the same pattern
    blank = copy.deepcopy(d)
    blank["train"]["trainable"] = ""
    try:
      if from_config_dict(blank).train.trainable == exp.train.trainable:
        d = blank
    except ConfigError:  # (PEFT refuses a given pattern; only a blank one validates)
      pass
  try:
    back = from_config_dict(d)
  except ConfigError as e:
    raise ValueError(f"the experiment does not survive config.json: {e}") from None
  if back != exp:
    diff = _differences(dataclasses.asdict(exp), dataclasses.asdict(back))
    raise ValueError("the experiment does not survive a round trip through config.json "
                     f"(field: given -> rebuilt): {', '.join(diff)}")
  return d


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """'field: old -> new' for every dotted field that differs (absent: '<unset>')."""
  a, b = _flat(old), _flat(new)
  return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def record_run_config(exp: Experiment) -> list[str]:
  """Write RUN_DIR/config.json atomically (call it from process 0 only). Returns the fields
  that differ from the config.json already there -- a resumed run whose settings changed
  -- as 'field: old -> new' lines; the new config replaces the old."""
  d = run_config_dict(exp)
  run = pathlib.Path(exp.run_dir)
  run.mkdir(parents=True, exist_ok=True)
  path = run / RUN_CONFIG
  changed = []
  if path.exists():
    try:
      changed = _differences(json.loads(path.read_text()), d)
    except ValueError:  # unreadable (a crash mid-write predates the atomic write)
      changed = [f"{RUN_CONFIG}: unreadable -> rewritten"]
  tmp = path.with_name(f".{RUN_CONFIG}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)  # readers see the old file or the new one, never half of one
  return changed


def recorded_config_dict(run_dir: str | os.PathLike) -> ConfigDict | None:
  """The experiment RUN_DIR records -- config.json (lmx train) or experiment.py (lmx convert
  --from_hf) -- as a ConfigDict; None when it records neither. run_dir is set to RUN_DIR
  when the directory has moved since."""
  run = pathlib.Path(run_dir)
  if (run / RUN_CONFIG).exists():
    try:
      cd = ConfigDict(json.loads((run / RUN_CONFIG).read_text()))
    except ValueError as e:
      raise ConfigError(f"Invalid config: {run / RUN_CONFIG} is not JSON ({e}).") from None
  elif (run / "experiment.py").exists():
    cd = load_config_dict([f"--config={run / 'experiment.py'}"])
  else:
    return None
  if os.path.abspath(str(cd.get("run_dir", ""))) != os.path.abspath(run):
    cd.run_dir = str(run_dir)
  return cd


def load_run_config(run_dir: str | os.PathLike) -> Experiment | None:
  """The validated experiment RUN_DIR records (see recorded_config_dict), or None."""
  cd = recorded_config_dict(run_dir)
  return None if cd is None else from_config_dict(cd)
