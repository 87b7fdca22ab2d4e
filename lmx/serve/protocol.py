"""OpenAI request bodies -> validated internal requests; token ids -> response text.

Checked by hand (not by pydantic) so every error is one sentence naming the field, sent as
`{"error": {"message", "type", "param", "code"}}` with a 4xx status.

Accepted (completions and chat): model, max_tokens (chat also max_completion_tokens),
temperature, top_p, top_k (-1 or 0 = off), min_p, frequency_penalty, presence_penalty,
repetition_penalty, min_tokens, stop (a string or a list of up to 4), n (1 only), seed,
stream, stream_options.include_usage, logprobs (completions: 0 or 1, the sampled token's
log-prob only; chat: true with top_logprobs 0). Unknown fields are ignored (as `user`);
fields lmx cannot honor (echo, suffix, best_of > 1, logit_bias, n > 1) are refused.
Completions `prompt`: a string, a list of token ids (used as given: no bos is added), or a
list of strings / of id lists (one choice per prompt). A string gets the bos id in front,
as `lmx generate` and training do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from lmx.infer.generate import truncate_at_stop


class ApiError(Exception):
  """An error for the client: HTTP status, one-sentence message, the offending field."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code

  def body(self) -> dict:
    kind = "invalid_request_error" if self.status < 500 else "server_error"
    return {"error": {"message": self.message, "type": kind, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass
class Request:
  """A validated request: one prompt (ids) per choice, plus the decoding settings."""
  prompts: list[list[int]]
  max_tokens: int
  sampling: dict[str, Any]  # SamplingOptions fields except stop_ids
  seed: int | None
  stop: list[str]
  stream: bool
  include_usage: bool
  logprobs: bool


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _field(body: dict, name: str, kinds: tuple, default, what: str):
  """body[name] (None -> default) if it is one of `kinds`, else a 400 naming the field."""
  x = body.get(name)
  if x is None:
    return default
  ok = any((_is_int(x) if k is int else isinstance(x, k) and not isinstance(x, bool)
            if k is float else isinstance(x, k)) for k in kinds)
  if not ok:
    raise ApiError(400, f"'{name}' must be {what}; got {x!r:.80}.", name)
  return x


def _number(body: dict, name: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
  x = float(_field(body, name, (int, float), default, "a number"))
  if not (lo < x if lo_open else lo <= x) or x > hi:
    interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
    raise ApiError(400, f"'{name}' is {x}; it must be in {interval}.", name)
  return x


def parse_common(body: Any, vocab: int, context: int, chat: bool,
                 prompts: list[list[int]]) -> Request:
  """The settings shared by completions and chat; `prompts` already encoded."""
  for p in prompts:
    if not p:
      raise ApiError(400, "every prompt needs at least one token.", "prompt")
    if min(p) < 0 or max(p) >= vocab:
      raise ApiError(400, f"prompt token ids must be in [0, {vocab}); got values in "
                          f"[{min(p)}, {max(p)}].", "prompt")
  n = _field(body, "n", (int,), 1, "an integer")
  if n != 1:
    raise ApiError(400, f"'n' is {n}; lmx serve returns one choice per prompt (n must be 1).",
                   "n")
  if body.get("echo"):
    raise ApiError(400, "'echo' is not supported.", "echo")
  if body.get("suffix"):
    raise ApiError(400, "'suffix' is not supported.", "suffix")
  if _field(body, "best_of", (int,), 1, "an integer") != 1:
    raise ApiError(400, "'best_of' must be 1.", "best_of")
  if body.get("logit_bias"):
    raise ApiError(400, "'logit_bias' is not supported.", "logit_bias")
  key = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
  longest = max(len(p) for p in prompts)
  if longest >= context:
    raise ApiError(400, f"This model's maximum context length is {context} tokens; the "
                        f"prompt alone has {longest}.", "messages" if chat else "prompt",
                   "context_length_exceeded")
  default = (context - longest) if chat else 16
  max_tokens = _field(body, key, (int,), default, "an integer")
  if max_tokens < 1:
    raise ApiError(400, f"'{key}' is {max_tokens}; it must be >= 1.", key)
  if longest + max_tokens > context:
    raise ApiError(400, f"This model's maximum context length is {context} tokens; the "
                        f"request asks for {longest + max_tokens} ({longest} in the prompt, "
                        f"{max_tokens} in the completion).", key, "context_length_exceeded")
  top_k = _field(body, "top_k", (int,), 0, "an integer")
  if top_k < -1:
    raise ApiError(400, f"'top_k' is {top_k}; it must be >= 0 (-1 or 0: off).", "top_k")
  sampling = dict(
      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
      top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
      top_k=max(top_k, 0),
      min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
      frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
      presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
      repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
      min_new_tokens=_field(body, "min_tokens", (int,), 0, "an integer"))
  if sampling["min_new_tokens"] < 0:
    raise ApiError(400, "'min_tokens' must be >= 0.", "min_tokens")
  seed = _field(body, "seed", (int,), None, "an integer")
  if seed is not None and not -2**63 <= seed < 2**63:
    raise ApiError(400, f"'seed' is {seed}; it must fit in 64 bits.", "seed")
  stop = _field(body, "stop", (str, list), [], "a string or a list of strings")
  stop = [stop] if isinstance(stop, str) else stop
  if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
    raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them.",
                   "stop")
  stream = _field(body, "stream", (bool,), False, "a boolean")
  opts = _field(body, "stream_options", (dict,), {}, "an object")
  include_usage = bool(opts.get("include_usage", False))
  if chat:
    logprobs = _field(body, "logprobs", (bool,), False, "a boolean")
    if _field(body, "top_logprobs", (int,), 0, "an integer") != 0:
      raise ApiError(400, "'top_logprobs' must be 0: lmx serve returns the sampled token's "
                          "log-prob only.", "top_logprobs")
  else:
    lp = _field(body, "logprobs", (int,), None, "an integer")
    if lp is not None and lp not in (0, 1):
      raise ApiError(400, f"'logprobs' is {lp}; it must be 0 or 1 (lmx serve returns the "
                          f"sampled token's log-prob only).", "logprobs")
    logprobs = lp is not None
  return Request(prompts=prompts, max_tokens=max_tokens, sampling=sampling, seed=seed,
                 stop=stop, stream=stream, include_usage=include_usage, logprobs=logprobs)


def check_model(body: Any, model_name: str) -> None:
  if not isinstance(body, dict):
    raise ApiError(400, "the request body must be a JSON object.")
  model = body.get("model")
  if not isinstance(model, str):
    raise ApiError(400, "'model' is required (a string); see /v1/models.", "model")
  if model != model_name:
    raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                        f"'{model_name}'.", "model", "model_not_found")


def completion_prompts(body: dict, tok) -> list[list[int]]:
  """`prompt` -> one list of ids per prompt (strings get bos in front)."""
  p = body.get("prompt")
  what = "a string, a list of token ids, or a list of strings / token-id lists"
  if isinstance(p, str):
    return [[tok.bos_id] + tok.encode(p)]
  if isinstance(p, list) and p:
    if all(_is_int(t) for t in p):
      return [list(p)]
    if all(isinstance(s, str) for s in p):
      return [[tok.bos_id] + tok.encode(s) for s in p]
    if all(isinstance(q, list) and all(_is_int(t) for t in q) for q in p):
      return [list(q) for q in p]
  raise ApiError(400, f"'prompt' must be {what}; got {p!r:.80}.", "prompt")


def chat_prompt(body: dict, tok, role_ids: dict[str, int] | None) -> list[int]:
  """`messages` -> `[bos] + turns + [<|assistant|>]` in lmx's chat template
  (lmx.data.sft), the prompt lmx.eval.sft_eval gives a chat model."""
  from lmx.data import sft
  if role_ids is None:
    raise ApiError(400, "this model's tokenizer has no chat tokens (lmx.data.sft.ROLE_TOKENS), "
                        "so /v1/chat/completions is off; use /v1/completions.", "messages")
  msgs = body.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.",
                   "messages")
  clean = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or m.get("role") not in sft.ROLES:
      raise ApiError(400, f"messages[{i}] needs a 'role' in {list(sft.ROLES)}.", "messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
      if not all(isinstance(c, dict) and c.get("type") == "text"
                 and isinstance(c.get("text"), str) for c in content):
        raise ApiError(400, f"messages[{i}].content parts must all be text.", "messages")
      content = "".join(c["text"] for c in content)
    if not isinstance(content, str):
      raise ApiError(400, f"messages[{i}].content must be a string.", "messages")
    clean.append({"role": m["role"], "content": content})
  ids, _ = sft.encode_conversation(tok, clean)  # [bos] + turns + [eos]
  return ids[:-1].tolist() + [role_ids["<|assistant|>"]]


class Choice:
  """One choice's tokens as they arrive: the text so far, stop strings applied, and the
  part safe to stream (a stop string may still be forming at the end)."""

  def __init__(self, tok, stop_ids: Sequence[int], stops: Sequence[str]):
    self.tok, self.stop_ids, self.stops = tok, set(stop_ids), list(stops)
    self.ids: list[int] = []
    self.logprobs: list[float] = []
    self.stop_token = False  # the last id is a stop id (counted, not shown)
    self.finish: str | None = None
    self.sent = ""  # text already streamed
    self._hold = max((len(s) for s in stops), default=1) - 1

  def add(self, ids: list[int], logprobs: list[float]) -> None:
    if self.finish is None:
      self.ids += ids
      self.logprobs += logprobs

  def done(self, reason: str) -> None:
    if self.finish is None:
      self.finish = reason
      self.stop_token = reason == "stop" and bool(self.ids) and self.ids[-1] in self.stop_ids

  def text_ids(self) -> list[int]:
    return self.ids[:-1] if self.stop_token else self.ids

  def _cut(self) -> tuple[str, bool]:
    return truncate_at_stop(self.tok.decode(self.text_ids()), self.stops)

  def check_stop_strings(self) -> bool:
    """Ends the choice ('stop') once a stop string appears; keeps the shortest prefix of
    the ids whose text holds it (as `lmx generate --stop`). True if it ended now."""
    if self.finish is not None or not self.stops:
      return False
    text, hit = self._cut()
    if not hit:
      return False
    ids = self.text_ids()
    n = next(n for n in range(1, len(ids) + 1)
             if truncate_at_stop(self.tok.decode(ids[:n]), self.stops)[1])
    self.ids, self.logprobs = ids[:n], self.logprobs[:n]
    self.finish, self.stop_token = "stop", False
    return True

  def text(self) -> str:
    return self._cut()[0]

  def delta(self) -> str:
    """Text not streamed yet that can no longer change (all of it once finished)."""
    text = self.text()
    if self.finish is None:
      text = text[:len(text) - self._hold] if self._hold else text
      text = text.rstrip("\ufffd")  # a character whose bytes are still arriving
    if not text.startswith(self.sent) or len(text) <= len(self.sent):
      return ""
    out, self.sent = text[len(self.sent):], text
    return out

  def completion_tokens(self) -> int:
    """Every token the model sampled for this choice, its stop token included."""
    return len(self.ids)

  def token_logprobs(self) -> tuple[list[str], list[float]]:
    """The shown tokens (stop token excluded) as text pieces, with their log-probs."""
    ids = self.text_ids()
    return [self.tok.decode([t]) for t in ids], self.logprobs[:len(ids)]
