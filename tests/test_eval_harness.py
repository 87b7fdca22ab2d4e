"""lmx evaluate: MC scoring against a per-row numpy reference, task files (shipped and user),
acc / acc_norm and generation metrics on fixed scores, bits per byte, and the CLI end to end."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rouge_score.rouge_scorer  # noqa: F401 (imported once here, not inside a timed test)
import sacrebleu  # noqa: F401
from flax import nnx

from lmx.config import ModelConfig
from lmx.data import corpus
from lmx.eval import harness, metrics, tasks
from lmx.infer import generate as gen
from lmx.model import Transformer

from conftest import hf_llama_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tok:
  """One id per character (ids 4..); bos 2, eos 3. decode inverts encode."""
  bos_id, eos_id, vocab_size = 2, 3, 200

  def encode(self, text):
    return [4 + (ord(c) % 190) for c in text]

  def decode(self, ids):
    return "".join(chr(i - 4) for i in ids if i >= 4)


# --------------------------------------------------------------------------- MC scoring


@pytest.fixture(scope="module")
def tiny_model():
  cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=24).validate()
  # Random weights drawn in numpy into the abstract model (no initializer compiles).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def _reference_score(model, ctx, cont, max_len):
  """sum log p(cont | ctx) from one unpadded row through the model, log-softmax in numpy."""
  ids = (list(ctx) + list(cont))[-(max_len + 1):]
  graphdef, state = nnx.split(model)
  logits = _forward(graphdef, state, jnp.asarray([ids[:-1]], jnp.int32))[0]
  logits = np.asarray(logits, np.float64)  # (T, V)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  n = min(len(cont), len(ids) - 1)
  t = np.arange(len(ids) - 1 - n, len(ids) - 1)
  return float(logp[t, np.asarray(ids)[t + 1]].sum())


@pytest.mark.slow  # compiles the tiny model at several shapes
def test_mc_scores_equal_per_row_reference(tiny_model, monkeypatch):
  # 12 (row, position) pairs per LM-head chunk: blocks of 3 rows x 24 run in 6 chunks of 4.
  monkeypatch.setattr(harness, "_HEAD_CHUNK_TOKENS", 12)
  rng = np.random.default_rng(1)
  # (context, continuation) lengths; rows of equal total length share one reference compile.
  shapes = [(5, 2), (3, 4), (1, 6), (10, 4), (12, 2),
            (30, 3),  # longer than max_len + 1: the context is cut on the left
            (1, 40)]  # a continuation longer than the window
  pairs = [(rng.integers(0, 50, a).tolist(), rng.integers(0, 50, b).tolist()) for a, b in shapes]
  got = harness.score_continuations(tiny_model, pairs, batch_size=3)  # padded last block
  want = [_reference_score(tiny_model, c, x, 24) for c, x in pairs]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The same rows scored one at a time (no neighbours, other widths, one head chunk).
  monkeypatch.setattr(harness, "_HEAD_CHUNK_TOKENS", 2048)
  alone = [harness.score_continuations(tiny_model, [p], batch_size=1)[0] for p in pairs[:2]]
  np.testing.assert_allclose(alone, want[:2], rtol=1e-5, atol=1e-5)


def test_acc_and_acc_norm_from_fixed_scores(monkeypatch):
  # Choice 'a' (1 byte) scores -2, 'bbbb' (4 bytes) -4: acc takes 'a', acc_norm (-2/1 vs
  # -4/4) takes 'bbbb'. Record 2: 3 choices, the label best either way. Record 3: 'é' is
  # 1 character but 2 bytes: per byte -1.5/2 > -3/3 (right), per character it would lose.
  recs = [{"context": "q", "choices": ["a", "bbbb"], "label": 1},
          {"context": "r", "choices": ["x", "yy", "z"], "label": 0},
          {"context": "s", "choices": ["é", "bbb"], "label": 0}]
  fixed = np.array([-2.0, -4.0, -1.0, -5.0, -3.0, -1.5, -3.0])
  monkeypatch.setattr(harness, "score_continuations", lambda m, pairs, b: fixed[:len(pairs)])
  out = harness.evaluate_mc(None, _Tok(), tasks.Task("t", tasks.MC, recs, skipped=2))
  assert out["acc"] == pytest.approx(2 / 3) and out["acc_norm"] == 1.0
  assert out["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
  assert out["n"] == 3 and out["skipped"] == 2


def test_split_continuation_concatenates_to_the_whole():
  from lmx.data import tokenizer as tk
  texts = ["def f(x):\n    return x\n" * 3, "import os\nimport sys\n" * 3] * 10
  tok = tk.train_tokenizer(texts, None, vocab_size=300, sample_bytes=1 << 16)
  clean = 0
  for ctx, choice in [("def f(x):\n", "    return x\n"), ("import", " os"), ("", "x")]:
    c, x = harness.split_continuation(tok, ctx, choice)
    whole, alone = [tok.bos_id] + tok.encode(ctx + choice), [tok.bos_id] + tok.encode(ctx)
    assert c + x == whole
    assert c[0] == tok.bos_id and len(x) >= 1
    assert tok.decode(x) and (ctx + choice).endswith(tok.decode(x))
    if whole[:len(alone)] == alone:  # no token across the boundary: split exactly there
      assert c == alone
      clean += 1
  assert clean >= 2


def test_generation_metrics_from_fixed_outputs(monkeypatch):
  tok = _Tok()
  outputs = {"p1": " get_name(self)", "p2": "foo\nbar", "p3": "The answer is X"}
  monkeypatch.setattr(gen, "generate", lambda model, prompts, n, **kw: [
      tok.encode(outputs[tok.decode(p)]) for p in prompts])
  recs = [{"prompt": "p1", "answers": ["get_name"], "stop": ["("]},
          {"prompt": "p2", "answers": ["bar", "foo"], "stop": ["\n"]},
          {"prompt": "p3", "answers": ["x"], "stop": ["\n"]}]

  class M:  # only cfg.max_seq_len is read before generate
    cfg = ModelConfig(vocab_size=200, d_model=16, n_layers=1, n_heads=2, max_seq_len=64)

  out = harness.evaluate_gen(M(), tok, tasks.Task("g", tasks.GEN, recs), max_new_tokens=8)
  preds, firsts = [" get_name", "foo", "The answer is X"], ["get_name", "bar", "x"]
  assert out["exact_match"] == pytest.approx(2 / 3)  # p2 matches its second answer
  assert out["accuracy"] == 1.0  # 'x' is contained, case-insensitively
  assert out["token_f1"] == pytest.approx((1 + 1 + metrics.token_f1("The answer is X", "x")) / 3)
  assert out["bleu"] == pytest.approx(metrics.bleu(preds, firsts))
  assert out["rougeL"] == pytest.approx(metrics.rouge(preds, firsts)["rougeL"])
  assert [e["prediction"] for e in out["examples"]] == preds


# ------------------------------------------------------------------------- task files


def test_user_task_file_skips_malformed_records(tmp_path):
  good = {"context": "1 + 1 =", "choices": [" 2", " 3"], "label": 0}
  lines = [json.dumps(good), "{not json", json.dumps([1, 2]), "",
           json.dumps({"context": "c", "choices": ["a", "b"]}),  # no label
           json.dumps({"context": "c", "choices": ["a", "b"], "label": 2}),  # out of range
           json.dumps({"context": "c", "choices": ["a", "b"], "label": True}),  # bool label
           json.dumps({"context": "c", "choices": ["a"], "label": 0}),  # one choice
           json.dumps({"context": "c", "choices": ["a", ""], "label": 0}),  # empty choice
           json.dumps({"context": 3, "choices": ["a", "b"], "label": 0}),  # context not str
           json.dumps({"prompt": "p", "answer": "a"}),  # the other kind
           json.dumps({**good, "label": 1})]
  path = tmp_path / "mine.jsonl"
  path.write_text("\n".join(lines) + "\n")
  t = tasks.load_task(str(path), 0.02)
  assert (t.name, t.kind, t.skipped) == ("mine", tasks.MC, 9)  # the blank line is no record
  assert t.records == [good, {**good, "label": 1}]
  g = tmp_path / "gen.jsonl"
  g.write_text("\n".join([json.dumps({"prompt": "p", "answer": "a"}),
                          json.dumps({"prompt": "p", "answers": ["a", "b"], "stop": [")"]}),
                          json.dumps({"prompt": "p", "answers": []}),
                          json.dumps({"prompt": "p", "answer": "a", "stop": "x"})]))
  t = tasks.read_task_file(g)
  assert t.kind == tasks.GEN and t.skipped == 2
  assert t.records == [{"prompt": "p", "answers": ["a"], "stop": ["\n"]},
                       {"prompt": "p", "answers": ["a", "b"], "stop": [")"]}]
  bad = tmp_path / "bad.jsonl"
  bad.write_text("{}\n[]\n")
  with pytest.raises(ValueError, match=r"no valid records \(2 malformed\)"):
    tasks.read_task_file(bad)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tasks.load_task(str(tmp_path / "missing.jsonl"), 0.02)
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    tasks.load_task("nope", 0.02)


@pytest.fixture(scope="module")
def shipped():
  return {n: tasks.shipped_task(n, 0.02) for n in tasks.SHIPPED}


def test_shipped_tasks_are_deterministic_and_held_out(shipped, tmp_path):
  for name, t in shipped.items():
    again = tasks.shipped_task(name, 0.02)  # rebuilt from the (cached) held-out files
    t.write_jsonl(tmp_path / "a.jsonl")
    again.write_jsonl(tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes(), name
    assert len(t.records) >= 40 and t.skipped == 0
    assert tasks.read_task_file(tmp_path / "a.jsonl").records == t.records  # round trip
  held = [d for d in corpus.stdlib_documents()
          if d.source == "stdlib" and corpus.is_validation(d.id, 0.02)]
  text = "\n".join(d.text for d in held)
  nl = shipped["next_line"]
  assert len(nl.records) == tasks.NEXT_LINE_ITEMS
  for r in nl.records:
    assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
    assert r["context"] + r["choices"][r["label"]] in text  # the real next line ...
    lo = min(len(c) for c in r["choices"])
    assert max(len(c) for c in r["choices"]) <= 3 * lo + 10  # ... among lines of like length
  labels = [r["label"] for r in nl.records]
  assert all(labels.count(k) > 30 for k in range(4))  # the answer's slot is not a tell
  for r in shipped["docstring_name"].records:
    assert r["prompt"].endswith("\ndef") and f"def {r['answers'][0]}(" in text
  for r, g in zip(shipped["docstring_name_mc"].records, shipped["docstring_name"].records):
    assert r["context"] == g["prompt"] and r["choices"][r["label"]] == f" {g['answers'][0]}("


@pytest.mark.slow  # two interpreter starts (~3 s)
def test_shipped_tasks_same_bytes_in_fresh_processes(shipped):
  """Another process with another str-hash seed writes the very same records."""
  import hashlib
  import subprocess
  import sys
  code = ("import hashlib, json; from lmx.eval import tasks; print(hashlib.sha256(json.dumps("
          "[tasks.shipped_task(n, 0.02).records for n in tasks.SHIPPED]).encode()).hexdigest())")
  want = hashlib.sha256(json.dumps([t.records for t in shipped.values()]).encode()).hexdigest()
  for seed in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=seed)
    got = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert got == want, seed


# --------------------------------------------------------------------------- bits/byte


def test_token_byte_lengths_sum_to_text_bytes():
  from lmx.data import tokenizer as tk
  from lmx.eval.perplexity import token_byte_lengths
  texts = ["def f(x):\n    return x  # café\n" * 3, "import os\n\tprint('日本')\n" * 3] * 10
  tok = tk.train_tokenizer(texts, None, vocab_size=300, sample_bytes=1 << 16)
  table = token_byte_lengths(tok, 320)
  assert table[tok.bos_id] == table[tok.eos_id] == table[tok.pad_id] == 0
  assert table[300:].sum() == 0
  for s in texts[:2] + ["naïve ☃ \u2581 x", "\n\n   \t"]:  # byte fallback, the space mark
    assert table[tok.encode(s)].sum() == len(s.encode("utf-8"))


# ------------------------------------------------------------------------ end to end

_TINY = {"model.vocab_size": 512, "model.d_model": 32, "model.n_layers": 1,
         "model.n_heads": 2, "model.n_kv_heads": 0, "model.max_seq_len": 64,
         "data.seq_len": 64, "data.batch_size": 8, "data.max_docs": 40,
         "data.tokenizer_sample_mb": 1, "data.validation_fraction": 0.1, "mesh.data": -1}


@pytest.mark.slow  # tokenizer + shards for 40 documents, three compiles (~30 s)
def test_cli_end_to_end_untrained(tmp_path, capsys):
  from lmx.cli import main
  from lmx.experiment import load_experiment
  user = tmp_path / "user.jsonl"
  user.write_text(json.dumps({"context": "x = ", "choices": ["1\n", "2\n"], "label": 0})
                  + "\n{broken\n")
  cfg = [f"--config={REPO}/experiments/default.py", f"--config.run_dir={tmp_path}/run",
         f"--config.data.cache_dir={tmp_path}/cache"]
  cfg += [f"--config.{k}={v}" for k, v in _TINY.items()]
  argv = ["evaluate", *cfg, "--init", f"--tasks=ppl,next_line,docstring_name,{user}",
          "--limit", "6", "--max_new_tokens", "4"]
  assert main(argv) == 0
  io = capsys.readouterr()
  out = json.loads(io.out.strip().splitlines()[-1])
  assert "next_line" in io.err and "val_bpb" in io.err  # the table
  assert out["checkpoint"] == "init" and out["step"] == 0
  assert out["val_ppl"] == pytest.approx(math.exp(out["val_loss"]), rel=1e-6)
  # Bits per byte over the whole validation split: every byte of every held-out document.
  exp, _ = load_experiment(cfg)
  docs = [d for d in corpus.iter_documents(exp.data) if corpus.is_validation(d.id, 0.1)]
  assert out["val_bytes"] == sum(len(d.text.encode("utf-8")) for d in docs)
  assert out["val_bpb"] == pytest.approx(
      out["val_loss"] * out["val_tokens"] / (out["val_bytes"] * math.log(2)), rel=1e-12)
  # An untrained model: ~uniform over 512 ids, so ~ln 512 nats per token.
  assert abs(out["val_loss"] - math.log(512)) < 0.5
  nl, gen, mine = (out["tasks"][k] for k in ("next_line", "docstring_name", "user"))
  assert nl["n"] == 6 and nl["chance"] == 0.25 and 0 <= nl["acc"] <= 1
  assert gen["n"] == 6 and {"exact_match", "token_f1", "accuracy", "bleu", "rougeL"} <= set(gen)
  assert mine["n"] == 1 and mine["skipped"] == 1


@pytest.mark.slow  # torch + transformers, a small HF LLaMA, shards for 40 documents (~30 s)
def test_cli_hf_directory_scores_like_transformers(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  pytest.importorskip("tokenizers")
  from lmx.cli import main
  from lmx.interop import hf

  texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n", "x = [1, 2]\n"]
  src = tmp_path / "hf"
  ref = hf_llama_dir(src, texts)
  records = [{"context": "def f(x):\n", "choices": ["    return x + 1\n", "import os\n"],
              "label": 0},
             {"context": "x = ", "choices": ["[1, 2]\n", "os.sep\n", "1"], "label": 1}]
  user = tmp_path / "mc.jsonl"
  user.write_text("".join(json.dumps(r) + "\n" for r in records))
  # ppl on a user corpus (--corpus): two text files and a JSONL file, every document.
  (tmp_path / "corpus").mkdir()
  docs = [texts[0] * 10, texts[1] * 14, "a = 1\n", "print(x)\n"]
  (tmp_path / "corpus" / "a.py").write_text(docs[0])
  (tmp_path / "corpus" / "b.txt").write_text(docs[1])
  (tmp_path / "corpus" / "c.jsonl").write_text(
      "".join(json.dumps({"text": t}) + "\n" for t in docs[2:]) + "{bad\n")
  cfg = [f"--config={REPO}/experiments/default.py", f"--config.data.cache_dir={tmp_path}/c"]
  cfg += [f"--config.{k}={v}" for k, v in _TINY.items() if not k.startswith("model.")]
  cfg += ["--config.data.seq_len=8"]  # several batches of 8 rows
  assert main(["evaluate", *cfg, "--hf", str(src), f"--tasks=ppl,{user}",
               f"--corpus={tmp_path}/corpus"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["checkpoint"] == str(src) and 0 < out["val_loss"] < 10
  htok = hf.load_tokenizer(src)
  assert out["val_bytes"] == sum(len(t.encode()) for t in docs)  # ASCII: exact for BPE too
  assert out["val_tokens"] == sum(len(htok.encode(t)) + 1 for t in docs)  # + eos each
  assert out["val_tokens"] > 2 * 8 * 8  # more than two batches
  assert out["val_bpb"] == pytest.approx(
      out["val_loss"] * out["val_tokens"] / (out["val_bytes"] * math.log(2)), rel=1e-12)

  # The same choices scored by transformers (torch log-softmax over a whole unpadded row).
  want, pairs = [], []
  for r in records:
    for c in r["choices"]:
      ctx, cont = harness.split_continuation(htok, r["context"], c)
      pairs.append((ctx, cont))
      with torch.no_grad():
        logits = ref(torch.tensor([ctx + cont])).logits[0].double()
      logp = torch.log_softmax(logits, -1)
      t = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
      want.append(float(logp[t, torch.tensor(cont)].sum()))
  model, _ = hf.from_pretrained(src)
  np.testing.assert_allclose(harness.score_continuations(model, pairs), want, atol=1e-4)
  acc = np.mean([int(np.argmax(want[:2])) == 0, int(np.argmax(want[2:])) == 1])
  assert out["tasks"]["mc"]["acc"] == acc and out["tasks"]["mc"]["n"] == 2


@pytest.mark.parametrize("args,msg", [
    (["--limit", "-1"], "--limit is -1; it must be >= 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens is 0; it must be >= 1"),
    (["--init", "--checkpoint", "x"], "at most one of --checkpoint, --init and --hf"),
    (["--tasks=,"], "--tasks is empty"),
])
def test_cli_rejects_bad_arguments(args, msg, capsys):
  with pytest.raises(SystemExit) as e:
    harness.cli_main([f"--config={REPO}/experiments/default.py", *args])
  assert e.value.code == 2 and msg in capsys.readouterr().err
