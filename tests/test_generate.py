"""generate(): determinism, greedy equals a full-forward argmax loop, EOS handling, ragged
prompts, stop strings and the `lmx generate` CLI (single prompt and --batch_file)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import ModelConfig
from lmx.infer.generate import generate
from lmx.model import Transformer


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=32, init_std=0.2).validate()  # larger init: peaky logits
  return Transformer(cfg, rngs=nnx.Rngs(0))


def _greedy_by_full_forward(model, prompt, n):
  """Reference: re-run the whole sequence each step and take the last argmax.

  The sequence lives in a fixed (B, T + n) buffer so one jit compile serves every step;
  by causality the zeros after position t cannot change the logits at t.
  """
  prompt = np.asarray(prompt, np.int32)
  b, t = prompt.shape
  buf = np.zeros((b, t + n), np.int32)
  buf[:, :t] = prompt
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  for i in range(t, t + n):
    logits = np.asarray(fwd(state, jnp.asarray(buf)))  # (B, T + n, V)
    buf[:, i] = logits[:, i - 1].argmax(-1)
  return buf[:, t:].tolist()


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_greedy_equals_argmax_of_full_forward(model):
  prompt = [[5, 9, 2, 44], [1, 1, 30, 7]]
  got = generate(model, np.asarray(prompt), 8, temperature=0.0)
  assert got == _greedy_by_full_forward(model, prompt, 8)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_deterministic_under_fixed_seed(model):
  kw = dict(temperature=1.0, top_k=20, top_p=0.95)
  a = generate(model, [3, 4, 5], 12, seed=7, **kw)
  b = generate(model, [3, 4, 5], 12, seed=7, **kw)
  c = generate(model, [3, 4, 5], 12, seed=8, **kw)
  assert a == b
  assert len(a) == 1 and len(a[0]) == 12
  assert all(0 <= t < 53 for t in a[0])
  assert a != c  # a different seed samples a different continuation


def test_stops_at_eos(model):
  prompt = [[5, 9, 2, 44], [1, 1, 30, 7]]
  full = generate(model, np.asarray(prompt), 8, temperature=0.0)
  eos = full[0][3]
  got = generate(model, np.asarray(prompt), 8, temperature=0.0, eos_id=eos)
  for row, ref in zip(got, full):
    want = ref[:ref.index(eos)] if eos in ref else ref
    assert row == want
  assert len(got[0]) <= 3


def test_learned_positions_reject_too_long_generation():
  cfg = ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, max_seq_len=8,
                    position="learned").validate()
  m = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # checks run before compute
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(m, [1, 2, 3], 6)


@pytest.mark.parametrize("bad", [[], [[1, 2], []], [1, 99], [[1, 2], [3, 99]]])
def test_bad_prompts_fail_clearly(model, bad):
  with pytest.raises(ValueError, match="generate: prompt"):
    generate(model, bad, 4)


from conftest import CharTokenizer as _CharTokenizer  # noqa: E402


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_cli_main_plumbing(monkeypatch, capsys):
  import lmx.data.tokenizer
  import lmx.train.checkpoint
  from lmx.experiment import load_experiment
  from lmx.infer.generate import cli_main

  calls = []

  def fake_restore(exp, model, directory=None):
    calls.append((exp.name, directory, type(model).__name__))
    return {"source": "fake", "step": 0}

  monkeypatch.setattr(lmx.data.tokenizer, "load_or_train_tokenizer", lambda exp: _CharTokenizer())
  monkeypatch.setattr(lmx.train.checkpoint, "restore_params", fake_restore)
  default = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"
  cfg = [f"--config={default}", "--config.model.vocab_size=64",
         "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
         "--config.model.n_kv_heads=1", "--config.sample.temperature=0.0"]
  rc = cli_main(cfg + ["--prompt", "ab", "--checkpoint", "/some/dir", "--max_new_tokens", "5"])
  assert rc == 0
  assert calls == [("default", "/some/dir", "Transformer")]
  exp, _ = load_experiment(cfg)
  model = Transformer(exp.model, rngs=nnx.Rngs(exp.seed))
  tok = _CharTokenizer()
  [new] = generate(model, [tok.bos_id] + tok.encode("ab"), 5, temperature=0.0,
                   eos_id=tok.eos_id)
  assert capsys.readouterr().out.strip() == "ab" + tok.decode(new)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_ragged_prompts_equal_each_prompt_alone_with_logprobs(model):
  prompts = [[5, 9, 2, 44], [1, 30], [7, 7, 7, 7, 7, 3]]
  got = generate(model, prompts, 6, temperature=0.0, return_logprobs=True)
  for p, (toks, lps) in zip(prompts, got):
    assert toks == _greedy_by_full_forward(model, [p], 6)[0]
    assert len(lps) == len(toks) and all(lp <= 0 for lp in lps)


def test_truncate_at_stop():
  from lmx.infer.generate import truncate_at_stop
  assert truncate_at_stop("ab\n\ncd###e", ["###", "\n\n"]) == ("ab", True)
  assert truncate_at_stop("abc", ["x", ""]) == ("abc", False)
  assert truncate_at_stop("abc", []) == ("abc", False)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_cli_batch_file_writes_one_json_line_per_prompt(monkeypatch, capsys, tmp_path):
  import json

  import lmx.data.tokenizer
  import lmx.train.checkpoint
  from lmx.experiment import load_experiment
  from lmx.infer.generate import cli_main

  monkeypatch.setattr(lmx.data.tokenizer, "load_or_train_tokenizer", lambda exp: _CharTokenizer())
  monkeypatch.setattr(lmx.train.checkpoint, "restore_params",
                      lambda exp, model, directory=None: {"source": "fake", "step": 0})
  default = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py"
  cfg = [f"--config={default}", "--config.model.vocab_size=64",
         "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
         "--config.model.n_kv_heads=1", "--config.sample.temperature=0.0"]
  prompts = ["ab", "hello there", "x"]
  (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
  exp, _ = load_experiment(cfg)
  model = Transformer(exp.model, rngs=nnx.Rngs(exp.seed))
  tok = _CharTokenizer()
  news = generate(model, [[tok.bos_id] + tok.encode(p) for p in prompts], 7, temperature=0.0,
                  eos_id=tok.eos_id)
  assert len(news[1]) >= 4
  stop = tok.decode(news[1])[2:4]  # a stop string inside the second completion
  rc = cli_main(cfg + ["--batch_file", str(tmp_path / "p.txt"), "--max_new_tokens", "7",
                       "--stop", stop, "--stop", "never-seen"])
  assert rc == 0
  captured = capsys.readouterr()
  lines = [json.loads(line) for line in captured.out.splitlines()]
  assert [d["prompt"] for d in lines] == prompts
  for d, new in zip(lines, news):
    text = tok.decode(new)
    cut = text.find(stop)
    assert d["completion"] == (text if cut < 0 else text[:cut])
    assert d["finish_reason"] == ("stop" if cut >= 0 or len(new) < 7 else "length")
    if cut >= 0:  # the shortest prefix of the ids whose text holds the stop string
      assert d["tokens"] == new[:len(d["tokens"])] and stop in tok.decode(d["tokens"])
      assert stop not in tok.decode(d["tokens"][:-1])
    else:
      assert d["tokens"] == new
  assert lines[1]["finish_reason"] == "stop"
  assert "tokens/s" in captured.err
