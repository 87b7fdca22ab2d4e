"""Mixture-of-Experts MLP: a router sends each token to `top_k` of `num_experts` gated MLPs.

Einsum letters: N tokens (B*T), D d_model, E experts, F one expert's hidden size, K top_k,
C capacity (tokens per expert), A = K*N assignments (token, expert) pairs.

    x (N, D) -> router logits (N, E) -> top-k experts and weights (N, K)
             -> assignments sorted by expert -> expert MLPs -> weighted sum (N, D)
             (+ shared experts on every token)

Router (`model.moe.router`):
  softmax: top-k of softmax(logits); the k weights are renormalized to sum to 1 when k > 1
    (Mixtral), kept as the raw probability when k = 1 (Switch: otherwise the router would
    get no gradient through the output).
  sigmoid: top-k of sigmoid(logits) + a per-expert bias that only steers the choice
    (DeepSeek-V3's auxiliary-loss-free balancing); weights are the chosen sigmoid scores,
    renormalized when k > 1. The bias is a parameter whose gradient is *defined* as
    (load share - 1/E) (a zero-valued term in the balance loss): Adam turns that into the
    paper's step of about lr * sign(overload), so no extra update rule is needed.

Dispatch (`model.moe.capacity_factor`):
  0 (dropless): the A assignments are sorted by expert and run through
    `jax.lax.ragged_dot` (a grouped matmul: rows [start_e, start_e + size_e) times expert
    e's weights), so nothing is dropped and no FLOPs go to padding slots.
  c > 0 (capacity): each expert takes at most C = ceil(c * N * K / E) assignments into an
    (E, C, D) buffer, first choices of every token before second choices, in token order,
    padding (segment 0) last; the rest are dropped (their share of the output is 0, the
    residual carries the token) and counted. With C large enough both paths are equal.

Statistics per MoE layer (over non-padding tokens), turned into the model's aux sums by
`aux_sums`: the switch load-balancing loss E * sum_e f_e P_e (f_e: share of assignments
to e, P_e: mean router probability of e; = 1 for uniform routing), the router z-loss
mean(logsumexp(logits)^2) (ST-MoE), assignments dropped, and the load per expert.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from lmx.config import ConfigError, ModelConfig
from lmx.model.layers import compute_dtype, normal, output_init_std, param, zeros
from lmx.parallel.mesh import active_mesh, constrain, mesh_sizes, spec_for, use_mesh

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "swiglu": jax.nn.silu,
                "geglu": jax.nn.gelu}


LOSS_NAMES = ("moe_balance_sum", "moe_router_z_sum")
METRIC_NAMES = ("moe_dropped_sum", "moe_load_cv_sum", "moe_load_max_sum", "moe_load_min_sum")


class MoEStat(nnx.Variable):
  """A scalar sum of the last forward pass (`LayerStack.moe_aux`); not a parameter."""


def expert_ff(cfg: ModelConfig) -> int:
  """One expert's hidden size F (`model.moe.d_ff`, default the dense `ff_dim`)."""
  return cfg.moe.d_ff or cfg.ff_dim


def capacity(n_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
  """Slots per expert: ceil(factor * N * K / E), at least 1 and at most N."""
  return max(1, min(n_tokens, math.ceil(factor * n_tokens * top_k / num_experts)))


def route(logits: jax.Array, top_k: int, kind: str = "softmax",
          bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Router logits float32 (N, E) -> (weights (N, K), experts int32 (N, K), probs (N, E)).

  `probs` is what the balance loss's P_e averages: the softmax, or for the sigmoid router
  the scores normalized per token. Ties go to the lower expert index (`jax.lax.top_k`).
  """
  if kind == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
    w, idx = jax.lax.top_k(probs, top_k)
  else:
    scores = jax.nn.sigmoid(logits)
    steer = scores if bias is None else scores + jax.lax.stop_gradient(bias)
    _, idx = jax.lax.top_k(steer, top_k)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  if top_k > 1:
    w = w / jnp.sum(w, axis=-1, keepdims=True)
  return w, idx.astype(jnp.int32), probs


def sort_assignments(idx: jax.Array, valid: jax.Array, num_experts: int):
  """The A = K*N assignments of `idx` (N, K) grouped by expert.

  Assignment a = r*N + t is token t's r-th choice (rank-major: all first choices come
  before any second choice). A stable sort by (expert, is_padding) keeps that order
  within an expert and puts padding last, which is the capacity path's priority.
  Returns (order (A,): assignment at each sorted position, group_sizes (E,),
  slot (A,): position of each sorted assignment within its expert).
  """
  n, k = idx.shape
  expert = idx.T.reshape(-1)  # (A,) rank-major
  pad = jnp.tile(~valid, k).astype(jnp.int32)
  order = jnp.argsort(expert * 2 + pad, stable=True)
  group_sizes = jnp.zeros((num_experts,), jnp.int32).at[expert].add(1)
  starts = jnp.cumsum(group_sizes) - group_sizes
  slot = jnp.arange(n * k, dtype=jnp.int32) - starts[expert[order]]
  return order, group_sizes, slot


class MoE(nnx.Module):
  """Routed experts (+ optional shared experts) in place of a Block's MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    from lmx.model.mlp import MLP
    m = cfg.moe
    self.cfg = cfg
    e, d, f = m.num_experts, cfg.d_model, expert_ff(cfg)
    init, out_init = normal(cfg.init_std), normal(output_init_std(cfg))
    self.router = param(rngs.params(), (d, e), ("embed", None), init)
    self.router_bias = param(rngs.params(), (e,), (None,), zeros) if m.router == "sigmoid" else None
    self.w_up = param(rngs.params(), (e, d, f), ("expert", "embed", "mlp"), init)
    self.w_gate = (param(rngs.params(), (e, d, f), ("expert", "embed", "mlp"), init)
                   if cfg.gated else None)
    self.w_down = param(rngs.params(), (e, f, d), ("expert", "mlp", "embed"), out_init)
    # The shared experts are one dense MLP of width shared_experts * F (the same function
    # as their sum), so they reuse the dense MLP (and its PEFT hooks).
    self.shared = (MLP(dataclasses.replace(cfg, d_ff=m.shared_experts * f,
                                           moe=dataclasses.replace(m, num_experts=0)),
                       rngs=rngs) if m.shared_experts else None)

  def _w(self, p) -> jax.Array:
    return p[...].astype(compute_dtype(self.cfg))

  def _experts_ragged(self, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Sorted assignments xs (A, D) through their experts: (A, D). Grouped matmuls."""
    act = _ACTIVATIONS[self.cfg.mlp]
    h = jax.lax.ragged_dot(xs, self._w(self.w_up), group_sizes)  # (A, F)
    if self.w_gate is not None:
      h = act(jax.lax.ragged_dot(xs, self._w(self.w_gate), group_sizes)) * h
    else:
      h = act(h)
    return jax.lax.ragged_dot(h, self._w(self.w_down), group_sizes)  # (A, D)

  def _experts_dense(self, buf: jax.Array) -> jax.Array:
    """An (E, C, D) capacity buffer through the experts: (E, C, D)."""
    act = _ACTIVATIONS[self.cfg.mlp]
    buf = constrain(buf, ("expert", None, "embed"))
    h = jnp.einsum("ECD,EDF->ECF", buf, self._w(self.w_up))
    if self.w_gate is not None:
      h = act(jnp.einsum("ECD,EDF->ECF", buf, self._w(self.w_gate))) * h
    else:
      h = act(h)
    return jnp.einsum("ECF,EFD->ECD", h, self._w(self.w_down))

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """(B, T, D) -> (B, T, D), dropless (what decoding uses: capacity would make a token's
    output depend on how many others share its step)."""
    return self.forward(x, None, dropless=True)[0]

  def forward(self, x: jax.Array, valid: jax.Array | None = None, *,
              dropless: bool | None = None) -> tuple[jax.Array, dict]:
    """x (B, T, D), valid bool (B, T) (False = padding, excluded from statistics and last
    in line for capacity) -> (y (B, T, D), this layer's statistics; see `layer_stats`)."""
    cfg, m = self.cfg, self.cfg.moe
    dropless = not m.capacity_factor if dropless is None else dropless
    mesh, rules = active_mesh()
    if mesh is not None and mesh_sizes(mesh).get("expert", 1) > 1:
      return self._forward_ep(x, valid, dropless, mesh, rules)
    b, t, d = x.shape
    n, e, k = b * t, m.num_experts, m.top_k
    xf = x.reshape(n, d)
    valid = jnp.ones((n,), bool) if valid is None else valid.reshape(n)
    logits = jnp.einsum("ND,DE->NE", xf, self._w(self.router),
                        preferred_element_type=jnp.float32)
    bias = None if self.router_bias is None else self.router_bias[...]
    w, idx, probs = route(logits, k, m.router, bias)
    order, group_sizes, slot = sort_assignments(idx, valid, e)
    token = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)[order]  # token of each sorted slot
    xs = xf[token]  # (A, D)
    if dropless:
      ys = self._experts_ragged(xs, group_sizes)
      dropped = jnp.zeros((), jnp.float32)
    else:
      c = capacity(n, k, e, m.capacity_factor)
      expert = jnp.repeat(jnp.arange(e, dtype=jnp.int32), group_sizes, total_repeat_length=n * k)
      keep = slot < c
      dest = jnp.where(keep, expert * c + slot, e * c)  # e * c: out of range, dropped
      buf = jnp.zeros((e * c, d), xs.dtype).at[dest].set(xs, mode="drop")
      out = self._experts_dense(buf.reshape(e, c, d)).reshape(e * c, d)
      ys = out.at[dest].get(mode="fill", fill_value=0)
      dropped = jnp.sum((~keep & valid[token]).astype(jnp.float32))
    # Back to assignment order (rank-major), weighted, summed over each token's k choices.
    inv = jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
    ya = ys[inv].reshape(k, n, d)
    y = jnp.einsum("KND,NK->ND", ya, w.astype(ya.dtype))
    if self.shared is not None:
      y = y + self.shared(x).reshape(n, d)
    sums = stat_sums(logits, probs, idx, valid, dropped, e)
    return y.reshape(b, t, d), layer_stats(sums, k, bias)

  def _forward_ep(self, x, valid, dropless, mesh, rules) -> tuple[jax.Array, dict]:
    """Expert parallelism: `forward` with the experts split over the `expert` mesh axis.

    One `shard_map` over the whole mesh. Each device routes its own tokens, packs them
    into an (E, C, D) buffer by destination expert, and one all-to-all over `expert` sends
    each expert's rows to the device holding it (E/ep experts per device); the experts run
    on everything they received, and a second all-to-all brings the outputs home.
    C is per source device: ceil(capacity_factor * local tokens * K / E), or the local
    token count when dropless (an expert can take every local token once, so nothing is
    dropped; the buffer is then E/K times the assignments -- memory traded for equality).
    Statistics are summed over all devices (psum), so they equal the one-device figures.
    NOTE: weights enter replicated over the other axes (fsdp/tensor shards are gathered).
    """
    cfg, m = self.cfg, self.cfg.moe
    b, t, d = x.shape
    e, k = m.num_experts, m.top_k
    sizes = mesh_sizes(mesh)
    ep = sizes["expert"]
    x_spec = spec_for(("batch", "seq", None), mesh, rules)
    token_axes = tuple(a for entry in x_spec if entry is not None
                       for a in ((entry,) if isinstance(entry, str) else entry))
    if "expert" not in token_axes:
      raise ConfigError("Invalid config: `mesh.rules` must split the batch over the `expert` "
                        "mesh axis (as the default rules do) for expert parallelism.")
    valid = jnp.ones((b, t), bool) if valid is None else valid
    bias = None if self.router_bias is None else self.router_bias[...]
    ws = [self._w(self.router), self._w(self.w_up), self._w(self.w_down)]
    ws += [] if self.w_gate is None else [self._w(self.w_gate)]
    act = _ACTIVATIONS[cfg.mlp]
    w_spec = PartitionSpec("expert")

    def body(x, valid, bias, router, w_up, w_down, w_gate=None):
      bl, tl, _ = x.shape
      n = bl * tl
      xf, vf = x.reshape(n, d), valid.reshape(n)
      logits = jnp.einsum("ND,DE->NE", xf, router, preferred_element_type=jnp.float32)
      w, idx, probs = route(logits, k, m.router, bias)
      order, group_sizes, slot = sort_assignments(idx, vf, e)
      token = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)[order]
      c = n if dropless else capacity(n, k, e, m.capacity_factor)
      expert = jnp.repeat(jnp.arange(e, dtype=jnp.int32), group_sizes, total_repeat_length=n * k)
      keep = slot < c
      dest = jnp.where(keep, expert * c + slot, e * c)
      buf = jnp.zeros((e * c, d), xf.dtype).at[dest].set(xf[token], mode="drop")
      buf = buf.reshape(ep, e // ep, c, d)  # by destination device
      buf = jax.lax.all_to_all(buf, "expert", 0, 0, tiled=True)  # (ep sources, E/ep, C, D)
      buf = jnp.swapaxes(buf, 0, 1).reshape(e // ep, ep * c, d)
      h = jnp.einsum("ECD,EDF->ECF", buf, w_up)
      h = act(h) if w_gate is None else act(jnp.einsum("ECD,EDF->ECF", buf, w_gate)) * h
      out = jnp.einsum("ECF,EFD->ECD", h, w_down)  # (E/ep, ep * C, D)
      out = jnp.swapaxes(out.reshape(e // ep, ep, c, d), 0, 1)
      out = jax.lax.all_to_all(out, "expert", 0, 0, tiled=True).reshape(e * c, d)
      ys = out.at[dest].get(mode="fill", fill_value=0)
      inv = jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
      ya = ys[inv].reshape(k, n, d)
      y = jnp.einsum("KND,NK->ND", ya, w.astype(ya.dtype))
      dropped = jnp.sum((~keep & vf[token]).astype(jnp.float32))
      sums = jax.lax.psum(stat_sums(logits, probs, idx, vf, dropped, e), token_axes)
      return y.reshape(bl, tl, d), sums

    smap = jax.shard_map(
        body, mesh=mesh,
        in_specs=(x_spec, PartitionSpec(*x_spec[:2]), PartitionSpec(), PartitionSpec(),
                  w_spec, w_spec) + ((w_spec,) if self.w_gate is not None else ()),
        out_specs=(x_spec, PartitionSpec()), check_vma=False)
    with use_mesh(None):
      y, sums = smap(x, valid, bias, *ws)
    if self.shared is not None:
      y = y + self.shared(x)
    return y, layer_stats(sums, k, bias)


def stat_sums(logits, probs, idx, valid, dropped, num_experts) -> dict:
  """One MoE layer's additive statistics over its valid tokens: load (E,) assignments per
  expert, prob (E,) summed router probabilities, z summed logsumexp(logits)^2, tokens,
  dropped. Sums, so shards of the tokens combine by adding (the expert-parallel path)."""
  vf = valid.astype(jnp.float32)
  k = idx.shape[1]
  load = jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(jnp.repeat(vf, k))
  return {"load": load, "prob": jnp.sum(probs * vf[:, None], axis=0),
          "z": jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * vf), "tokens": jnp.sum(vf),
          "dropped": dropped}


def layer_stats(sums: dict, top_k: int, bias: jax.Array | None = None) -> dict:
  """One MoE layer's statistics from its `stat_sums` (scalars unless noted):
  balance = E * sum_e f_e P_e, z = mean logsumexp(logits)^2, load (E,) = assignments per
  expert, dropped / assigned = assignments dropped / made, bias_grad = the zero-valued
  term that gives a sigmoid router's bias its balancing gradient (module docstring)."""
  load = sums["load"]
  num_experts = load.shape[0]
  n_valid = jnp.maximum(sums["tokens"], 1.0)
  f = load / (n_valid * top_k)
  p = sums["prob"] / n_valid
  if bias is None:
    bias_grad = jnp.zeros((), jnp.float32)
  else:
    term = jnp.sum(bias * jax.lax.stop_gradient(f - 1.0 / num_experts))
    bias_grad = term - jax.lax.stop_gradient(term)
  return {"balance": num_experts * jnp.sum(f * p), "z": sums["z"] / n_valid, "load": load,
          "dropped": sums["dropped"], "assigned": n_valid * top_k, "bias_grad": bias_grad}


def aux_sums(stats: dict, cfg: ModelConfig, n_valid: jax.Array) -> tuple[dict, dict]:
  """Per-layer statistics stacked over the MoE layers (leading axis) -> (loss sums, metric
  sums) for `Transformer.aux_losses` / `aux_metrics`.

  Every value is a per-token mean (averaged over MoE layers) times `n_valid`, the
  microbatch's non-padding tokens, so that the train step's division by the batch's token
  count gives the mean back (lmx.train.objectives). Losses: moe_balance (aux_loss_coef *
  switch loss, = coef for uniform routing), moe_router_z (router_z_loss * z). Metrics
  (logged, not trained): moe_dropped (fraction of assignments dropped), moe_load_cv
  (std/mean of the load over experts, mean over layers), moe_load_max / moe_load_min
  (largest / smallest expert's share of the load times E; 1 = uniform).
  """
  m = cfg.moe
  balance = m.aux_loss_coef * jnp.mean(stats["balance"]) + jnp.sum(stats["bias_grad"])
  losses = {"moe_balance_sum": balance * n_valid,
            "moe_router_z_sum": m.router_z_loss * jnp.mean(stats["z"]) * n_valid}
  load = jax.lax.stop_gradient(stats["load"])  # (layers, E)
  mean = jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
  share = load / mean[:, None]
  metrics = {
      "moe_dropped_sum": jnp.sum(stats["dropped"]) / jnp.sum(stats["assigned"]) * n_valid,
      "moe_load_cv_sum": jnp.mean(jnp.std(load, axis=-1) / mean) * n_valid,
      "moe_load_max_sum": jnp.max(share) * n_valid,
      "moe_load_min_sum": jnp.min(share) * n_valid,
  }
  return losses, jax.tree.map(jax.lax.stop_gradient, metrics)
