"""`lmx serve` throughput and latency for 1, 4 and 16 concurrent clients -> one JSON object.

    python benchmarks/serve.py [--config experiments/default.py] [--requests 96] [--repeats 3]
        [--max_tokens 32] [--concurrency 1,4,16] [--max_batch 16] [--batch_wait_ms 10]

Starts `lmx serve` (the default experiment's checkpoint, runs/default) on a free localhost
port and warms every concurrency level (the engine compiles per batch size and prompt
bucket; a compile inside a measured window shows as a p95 outlier). Then, `--repeats`
times over the levels in turn (so a change in machine load touches every level), each
level runs `--requests` greedy completions of a fixed prompt set from that many client
threads (each sends its next request when its last one returns). Per level it reports the
repeat with the median requests/s: requests/s, completion tokens/s, p50/p95 latency,
engine calls, the speed-up over concurrency 1 (sequential single-request serving) in the
same run, and every repeat's requests/s. The clients share the CPU with the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["import os\n", "def __init__(self", "class ", "    return ", "from collections import",
           "# Copyright", "if __name__ == ", "    def test_", "import sys\nimport ",
           '"""Utilities for ', "try:\n    ", "for i in range(", "    @property\n    def ",
           "raise ValueError(", "with open(", "self.assertEqual("]


def _post(url: str, body: dict) -> dict:
  req = urllib.request.Request(url, data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=600) as r:
    return json.load(r)


def _get(url: str) -> dict:
  with urllib.request.urlopen(url, timeout=10) as r:
    return json.load(r)


def _level(base: str, model: str, clients: int, n: int, max_tokens: int) -> dict:
  """n requests from `clients` closed-loop threads -> figures."""
  lat, toks = [], []

  def one(i):
    t0 = time.perf_counter()
    r = _post(base + "/v1/completions", {"model": model, "prompt": PROMPTS[i % len(PROMPTS)],
                                         "max_tokens": max_tokens, "temperature": 0})
    lat.append(time.perf_counter() - t0)
    toks.append(r["usage"]["completion_tokens"])

  before = _get(base + "/health")
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    list(pool.map(one, range(n)))
  wall = time.perf_counter() - t0
  after = _get(base + "/health")
  return {"concurrency": clients, "requests": n, "seconds": round(wall, 3),
          "requests_per_s": round(n / wall, 3), "tokens_per_s": round(sum(toks) / wall, 1),
          "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
          "p95_latency_s": round(float(np.percentile(lat, 95)), 3),
          "engine_calls": after["engine_calls"] - before["engine_calls"],
          "mean_batch": round((after["engine_rows"] - before["engine_rows"])
                              / max(after["engine_calls"] - before["engine_calls"], 1), 2)}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default=str(ROOT / "experiments" / "default.py"))
  ap.add_argument("--checkpoint", default=None)
  ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
  ap.add_argument("--max_tokens", type=int, default=32)
  ap.add_argument("--concurrency", default="1,4,16")
  ap.add_argument("--repeats", type=int, default=3, help="measured passes over the levels")
  ap.add_argument("--max_batch", type=int, default=16)
  ap.add_argument("--batch_wait_ms", type=float, default=10.0)
  args = ap.parse_args()
  levels = [int(c) for c in args.concurrency.split(",")]

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  cmd = [sys.executable, "-m", "lmx.cli", "serve", f"--config={args.config}", "--port",
         str(port), "--max_batch", str(args.max_batch), "--batch_wait_ms",
         str(args.batch_wait_ms)]
  if args.checkpoint:
    cmd += ["--checkpoint", args.checkpoint]
  proc = subprocess.Popen(cmd, cwd=ROOT)
  base = f"http://127.0.0.1:{port}"
  try:
    t0 = time.perf_counter()
    while True:
      try:
        model = _get(base + "/health")["model"]
        break
      except OSError:
        if proc.poll() is not None:
          raise SystemExit("lmx serve exited before it was ready")
        time.sleep(0.5)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in levels * 3:  # compile the batch shapes each level will reach
      _level(base, model, c, 4 * c, args.max_tokens)
    warmup = time.perf_counter() - t0
    load = os.getloadavg()[0]
    runs = {c: [] for c in levels}
    for _ in range(args.repeats):
      for c in levels:
        runs[c].append(_level(base, model, c, args.requests, args.max_tokens))
    results = []
    for c in levels:
      by_rps = sorted(runs[c], key=lambda r: r["requests_per_s"])
      results.append({**by_rps[len(by_rps) // 2],
                      "requests_per_s_all": [r["requests_per_s"] for r in runs[c]]})
    seq = next((r for r in results if r["concurrency"] == 1), None)
    for r in results:
      if seq:
        r["speedup_vs_sequential"] = round(r["requests_per_s"] / seq["requests_per_s"], 2)
    print(json.dumps({"model": model, "max_tokens": args.max_tokens,
                      "prompts": len(PROMPTS), "max_batch": args.max_batch,
                      "batch_wait_ms": args.batch_wait_ms, "cpus": os.cpu_count(),
                      "load_avg_1m_before": round(load, 2),
                      "load_avg_1m_after": round(os.getloadavg()[0], 2),
                      "startup_s": round(startup, 1), "warmup_s": round(warmup, 1),
                      "results": results}, indent=1))
  finally:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    print(f"lmx serve exited with {rc}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
