"""The memory planner: the state it plans is the state the compiled step takes, byte for
byte; its total is within 15% of XLA's; ZeRO formulas match the paper; 70B plans shape-only."""

import dataclasses
import math

import jax
import pytest

from lmx.config import (ConfigError, DataConfig, Experiment, MeshConfig, ModelConfig,
                        TrainConfig, from_config_dict)
from lmx.experiment import load_experiment
from lmx.parallel.mesh import make_mesh, make_rules
from lmx.parallel.pipeline import make_schedule
from lmx.scaling import memory
from lmx.scaling.accounting import count_params

# Small enough to compile in seconds, shaped like a real run: activations and state both
# matter (d_model 128, 4 layers, 16 rows of 128 tokens over 8 devices).
SMALL = Experiment(
    model=ModelConfig(vocab_size=1024, d_model=128, n_layers=4, n_heads=2, max_seq_len=128),
    data=DataConfig(batch_size=16, seq_len=128), train=TrainConfig(), mesh=MeshConfig(),
    checkpoint=from_config_dict({}).checkpoint, sample=from_config_dict({}).sample)
LAYOUTS = {"data:0": (dict(data=8), 0), "data:1": (dict(data=8), 1),
           "data:2": (dict(data=8), 2), "data:3": (dict(data=8), 3),
           "fsdp:0": (dict(data=1, fsdp=8), 0),
           "pipeline:0": (dict(data=4, pipeline=2), 0)}  # 1F1B over 4 microbatches


def _exp(base=SMALL, mesh=None, **train):
  mesh_cfg = dataclasses.replace(base.mesh, **(mesh or {})).validate()
  return dataclasses.replace(base, mesh=mesh_cfg,
                             train=dataclasses.replace(base.train, **train).validate())


# Each case compiles the step once (~3-8 s on 2 cores); ZeRO-1 and fsdp run by default.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("layout", [pytest.param(k, marks=() if k in ("data:1", "fsdp:0")
                                                 else SLOW) for k in LAYOUTS])
@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_plan_equals_compiled_state_and_total_within_15pct(layout):
  mesh_sizes, stage = LAYOUTS[layout]
  accum = 4 if "pipeline" in mesh_sizes else 1
  exp = _exp(mesh=mesh_sizes, zero_stage=stage, grad_accum_steps=accum)
  plan = memory.plan_memory(exp, 8)
  xla = memory.compiled_step_memory(exp, make_mesh(exp.mesh))
  # Exact: the state the planner lays out is what the compiled step takes as arguments,
  # counted two independent ways (its input shardings; its argument bytes minus the batch).
  state = plan.param_bytes + plan.optimizer_bytes + plan.counter_bytes
  assert state == xla["state_arguments"]
  assert state == xla["argument"] - xla["batch_arguments"]
  assert plan.batch_bytes == xla["batch_arguments"]
  # Estimated: the peak (state + grads + activations + update copy) against XLA's total.
  assert plan.total_bytes == pytest.approx(xla["total"], rel=0.15)


def test_zero_formulas_are_the_papers():
  # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 data-parallel devices, K = 12.
  gb = {s: b / 1e9 for s, b in memory.zero_formulas(7.5e9, 64)["paper"].items()}
  assert round(gb[0], 1) == 120.0 and round(gb[1], 1) == 31.4
  assert round(gb[2], 1) == 16.6 and round(gb[3], 1) == 1.9
  lmx = memory.zero_formulas(1.0, 4)["lmx"]  # 4+4+8 bytes: params, grads, moments
  assert lmx == {0: 16.0, 1: 8.0 + 2.0, 2: 4.0 + 3.0, 3: 4.0}


def _llama_70b(argv=()):
  exp, _ = load_experiment(["--config=experiments/llama.py:70b", *argv])
  return exp


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_70b_plans_shape_only_on_an_abstract_mesh():
  exp = _llama_70b()
  assert count_params(exp.model).params == 68_976_648_192  # Llama-2-70B
  live = len(jax.live_arrays())
  plan = memory.plan_memory(exp, 256)  # fsdp=32 x tensor=8; there are 8 CPU devices here
  assert len(jax.live_arrays()) == live  # nothing allocated
  assert plan.mesh["fsdp"] == 32 and plan.mesh["tensor"] == 8
  # By hand: every matrix splits 256 ways; the RMSNorm scales ('embed' only) 32 ways.
  norms = 2 * 80 * 8192 + 8192
  assert plan.param_bytes == 4 * (plan.params - norms) // 256 + 4 * norms // 32
  assert plan.optimizer_bytes == 2 * plan.param_bytes
  assert plan.grad_bytes == plan.param_bytes == plan.grad_accum_bytes  # 8 microbatches


def test_zero_formulas_count_the_expert_split():
  """Mixtral 8x7B on data=2 x fsdp=8 x expert=8: the experts' weights (~97% of the
  parameters) split 64 ways, the rest 8 ways; the formulas' Psi must be that per-replica
  share (an fsdp x tensor x pipeline quotient alone overstates it ~7x)."""
  exp, _ = load_experiment(["--config=experiments/moe.py:mixtral_8x7b", "--config.mesh.data=2"])
  m = exp.model
  experts = m.n_layers * m.moe.num_experts * 3 * m.d_model * m.ff_dim  # w_gate, w_up, w_down
  others = count_params(m).params - experts
  for stage in range(4):
    p = memory.plan_memory(exp, 128, stage)
    assert p.mesh["expert"] == 8 and p.mesh["fsdp"] == 8 and p.mesh["data"] == 2
    psi = experts / 64 + others / 8  # per data replica, by hand
    # lmx's fp32 formula (4 + 4 + 8 bytes): stage 0 16 psi, 1: 8 psi + 8 psi / 2, ...
    want = {0: 16 * psi, 1: 8 * psi + 8 * psi / 2, 2: 4 * psi + 12 * psi / 2,
            3: 16 * psi / 2}[stage]
    assert p.zero_lmx_bytes == pytest.approx(want, rel=1e-3)  # norms stay whole on fsdp
    got = p.param_bytes + p.grad_bytes + p.optimizer_bytes
    assert got == pytest.approx(p.zero_lmx_bytes, rel=1e-3)


def test_zero_stages_shard_over_data_as_the_formulas_say():
  exp = _llama_70b(["--config.mesh.data=4", "--config.mesh.fsdp=8"])
  plans = [memory.plan_memory(exp, 256, s) for s in range(4)]
  for p in plans:
    got = p.param_bytes + p.grad_bytes + p.optimizer_bytes
    # Equal up to the norm scales, which stay whole on `tensor` (0.013%).
    assert got == pytest.approx(p.zero_lmx_bytes, rel=2e-4)
  p0, p1, p2, p3 = plans
  assert p1.optimizer_bytes == pytest.approx(p0.optimizer_bytes / 4, rel=1e-4)
  assert p1.grad_bytes == p0.grad_bytes and p2.grad_bytes == pytest.approx(p0.grad_bytes / 4,
                                                                            rel=1e-4)
  assert p2.param_bytes == p0.param_bytes and p3.param_bytes == pytest.approx(
      p0.param_bytes / 4, rel=1e-4)
  # Activations do not depend on the ZeRO stage.
  assert len({p.activation_bytes for p in plans}) == 1


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_pipeline_follows_the_runtimes_schedule_table():
  """mesh.pipeline > 1 runs lmx.parallel.pipeline: stages hold 1/p of the layers, and the
  activations are the schedule's input / cotangent slots of one microbatch, not the layers'
  residuals of the whole batch."""
  base = dataclasses.replace(SMALL, data=dataclasses.replace(SMALL.data, batch_size=32))

  def plan(kind, mesh=dict(data=4, pipeline=2)):
    exp = _exp(base, mesh=mesh, grad_accum_steps=8, pipeline_schedule=kind)
    return memory.plan_memory(exp, 8)

  flat = memory.plan_memory(_exp(base, mesh=dict(data=4), grad_accum_steps=8), 4)
  gpipe, one_f_one_b = plan("gpipe"), plan("1f1b")
  layers = 4 * count_params(SMALL.model).per_layer * SMALL.model.n_layers
  assert flat.param_bytes - one_f_one_b.param_bytes == layers // 2  # storage over stages
  # Microbatch rows: 32 rows / 8 microbatches / 4 data replicas.
  assert one_f_one_b.rows_per_device == 32 // 8 // 4
  with pytest.raises(ConfigError, match="multiple of 32"):  # as the runtime says it
    memory.plan_memory(_exp(mesh=dict(data=4, pipeline=2), grad_accum_steps=8), 8)
  slots = {k: make_schedule(k, 2, 8) for k in ("gpipe", "1f1b")}
  extra = sum(slots["gpipe"].__dict__[f] - slots["1f1b"].__dict__[f] for f in ("slots",
                                                                                "g_slots"))
  assert extra == 6  # GPipe holds all 8 inputs, 1F1B 2 (docs/parallelism.md)
  x = one_f_one_b.rows_per_device * SMALL.data.seq_len * SMALL.model.d_model * 4
  assert gpipe.saved_activation_bytes - one_f_one_b.saved_activation_bytes == extra * x
  # fsdp stays with the partitioner inside a stage (one layer gathered at a time): no
  # whole-stage term. ZeRO-3's `data` split is a manual axis of the executor: the stage's
  # layers are gathered at its entry, plus their fp32 gradient before the reduce.
  fsdp = plan("1f1b", dict(data=1, fsdp=4, pipeline=2))
  assert fsdp.weight_residual_bytes < one_f_one_b.weight_residual_bytes
  zero3 = memory.plan_memory(_exp(base, mesh=dict(data=4, pipeline=2), grad_accum_steps=8,
                                  pipeline_schedule="1f1b", zero_stage=3), 8)
  assert zero3.weight_residual_bytes - one_f_one_b.weight_residual_bytes == 2 * layers // 2


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_rules_table_and_tensor_split_are_the_runtimes():
  # mesh.rules 'mlp=' keeps the MLP whole on `tensor`: only attention and vocab split.
  c = SMALL.model
  base = _exp(mesh=dict(data=4, tensor=2))
  no_mlp = _exp(mesh=dict(data=4, tensor=2, rules="default;mlp="))
  mlp = 4 * c.n_layers * 3 * c.d_model * c.ff_dim
  assert (memory.plan_memory(no_mlp, 8).param_bytes -
          memory.plan_memory(base, 8).param_bytes) == mlp // 2
  # Tensor parallelism halves the heads, MLP and vocab a device computes, not the rows.
  local = memory.local_model(c, make_rules(base.mesh), {"tensor": 2, "data": 4,
                                                               "fsdp": 1, "pipeline": 1,
                                                               "expert": 1})
  assert (local.n_heads, local.ff_dim, local.vocab_size) == (1, c.ff_dim // 2, 512)
  assert local.dim_per_head == c.dim_per_head
  # ... and the plan uses it: same rows per device, fewer activations, but more than half
  # (the residual stream stays whole on every tensor rank).
  flat, tp = memory.plan_memory(_exp(mesh=dict(data=4)), 4), memory.plan_memory(base, 8)
  assert tp.rows_per_device == flat.rows_per_device
  assert flat.saved_activation_bytes / 2 < tp.saved_activation_bytes < (
      flat.saved_activation_bytes)


def test_residuals_follow_remat():
  """remat 'full' keeps only each layer's input (B, T, D) per layer, so the saved activations
  shrink to n_layers * rows * T * D * itemsize plus the non-layer part."""
  none = memory.plan_memory(_exp(mesh=dict(data=8)), 8)
  full_model = dataclasses.replace(SMALL.model, remat="full")
  full = memory.plan_memory(dataclasses.replace(_exp(mesh=dict(data=8)), model=full_model), 8)
  m, rows, t = SMALL.model, none.rows_per_device, SMALL.data.seq_len
  per_layer = lambda r: memory.residual_bytes(  # noqa: E731
      dataclasses.replace(full_model, n_layers=2), r, t, 512, 0.0) - memory.residual_bytes(
          dataclasses.replace(full_model, n_layers=1), r, t, 512, 0.0)
  assert per_layer(rows) == rows * t * m.d_model * 4  # the layer input, float32
  assert full.saved_activation_bytes < none.saved_activation_bytes / 4
  assert full.working_bytes == none.working_bytes  # one layer recomputed = one layer saved


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_info_reports_plan_fields(capsys):
  from lmx.info import cli_main
  assert cli_main(["--config=experiments/gpt2_124m.py", "--devices", "8",
                   "--config.train.zero_stage=1", "--table"]) == 0
  out = capsys.readouterr().out.splitlines()
  import json
  info = json.loads(out[0])
  p = info["params"]
  assert info["param_bytes_per_device"] == 4 * p  # data=8 replicates the parameters
  assert info["optimizer_bytes_per_device"] == 8 * p // 8  # ZeRO-1 splits the moments
  assert info["memory_bytes_per_device"] == 4 * p + p
  assert info["step_bytes_per_device"] > info["memory_bytes_per_device"]
  assert info["zero_lmx_bytes_per_device"] == round(8 * p + 8 * p / 8)
  assert "ZeRO 0" in out[2] and "ZeRO 1*" in out[2] and "ZeRO 3" in out[2]
  assert math.isclose(info["memory_gib_per_device"], 5 * p / 2**30, abs_tol=1e-4)
