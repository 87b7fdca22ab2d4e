"""Config validation: bad values fail early with one sentence naming the field."""

import json
import subprocess
import sys

import pytest

from lmx.config import ConfigError, ModelConfig, base_config, from_config_dict
from lmx.experiment import load_experiment
from lmx.info import experiment_info


def _exp(**overrides):
  c = base_config()
  for dotted, v in overrides.items():
    sec, key = dotted.split("__")
    c[sec][key] = v
  return from_config_dict(c)


@pytest.mark.parametrize("overrides, field", [
    ({"model__n_heads": 5}, "model.n_heads"),  # 5 does not divide 256
    ({"model__n_heads": 8, "model__n_kv_heads": 3}, "model.n_heads"),  # not a multiple
    ({"model__mlp": "swish"}, "model.mlp"),
    ({"model__position": "alibi"}, "model.position"),
    ({"train__learning_rate": -1.0}, "train.learning_rate"),
    ({"train__precision": "int8"}, "train.precision"),
    ({"data__seq_len": 0}, "data.seq_len"),
    ({"mesh__data": 0}, "mesh.data"),
    ({"sample__top_p": 0.0}, "sample.top_p"),
    ({"train__loss_chunk_tokens": -1}, "train.loss_chunk_tokens"),
    ({"train__schedule": "linear"}, "train.schedule"),
    ({"train__decay_fraction": 0.0}, "train.decay_fraction"),
    ({"train__objective": "distill"}, "distill.teacher_config"),  # no teacher file or run
])
def test_invalid_values_name_the_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    _exp(**overrides)
  msg = str(e.value)
  assert f"`{field}`" in msg
  assert msg.count("\n") == 0  # one sentence, one line


def test_unknown_key_is_rejected_with_valid_keys():
  c = base_config().to_dict()
  c["model"]["n_head"] = 4  # typo of n_heads
  with pytest.raises(ConfigError, match=r"`model.n_head` is not a known key.*n_heads"):
    from_config_dict(c)


def test_unknown_override_names_the_key():
  with pytest.raises(ConfigError, match=r"`model.n_head` is not a known key"):
    load_experiment(["--config=experiments/default.py", "--config.model.n_head=4"])


def test_overrides_apply_without_touching_sys_argv():
  exp, _ = load_experiment(["--config=experiments/default.py", "--config.train.steps=7",
                            "--config.train.warmup_steps=2", "--config.model.mlp=gelu"])
  assert exp.train.steps == 7 and exp.model.mlp == "gelu"


def test_missing_experiment_file_names_the_path():
  with pytest.raises(ConfigError, match="experiments/nope.py"):
    load_experiment(["--config=experiments/nope.py"])


def test_derived_sizes():
  m = ModelConfig(d_model=256, n_heads=8, mlp="swiglu").validate()
  assert m.kv_heads == 8 and m.dim_per_head == 32
  assert m.ff_dim % 64 == 0 and m.ff_dim >= 8 * 256 // 3
  assert ModelConfig(d_model=256, n_heads=8, mlp="gelu").ff_dim == 1024


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_gpt2_124m_info_reports_the_known_figure():
  exp, _ = load_experiment(["--config=experiments/gpt2_124m.py"])
  info = experiment_info(exp)
  assert info["params"] == 124_439_808
  # 6N + attention by hand: N_nonemb = 85,056,000, D*V = 768*50257, 6*L*T*H*Dh.
  n, dv = 85_056_000, 768 * 50257
  assert info["flops_per_token"] == 6 * (n + dv) + 6 * 12 * 1024 * 12 * 64
  # fp32 params (4 B) + two fp32 Adam moments (8 B) on one device.
  assert info["memory_bytes_per_device"] == 12 * 124_439_808


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_info_cli_prints_one_json_line():
  out = subprocess.run([sys.executable, "-m", "lmx.cli", "info",
                        "--config=experiments/gpt2_124m.py"],
                       capture_output=True, text=True, check=True).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 1
  assert json.loads(lines[0])["params"] == 124439808


def test_cli_config_error_exits_2_with_one_line():
  r = subprocess.run([sys.executable, "-m", "lmx.cli", "info",
                      "--config=experiments/default.py", "--config.model.n_heads=5"],
                     capture_output=True, text=True)
  assert r.returncode == 2
  assert "model.n_heads" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_compute_dtype_has_one_source():
  """train.precision sets the model's compute dtype for every command; a conflicting
  model.dtype is an error, not silently overridden in some commands and not in others."""
  exp = _exp(train__precision="bfloat16")
  assert exp.model.dtype == "bfloat16"
  assert _exp().model.dtype == "float32"
  c = base_config()
  c.model.dtype = "float16"
  with pytest.raises(ConfigError, match=r"`model.dtype` is 'float16' but train.precision"):
    from_config_dict(c)
  c.train.precision = "float16"  # agreeing values are fine
  assert from_config_dict(c).model.dtype == "float16"
  with pytest.raises(ConfigError, match=r"`model.dtype` is set by train.precision"):
    load_experiment(["--config=experiments/default.py", "--config.model.dtype=bfloat16"])
  exp, _ = load_experiment(["--config=experiments/gpt2_124m.py"])
  assert exp.model.dtype == exp.train.precision == "bfloat16"


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_generate_builds_the_model_in_the_training_dtype(monkeypatch, tmp_path):
  """`lmx generate` builds its model from the experiment, so it computes in train.precision
  (it used the raw model.dtype, float32, while train and evaluate used bf16)."""
  from lmx.infer import generate as gen
  seen = {}

  class Stop(Exception):
    pass

  def fake_restore(exp, model, directory=None):
    seen["dtype"] = model.cfg.dtype
    raise Stop

  monkeypatch.setattr("lmx.train.checkpoint.restore_params", fake_restore)
  monkeypatch.setattr("lmx.data.tokenizer.load_or_train_tokenizer", lambda exp: None)
  with pytest.raises(Stop):
    gen.cli_main(["--config=experiments/llama.py:tiny", "--config.train.precision=bfloat16",
                  "--config.model.n_layers=1", f"--config.run_dir={tmp_path}"])
  assert seen["dtype"] == "bfloat16"
