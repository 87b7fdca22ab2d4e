"""Where training numbers go: metrics.jsonl, TensorBoard, a tqdm bar and a loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

METRICS_FILE, CURVE_FILE, TB_DIR = "metrics.jsonl", "loss_curve.png", "tensorboard"


def _plain(v: Any) -> Any:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if isinstance(v, (bool, int)) else f


class MetricsLogger:
  """One JSON line per logged step, TensorBoard scalars, and a progress bar with loss and
  tokens/s.

  A run that starts at `start_step` (resumed from that checkpoint) continues the same
  metrics.jsonl, first dropping the records after start_step: those steps run again, and
  each step should appear once.
  """

  def __init__(self, run_dir: str | pathlib.Path, total_steps: int, start_step: int = 0,
               progress_bar: bool = True):
    self.run_dir = pathlib.Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    _truncate_after(self.run_dir / METRICS_FILE, start_step)
    self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # imported lazily: it pulls in protobuf
    self._tb = SummaryWriter(str(self.run_dir / TB_DIR))
    self._bar = None
    if progress_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
    self._last = (time.perf_counter(), start_step, 0.0)  # (time, step, tokens since)

  def count_tokens(self, n: float) -> None:
    t, s, tok = self._last
    self._last = (t, s, tok + n)

  def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> dict[str, Any]:
    """Write one record; for kind='train' adds tokens_per_s since the previous train log."""
    rec = {"step": step, "kind": kind, **{k: _plain(v) for k, v in metrics.items()}}
    if kind == "train":
      now = time.perf_counter()
      t, s, tok = self._last
      rec["tokens_per_s"] = tok / max(now - t, 1e-9)
      self._last = (now, step, 0.0)
    # NOTE: json writes non-finite floats as NaN/Infinity (not strict JSON, but what a
    # diverged run must still record); json.loads reads them back.
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    for k, v in rec.items():
      if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.add_scalar(f"{kind}/{k}", v, step)
    if self._bar is not None and kind == "train":
      self._bar.set_postfix(loss=f"{rec.get('loss', math.nan):.4f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}")
    return rec

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self._tb.close()
    self._jsonl.close()


def _truncate_after(path: pathlib.Path, step: int) -> None:
  """Keep only the records of `path` with step <= `step` (and no line cut by a kill)."""
  if not path.exists():
    return
  kept = [json.dumps(r) + "\n" for r in read_metrics(path.parent) if r.get("step", 0) <= step]
  tmp = path.with_suffix(".jsonl.tmp")
  tmp.write_text("".join(kept), encoding="utf-8")
  os.replace(tmp, path)


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(run_dir) / METRICS_FILE
  if not path.exists():
    return []
  out = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut by a kill: skip it
      continue
  return out


def plot_loss_curve(run_dir: str | pathlib.Path) -> pathlib.Path | None:
  """Train and validation loss against step, from metrics.jsonl, as loss_curve.png."""
  recs = read_metrics(run_dir)
  # Train points are means over each logging interval (MetricsLogger's caller averages).
  train = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and "loss" in r]
  val = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "eval"]
  final = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "final_eval"]
  if not train and not val:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train (mean per log interval)")
  if val:
    n = next((r.get("val_batches") for r in recs if r.get("kind") == "eval"), None)
    ax.plot(*zip(*val), "o-", label=f"validation, first {n} batches" if n else "validation")
  if final:
    ax.plot(*zip(*final[-1:]), "*", markersize=12, label="validation, whole split")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.legend()
  ax.grid(alpha=0.3)
  path = pathlib.Path(run_dir) / CURVE_FILE
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
