"""`lmx convert` both ways, `lmx generate --hf`, and fine-tuning an imported checkpoint:
HF LLaMA -> lmx run -> 10 training steps (train.init_from) -> HF again, where transformers
must reproduce lmx's logits for the fine-tuned weights."""

import json

import numpy as np
import pytest

from lmx.interop import convert

from conftest import hf_llama_dir  # noqa: E402

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n", "class A:\n  pass\n"]


def test_convert_refuses_pickles_and_bad_arguments(tmp_path, capsys):
  src = tmp_path / "hf"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({
      "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
      "num_attention_heads": 2, "intermediate_size": 32}))
  (src / "pytorch_model.bin").write_bytes(b"never opened")
  assert convert.cli_main(["--from_hf", str(src), "--to", str(tmp_path / "run")]) == 2
  assert "never unpickles" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # a run without experiment.py needs --config
    convert.cli_main(["--from", str(tmp_path), "--to_hf", str(tmp_path / "out")])
  assert "has no experiment.py" in capsys.readouterr().err


@pytest.mark.slow  # torch, three compiles and a 10-step training run
def test_import_generate_finetune_export(tmp_path, capsys, monkeypatch):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  from lmx.experiment import load_experiment
  from lmx.infer import generate as gen
  from lmx.interop import hf
  from lmx.model.transformer import Transformer
  from lmx.train import loop
  from lmx.train.checkpoint import restore_params
  from flax import nnx

  # A small HF LLaMA (GQA, untied) with a byte-level BPE tokenizer.json.
  src = tmp_path / "hf"
  ref = hf_llama_dir(src, TEXTS)
  tok = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))

  run = tmp_path / "run"
  assert convert.cli_main(["--from_hf", str(src), "--to", str(run)]) == 0
  exp_file = f"--config={run}/experiment.py"
  exp, _ = load_experiment([exp_file])
  assert exp.data.tokenizer_path == str(run / "hf_tokenizer")
  model = Transformer(exp.model, rngs=nnx.Rngs(0))
  restore_params(exp, model)  # what lmx generate/evaluate --config do
  tokens = np.random.default_rng(0).integers(0, 320, (2, 16)).astype(np.int32)
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(tokens)), want, rtol=0, atol=1e-4)

  # lmx generate: from the run's experiment and straight from the HF directory, greedy.
  capsys.readouterr()
  outs = []
  for extra in ([], ["--hf", str(src)]):  # with --hf the config gives only sample settings
    assert gen.cli_main([exp_file, "--config.sample.temperature=0.0", "--prompt", "def f",
                         "--max_new_tokens", "8"] + extra) == 0
    outs.append(capsys.readouterr().out)
  assert outs[0].startswith("def f") and outs[0] == outs[1]

  # Fine-tune 10 steps from the imported weights, with the HF tokenizer, then export.
  ft = tmp_path / "ft"
  over = [exp_file, f"--config.train.init_from={run}", f"--config.run_dir={ft}",
          "--config.train.steps=10", "--config.data.max_docs=40", "--config.data.seq_len=32",
          "--config.data.batch_size=8", "--config.train.eval_every=0",
          "--config.train.eval_batches=1", "--config.train.warmup_steps=2",
          "--config.train.progress_bar=False", "--config.checkpoint.every=0",
          "--config.checkpoint.async_save=False", f"--config.data.cache_dir={tmp_path}/cache"]
  assert loop.cli_main(over) == 0
  out = tmp_path / "out"
  assert convert.cli_main(["--from", str(ft), "--to_hf", str(out)]) == 0  # ft/config.json
  ft_exp, _ = load_experiment(over)
  tuned = Transformer(ft_exp.model, rngs=nnx.Rngs(0))
  restore_params(ft_exp, tuned)
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    got_hf = back(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  lmx_logits = np.asarray(tuned(tokens))
  assert np.abs(lmx_logits - want).max() > 1e-3  # training moved the weights
  np.testing.assert_allclose(got_hf, lmx_logits, rtol=0, atol=1e-4)
  assert hf.load_tokenizer(out).encode("def f") == tok.encode("def f").ids

  # A LoRA run on the imported base exports merged: transformers = lmx with adapters.
  lora = over + [f"--config.run_dir={tmp_path}/lora", "--config.peft.method=lora",
                 "--config.train.steps=3", "--config.train.learning_rate=0.03"]
  assert loop.cli_main(lora) == 0
  assert convert.cli_main(["--from", str(tmp_path / "lora"), "--to_hf", str(out / "lora"),
                           "--no_tokenizer"]) == 0  # its config.json (peft.method=lora)
  lora_exp, _ = load_experiment(lora)
  adapted = Transformer(lora_exp.model, rngs=nnx.Rngs(0))
  restore_params(lora_exp, adapted)  # base from init_from + the trained adapters
  lmx_logits = np.asarray(adapted(tokens))
  assert np.abs(lmx_logits - want).max() > 1e-3  # the adapters changed something
  back = transformers.AutoModelForCausalLM.from_pretrained(out / "lora").eval()
  with torch.no_grad():
    got_hf = back(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(got_hf, lmx_logits, rtol=0, atol=1e-4)
