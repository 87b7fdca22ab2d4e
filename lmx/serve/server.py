"""`lmx serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a checkpoint.

    lmx serve --config=experiments/default.py [--checkpoint DIR] [--port 8000]
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "default", "prompt": "import os\\n", "max_tokens": 32, "temperature": 0}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (when the tokenizer has the
chat role tokens of lmx.data.sft; else 400), GET /v1/models, GET /health. `stream: true`
sends server-sent events, `data: {chunk}` lines in OpenAI's chunk shapes ending with
`data: [DONE]`. Request fields: lmx.serve.protocol. Batching: lmx.serve.batcher.

The handlers run on uvicorn's event loop and only wait on queues; the model runs on the
batcher's thread, so the server answers /health and queues new requests while it decodes.
SIGTERM / Ctrl-C: uvicorn stops accepting connections, lets the requests in flight finish
(up to --graceful_timeout seconds, then cancels them), stops the batcher and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmx.infer.engine import SamplingOptions
from lmx.serve.batcher import Batcher, Job
from lmx.serve.protocol import (ApiError, Choice, chat_prompt, check_model, completion_prompts,
                                parse_common)


def create_app(model, tok, name: str, *, max_batch: int = 16, batch_wait_s: float = 0.01):
  """The FastAPI app serving `model` (an nnx Transformer) with tokenizer `tok` as `name`.
  The batcher thread starts with the app's lifespan and stops after it."""
  vocab, context = model.cfg.vocab_size, model.cfg.max_seq_len
  try:
    from lmx.data.sft import END_TOKEN, chat_token_ids
    role_ids = chat_token_ids(tok)
  except ValueError:
    role_ids = None
  created = int(time.time())
  state = {}

  @contextlib.asynccontextmanager
  async def lifespan(app):
    state["batcher"] = Batcher(model, max_batch=max_batch, batch_wait_s=batch_wait_s)
    yield
    await asyncio.to_thread(state["batcher"].close)

  app = FastAPI(title="lmx serve", lifespan=lifespan)
  app.state.lmx = state

  @app.exception_handler(ApiError)
  async def _api_error(request, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(HTTPException)
  async def _http_error(request, e: HTTPException):
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request, e: RequestValidationError):
    return JSONResponse(ApiError(400, f"invalid request: {e.errors()!r:.300}").body(),
                        status_code=400)

  async def _body(request: Request):
    raw = await request.body()
    try:
      return json.loads(raw)
    except ValueError as e:
      raise ApiError(400, f"the request body is not valid JSON ({e}).") from None

  @app.get("/health")
  async def health():
    b = state.get("batcher")
    return {"status": "ok", "model": name, "engine_calls": b.calls if b else 0,
            "engine_rows": b.rows if b else 0}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "lmx"}]}

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = await _body(request)
    check_model(body, name)
    req = parse_common(body, vocab, context, False, completion_prompts(body, tok))
    return await _respond(req, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = await _body(request)
    check_model(body, name)
    if role_ids is None:
      chat_prompt(body, tok, None)  # raises the 400
    req = parse_common(body, vocab, context, True, [chat_prompt(body, tok, role_ids)])
    return await _respond(req, chat=True)

  async def _respond(req, chat: bool):
    stop_ids = (tok.eos_id,) + ((role_ids[END_TOKEN],) if chat else ())
    opts = SamplingOptions(**req.sampling, stop_ids=stop_ids,
                           seed=0 if req.seed is None else req.seed)
    try:
      opts.validate(vocab)
    except ValueError as e:
      raise ApiError(400, str(e).replace("engine: ", "")) from None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    choices = [Choice(tok, stop_ids, req.stop) for _ in req.prompts]
    for i, prompt in enumerate(req.prompts):
      def emit(ev, i=i):
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
          loop.call_soon_threadsafe(events.put_nowait, (i, ev))
      state["batcher"].submit(Job(prompt, req.max_tokens, opts, emit,
                                  seeded=req.seed is not None, streaming=req.stream))
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = dict(id=rid, object="chat.completion" if chat else "text_completion",
                created=int(time.time()), model=name)

    def usage():
      p = sum(len(q) for q in req.prompts)
      c = sum(ch.completion_tokens() for ch in choices)
      return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def next_event():
      """(index, changed) after applying one event; raises ApiError on an engine error."""
      i, ev = await events.get()
      ch = choices[i]
      if ev[0] == "error":
        if ch.finish is None:
          raise ApiError(503 if "shutting down" in ev[1] else 500, ev[1])
        return i
      if ev[0] == "tokens":
        ch.add(ev[1], ev[2])
        ch.check_stop_strings()
      elif ev[0] == "done":
        ch.done(ev[1])
      return i

    if not req.stream:
      while any(ch.finish is None for ch in choices):
        await next_event()
      out = {**head, "choices": [_final_choice(ch, i, chat, req.logprobs)
                                 for i, ch in enumerate(choices)], "usage": usage()}
      return out

    chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def sse(obj) -> str:
      return f"data: {json.dumps(obj)}\n\n"

    async def gen():
      lp_sent = [0] * len(choices)
      if chat:
        yield sse({**chunk_head, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                    "content": ""},
                                              "logprobs": None, "finish_reason": None}]})
      pending = set(range(len(choices)))
      try:
        while pending:
          i = await next_event()
          ch = choices[i]
          if i not in pending:
            continue
          text = ch.delta()
          lps = None
          if req.logprobs:
            toks, vals = ch.token_logprobs()
            lps = _logprobs(toks[lp_sent[i]:], vals[lp_sent[i]:], chat)
            lp_sent[i] = max(lp_sent[i], len(toks))
          if text or ch.finish is not None:
            c = ({"index": i, "delta": {"content": text} if text else {}, "logprobs": lps,
                  "finish_reason": ch.finish} if chat else
                 {"index": i, "text": text, "logprobs": lps, "finish_reason": ch.finish})
            yield sse({**chunk_head, "choices": [c]})
          if ch.finish is not None:
            pending.discard(i)
        if req.include_usage:
          yield sse({**chunk_head, "choices": [], "usage": usage()})
      except ApiError as e:
        yield sse(e.body())
      yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

  return app


def _logprobs(tokens: list[str], values: list[float], chat: bool) -> dict:
  if chat:
    return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()),
                         "top_logprobs": []} for t, v in zip(tokens, values)]}
  return {"tokens": tokens, "token_logprobs": values, "top_logprobs": None}


def _final_choice(ch: Choice, i: int, chat: bool, logprobs: bool) -> dict:
  lps = _logprobs(*ch.token_logprobs(), chat) if logprobs else None
  if chat:
    return {"index": i, "message": {"role": "assistant", "content": ch.text()},
            "logprobs": lps, "finish_reason": ch.finish}
  return {"index": i, "text": ch.text(), "logprobs": lps, "finish_reason": ch.finish}


def cli_main(argv: Sequence[str]) -> int:
  """`lmx serve --config=EXP [--checkpoint DIR] [--host 127.0.0.1] [--port 8000]
  [--max_batch 16] [--batch_wait_ms 10] [--model_name NAME] [--graceful_timeout 10]`."""
  import jax
  import jax.numpy as jnp
  import uvicorn
  from flax import nnx

  from lmx.data.tokenizer import load_or_train_tokenizer
  from lmx.experiment import load_experiment, split_config_args
  from lmx.model.transformer import Transformer
  from lmx.train.checkpoint import restore_params

  cfg_args, rest = split_config_args(argv)
  parser = argparse.ArgumentParser(prog="lmx serve", description=cli_main.__doc__)
  parser.add_argument("--checkpoint", default=None,
                      help="checkpoint directory (default: the run_dir of the config)")
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1: this machine only)")
  parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
  parser.add_argument("--max_batch", type=int, default=16,
                      help="most requests decoded in one engine call (default 16)")
  parser.add_argument("--batch_wait_ms", type=float, default=10.0,
                      help="the longest a queued request waits for others to batch with; "
                           "it waits only until as many requests as the last engine call "
                           "took are queued, so a lone client waits only on its first "
                           "request (default 10 ms)")
  parser.add_argument("--model_name", default=None,
                      help="the name clients pass as `model` (default: the experiment name)")
  parser.add_argument("--graceful_timeout", type=float, default=10.0,
                      help="on SIGTERM, seconds the requests in flight get to finish")
  args = parser.parse_args(rest)
  if args.max_batch < 1:
    parser.error(f"--max_batch is {args.max_batch}; it must be >= 1")
  if args.batch_wait_ms < 0:
    parser.error(f"--batch_wait_ms is {args.batch_wait_ms}; it must be >= 0")
  if not 0 <= args.port < 65536:
    parser.error(f"--port is {args.port}; it must be in [0, 65535]")
  exp, _ = load_experiment(cfg_args)
  tok = load_or_train_tokenizer(exp)
  # Zeros in the abstract model's shapes, not an eager init: the init compiles every
  # initializer (seconds), and restore_params overwrites every Param (or raises).
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(exp.model,
                                                                  rngs=nnx.Rngs(exp.seed))))
  model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params))
  info = restore_params(exp, model, directory=args.checkpoint)  # in place
  print(f"lmx serve: restored {info['source']} (step {info['step']})", file=sys.stderr)
  if exp.model.quant:  # weight-only quantization for inference (lmx.quant.apply)
    from lmx.quant.apply import quantize_model, report_bytes
    report_bytes("lmx serve", exp.model.quant,
                 quantize_model(model, exp.model.quant, exp.model.quant_group))
  name = args.model_name or exp.name
  app = create_app(model, tok, name, max_batch=args.max_batch,
                   batch_wait_s=args.batch_wait_ms / 1000)
  print(f"lmx serve: model '{name}' on http://{args.host}:{args.port}", file=sys.stderr,
        flush=True)
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                          timeout_graceful_shutdown=args.graceful_timeout)
  # NOTE: after its graceful shutdown uvicorn re-raises the signal it caught, to the
  # handler that was installed before it. A no-op handler there makes SIGTERM / Ctrl-C a
  # clean exit (code 0) instead of a death by signal (143 / 130).
  quiet = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    uvicorn.Server(config).run()
  finally:
    for s, handler in quiet.items():
      signal.signal(s, handler)
  return 0
