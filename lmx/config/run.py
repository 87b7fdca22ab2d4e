"""`mesh`, `checkpoint` and `sample`: where a run executes, what it saves, what it prints."""

from __future__ import annotations

import dataclasses

from lmx.config.checks import _fail, _nonneg_float, _positive

MESH_AXES = ("data", "fsdp", "tensor", "pipeline", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; one axis may be -1 (takes the remaining devices). 1 turns an axis off.

  `data`...`expert` are the sizes within one slice (ICI, the fast interconnect); the `dcn_*`
  factors multiply them across slices (DCN) on multi-slice TPU (or across processes
  elsewhere), so the mesh axis `data` has data * dcn_data devices.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  pipeline: int = 1
  expert: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1
  dcn_pipeline: int = 1
  dcn_expert: int = 1
  # Logical-axis rules (lmx/parallel/rules.py): '' or a named set ('default',
  # 'sequence_parallel'), optionally followed by overrides 'name=axis+axis;name=' that
  # replace single rules, e.g. 'default;mlp=tensor+fsdp' or 'vocab='.
  rules: str = ""

  def validate(self) -> "MeshConfig":
    sizes = [getattr(self, a) for a in MESH_AXES]
    for a, s in zip(MESH_AXES, sizes):
      if not isinstance(s, int) or (s < 1 and s != -1):
        _fail(f"mesh.{a}", f"is {s!r}; it must be a positive integer or -1")
    if sizes.count(-1) > 1:
      _fail("mesh", "has more than one axis set to -1; at most one axis may take the rest")
    for a in MESH_AXES:
      s = getattr(self, f"dcn_{a}")
      if not isinstance(s, int) or isinstance(s, bool) or s < 1:
        _fail(f"mesh.dcn_{a}", f"is {s!r}; it must be a positive integer (1 = one slice)")
    from lmx.parallel.rules import parse_rules  # validates names and mesh axes
    try:
      parse_rules(self.rules)
    except ValueError as e:
      _fail("mesh.rules", f"is {self.rules!r}; {e}")
    return self


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 200  # steps between saves; 0 saves only at the end / on signal.
  keep: int = 3  # newest checkpoints kept (the best one by validation loss is kept too).
  async_save: bool = True

  def validate(self) -> "CheckpointConfig":
    if self.every < 0:
      _fail("checkpoint.every", f"is {self.every!r}; it must be >= 0")
    _positive("checkpoint.keep", self.keep)
    return self


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  prompt: str = "def "
  max_new_tokens: int = 64
  temperature: float = 0.8  # 0 means greedy.
  top_k: int = 0  # 0 disables.
  top_p: float = 1.0  # 1.0 disables.
  seed: int = 0

  def validate(self) -> "SampleConfig":
    _positive("sample.max_new_tokens", self.max_new_tokens)
    _nonneg_float("sample.temperature", self.temperature)
    if self.top_k < 0:
      _fail("sample.top_k", f"is {self.top_k!r}; it must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      _fail("sample.top_p", f"is {self.top_p!r}; it must be in (0, 1]")
    return self
