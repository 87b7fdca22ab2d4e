"""Stop when the validation loss has not improved for `patience` evaluations."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class EarlyStopping:
  """patience=0 never stops. `min_delta`: improvements smaller than this do not count."""

  patience: int
  best: float = math.inf
  best_step: int = -1
  bad_evals: int = 0
  min_delta: float = 0.0

  def update(self, step: int, val_loss: float) -> bool:
    """Record one evaluation; True if it is a new best."""
    if val_loss < self.best - self.min_delta:
      self.best, self.best_step, self.bad_evals = val_loss, step, 0
      return True
    self.bad_evals += 1
    return False

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.bad_evals >= self.patience

  def state_dict(self) -> dict:
    # JSON has no inf: an unset best is stored as None.
    return {"best": None if math.isinf(self.best) else self.best, "best_step": self.best_step,
            "bad_evals": self.bad_evals}

  def load_state_dict(self, d: dict) -> None:
    self.best = math.inf if d.get("best") is None else float(d["best"])
    self.best_step, self.bad_evals = int(d["best_step"]), int(d["bad_evals"])
