"""The memory planner: bytes per device of one training step, from the runtime's own layout.

Shape before memory: the TrainState is planned exactly as the trainer plans it
(`lmx.train.state.plan_train_state`: `jax.eval_shape`, the rules table `mesh.rules`, ZeRO
`train.zero_stage`, `train.optimizer_memory`) on a `jax.sharding.AbstractMesh` of the
requested size, so a 70B model on 256 devices plans on a laptop in seconds, allocating nothing.

Per device (every figure is a per-device byte count):

  params      fp32 master parameters: sum over leaves of shard shape x itemsize under
              `lmx.parallel.zero.train_state_shardings` -- exact.
  optimizer   Adam's two fp32 moments, the same sum -- exact. With optimizer_memory=
              'pinned_host' they sit in host memory between steps, but the update runs on the
              device (`lmx.parallel.zero.to_device`), so the step's peak still holds them.
  counters    step, rng, loss scale, Adam / schedule counts (replicated scalars) -- exact.
  batch       the five (B, T) int32 / float32 input arrays over the batch axes -- exact.
  grads       fp32 gradients (of fp32 parameters) in the parameters' layout (ZeRO 0-1: the
              all-reduce leaves every replica the full sum), or with `data` added (ZeRO 2-3:
              reduce-scattered). All are live at once: the global-norm clip needs every
              gradient before any update. Layout exact; liveness an assumption.
  grad accum  with grad_accum_steps > 1 (and no pipeline), a second set in the same layout:
              the running sum beside the microbatch's gradient.
  activations an estimate, in three parts, all from shape-only traces of the real loss
              (`lmx.train.step.batch_loss`, remat policy and loss chunking included) on this
              device's slice of the work -- its microbatch rows (B / grad_accum_steps over the
              batch axes of the rules table) and, under tensor parallelism, its share of the
              heads, kv heads, MLP width and vocabulary (Megatron-style; the residual stream
              stays whole):
                saved     the residuals `jax.vjp` keeps for the backward pass that grow with
                          the batch: per layer, times n_layers (the scan stacks them), plus
                          the embedding / final norm / LM head's.
                weights   residuals that do not grow with the batch: the per-layer weight
                          copies that `project`'s VJP keeps (laid out like the parameters,
                          so split as they are beyond `tensor`), and the LM head's fp32
                          gradient that the chunked loss forms in the forward pass.
                working   one layer's residuals as saved without remat: about what one
                          layer's backward makes (its cotangents), and what a remat layer
                          recomputes before its backward.
              Traced at 1 and 2 layers and at 1x and 2x the rows, so a 70B layer is traced,
              never an 80-layer model. The trace runs on this machine's backend: on CPU
              attention_impl 'auto' is the blocked kernel, whose residuals differ from an
              accelerator's (plan with --config.model.attention_impl=jax for those).
  total       the sum: the planned peak of one step.

Measured against XLA's compiled step on 8 CPU devices (docs/scaling.md,
`benchmarks/memory_plan.py`): state and batch equal the compiled arguments byte for byte;
the total is within 7.5% of `memory_analysis()` (argument + output - alias + temp) at ~110M
parameters in fp32 over data / ZeRO / fsdp / tensor (-7.2% .. +0.9%), within 15% on small
models (tests/test_memory_plan.py). It is low where XLA:CPU departs from the traced
program: bf16 residuals kept in float32. (The train step skips a bad step with a branch,
so XLA no longer copies the donated Adam moments, and nothing is counted for that.)

Pipeline (mesh.pipeline > 1, `lmx.parallel.pipeline`): the grad_accum_steps microbatches
flow through the stages, so activations follow the runtime's schedule table instead: per
stage, `Schedule.slots` stage inputs and `g_slots` cotangents of one microbatch (B / m over
the data axes, T, D), two ppermute buffers, the embedded batch of all m microbatches and its
fp32 gradient, and one microbatch's residuals of the stage's L/p layers (saved) -- the stage
recomputes them in its backward, for the stage's tensor share of the heads, MLP width and
vocabulary (`tensor` and `fsdp` stay with the partitioner inside a stage, fsdp gathering one
layer at a time); the LM head's vocabulary share and its fp32 gradient (weights); and, only
where the layers are also split over a manual data axis (ZeRO-3's `data`), the stage's
layers gathered at the executor's entry plus their fp32 gradient.

ZeRO (Rajbhandari et al. 2020), bytes per device for Psi parameters over N data replicas,
mixed-precision Adam (fp16 params 2, fp16 grads 2, fp32 master + 2 moments K = 12):
    stage 0: 16 Psi   1: 4 Psi + 12 Psi/N   2: 2 Psi + 14 Psi/N   3: 16 Psi/N
lmx keeps fp32 params (they are the master copy; compute casts at use) and fp32 grads:
params 4 Psi, grads 4 Psi, moments 8 Psi -- also 16 Psi, split differently:
    stage 0: 16 Psi   1: 8 Psi + 8 Psi/N    2: 4 Psi + 12 Psi/N   3: 16 Psi/N
Here Psi is per model-parallel shard (params / (fsdp * tensor * pipeline): `fsdp` always
shards all three) and N the `data` axis size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from lmx.config import MESH_AXES, ConfigError, Experiment, ModelConfig
from lmx.parallel.mesh import make_rules, mesh_axis_sizes, use_mesh
from lmx.parallel.rules import logical_to_spec
from lmx.parallel.zero import train_state_shardings
from lmx.scaling.accounting import count_params

# The batch the train step takes: name -> dtype, each (B, T) (lmx.data.pipeline).
BATCH_ARRAYS = (("inputs", jnp.int32), ("targets", jnp.int32), ("positions", jnp.int32),
                ("segment_ids", jnp.int32), ("loss_mask", jnp.float32))


def zero_formulas(psi: float, n: int) -> dict[str, dict[int, float]]:
  """Params + grads + optimizer bytes per device, per ZeRO stage, for Psi parameters over N
  data replicas: the paper's mixed-precision Adam and lmx's fp32 variant (module docstring)."""
  return {
      "paper": {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n,
                3: 16 * psi / n},
      "lmx": {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n,
              3: 16 * psi / n},
  }


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one training step (see the module docstring for each field)."""

  devices: int
  mesh: dict[str, int]  # mesh axis -> size (ici * dcn)
  zero_stage: int
  optimizer_memory: str  # '' (device) or 'pinned_host'
  params: int  # parameter count
  param_bytes: int
  optimizer_bytes: int
  counter_bytes: int
  grad_bytes: int
  grad_accum_bytes: int  # the running gradient sum when grad_accum_steps > 1, else 0
  batch_bytes: int
  saved_activation_bytes: int
  weight_residual_bytes: int
  working_bytes: int
  rows_per_device: int  # microbatch rows this device computes
  zero_paper_bytes: float  # the paper's params + grads + optimizer for this stage
  zero_lmx_bytes: float  # lmx's fp32 variant of the same

  @property
  def state_bytes(self) -> int:
    """Parameters + optimizer moments: the train state between steps."""
    return self.param_bytes + self.optimizer_bytes

  @property
  def activation_bytes(self) -> int:
    return self.saved_activation_bytes + self.weight_residual_bytes + self.working_bytes

  @property
  def total_bytes(self) -> int:
    return (self.state_bytes + self.counter_bytes + self.grad_bytes + self.grad_accum_bytes +
            self.batch_bytes + self.activation_bytes)


def abstract_mesh(exp: Experiment, n_devices: int) -> AbstractMesh:
  """The experiment's mesh on `n_devices` devices, without devices (axis size = ici * dcn)."""
  ici, dcn = mesh_axis_sizes(exp.mesh, n_devices)
  return AbstractMesh(tuple(i * d for i, d in zip(ici, dcn)), MESH_AXES)


def plan_state(exp: Experiment, mesh, zero_stage: int | None = None):
  """(abstract TrainState, its shardings) exactly as the trainer plans them (shape-only)."""
  from lmx.model import Transformer  # the model and trainer only when planning
  from lmx.train.optimizer import make_optimizer
  from lmx.peft import peft_finish
  from lmx.train.state import plan_train_state
  train = exp.train if zero_stage is None else dataclasses.replace(exp.train,
                                                                  zero_stage=zero_stage)
  with use_mesh(mesh, make_rules(exp.mesh)):
    _, abstract, shardings, _ = plan_train_state(
        lambda rngs: Transformer(exp.model, rngs=rngs), make_optimizer(train), train,
        exp.seed, mesh, finish=peft_finish(exp))
  return abstract[0], shardings[0]


def shard_bytes(tree, shardings) -> int:
  """Sum over leaves of (per-device shard shape) x itemsize; `shardings` mirrors `tree`."""
  leaves = jax.tree.leaves(tree)
  shs = jax.tree.leaves(shardings)
  assert len(leaves) == len(shs), (len(leaves), len(shs))
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(leaves, shs))


def _split(names, rules, sizes) -> list[int]:
  """Per dimension, how many ways the logical `names` are split on this mesh."""
  spec = tuple(logical_to_spec(names, rules, sizes)) + (None,) * len(names)
  out = []
  for entry in spec[:len(names)]:
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    out.append(math.prod(sizes[a] for a in axes))
  return out


def local_model(model: ModelConfig, rules, sizes) -> ModelConfig:
  """The slice of the model one device computes under tensor parallelism: heads, kv heads,
  MLP width and vocabulary divided as the activations' logical names are split."""
  act = ("batch", "seq")
  heads = _split(act + ("heads", "head_dim"), rules, sizes)[2]
  kv = _split(act + ("kv_heads", "head_dim"), rules, sizes)[2]
  mlp = _split(act + ("mlp",), rules, sizes)[2]
  vocab = _split(act + ("vocab",), rules, sizes)[2]
  try:
    return dataclasses.replace(
        model, n_heads=model.n_heads // heads, n_kv_heads=model.kv_heads // kv,
        head_dim=model.dim_per_head, d_ff=model.ff_dim // mlp,
        vocab_size=model.vocab_size // vocab).validate()
  except ValueError:  # a split the model does not divide by: plan the whole width
    return model


@functools.lru_cache(maxsize=128)
def residual_bytes(model: ModelConfig, rows: int, seq: int, chunk_tokens: int,
                   z_loss: float) -> int:
  """Bytes of the residuals `jax.vjp` keeps for the backward pass of the train loss
  (`batch_loss`) w.r.t. the parameters, on a (rows, seq) batch; shape-only.

  Residuals that are the parameters themselves are not counted (they are already in
  memory); everything computed -- activations, stacked per-layer copies -- is.
  """
  from lmx.model import Transformer
  from lmx.train.step import batch_loss
  abstract = nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  batch = {k: jax.ShapeDtypeStruct((rows, seq), dt) for k, dt in BATCH_ARRAYS}

  def residuals(p, b):
    return jax.vjp(lambda q: batch_loss(graphdef, rest, q, b, z_loss, chunk_tokens)[0], p)[1]

  jaxpr = jax.make_jaxpr(residuals)(params, batch).jaxpr
  inputs = set(jaxpr.invars)
  seen, total = set(), 0
  for v in jaxpr.outvars:
    if isinstance(v, jax.extend.core.Literal) or v in inputs or v in seen:  # forwarded inputs
      continue
    seen.add(v)
    total += math.prod(v.aval.shape) * jnp.dtype(v.aval.dtype).itemsize
  return total


def activation_bytes(model: ModelConfig, rows: int, seq: int, chunk_tokens: int,
                     z_loss: float, weight_split: float) -> tuple[int, int, int]:
  """(saved, weights, working) activation bytes for `rows` rows of `seq` tokens (module
  docstring). `weight_split`: how much further than `model` the parameters are split."""
  # The traces take 1 and 2 units of layers: one layer, or with MoE every n layers a group
  # of n (n - 1 dense + 1 MoE; lmx.model.stack.MoEGroup), whose per-unit figures scale.
  unit = model.moe.every_n_layers if model.moe.num_experts else 1

  def r(layers, n, remat=model.remat):
    m = dataclasses.replace(model, n_layers=layers * unit, remat=remat)
    return residual_bytes(m, n, seq, chunk_tokens, z_loss)

  # r(l, n) = n * (a_other + l * a_layer) + (w_other + l * w_layer): solve from four traces.
  r11, r21, r12, r22 = r(1, rows), r(2, rows), r(1, 2 * rows), r(2, 2 * rows)
  a_layer = ((r22 - r12) - (r21 - r11)) / rows
  a_other = (r12 - r11) / rows - a_layer
  w_layer = (r21 - r11) - rows * a_layer
  w_other = r11 - rows * (a_other + a_layer) - w_layer
  layers = model.n_layers // unit
  saved = rows * (a_other + layers * a_layer)
  weights = layers * w_layer / weight_split + w_other
  # One layer's residuals as saved without remat: what a remat layer recomputes before its
  # backward, and about the cotangents any layer's backward makes.
  working = r21 - r11 if model.remat == "none" else r(2, rows, "none") - r(1, rows, "none")
  return round(saved), round(weights), round(working)


def pipeline_activation_bytes(exp: Experiment, sizes, rules,
                              layer_split: float) -> tuple[int, int, int, int]:
  """(saved, weights, working, microbatch rows) per device of the pipelined step (module
  docstring), from the runtime's own schedule table. `layer_split`: how many ways a stage's
  layers are split beyond `pipeline` (fsdp, tensor, ZeRO-3 data)."""
  from lmx.parallel.pipeline import make_schedule
  model, p, m = exp.model, sizes["pipeline"], exp.train.grad_accum_steps
  schedule = make_schedule(exp.train.pipeline_schedule, p, m)
  n_data = math.prod(sizes[a] for a in dict(rules)["batch"] if a != "pipeline")
  if exp.data.batch_size % (m * n_data):  # the runtime's own check, before anything runs
    raise ConfigError(f"Invalid config: the pipeline cuts the global batch of "
                      f"{exp.data.batch_size} rows into train.grad_accum_steps={m} "
                      f"microbatches, each split over {n_data} data-parallel devices; "
                      f"data.batch_size must be a multiple of {m * n_data}.")
  rows = exp.data.batch_size // (m * n_data)
  seq, d = exp.data.seq_len, model.d_model
  x = rows * seq * d * jnp.dtype(model.dtype).itemsize  # one microbatch's (B/m, T, D)
  # A stage computes its tensor share (the partitioner keeps `tensor` and `fsdp` inside).
  stage = local_model(dataclasses.replace(model, n_layers=model.n_layers // p), rules, sizes)
  saved, weights, working = activation_bytes(stage, rows, seq, exp.train.loss_chunk_tokens,
                                             exp.train.z_loss, sizes["fsdp"])
  saved += (schedule.slots + schedule.g_slots + 2) * x + m * x + m * x * 4 // jnp.dtype(
      model.dtype).itemsize
  head = d * stage.vocab_size * (jnp.dtype(model.dtype).itemsize + 4)
  weights += head
  stage_bytes = 4 * count_params(stage).per_layer * stage.n_layers / sizes["fsdp"]
  if layer_split * stage_bytes > 1.01 * 4 * count_params(model).per_layer * stage.n_layers:
    # Split further over a manual axis (ZeRO-3's `data`): gathered for the whole stage at
    # the executor's entry, and their gradient before the reduce.
    weights += round(2 * stage_bytes)
  return saved, weights, working, rows


def plan_memory(exp: Experiment, n_devices: int, zero_stage: int | None = None) -> MemoryPlan:
  """The per-device memory plan of `exp`'s train step on `n_devices` (shape-only)."""
  stage = exp.train.zero_stage if zero_stage is None else zero_stage
  mesh = abstract_mesh(exp, n_devices)
  sizes = dict(mesh.shape)
  rules = make_rules(exp.mesh)
  state, sh = plan_state(exp, mesh, stage)
  param_bytes = shard_bytes(state.params, sh.params)
  # The moments; Adam's and the schedule's scalar counts go with the other counters.
  optimizer_bytes = sum(shard_bytes(x, s) for x, s in zip(jax.tree.leaves(state.opt_state),
                                                          jax.tree.leaves(sh.opt_state))
                        if x.ndim)
  counter_bytes = shard_bytes(state, sh) - param_bytes - optimizer_bytes
  # Gradients: fp32, laid out as constrain_grads lays them out (the stage-3 parameter
  # layout is the parameters' plus `data`, which is what ZeRO 2-3 reduce-scatter to).
  grad_sh = train_state_shardings(state, mesh, 3 if stage >= 2 else 0, rules).params
  grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), state.params)
  k = exp.train.grad_accum_steps
  grad_bytes = shard_bytes(grads, grad_sh)

  batch, seq = exp.data.batch_size, exp.data.seq_len
  row_split, seq_split = _split(("batch", "seq"), rules, sizes)
  batch_bytes = sum(-(-batch // row_split) * -(-seq // seq_split) * jnp.dtype(dt).itemsize
                    for _, dt in BATCH_ARRAYS)
  if sizes["pipeline"] > 1:
    stacked = shard_bytes(state.params["layers"], sh.params["layers"])
    layer_split = 4 * count_params(exp.model).per_layer * exp.model.n_layers / (
        sizes["pipeline"] * stacked)
    saved, weights, working, rows = pipeline_activation_bytes(exp, sizes, rules, layer_split)
  else:
    rows = max(1, -(-batch // (k * row_split)))
    local = local_model(exp.model, rules, sizes)
    weight_split = 4 * count_params(local).params / max(param_bytes, 1)
    saved, weights, working = activation_bytes(local, rows, seq, exp.train.loss_chunk_tokens,
                                               exp.train.z_loss, max(weight_split, 1.0))

  psi = count_params(exp.model).params
  # The formulas' Psi is what one data replica holds: the parameters split by the model
  # axes only (fsdp, tensor, pipeline, and expert for the experts' weights, which a dense
  # fsdp x tensor x pipeline quotient would miss), i.e. the stage-0 layout's shards.
  stage0 = train_state_shardings(state, mesh, 0, rules).params
  psi_local = sum(math.prod(sh0.shard_shape(x.shape))
                  for x, sh0 in zip(jax.tree.leaves(state.params), jax.tree.leaves(stage0)))
  formulas = zero_formulas(psi_local, sizes["data"])
  return MemoryPlan(
      devices=n_devices, mesh=sizes, zero_stage=stage,
      optimizer_memory=exp.train.optimizer_memory, params=psi, param_bytes=param_bytes,
      optimizer_bytes=optimizer_bytes, counter_bytes=counter_bytes, grad_bytes=grad_bytes,
      grad_accum_bytes=grad_bytes if k > 1 and sizes["pipeline"] == 1 else 0,
      batch_bytes=batch_bytes, saved_activation_bytes=saved, weight_residual_bytes=weights,
      working_bytes=working, rows_per_device=rows,
      zero_paper_bytes=formulas["paper"][stage], zero_lmx_bytes=formulas["lmx"][stage])


def compiled_step_memory(exp: Experiment, mesh) -> dict[str, int]:
  """XLA's figures for `exp`'s train step on a real `mesh`: built as the trainer builds it
  (lmx.train.loop), lowered with abstract inputs and compiled -- never run, nothing of the
  state allocated. Per device: `memory_analysis()`'s argument / output / alias / temp bytes,
  `total` = argument + output - alias + temp, and the state's and batch's argument shards
  under the shardings the compiled executable takes."""
  from lmx.model import Transformer
  from lmx.train.optimizer import make_optimizer
  from lmx.peft import peft_finish
  from lmx.train.state import plan_train_state
  from lmx.train.step import batch_sharding, jit_train_step, make_train_step
  cfg = exp.train
  optimizer = make_optimizer(cfg)
  with use_mesh(mesh, make_rules(exp.mesh)):
    graphdef, abstract, shardings, _ = plan_train_state(
        lambda rngs: Transformer(exp.model, rngs=rngs), optimizer, cfg, exp.seed, mesh,
        finish=peft_finish(exp))
    step = jit_train_step(make_train_step(graphdef, abstract[1], optimizer, cfg), abstract[0],
                          mesh, cfg)
    leaves, treedef = jax.tree.flatten(abstract[0])
    state = jax.tree.unflatten(treedef, [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        for x, s in zip(leaves, jax.tree.leaves(shardings[0]))])
    shape = (exp.data.batch_size, exp.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh))
             for k, dt in BATCH_ARRAYS}
    compiled = step.lower(state, batch).compile()
  ma = compiled.memory_analysis()
  in_state, in_batch = compiled.input_shardings[0]
  return {
      "argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
      "alias": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes,
      "total": (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes +
                ma.temp_size_in_bytes),
      "state_arguments": shard_bytes(leaves, in_state),
      "batch_arguments": shard_bytes(list(batch.values()),
                                     [in_batch[k] for k in batch]),
  }


def _gib(b: float) -> str:
  return f"{b / 2**30:,.2f}"


def format_table(plans: list[MemoryPlan], marked: int | None = None) -> str:
  """A GiB-per-device table, one column per plan (e.g. ZeRO stages 0-3 on one mesh)."""
  rows = [
      ("params (fp32)", lambda p: p.param_bytes),
      ("grads (fp32)", lambda p: p.grad_bytes),
      ("optimizer (2 fp32 moments)", lambda p: p.optimizer_bytes),
      ("  = params+grads+optimizer", lambda p: p.state_bytes + p.grad_bytes),
      ("  ZeRO paper (mixed prec., K=12)", lambda p: p.zero_paper_bytes),
      ("  lmx formula (fp32 4+4+8)", lambda p: p.zero_lmx_bytes),
      ("grad accumulator (accum > 1)", lambda p: p.grad_accum_bytes),
      ("batch", lambda p: p.batch_bytes),
      ("activations: saved (estimate)", lambda p: p.saved_activation_bytes),
      ("activations: weight copies", lambda p: p.weight_residual_bytes),
      ("activations: one layer working", lambda p: p.working_bytes),
      ("counters", lambda p: p.counter_bytes),
      ("total per device", lambda p: p.total_bytes),
  ]
  heads = [f"ZeRO {p.zero_stage}" + ("*" if p.zero_stage == marked else "") for p in plans]
  width = max(len(r[0]) for r in rows)
  out = [f"{'GiB per device':<{width}}  " + "  ".join(f"{h:>9}" for h in heads)]
  for name, get in rows:
    out.append(f"{name:<{width}}  " + "  ".join(f"{_gib(get(p)):>9}" for p in plans))
  return "\n".join(out)
