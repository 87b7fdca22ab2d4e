"""The serving scheduler: one thread that batches queued requests through the decode engine.

    HTTP handlers --submit(Job)--> queue --> scheduler thread:
      take the first job, wait up to `batch_wait_s` for more until as many jobs as the last
      collection held (plus its queue) are here, take any others already queued (up to
      `max_batch`),
      split them into groups that can share ONE engine call, run each group with
      `lmx.infer.engine.stream`, and hand every row's new tokens to its job's `emit`.

Design choices:
- Per-row settings. The engine takes temperature, top-k/p, min-p, penalties,
  min_new_tokens and the seed per row (`SamplingOptions` fields as tuples), and a row's
  random draws use its own key, so a group is every job with the same stop ids (they are
  one list per call): greedy and sampled, seeded or not. A seeded job in a group
  reproduces `generate(..., seed=s)` exactly, as alone; an unseeded sampled job gets a
  fresh random seed of its own. When every row has the same settings (and no row samples
  with its own seed) the engine takes its static path, as before per-row settings.
- Fewer compiles. The engine compiles per (batch size, prompt bucket, max_new_tokens,
  the sampling stages the rows use; per-row values are runtime inputs). A group's row
  count is padded up to a power of two (capped at max_batch) with copies of its shortest
  job (prompt and settings), and its max_new_tokens is rounded up to a multiple of 16
  (within the context); each row is cut at its own max_tokens here, and the loop is
  resumed in chunks so it stops once every real row has ended. Rows are independent
  in the engine (left padding is masked), so padding changes no row's tokens.
- A group keeps max(prompt) + max(max_new) within the model's context.
- No continuous batching: a job that arrives while a group decodes waits for the next
  engine call (the engine cannot add rows to a running loop).
- Events to `emit` (called on the scheduler thread): ('tokens', ids, logprobs) with the
  engine's convention (a stop id is included), then ('done', 'stop' | 'length'), or
  ('error', message). A job gets nothing after 'done' or 'error'.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import sys
import threading
import time
import traceback
from typing import Callable

from lmx.infer.engine import ROW_FIELDS, SamplingOptions, stream

MAX_NEW_BUCKET = 16
STREAM_CHUNK = 8  # token columns per host sync when a group has a streaming job


@dataclasses.dataclass
class Job:
  """One completion to produce. `options.seed` counts only when `seeded` is set."""
  prompt: list[int]
  max_new: int
  options: SamplingOptions
  emit: Callable[[tuple], None]
  seeded: bool = False
  streaming: bool = False

  def group_key(self):
    """Jobs with equal keys can share an engine call: only the stop ids must match."""
    return self.options.stop_ids

  def row_seed(self) -> int:
    """The seed of this job's row: its own, a fresh one if unseeded, 0 when greedy (so
    greedy rows never force per-row keys)."""
    if self.options.temperature == 0:
      return 0
    return self.options.seed if self.seeded else random.getrandbits(31)


def _batch_rows(n: int, max_batch: int) -> int:
  """Rows to run for n jobs: the next power of two, capped at max_batch (>= n)."""
  return max(n, min(1 << (n - 1).bit_length(), max_batch))


class Batcher:
  """Owns the model on a scheduler thread; `submit` is thread-safe."""

  def __init__(self, model, *, max_batch: int = 16, batch_wait_s: float = 0.01):
    self.model = model
    self.context = model.cfg.max_seq_len
    self.max_batch = max_batch
    self.batch_wait_s = batch_wait_s
    self.calls = 0  # engine calls run (for tests and logs)
    self.rows = 0  # requests (real rows) those calls decoded
    self._q: queue.Queue = queue.Queue()
    self._closed = False
    self._last_size = 2  # jobs taken last time, plus those already queued behind them
    self._thread = threading.Thread(target=self._run, name="lmx-serve-batcher", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> None:
    if self._closed:
      job.emit(("error", "the server is shutting down"))
      return
    self._q.put(job)

  def close(self, timeout: float | None = None) -> None:
    """Finish the engine call in progress, fail the jobs still queued, stop the thread."""
    self._closed = True
    self._q.put(None)
    self._thread.join(timeout)

  # ------------------------------------------------------------------ scheduler thread

  def _run(self) -> None:
    stop = False
    while not stop:
      first = self._q.get()
      if first is None:
        break
      jobs = [first]
      # Wait for company only until as many jobs as last time are here (a lone client's
      # request starts at once); then take only what is already queued.
      target = min(self._last_size, self.max_batch)
      deadline = time.monotonic() + self.batch_wait_s
      while len(jobs) < self.max_batch:
        left = deadline - time.monotonic() if len(jobs) < target else 0
        try:
          job = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
        except queue.Empty:
          break
        if job is None:
          stop = True
          break
        jobs.append(job)
      self._last_size = len(jobs) + self._q.qsize()
      for group in self._groups(jobs):
        self._decode(group)
    while True:  # shutting down: whatever is still queued gets an error
      try:
        job = self._q.get_nowait()
      except queue.Empty:
        return
      if job is not None:
        job.emit(("error", "the server is shutting down"))

  def _groups(self, jobs: list[Job]) -> list[list[Job]]:
    """Jobs with one group key, in arrival order, split where the context would overflow."""
    by_key: dict = {}
    for job in jobs:
      by_key.setdefault(job.group_key(), []).append(job)
    groups = []
    for members in by_key.values():
      cur: list[Job] = []
      for job in members:
        trial = cur + [job]
        if cur and (max(len(j.prompt) for j in trial) + max(j.max_new for j in trial)
                    > self.context):
          groups.append(cur)
          trial = [job]
        cur = trial
      groups.append(cur)
    return groups

  def _decode(self, group: list[Job]) -> None:
    sent = [0] * len(group)
    live = [True] * len(group)
    try:
      self._stream(group, sent, live)
    except Exception as e:  # one bad call must not stop the server
      traceback.print_exc(file=sys.stderr)
      for i, job in enumerate(group):
        if live[i]:
          job.emit(("error", f"decoding failed: {e}"))

  def _stream(self, group: list[Job], sent: list[int], live: list[bool]) -> None:
    """One engine call for the group; rows' tokens go to their jobs as chunks arrive."""
    longest = max(len(j.prompt) for j in group)
    want = max(j.max_new for j in group)
    max_new = max(want, min(-(-want // MAX_NEW_BUCKET) * MAX_NEW_BUCKET,
                            self.context - longest))
    # pad rows: copies of the job with the shortest prompt (its settings too, so a group
    # with one setting keeps the engine's static path)
    short = min(group, key=lambda j: len(j.prompt))
    rows = group + [short] * (_batch_rows(len(group), self.max_batch) - len(group))
    prompts = [j.prompt for j in rows]
    seeds = [j.row_seed() for j in group]
    seeds += [seeds[group.index(short)]] * (len(rows) - len(group))
    opts = dataclasses.replace(
        group[0].options, seed=tuple(seeds),
        **{f: tuple(getattr(j.options, f) for j in rows) for f in ROW_FIELDS if f != "seed"})
    # Non-streaming rows come back at the first chunk boundary at or after their end: the
    # shortest max_tokens is one (the bucket's extra columns then never run).
    chunk = STREAM_CHUNK if any(j.streaming for j in group) else min(j.max_new for j in group)
    self.calls += 1
    self.rows += len(group)
    for c in stream(self.model, prompts, max_new, opts, chunk=chunk):
      for i, job in enumerate(group):
        if not live[i]:
          continue
        toks = c.tokens[i][:job.max_new - sent[i]]
        lps = c.logprobs[i][:len(toks)]
        sent[i] += len(toks)
        if toks:
          job.emit(("tokens", toks, lps))
        if c.done[i] and c.finish_reason[i] == "stop" and sent[i] <= job.max_new \
           and len(toks) == len(c.tokens[i]):
          live[i] = False
          job.emit(("done", "stop"))
        elif sent[i] >= job.max_new or c.done[i]:
          live[i] = False
          job.emit(("done", "length"))
      if not any(live):
        break
