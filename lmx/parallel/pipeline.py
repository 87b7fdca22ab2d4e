"""Pipeline parallelism over the `pipeline` mesh axis: GPipe and 1F1B as schedule tables
run by one executor.

Stages are contiguous slices of the stacked layers (the `layers` parameter axis is split
over `pipeline`, so stage s holds layers [s*L/p, (s+1)*L/p)). The batch is cut into m
microbatches (`train.grad_accum_steps`). A schedule is data: for every tick and stage, an
op (idle, forward F(i), backward B(i)) on microbatch i. One `shard_map` runs a `lax.scan`
over the ticks; each tick every stage does its op, then activations move one stage forward
and cotangents one stage back with `ppermute`.

    tick:        0    1    2    3    4    5    6    7    8    9     (p=2, m=3, 1F1B)
    stage 0:     F0   .    F1   .    F2   B0   .    B1   .    B2
    stage 1:     .    .    .    B0   .    B1   .    B2   .    .   (last stage: F+loss+B)

Each stage keeps the *input* of every microbatch it has forwarded but not yet backwarded,
and its backward recomputes the stage's forward under `jax.vjp` (stage-level remat, as
in the GPipe paper). So activation memory is (live inputs) x (B/m, T, D) per stage: all m
for GPipe (every forward runs before any backward), at most p for 1F1B (a stage starts
backwarding microbatch i before forwarding i+p). The slot count comes from the table
(`Schedule.slots`) and shows up in the compiled step's memory (tests, docs).

The last stage runs final norm + LM head + loss and their backward as one op, so the
embedding and head stay outside the pipeline: the embedding's output for all microbatches
goes in, and d(loss)/d(embedding output) plus the head/norm gradients come out.

The shard_map is manual only over `pipeline` and the pure data axes (`manual_axes`);
`tensor` and `fsdp` stay with the SPMD partitioner (partial-manual shard_map). So inside a
stage the matmuls run on the rules' Megatron splits (column-parallel wq/wk/wv/w1/w3,
row-parallel wo/w2, an all-reduce of the (B/m, T, D) activations over `tensor` after each),
and fsdp-split weights are gathered one layer at a time, as without a pipeline; the batch
keeps its fsdp split. The last stage's LM head stays split over the vocabulary.

NOTE: weights split over a *manual* axis -- ZeRO-3's `data` split -- are gathered for the
whole stage at the shard_map's entry, and their gradient is psum'd whole before it is
re-split. The body sets no sharding constraints (`use_mesh(None)`): the partitioner
derives the activations' tensor layout from the weights, and the `sequence_parallel` rule
set has no effect inside a stage.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmx.config import ConfigError

IDLE, FWD, BWD = 0, 1, 2
SCHEDULES = ("gpipe", "1f1b")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A static pipeline schedule for p stages and m microbatches; arrays are (ticks, p)."""
  kind: str
  stages: int
  microbatches: int
  op: np.ndarray  # IDLE / FWD / BWD
  mb: np.ndarray  # microbatch of the op (0 where idle)
  arrive_x: np.ndarray  # microbatch whose activation arrives at the tick's start, or -1
  arrive_g: np.ndarray  # microbatch whose cotangent arrives, or -1
  x_slot: np.ndarray  # (p, m) buffer slot of microbatch i's stage input
  g_slot: np.ndarray  # (p, m) buffer slot of microbatch i's incoming cotangent
  slots: int  # input slots per stage (the activation memory, in microbatch inputs)
  g_slots: int

  @property
  def ticks(self) -> int:
    return self.op.shape[0]

  def bubble(self, fwd_cost: float = 1.0, bwd_cost: float = 3.0) -> float:
    """Idle share of stage time in lockstep: a tick lasts as long as its slowest op. Every
    B recomputes its stage's forward (B = 1 + 2 forward units); the last stage's B also
    stands in for its F, so its work is charged as fwd + bwd."""
    cost = np.where(self.op == FWD, fwd_cost, np.where(self.op == BWD, bwd_cost, 0.0))
    tick_time = cost.max(axis=1)
    work = cost.sum() + fwd_cost * self.microbatches  # the last stage's folded-in F
    return float(1.0 - work / (tick_time.sum() * self.stages))


def _allocate(intervals: list[tuple[int, int, int]], m: int) -> tuple[np.ndarray, int]:
  """Buffer slots for (start, end, microbatch) lifetimes: lowest free slot at each start."""
  slot = np.zeros(m, np.int32)
  free_at: list[int] = []  # slot -> tick after which it is free
  for start, end, i in sorted(intervals):
    for k, t in enumerate(free_at):
      if t < start:
        free_at[k], slot[i] = end, k
        break
    else:
      free_at.append(end)
      slot[i] = len(free_at) - 1
  return slot, max(len(free_at), 1)


def make_schedule(kind: str, p: int, m: int) -> Schedule:
  """The tick of every op, in lockstep (every stage runs one op per tick, then the
  ppermutes): a tick lasts as long as its slowest op, so ticks are kept uniform.

  gpipe: a forward phase (F(s, i) at tick i + s) then a backward phase (B(s, i) at
    T + i + (p - 1 - s), T = m + p - 1): 2(m + p - 1) ticks, bubble (p - 1)/(m + p - 1),
    every stage holds all m inputs at the turn.
  1f1b: ticks alternate F and B. F(s, i) at F-tick i + s, B(s, i) at B-tick
    i + 2(p - 1) - s: a stage backwards microbatch i before forwarding i + 2(p - 1 - s) + 1,
    so it holds O(p) inputs whatever m is (`Schedule.slots`: 6 at p = 4 for any m >= 6).
    2(m + 2p - 2) ticks, but the ramp's B-ticks and the drain's F-ticks have no op on any
    stage and cost only an empty ppermute, so the idle share equals GPipe's.
  The last stage has no F: its B runs forward, loss and backward together.
  """
  if kind not in SCHEDULES:
    raise ValueError(f"pipeline schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
  done: dict[tuple[int, int, int], int] = {}  # (op, stage, mb) -> tick
  for s in range(p):
    for i in range(m):
      if kind == "gpipe":
        if s < p - 1:
          done[(FWD, s, i)] = i + s
        done[(BWD, s, i)] = (m + p - 1) + i + (p - 1 - s)
      else:
        if s < p - 1:
          done[(FWD, s, i)] = 2 * (i + s)
        done[(BWD, s, i)] = 2 * (i + 2 * (p - 1) - s) + 1
  ticks = max(done.values()) + 1
  op_t = np.zeros((ticks, p), np.int32)
  mb_t = np.zeros((ticks, p), np.int32)
  ax = np.full((ticks, p), -1, np.int32)
  ag = np.full((ticks, p), -1, np.int32)
  for (op, s, i), t in done.items():
    op_t[t, s], mb_t[t, s] = op, i
    if op == FWD and s + 1 < p and t + 1 < ticks:
      ax[t + 1, s + 1] = i
    if op == BWD and s > 0 and t + 1 < ticks:
      ag[t + 1, s - 1] = i
  # Stage 0 reads its inputs from the embedded batch; stage s > 0 keeps x_i from its
  # arrival until B(s, i), and a cotangent from its arrival until B(s, i).
  x_slot, g_slot = np.zeros((p, m), np.int32), np.zeros((p, m), np.int32)
  slots = g_slots = 1
  for s in range(p):
    if s > 0:
      xs = [(done[(FWD, s - 1, i)] + 1, done[(BWD, s, i)], i) for i in range(m)]
      x_slot[s], n = _allocate(xs, m)
      slots = max(slots, n)
    if s < p - 1:
      gs = [(done[(BWD, s + 1, i)] + 1, done[(BWD, s, i)], i) for i in range(m)]
      g_slot[s], n = _allocate(gs, m)
      g_slots = max(g_slots, n)
  return Schedule(kind, p, m, op_t, mb_t, ax, ag, x_slot, g_slot, slots, g_slots)


def _batch_axes(mesh, rules) -> tuple[str, ...]:
  sizes = dict(mesh.shape)
  table = dict(rules)
  return tuple(a for a in table["batch"] if sizes.get(a, 1) > 1 and a != "pipeline")


def manual_axes(mesh, rules) -> tuple[str, ...]:
  """The mesh axes the executor handles by hand: `pipeline` (ppermute, axis_index) and the
  pure data axes the batch is split over (the body psums their gradients). `tensor` and
  `fsdp` stay with the SPMD partitioner (partial-manual shard_map), so inside a stage the
  matmuls run on tensor-split weights and fsdp shards are gathered one layer at a time,
  as outside the pipeline; the batch keeps its fsdp split as an auto-axis sharding."""
  return ("pipeline",) + tuple(a for a in _batch_axes(mesh, rules) if a != "fsdp")


def pipeline_value_and_grad(model_parts, params, batch, scale, *, kind: str, microbatches: int,
                            mesh, rules, z_loss: float, chunk_tokens: int):
  """Loss sums and gradients of the LM objective for one batch, pipelined.

  model_parts: `pipeline_parts(graphdef, rest)`; params: the full nnx.State of params;
  batch: (B, T) arrays; scale: the factor on the summed loss (loss scale / tokens).
  Returns ((ce_sum, z_sum, n_tokens), grads) with grads shaped like params.
  """
  from lmx.parallel.mesh import use_mesh
  from lmx.train.loss import chunked_lm_loss, lm_loss
  from lmx.model.transformer import head_logits

  graphdef, rest, block_gd, norm_gd, remat = model_parts
  p = dict(mesh.shape)["pipeline"]
  m = microbatches
  sched = make_schedule(kind, p, m)
  layers = params["layers"]["block"]
  others = nnx.State({k: v for k, v in params.items() if k != "layers"})

  def pre(others):
    """Everything before the stack: (x (B, T, D), head weight (D, V), final-norm state)."""
    full = nnx.State({**others, "layers": params["layers"]})
    model = nnx.merge(graphdef, full, rest) if rest is not None else nnx.merge(graphdef, full)
    x = model.embed_inputs(batch["inputs"], batch["positions"])
    return x, model.head_weight(), nnx.state(model.final_norm)

  (x, head_w, norm_state), pre_vjp = jax.vjp(pre, others)

  def split(a):  # (B, ...) -> (m, B/m, ...): microbatch i takes rows i, i+m, ...
    return jnp.swapaxes(a.reshape(a.shape[0] // m, m, *a.shape[1:]), 0, 1)

  def unsplit(a):
    return jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:])

  baxes = _batch_axes(mesh, rules)
  n_data = math.prod(dict(mesh.shape)[a] for a in baxes)
  rows = x.shape[0]
  if rows % m or (rows // m) % n_data:
    raise ConfigError(
        f"Invalid config: the pipeline cuts the global batch of {rows} rows into "
        f"train.grad_accum_steps={m} microbatches, each split over the {n_data} data-parallel "
        f"devices ({'x'.join(baxes) or 'none'}); data.batch_size must be a multiple of "
        f"{m * n_data}.")
  xs = split(x)
  aux = {k: split(batch[k]) for k in ("positions", "segment_ids", "targets", "loss_mask")}
  daxes = manual_axes(mesh, rules)[1:]  # the data axes the body splits the batch over
  bspec = P(None, daxes if daxes else None)
  tables = tuple(jnp.asarray(a) for a in (sched.op, sched.mb, sched.arrive_x, sched.arrive_g))
  x_slot, g_slot = jnp.asarray(sched.x_slot), jnp.asarray(sched.g_slot)

  def stage_fwd(lp, xin, a):
    return run_layers(block_gd, lp, xin, a["positions"], a["segment_ids"], remat=remat)

  def last_loss(lp, ns, hw, xin, a):
    h = nnx.merge(norm_gd, ns)(stage_fwd(lp, xin, a))
    if chunk_tokens:
      _, s = chunked_lm_loss(h, hw, a["targets"], a["loss_mask"], z_loss, chunk_tokens)
    else:
      _, s = lm_loss(head_logits(h, hw), a["targets"], a["loss_mask"], z_loss)
    return (s["ce_sum"] + s["z_sum"]) * scale, (s["ce_sum"], s["z_sum"], s["n_tokens"])

  def body(lp, ns, hw, xs, aux, tables, x_slot, g_slot):
    s = jax.lax.axis_index("pipeline")
    is_last = s == p - 1
    bm = xs.shape[1:]
    zeros_x = jnp.zeros(bm, xs.dtype)
    f32 = lambda t: jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), t)
    carry0 = dict(
        in_buf=jnp.zeros((sched.slots, *bm), xs.dtype),
        g_buf=jnp.zeros((sched.g_slots, *bm), xs.dtype),
        d_lp=f32(lp), d_ns=f32(ns), d_hw=jnp.zeros(hw.shape, jnp.float32),
        dx=jnp.zeros(xs.shape, jnp.float32),
        sums=jnp.zeros((3,), jnp.float32), recv_x=zeros_x, recv_g=zeros_x)

    def mb_aux(i):
      return {k: v[i] for k, v in aux.items()}

    def tick(c, row):
      op, mb, ax, ag = (r[s] for r in row)
      # Store what arrived: activations in their input slot, cotangents in theirs.
      xi = x_slot[s, jnp.maximum(ax, 0)]
      c["in_buf"] = c["in_buf"].at[xi].set(jnp.where(ax >= 0, c["recv_x"], c["in_buf"][xi]))
      gi = g_slot[s, jnp.maximum(ag, 0)]
      c["g_buf"] = c["g_buf"].at[gi].set(jnp.where(ag >= 0, c["recv_g"], c["g_buf"][gi]))
      slot = x_slot[s, mb]

      def idle(c):
        return c, zeros_x, zeros_x

      def fwd(c):
        xin = jnp.where(s == 0, xs[mb], c["in_buf"][slot])
        return c, stage_fwd(lp, xin, mb_aux(mb)).astype(xs.dtype), zeros_x

      def bwd(c):
        xin = jnp.where(s == 0, xs[mb], c["in_buf"][slot])
        a = mb_aux(mb)

        def last(c):
          _, vjp, sums = jax.vjp(lambda *z: last_loss(*z, a), lp, ns, hw, xin, has_aux=True)
          d_lp, d_ns, d_hw, d_x = vjp(jnp.float32(1.0))
          c = dict(c, d_ns=jax.tree.map(jnp.add, c["d_ns"], d_ns),
                   d_hw=c["d_hw"] + d_hw.astype(jnp.float32),
                   sums=c["sums"] + jnp.stack([x.astype(jnp.float32) for x in sums]))
          return c, d_lp, d_x

        def middle(c):
          _, vjp = jax.vjp(lambda lp_, x_: stage_fwd(lp_, x_, a), lp, xin)
          d_lp, d_x = vjp(c["g_buf"][g_slot[s, mb]])
          return c, d_lp, d_x

        c, d_lp, d_x = jax.lax.cond(is_last, last, middle, c)
        c = dict(c, d_lp=jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), c["d_lp"],
                                      d_lp),
                 dx=c["dx"].at[mb].set(jnp.where(s == 0, d_x.astype(jnp.float32), c["dx"][mb])))
        return c, zeros_x, d_x.astype(xs.dtype)

      c, send_x, send_g = jax.lax.switch(op, (idle, fwd, bwd), c)
      fwd_perm = [(i, i + 1) for i in range(p - 1)]
      bwd_perm = [(i + 1, i) for i in range(p - 1)]
      c["recv_x"] = jax.lax.ppermute(send_x, "pipeline", fwd_perm)
      c["recv_g"] = jax.lax.ppermute(send_g, "pipeline", bwd_perm)
      return c, None

    c, _ = jax.lax.scan(tick, carry0, tables)  # one row of every table per tick
    everything = ("pipeline",) + daxes
    return (jax.lax.psum(c["sums"], everything),
            jax.lax.psum(c["d_lp"], daxes) if daxes else c["d_lp"],
            jax.lax.psum(c["d_ns"], everything), jax.lax.psum(c["d_hw"], everything),
            jax.lax.psum(c["dx"], "pipeline"))

  smap = jax.shard_map(
      body, mesh=mesh,
      in_specs=(P("pipeline"), P(), P(), bspec, bspec, P(), P(), P()),
      out_specs=(P(), P("pipeline"), P(), P(), bspec),
      axis_names=frozenset(manual_axes(mesh, rules)), check_vma=False)
  with use_mesh(None):  # no sharding constraints inside the manual region
    sums, d_layers, d_ns, d_hw, dxs = smap(layers, norm_state, head_w, xs, aux, tables,
                                           x_slot, g_slot)
  (d_others,) = pre_vjp((unsplit(dxs).astype(x.dtype), d_hw.astype(head_w.dtype),
                         jax.tree.map(lambda g, v: g.astype(v.dtype), d_ns, norm_state)))
  # Reassemble the gradient in the parameters' own tree (node types included).
  found = {**_by_path(d_others), **_by_path(d_layers, ("layers", "block"))}
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  grads = jax.tree.unflatten(treedef, [found[_path_key(p)] for p, _ in paths])
  return (sums[0], sums[1], sums[2]), grads


def _path_key(path, prefix=()) -> tuple[str, ...]:
  return prefix + tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _by_path(tree, prefix=()) -> dict:
  return {_path_key(p, prefix): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def pipeline_parts(graphdef, rest, params):
  """Static pieces the executor needs: the model's graphdef and non-param state, the
  per-layer Block graphdef (for run_layers), the final norm's graphdef, the remat mode."""
  full = nnx.merge(graphdef, params, rest) if rest is not None else nnx.merge(graphdef, params)
  block_gd = nnx.split(full.layers.block)[0]
  norm_gd = nnx.split(full.final_norm)[0]
  return graphdef, rest, block_gd, norm_gd, full.cfg.remat


from lmx.model.stack import run_layers  # noqa: E402  (after the definitions above)
