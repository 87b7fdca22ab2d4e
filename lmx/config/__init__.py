"""Typed, validated configuration.

Experiments are `ml_collections.ConfigDict`s (see `experiments/`). Code never reads the
ConfigDict directly: `from_config_dict` turns each section into a frozen dataclass and
validates it, so a bad value fails here -- before any compilation -- with one sentence that
names the field and its valid range.

Sections: `model` (ModelConfig, the only thing layers see), `data` (DataConfig), `train`
(TrainConfig), `mesh` (MeshConfig), `checkpoint` (CheckpointConfig), `sample`
(SampleConfig). `run_dir`, `seed` and `name` sit at top level. Periodic validation settings
live in `train` (eval_every, eval_batches).

Files: `checks.py` (ConfigError), `model.py` (model, model.moe), `training.py` (data, train,
distill, peft), `run.py` (mesh, checkpoint, sample); this file joins them into an
`Experiment` and holds the checks that span sections.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from lmx.config.checks import (ConfigError, _choice, _fail, _nonneg_float, _positive,  # noqa: F401
                               _section_from_dict)
from lmx.config.model import ModelConfig, MoEConfig
from lmx.config.run import MESH_AXES, CheckpointConfig, MeshConfig, SampleConfig  # noqa: F401
from lmx.config.training import (PEFT_METHODS, DataConfig, DistillConfig, PeftConfig,  # noqa: F401
                                 TrainConfig)

__all__ = ["ConfigError", "MoEConfig", "ModelConfig", "DataConfig", "TrainConfig",
           "DistillConfig", "PeftConfig", "PEFT_METHODS", "MeshConfig", "MESH_AXES",
           "CheckpointConfig", "SampleConfig", "SECTIONS", "TOP_LEVEL", "Experiment",
           "from_config_dict", "to_config_dict", "base_config"]


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "sample": SampleConfig,
    "peft": PeftConfig,
    "distill": DistillConfig,
}
TOP_LEVEL = {"run_dir": str, "seed": int, "name": str}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The whole validated experiment: one frozen dataclass per section."""

  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig
  checkpoint: CheckpointConfig
  sample: SampleConfig
  peft: PeftConfig = PeftConfig()
  distill: DistillConfig = DistillConfig()
  run_dir: str = "runs/default"
  seed: int = 0
  name: str = "default"


def from_config_dict(cfg: ml_collections.ConfigDict | dict) -> Experiment:
  """Validate a ConfigDict and turn it into typed sections. Raises ConfigError."""
  d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  extra = sorted(set(d) - set(SECTIONS) - set(TOP_LEVEL))
  if extra:
    _fail(extra[0], f"is not a known top-level key; valid keys are "
          f"{', '.join(sorted(set(SECTIONS) | set(TOP_LEVEL)))}")
  kwargs: dict[str, Any] = {}
  for name, cls in SECTIONS.items():
    kwargs[name] = _section_from_dict(name, cls, d.get(name, {}) or {})
  for k, t in TOP_LEVEL.items():
    if k in d:
      if not isinstance(d[k], t):
        _fail(k, f"is {d[k]!r}; it must be a {t.__name__}")
      kwargs[k] = d[k]
  # The compute dtype has one source, train.precision; model.dtype follows it, so train,
  # evaluate and generate all run the model in the same dtype.
  precision = kwargs["train"].precision
  given = (d.get("model") or {}).get("dtype")
  if given is not None and given != precision:
    _fail("model.dtype", f"is {given!r} but train.precision is {precision!r}; the compute dtype "
          "is set by train.precision alone (leave model.dtype unset)")
  kwargs["model"] = dataclasses.replace(kwargs["model"], dtype=precision)
  if kwargs["peft"].method:
    from lmx.peft import trainable_pattern  # what the method adds is what trains
    given = kwargs["train"].trainable
    if given:
      _fail("train.trainable", f"is {given!r} but peft.method={kwargs['peft'].method!r} "
            "already decides what trains; leave train.trainable unset")
    kwargs["train"] = dataclasses.replace(kwargs["train"],
                                          trainable=trainable_pattern(kwargs["peft"]))
  if kwargs["train"].objective == "distill":
    if not kwargs["distill"].teacher_config and not kwargs["distill"].teacher_run:
      _fail("distill.teacher_config", "is empty and so is distill.teacher_run; "
            "train.objective='distill' needs the teacher's experiment file (e.g. "
            "'experiments/default.py') or its run directory")
    if kwargs["peft"].method:
      _fail("peft.method", "must be '' with train.objective='distill' (the student trains whole)")
    if not kwargs["train"].trainable:  # the teacher rides along frozen (lmx.train.objectives)
      kwargs["train"] = dataclasses.replace(kwargs["train"], trainable=r"^(?!teacher\.)")
  exp = Experiment(**kwargs)
  if exp.model.moe.num_experts:  # MoE x mesh (lmx/model/moe.py)
    m = exp.mesh
    if m.pipeline > 1 or m.dcn_pipeline > 1:
      _fail("mesh.pipeline", f"is {m.pipeline} but MoE models do not run pipelined yet (the "
            "pipeline drops the router losses); use mesh.pipeline=1")
    if exp.peft.method:
      _fail("peft.method", f"is {exp.peft.method!r} but PEFT does not reach MoE experts yet; "
            "use peft.method='' (or train.trainable to freeze parts) with model.moe")
    ep = m.expert * m.dcn_expert
    if ep > 0 and exp.model.moe.num_experts % ep:
      _fail("model.moe.num_experts", f"is {exp.model.moe.num_experts}; it must be a multiple "
            f"of the expert mesh axis size {ep} (mesh.expert x mesh.dcn_expert)")
  if exp.data.seq_len > exp.model.max_seq_len and exp.model.position == "learned":
    _fail("data.seq_len", f"is {exp.data.seq_len}; with learned positions it must be <= "
          f"model.max_seq_len={exp.model.max_seq_len}")
  if exp.data.batch_size % exp.train.grad_accum_steps:
    _fail("train.grad_accum_steps", f"is {exp.train.grad_accum_steps}; it must divide "
          f"data.batch_size={exp.data.batch_size}")
  return exp


def to_config_dict(exp_section) -> ml_collections.ConfigDict:
  """A dataclass section as a ConfigDict (used by experiments to start from defaults)."""
  return ml_collections.ConfigDict(dataclasses.asdict(exp_section))


def base_config() -> ml_collections.ConfigDict:
  """Every section at its defaults; experiments start here and override fields."""
  c = ml_collections.ConfigDict()
  for name, cls in SECTIONS.items():
    c[name] = to_config_dict(cls())
  del c.model["dtype"]  # follows train.precision (see from_config_dict)
  c.run_dir = "runs/default"
  c.seed = 0
  c.name = "default"
  return c
