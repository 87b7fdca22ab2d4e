"""The layer stack: n_layers Blocks held as one module whose parameters carry a leading
'layers' axis, run by a scan over that axis.

    x (B, T, D) -> Block(params[0]) -> Block(params[1]) -> ... -> x (B, T, D)

Every parameter of `LayerStack.block` is the per-layer parameter with a leading L axis,
annotated with the logical name 'layers' (mapped to the 'pipeline' mesh axis by
`lmx.parallel.rules`): attn.wq is (L, D, N, H), attn_norm.scale (L, D), and so on. One
`jax.lax.scan` runs them, so the traced and compiled program holds one layer however deep
the model is (compile time flat in depth, docs/benchmarks.md), and a pipeline stage is
just a slice [i:j] of that axis given to `run_layers`.

`ModelConfig.remat` wraps the scanned layer in `jax.checkpoint`: 'full' saves only each
layer's input, 'save_dots' also keeps the weight matmuls (recomputing the attention scores
and the elementwise work). `ModelConfig.scan_layers=False` runs the same stacked
parameters unrolled, one slice at a time in a Python loop, so XLA sees every layer at once.
Decoding scans the stacked weights and KV cache (`decode_layers`), or, in the decode loops on
CPU (`model.decode_layers`), runs an `UnrolledLayers` view: per-layer weights and caches.

MoE (`model.moe`, lmx/model/moe.py): each Block's `forward` also returns its MoE layer's
statistics, which the scan emits per layer and `LayerStack` turns into the loss and metric
sums of `Transformer.aux_losses` / `aux_metrics`. With every_n_layers = n > 1 the scanned
unit is an `MoEGroup` of n layers, so the body stays homogeneous.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.config import ModelConfig
from lmx.model.attention import Attention, LayerCache
from lmx.model.layers import PEFT_SUFFIX, PROJECTION, compute_dtype
from lmx.model.mlp import MLP
from lmx.model.moe import LOSS_NAMES, METRIC_NAMES, MoE, MoEStat, aux_sums
from lmx.model.norms import make_norm
from lmx.parallel.mesh import constrain

_ACT = ("batch", "seq", "embed")

REMAT_POLICIES = {
    "full": None,  # save nothing but each layer's input
    # Saves x @ W results (no batch dims; `project` names its outputs) but not the batched
    # attention einsums, whose (B, N, T, S) score tensors are the memory hog at long context.
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(PROJECTION)),
}


class Block(nnx.Module):
  """Attention + MLP with residuals; pre-LN (GPT-2/LLaMA) or post-LN (Vaswani 2017)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
    self.pre = cfg.norm_position == "pre"
    self.attn_norm = make_norm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = make_norm(cfg, rngs=rngs)
    self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, rngs=rngs)

  def _hook(self, name: str, y: jax.Array) -> jax.Array:
    """A sublayer output through its PEFT hook (bottleneck adapter, lmx.peft), if any."""
    hook = getattr(self, name + PEFT_SUFFIX, None)
    return y if hook is None else hook(y)

  def _mix(self, x, attn_fn, mlp_fn):
    """The residual wiring; attn_fn(y) -> (attention output, aux), mlp_fn(y) -> (MLP
    output, stats); returns (out, aux, stats)."""
    if self.pre:
      a, aux = attn_fn(self.attn_norm(x))
      h = x + self._hook("attn", a)
      m, stats = mlp_fn(self.mlp_norm(h))
      return h + self._hook("mlp", m), aux, stats
    a, aux = attn_fn(x)
    h = self.attn_norm(x + self._hook("attn", a))
    m, stats = mlp_fn(h)
    return self.mlp_norm(h + self._hook("mlp", m)), aux, stats

  def forward(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
              key: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """(B, T, D) -> ((B, T, D), the MoE layer's statistics ({} for a dense MLP))."""
    ka, km = (None, None) if key is None else jax.random.split(key)
    if isinstance(self.mlp, MoE):
      valid = None if segment_ids is None else segment_ids != 0
      mlp_fn = lambda y: self.mlp.forward(y, valid)
    else:
      mlp_fn = lambda y: (self.mlp(y, km), {})
    out, _, stats = self._mix(x, lambda y: (self.attn(y, positions, segment_ids, ka), None),
                              mlp_fn)
    return constrain(out, _ACT), stats

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               key: jax.Array | None = None) -> jax.Array:  # (B, T, D) -> (B, T, D)
    return self.forward(x, positions, segment_ids, key)[0]

  def decode(self, x, positions, cache: LayerCache, index, kv_start=None, *,
             whole: bool = False) -> tuple[jax.Array, LayerCache]:
    """(B, t, D) -> (B, t, D) and this layer's t new keys/values (B, K, t, H) (whole=True:
    its whole cache with them written, `Attention.decode`)."""
    out, new, _ = self._mix(
        x, lambda y: self.attn.decode(y, positions, cache, index, kv_start, whole=whole),
        lambda y: (self.mlp(y), {}))
    return out, new


class MoEGroup(nnx.Module):
  """`model.moe.every_n_layers` = n consecutive layers: n - 1 dense Blocks (stacked, leading
  axis n - 1) then one MoE Block. A stack of these groups is homogeneous, so the layer scan
  runs over groups (n_layers / n of them) and each scanned body is the same program."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.n = cfg.moe.every_n_layers

    @nnx.split_rngs(splits=self.n - 1)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_dense(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs)

    self.dense = make_dense(rngs)
    self.moe = Block(cfg, rngs=rngs, moe=True)

  def forward(self, x, positions, segment_ids, key=None) -> tuple[jax.Array, dict]:
    keys = [None] * self.n if key is None else list(jax.random.split(key, self.n))
    graphdef, dense = nnx.split(self.dense)
    for params, k in zip(_unstack(dense), keys):
      x = nnx.merge(graphdef, params)(x, positions, segment_ids, k)
    return self.moe.forward(x, positions, segment_ids, keys[-1])

  def __call__(self, x, positions, segment_ids, key=None) -> jax.Array:
    return self.forward(x, positions, segment_ids, key)[0]

  def decode(self, x, positions, cache: LayerCache, index, kv_start=None):
    """Like Block.decode with this group's n layers of cache (n, B, K, S, H); returns the
    n layers' new keys/values stacked (n, B, K, t, H)."""
    graphdef, dense = nnx.split(self.dense)
    news = []
    for i, params in enumerate(_unstack(dense)):
      x, new = nnx.merge(graphdef, params).decode(
          x, positions, jax.tree.map(lambda a: a[i], cache), index, kv_start)
      news.append(new)
    x, new = self.moe.decode(x, positions, jax.tree.map(lambda a: a[-1], cache), index,
                             kv_start)
    news.append(new)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *news)


def num_layers(layers: nnx.State) -> int:
  """The length of the leading 'layers' axis of a stacked (slice of a) layer state."""
  return jax.tree.leaves(layers)[0].shape[0]


def _unstack(tree) -> list:
  """A tree of (L, ...) arrays -> L trees of (...) arrays.

  One `jnp.unstack` per leaf rather than L indexings `a[i]`: the gradient is then one
  `stack` instead of L full-size (L, ...) pads summed. (XLA:CPU folds those pads well: no
  step-time or memory difference measured at 12 layers; the program is just smaller.)
  """
  leaves, treedef = jax.tree.flatten(tree)
  columns = [jnp.unstack(a) for a in leaves]
  return [jax.tree.unflatten(treedef, [c[i] for c in columns]) for i in range(len(columns[0]))]


def run_layers(graphdef: nnx.GraphDef, layers: nnx.State, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None, *, remat: str = "none",
               unroll: bool = False, keys: jax.Array | None = None,
               with_stats: bool = False):
  """Run the stacked layers `layers` (any contiguous slice [i:j] of a LayerStack's block
  state, leading axis j - i) over x (B, T, D) in order; returns (B, T, D).

  `graphdef` is the per-layer Block's (`nnx.split(stack.block)[0]`). Pure: a pipeline
  stage calls it on its own slice, and running [0:k] then [k:L] equals running [0:L].
  unroll=True runs a Python loop over the layer slices instead of the scan: same numbers,
  one copy of the layer per layer in the program. `keys` (one dropout key per layer, a
  training step's) are scanned with the layers; None runs deterministically.
  with_stats=True returns (x, stats): the MoE layers' statistics stacked over the layers
  ({} for a dense stack; lmx.model.moe.layer_stats).
  """

  def layer(x, params_and_key):
    params, key = params_and_key
    return nnx.merge(graphdef, params).forward(x, positions, segment_ids, key)

  if remat != "none":
    # NOTE: prevent_cse only matters where XLA could merge the recomputation back into the
    # forward pass, i.e. when unrolled; inside a scan it would only cost a barrier.
    layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=unroll)
  if unroll:
    # A Python loop rather than jax.lax.scan(..., unroll=True): a faster CPU train step
    # in an in-process A/B (docs/benchmarks.md).
    per_layer = _unstack(layers)
    stats = []
    for params, key in zip(per_layer, [None] * len(per_layer) if keys is None else keys):
      x, st = layer(x, (params, key))
      stats.append(st)
    stats = jax.tree.map(lambda *a: jnp.stack(a), *stats)
  else:
    x, stats = jax.lax.scan(layer, x, (layers, keys))
  return (x, stats) if with_stats else x


def decode_layers(graphdef: nnx.GraphDef, layers: nnx.State, x: jax.Array,
                  positions: jax.Array, cache: LayerCache, index: jax.Array,
                  kv_start: jax.Array | None = None) -> tuple[jax.Array, LayerCache]:
  """Run t new tokens x (B, t, D) through the stacked layers against their stacked cache
  (k/v (L, B, K, S, H)); write them at slot `index`. Returns (x, updated cache).
  `kv_start` (B,): each row's left-padding slots, which attention skips (`cache_mask`).

  The scan carries only x and emits each layer's t new keys/values (L, B, K, t, H); one
  write after the scan puts them into the cache, so a donated cache is updated in place
  (no copy in the compiled step). NOTE: decode scans whatever `scan_layers` says; the
  unrolled decode layout is `UnrolledLayers` (slicing this stacked cache per layer inside
  the loop made XLA:CPU copy the whole donated cache twice per step).
  """

  def layer(x, inputs):
    params, layer_cache = inputs
    return nnx.merge(graphdef, params).decode(x, positions, layer_cache, index, kv_start)

  units = num_layers(layers)
  group = cache.k.shape[0] // units  # > 1: MoE groups of `group` layers (MoEGroup)
  scanned = cache if group == 1 else jax.tree.map(
      lambda a: a.reshape(units, group, *a.shape[1:]), cache)
  x, new = jax.lax.scan(layer, x, (layers, scanned))  # new: (L, B, K, t, H)
  if group > 1:
    new = jax.tree.map(lambda a: a.reshape(units * group, *a.shape[2:]), new)
  start = (0, 0, 0, index, 0)
  k = jax.lax.dynamic_update_slice(cache.k, new.k, start)  # new is in the cache dtype
  v = jax.lax.dynamic_update_slice(cache.v, new.v, start)
  if cache.k_scale is None:
    return x, LayerCache(k=k, v=v)
  # int8 cache: the per-(kv head, token) scales (L, B, K, S) are written the same way.
  k_scale = jax.lax.dynamic_update_slice(cache.k_scale, new.k_scale, start[:4])
  v_scale = jax.lax.dynamic_update_slice(cache.v_scale, new.v_scale, start[:4])
  return x, LayerCache(k=k, v=v, k_scale=k_scale, v_scale=v_scale)


def stack_units(cfg: ModelConfig) -> tuple[int, int]:
  """(units, layers per unit) of the stack: n_layers Blocks, or with MoE every n > 1
  layers, n_layers / n MoEGroups of n layers."""
  n = cfg.moe.every_n_layers if cfg.moe.num_experts else 1
  return cfg.n_layers // n, n


class LayerStack(nnx.Module):
  """`cfg.n_layers` Blocks as one Block whose parameters have a leading 'layers' axis.

  With MoE (`model.moe.num_experts` > 0) every Block's MLP is an MoE (every_n_layers=1,
  `block.mlp.{router, w_up, ...}` (L, E, ...)), or the stack holds L/n MoEGroups
  (`block.dense.*` (L/n, n-1, ...), `block.moe.*` (L/n, ...)). The MoE layers' summed
  losses and metrics of the last forward pass are kept in `moe_aux` for
  `Transformer.aux_losses` (a dense stack has no such attribute).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    units, per_unit = stack_units(cfg)

    # Each layer draws its own keys (split_rngs), and vmap puts 'layers' first in every
    # parameter's logical names (flax's spmd.add_axis on the out_sharding metadata).
    @nnx.split_rngs(splits=units)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_block(rngs: nnx.Rngs) -> Block:
      if per_unit > 1:
        return MoEGroup(cfg, rngs=rngs)
      return Block(cfg, rngs=rngs, moe=bool(cfg.moe.num_experts))

    self.block = make_block(rngs)
    if cfg.moe.num_experts:
      # One scalar Variable per sum, fixed at construction, so the model's state has the
      # same structure before and after a forward pass (and under nnx.eval_shape).
      self.moe_aux = nnx.data({k: MoEStat(jnp.zeros((), jnp.float32))
                               for k in LOSS_NAMES + METRIC_NAMES})

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               key: jax.Array | None = None) -> jax.Array:  # (B, T, D) -> (B, T, D)
    graphdef, layers = nnx.split(self.block)
    keys = None if key is None else jax.random.split(key, num_layers(layers))
    x, stats = run_layers(graphdef, layers, x, positions, segment_ids, remat=self.cfg.remat,
                          unroll=not self.cfg.scan_layers, keys=keys, with_stats=True)
    if self.cfg.moe.num_experts:
      valid = (jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids != 0)
      losses, metrics = aux_sums(stats, self.cfg, jnp.sum(valid.astype(jnp.float32)))
      # New Variables rather than updated ones: the model may be merged inside a trace
      # from a `rest` state made outside it, whose Variables that trace may not mutate.
      self.moe_aux = nnx.data({k: MoEStat(v) for k, v in {**losses, **metrics}.items()})
    return x

  def init_cache(self, batch: int, max_len: int) -> LayerCache:
    """Zero keys/values (L, B, K, max_len, H) in the compute dtype, or int8 with float32
    scales (L, B, K, max_len) when `cfg.kv_cache_dtype` is 'int8' (LayerCache's layout)."""
    cfg = self.cfg
    shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.dim_per_head)
    if cfg.kv_cache_dtype == "int8":
      zeros = lambda: jnp.zeros(shape[:-1], jnp.float32)
      return LayerCache(k=jnp.zeros(shape, jnp.int8), v=jnp.zeros(shape, jnp.int8),
                        k_scale=zeros(), v_scale=zeros())
    dtype = compute_dtype(cfg)
    return LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  def decode(self, x: jax.Array, positions: jax.Array, cache: LayerCache, index: jax.Array,
             kv_start: jax.Array | None = None) -> tuple[jax.Array, LayerCache]:
    graphdef, layers = nnx.split(self.block)
    return decode_layers(graphdef, layers, x, positions, cache, index, kv_start)

  def decoder(self) -> LayerStack | UnrolledLayers:
    """What a decode loop runs the layers with (`model.decode_layers`): this stack (a scan
    over the stacked weights and cache) or an `UnrolledLayers` view of it. Call it once per
    jitted call, outside the loop, and pass it to `Transformer.init_cache/decode(layers=)`."""
    mode = self.cfg.decode_layers
    if mode == "auto":
      mode = "unrolled" if jax.default_backend() == "cpu" else "scan"
    return UnrolledLayers(self) if mode == "unrolled" else self


class UnrolledLayers:
  """A decode-time view of a LayerStack: every layer a separate Block with its own weight
  and cache buffers.

  Why: inside a `while_loop`, XLA:CPU copies each layer's slice of a stacked weight before
  its matmul (a dynamic-slice in the scan, or a static slice: it does not hoist either out
  of the loop), so a scanned decode step reads every weight twice and writes it once --
  about half the memory-bandwidth limit at batch 1 (docs/decoding.md). Here the slices
  are taken once, when the view is made (one copy of the layer weights per jitted call,
  which is also the extra memory), and the loop body reads the weights in place. The cache
  is a tuple of per-layer `LayerCache`s, k/v (B, K, S, H) (the batch axis first, unlike the
  stacked (L, B, ...)), each written in place by the attention that reads it
  (`Attention.decode(whole=True)`). NOTE: leaves (1, B, S, ...) squeezed for attention and
  re-expanded made XLA copy every layer's cache twice per step; 4-d leaves copy nothing.
  """

  def __init__(self, stack: LayerStack):
    self.stack = stack
    graphdef, layers = nnx.split(stack.block)
    units = [nnx.merge(graphdef, p) for p in _unstack(layers)]
    self.blocks = []
    for unit in units:
      if isinstance(unit, MoEGroup):  # its n - 1 dense layers, then its MoE layer
        dense_gd, dense = nnx.split(unit.dense)
        self.blocks += [nnx.merge(dense_gd, p) for p in _unstack(dense)] + [unit.moe]
      else:
        self.blocks.append(unit)

  def init_cache(self, batch: int, max_len: int) -> tuple[LayerCache, ...]:
    stacked = self.stack.init_cache(batch, max_len)
    return tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(len(self.blocks)))

  def decode(self, x: jax.Array, positions: jax.Array, cache: tuple[LayerCache, ...],
             index: jax.Array, kv_start: jax.Array | None = None
             ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
    out = []
    for block, layer_cache in zip(self.blocks, cache):
      x, written = block.decode(x, positions, layer_cache, index, kv_start, whole=True)
      out.append(written)
    return x, tuple(out)
