"""`lmx serve`: a real server process on a free localhost port, driven by the `openai` client.

References are computed here, never by the server: token counts from the tokenizer,
greedy and seeded continuations from lmx.infer.generate.generate on the same weights, chat
prompts from lmx.eval.sft_eval.prompt_ids. One module-scoped server (a tiny random-weight
checkpoint with the chat tokens) serves every slow test; the last test sends it SIGTERM.
"""

import concurrent.futures
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from lmx.serve import protocol
from lmx.serve.batcher import Job, _batch_rows, Batcher

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_TOKENS = 12
PROMPTS = ["how do I sort", "def return self", "hello world", "the list is", "use sorted a",
           "of to is", "ok ok", "sort list"]


# ------------------------------------------------------------------- fast unit tests


class _Chars:
  """Tokenizer stand-in: one id per lower-case letter (a=4 ... z=29); bos 2, eos 3."""
  bos_id, eos_id = 2, 3

  def encode(self, text):
    return [4 + ord(c) - ord("a") for c in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i - 4) for i in ids if i >= 4)


def test_choice_stop_strings_and_stream_hold_back():
  ch = protocol.Choice(_Chars(), stop_ids=(3,), stops=["xyz"])
  ch.add(_Chars().encode("abcx"), [-1.0] * 4)
  assert not ch.check_stop_strings()
  assert ch.delta() == "ab"  # 'cx' may begin 'xyz': held back (len('xyz') - 1 chars)
  ch.add(_Chars().encode("yzqq"), [-2.0] * 4)
  assert ch.check_stop_strings() and ch.finish == "stop"
  assert ch.text() == "abc" and ch.delta() == "c"
  # the shortest prefix of the ids whose text holds 'xyz': a b c x y z
  assert ch.completion_tokens() == 6 and ch.token_logprobs()[1] == [-1.0] * 4 + [-2.0] * 2


def test_choice_counts_the_stop_token_but_does_not_show_it():
  ch = protocol.Choice(_Chars(), stop_ids=(3,), stops=[])
  ch.add([4, 5, 3], [-0.5, -0.5, -0.25])
  ch.done("stop")
  assert ch.text() == "ab" and ch.completion_tokens() == 3
  assert ch.token_logprobs() == (["a", "b"], [-0.5, -0.5])


@pytest.mark.parametrize("body,status,param", [
    ({"model": "m", "prompt": "ab", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "m", "prompt": "ab", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "m", "prompt": "ab", "max_tokens": 7}, 400, "max_tokens"),  # 3 + 7 > 8
    ({"model": "m", "prompt": "abcdefgh"}, 400, "prompt"),  # 9 ids >= context 8
    ({"model": "m", "prompt": "ab", "max_tokens": 2, "temperature": "hot"}, 400, "temperature"),
    ({"model": "m", "prompt": "ab", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "m", "prompt": "ab", "max_tokens": 2, "n": 2}, 400, "n"),
    ({"model": "m", "prompt": 5}, 400, "prompt"),
    ({"model": "m", "prompt": [1, 99], "max_tokens": 2}, 400, "prompt"),  # 99 >= vocab 30
    ({"model": "m", "prompt": "ab", "max_tokens": 2, "logprobs": 5}, 400, "logprobs"),
    ({"model": "m", "prompt": "ab", "max_tokens": 2, "seed": 2**64}, 400, "seed"),
    ({"model": "m", "prompt": "ab", "max_tokens": 2, "stop": ["a", 3]}, 400, "stop"),
    ({"model": "other", "prompt": "ab"}, 404, "model"),
    ({"prompt": "ab"}, 400, "model"),
])
def test_bad_completion_requests(body, status, param):
  with pytest.raises(protocol.ApiError) as e:
    protocol.check_model(body, "m")
    protocol.parse_common(body, 30, 8, False, protocol.completion_prompts(body, _Chars()))
  assert (e.value.status, e.value.param) == (status, param)
  assert e.value.body()["error"]["message"].endswith(".")


def test_batch_rows_and_groups():
  assert [_batch_rows(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
  assert _batch_rows(5, 6) == 6 and _batch_rows(6, 6) == 6

  from lmx.infer.engine import SamplingOptions
  b = Batcher.__new__(Batcher)  # the grouping rule only: no thread, no model
  b.context = 20
  greedy = SamplingOptions(temperature=0.0, stop_ids=(3,))
  hot = SamplingOptions(temperature=1.0, stop_ids=(3,), seed=5)
  chat = SamplingOptions(temperature=0.5, top_k=4, stop_ids=(3, 9))
  jobs = [Job([1] * 4, 4, greedy, None), Job([1] * 3, 4, dict_seed(greedy, 9), None, True),
          Job([1] * 4, 4, hot, None), Job([1] * 4, 4, hot, None, seeded=True),
          Job([1] * 4, 4, chat, None), Job([1] * 4, 4, hot, None, seeded=True),
          Job([1] * 10, 12, greedy, None)]
  groups = b._groups(jobs)
  # settings and seeds are per row: only the stop ids split groups (the chat job);
  # 10 + 12 > 20 splits the last greedy job off.
  index = [[[x is j for x in jobs].index(True) for j in g] for g in groups]
  assert index == [[0, 1, 2, 3, 5], [6], [4]]
  # a row's seed: its own when seeded and sampled, 0 when greedy, fresh when unseeded
  assert jobs[3].row_seed() == 5 and jobs[1].row_seed() == 0


def dict_seed(opts, seed):
  import dataclasses
  return dataclasses.replace(opts, seed=seed)


# ----------------------------------------------------------------- the server process


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, chat_tokenizer):
  """(base url, model, tokenizer, process): a tiny random checkpoint served by `lmx serve`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lmx.config import CheckpointConfig
  from lmx.experiment import load_experiment
  from lmx.model import Transformer
  from lmx.train.checkpoint import Checkpointer

  tmp = tmp_path_factory.mktemp("serve")
  tok = chat_tokenizer
  tok.save(tmp / "tok.model")
  cfg = [f"--config={ROOT / 'experiments' / 'default.py'}", "--config.name=tiny",
         f"--config.model.vocab_size={tok.vocab_size}", "--config.model.d_model=32",
         "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.n_kv_heads=1",
         "--config.model.max_seq_len=64", "--config.data.seq_len=64",
         f"--config.data.tokenizer_path={tmp / 'tok.model'}", f"--config.run_dir={tmp / 'run'}"]
  exp, _ = load_experiment(cfg)
  # Random weights drawn in numpy (no eager init compile); 0.3 makes the logits peaky.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(exp.model, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), state)
  model = nnx.merge(graphdef, state)
  ck = Checkpointer(tmp / "run", CheckpointConfig(async_save=False))
  ck.save_best(1, nnx.state(model, nnx.Param), 0.0)
  ck.close()

  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  log = open(tmp / "serve.log", "w")  # a file, not a pipe nobody reads (it could fill)
  proc = subprocess.Popen([sys.executable, "-m", "lmx.cli", "serve", *cfg, "--port", str(port),
                           "--batch_wait_ms", "150", "--max_batch", "8"],
                          cwd=ROOT, env=env, stderr=log)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 120
  while True:
    try:
      with urllib.request.urlopen(url + "/health", timeout=2) as r:
        if r.status == 200:
          break
    except OSError:
      pass
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"lmx serve did not start:\n{(tmp / 'serve.log').read_text()}")
    time.sleep(0.3)
  yield url, model, tok, proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()
  log.close()


@pytest.fixture(scope="module")
def client(served):
  import openai
  return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def _engine_calls(url):
  with urllib.request.urlopen(url + "/health") as r:
    return json.load(r)["engine_calls"]


def _in_parallel(fn, items):
  with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
    return list(pool.map(fn, items))


@pytest.mark.slow  # starts a server process and compiles decode programs
def test_completions_greedy_equal_generate_concurrent_equal_sequential(served, client):
  from lmx.infer.generate import generate
  url, model, tok, _ = served

  def ask(prompt):
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage

  calls = _engine_calls(url)
  together = _in_parallel(ask, PROMPTS)
  batched_calls = _engine_calls(url) - calls
  assert batched_calls < len(PROMPTS)  # concurrent requests shared engine calls
  alone = [ask(p) for p in PROMPTS]
  assert together == alone

  refs = generate(model, [[tok.bos_id] + tok.encode(p) for p in PROMPTS], MAX_TOKENS,
                  temperature=0.0, eos_id=tok.eos_id)
  for p, (text, why, usage), new in zip(PROMPTS, together, refs):
    stopped = len(new) < MAX_TOKENS
    assert text == tok.decode(new)
    assert why == ("stop" if stopped else "length")
    assert usage.prompt_tokens == 1 + len(tok.encode(p))  # bos + the text
    assert usage.completion_tokens == len(new) + stopped  # the eos counts, unshown
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

  # streaming: the chunks concatenate to the same text; usage in the last chunk
  def ask_stream(prompt):
    text, why, usage = "", None, None
    for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True}):
      if c.choices:
        text += c.choices[0].text
        why = c.choices[0].finish_reason or why
      usage = c.usage or usage
    return text, why, usage

  assert _in_parallel(ask_stream, PROMPTS[:4]) == together[:4]

  # a stop string taken from inside a completion cuts it there
  text = together[0][0]
  stop = text[3:6]
  r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                temperature=0, stop=[stop])
  assert r.choices[0].text == text[:text.find(stop)]
  assert r.choices[0].finish_reason == "stop"


@pytest.mark.slow  # starts a server process and compiles decode programs
def test_seeded_sampling_equals_generate_with_that_seed(served, client):
  from lmx.infer.generate import generate
  _, model, tok, _ = served
  kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9,
            seed=1234, logprobs=1)
  a, b = _in_parallel(lambda _: client.completions.create(**kw), [0, 1])
  [(new, lps)] = generate(model, [[tok.bos_id] + tok.encode(PROMPTS[1])], MAX_TOKENS,
                          temperature=1.0, top_p=0.9, seed=1234, eos_id=tok.eos_id,
                          return_logprobs=True)
  assert a.choices[0].text == b.choices[0].text == tok.decode(new)
  np.testing.assert_allclose(a.choices[0].logprobs.token_logprobs, lps, rtol=1e-5, atol=1e-5)


MIXED = [dict(temperature=0), dict(temperature=1.0, top_k=5, seed=7),
         dict(temperature=0.8, top_p=0.9, min_p=0.05, frequency_penalty=0.5, seed=1234),
         dict(temperature=0, presence_penalty=1.0, repetition_penalty=1.2)]


@pytest.mark.slow  # starts a server process and compiles decode programs
def test_mixed_settings_requests_share_a_call_and_equal_each_alone(served, client):
  """Greedy, seeded top-k, seeded top-p/min-p + penalty, greedy + penalties: sent together
  they share engine calls (settings are per row), and each equals generate() alone."""
  from lmx.infer.generate import generate
  url, model, tok, _ = served

  def ask(i):
    extra = {k: v for k, v in MIXED[i].items() if k in ("top_k", "min_p", "repetition_penalty")}
    std = {k: v for k, v in MIXED[i].items() if k not in extra}
    r = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                  logprobs=1, extra_body=extra, **std)
    return r.choices[0].text, r.choices[0].logprobs.token_logprobs

  calls = _engine_calls(url)
  together = _in_parallel(ask, range(len(MIXED)))
  assert _engine_calls(url) - calls < len(MIXED)  # mixed settings shared engine calls
  for i, (text, lps) in enumerate(together):
    kw = dict(MIXED[i])
    kw["temperature"] = float(kw["temperature"])
    [(new, ref_lps)] = generate(model, [[tok.bos_id] + tok.encode(PROMPTS[i])], MAX_TOKENS,
                                eos_id=tok.eos_id, return_logprobs=True, **kw)
    assert text == tok.decode(new), i
    np.testing.assert_allclose(lps[:len(ref_lps)], ref_lps, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # starts a server process and compiles decode programs
def test_chat_greedy_equals_generate_on_the_chat_prompt(served, client):
  from lmx.data import sft
  from lmx.eval.sft_eval import prompt_ids
  from lmx.infer.generate import generate
  _, model, tok, _ = served
  convs = [[{"role": "user", "content": "how do I sort a list"}],
           [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"},
            {"role": "user", "content": "return self"}]]
  end = sft.chat_token_ids(tok)[sft.END_TOKEN]

  def ask(msgs):
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=MAX_TOKENS,
                                       temperature=0)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage

  def ask_stream(msgs):
    text, roles = "", []
    for c in client.chat.completions.create(model="tiny", messages=msgs, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True):
      roles += [c.choices[0].delta.role] if c.choices[0].delta.role else []
      text += c.choices[0].delta.content or ""
    assert roles == ["assistant"]
    return text

  got = _in_parallel(ask, convs)
  streamed = _in_parallel(ask_stream, convs)
  for msgs, (text, why, usage), text_s in zip(convs, got, streamed):
    prompt = prompt_ids(tok, msgs + [{"role": "assistant", "content": "x"}])
    [new] = generate(model, [prompt], MAX_TOKENS, temperature=0.0, eos_id=tok.eos_id,
                     stop_ids=(end,))
    stopped = len(new) < MAX_TOKENS
    assert text == text_s == tok.decode(new)
    assert why == ("stop" if stopped else "length")
    assert usage.prompt_tokens == len(prompt)
    assert usage.completion_tokens == len(new) + stopped


@pytest.mark.slow  # starts a server process
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, client):
  import openai
  url = served[0]
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    client.completions.create(model="nope", prompt="ok", max_tokens=2)
  for n in (0, -1):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
      client.completions.create(model="tiny", prompt="ok", max_tokens=n)
  with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
    client.completions.create(model="tiny", prompt="hello world " * 40, max_tokens=2)
  with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
    client.chat.completions.create(model="tiny", max_tokens=60,
                                   messages=[{"role": "user", "content": "hello world"}])
  with pytest.raises(openai.BadRequestError, match="'n'"):
    client.completions.create(model="tiny", prompt="ok", max_tokens=2, n=2)
  with pytest.raises(openai.BadRequestError, match="role"):
    client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
  for raw in (b"{not json", b'{"model": "tiny", "prompt": "ok", "temperature": "hot"}',
              b'["a list"]'):
    req = urllib.request.Request(url + "/v1/completions", data=raw,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(req)
    assert e.value.code == 400
    assert json.load(e.value)["error"]["message"]
  r = client.completions.create(model="tiny", prompt="ok", max_tokens=3, temperature=0)
  assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
  assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.slow  # starts a server process
def test_sigterm_finishes_the_request_in_flight_then_exits_0(served, client):
  _, _, _, proc = served
  out = {}

  def ask():
    out["r"] = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                         temperature=1.0, top_p=0.9, seed=99)

  t = threading.Thread(target=ask)
  t.start()
  time.sleep(0.2)  # the request is queued or decoding
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=20) == 0
  t.join(5)
  assert out["r"].usage.completion_tokens >= 1
