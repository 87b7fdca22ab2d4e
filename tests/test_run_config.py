"""RUN_DIR/config.json: exact round trips, recording, `--run RUN_DIR` for every command."""

import dataclasses
import json
import os
import shutil

import pytest

from lmx.config import ConfigError, from_config_dict
from lmx.experiment import (load_experiment, load_run_config, record_run_config,
                            run_config_dict, split_config_args)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.vocab_size=64", "--config.model.d_model=32",
        "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.n_kv_heads=1"]


def _exp(name, *over):
  return load_experiment([f"--config={REPO}/experiments/{name}", *over])[0]


@pytest.mark.parametrize("name,over", [
    ("default.py", []),
    ("default.py", ["--config.train.learning_rate=1e-3", "--config.train.trainable=^blocks"]),
    ("sft_lora.py", ["--config.peft.rank=4"]),
    ("sft_qlora.py", []),
    ("moe.py", ["--config.model.moe.top_k=1"]),
    ("distill.py", []),
    ("llama.py:150m", ["--config.train.precision=bfloat16"]),
])
def test_round_trip_through_json_is_exact(name, over):
  exp = _exp(name, *over)
  text = json.dumps(run_config_dict(exp))  # what config.json holds
  assert from_config_dict(json.loads(text)) == exp


def test_plain_asdict_does_not_round_trip_a_peft_run():
  """Why run_config_dict exists: train.trainable is derived from the peft section."""
  exp = _exp("sft_lora.py")
  with pytest.raises(ConfigError, match="train.trainable"):
    from_config_dict(dataclasses.asdict(exp))
  assert "trainable" in json.dumps(run_config_dict(exp))  # recorded, but blank
  assert run_config_dict(exp)["train"]["trainable"] == ""
  # A pattern the user set (not derived) is kept.
  own = _exp("default.py", "--config.train.trainable=^blocks")
  assert run_config_dict(own)["train"]["trainable"] == "^blocks"


def test_an_experiment_edited_past_validation_is_refused(tmp_path, capsys):
  from lmx.train import loop  # (already imported by test_train_loop's collection)
  exp = _exp("default.py", f"--config.run_dir={tmp_path}")
  bad = dataclasses.replace(exp, model=dataclasses.replace(exp.model, dtype="bfloat16"))
  with pytest.raises(ValueError, match="model.dtype: 'bfloat16' -> 'float32'"):
    run_config_dict(bad)
  loop._record_config(bad)  # the trainer says so and goes on without a config.json
  assert "not writing config.json" in capsys.readouterr().err
  assert not (tmp_path / "config.json").exists()


def test_record_then_load(tmp_path):
  run = tmp_path / "run"
  exp = _exp("sft_lora.py", f"--config.run_dir={run}", *TINY)
  assert record_run_config(exp) == []
  assert sorted(os.listdir(run)) == ["config.json"]  # no temporary file left behind
  assert load_run_config(run) == exp
  assert load_run_config(tmp_path / "elsewhere") is None
  # A run directory that moved: its own location wins over the recorded run_dir.
  shutil.copytree(run, tmp_path / "moved")
  assert load_run_config(tmp_path / "moved") == dataclasses.replace(
      exp, run_dir=str(tmp_path / "moved"))


def test_a_resumed_run_with_other_settings_names_them(tmp_path):
  run = str(tmp_path / "run")
  exp = _exp("default.py", f"--config.run_dir={run}")
  record_run_config(exp)
  assert record_run_config(exp) == []  # same settings: nothing to say
  longer = _exp("default.py", f"--config.run_dir={run}", "--config.train.steps=2500",
                "--config.model.moe.num_experts=4")
  assert record_run_config(longer) == ["model.moe.num_experts: 0 -> 4",
                                       "train.steps: 1800 -> 2500"]
  assert load_run_config(run) == longer  # the new settings are the record


def test_import_run_falls_back_to_its_experiment_py(tmp_path):
  (tmp_path / "experiment.py").write_text(
      "from lmx.config import base_config\n\n\ndef get_config(arg=None):\n"
      "  c = base_config()\n  c.model.d_model = 64\n  return c\n")
  exp = load_run_config(tmp_path)
  assert exp.model.d_model == 64 and exp.run_dir == str(tmp_path)


def test_run_flag_loads_the_record_with_overrides(tmp_path):
  run = str(tmp_path / "run")
  exp = _exp("sft_lora.py", f"--config.run_dir={run}", *TINY)
  record_run_config(exp)
  assert split_config_args(["--run", run, "--prompt", "x", "--runs=y"]) == (
      [f"--run={run}"], ["--prompt", "x", "--runs=y"])
  assert load_experiment(["--run", run])[0] == exp
  assert load_experiment([f"--run={run}"])[0] == exp
  got = load_experiment(["--run", run, "--config.train.steps=5", "--config.peft.rank=2"])[0]
  assert got == dataclasses.replace(
      exp, train=dataclasses.replace(exp.train, steps=5),
      peft=dataclasses.replace(exp.peft, rank=2))
  # model.dtype is not recorded: it follows an overridden train.precision.
  half = load_experiment(["--run", run, "--config.train.precision=bfloat16"])[0]
  assert half.model.dtype == half.train.precision == "bfloat16"
  with pytest.raises(ConfigError, match="`train.stepz` is not a known key"):
    load_experiment(["--run", run, "--config.train.stepz=5"])
  with pytest.raises(ConfigError, match="model.dtype"):
    load_experiment(["--run", run, "--config.model.dtype=bfloat16"])
  with pytest.raises(ConfigError, match="not both"):
    load_experiment(["--run", run, f"--config={REPO}/experiments/default.py"])
  with pytest.raises(ConfigError, match="has no config.json"):
    load_experiment(["--run", str(tmp_path / "none")])


class _Seen(Exception):
  """Raised by a patched loader to stop a command once it has built its experiment."""


def test_generate_and_evaluate_take_run(tmp_path, monkeypatch):
  import lmx.data.tokenizer
  from lmx.eval import harness
  from lmx.infer import generate

  run = tmp_path / "run"
  exp = _exp("default.py", f"--config.run_dir={run}", *TINY)
  record_run_config(exp)
  moved = tmp_path / "moved"
  shutil.copytree(run, moved)
  want = dataclasses.replace(exp, run_dir=str(moved))  # checkpoints are read from here

  def seen(*args):
    raise _Seen(args[-1])  # (exp) for the tokenizer, (args, exp) for _load_model

  monkeypatch.setattr(lmx.data.tokenizer, "load_or_train_tokenizer", seen)
  monkeypatch.setattr(harness, "_load_model", seen)
  with pytest.raises(_Seen) as got:
    generate.cli_main(["--run", str(moved), "--prompt", "ab"])
  assert got.value.args[0] == want
  with pytest.raises(_Seen) as got:
    harness.cli_main(["--run", str(moved), "--config.train.eval_batches=3"])
  assert got.value.args[0] == dataclasses.replace(
      want, train=dataclasses.replace(want.train, eval_batches=3))
