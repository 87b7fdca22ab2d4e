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
Decoding with the stacked KV cache always scans (`decode_layers`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.config import ModelConfig
from lmx.model.attention import Attention, LayerCache
from lmx.model.layers import PEFT_SUFFIX, PROJECTION, compute_dtype
from lmx.model.mlp import MLP
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

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.pre = cfg.norm_position == "pre"
    self.attn_norm = make_norm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = make_norm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def _hook(self, name: str, y: jax.Array) -> jax.Array:
    """A sublayer output through its PEFT hook (bottleneck adapter, lmx.peft), if any."""
    hook = getattr(self, name + PEFT_SUFFIX, None)
    return y if hook is None else hook(y)

  def _mix(self, x, attn_fn, key=None):
    """The residual wiring; attn_fn(y) -> (attention output, aux) and aux is passed on."""
    if self.pre:
      a, aux = attn_fn(self.attn_norm(x))
      h = x + self._hook("attn", a)
      return h + self._hook("mlp", self.mlp(self.mlp_norm(h), key)), aux
    a, aux = attn_fn(x)
    h = self.attn_norm(x + self._hook("attn", a))
    return self.mlp_norm(h + self._hook("mlp", self.mlp(h, key))), aux

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               key: jax.Array | None = None) -> jax.Array:  # (B, T, D) -> (B, T, D)
    ka, km = (None, None) if key is None else jax.random.split(key)
    out, _ = self._mix(x, lambda y: (self.attn(y, positions, segment_ids, ka), None), km)
    return constrain(out, _ACT)

  def decode(self, x, positions, cache: LayerCache, index,
             kv_start=None) -> tuple[jax.Array, LayerCache]:
    """(B, t, D) -> (B, t, D) and this layer's t new keys/values (B, t, K, H)."""
    return self._mix(x, lambda y: self.attn.decode(y, positions, cache, index, kv_start))


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
               unroll: bool = False, keys: jax.Array | None = None) -> jax.Array:
  """Run the stacked layers `layers` (any contiguous slice [i:j] of a LayerStack's block
  state, leading axis j - i) over x (B, T, D) in order; returns (B, T, D).

  `graphdef` is the per-layer Block's (`nnx.split(stack.block)[0]`). Pure: a pipeline
  stage calls it on its own slice, and running [0:k] then [k:L] equals running [0:L].
  unroll=True runs a Python loop over the layer slices instead of the scan: same numbers,
  one copy of the layer per layer in the program. `keys` (one dropout key per layer, a
  training step's) are scanned with the layers; None runs deterministically.
  """

  def layer(x, params_and_key):
    params, key = params_and_key
    return nnx.merge(graphdef, params)(x, positions, segment_ids, key), None

  if remat != "none":
    # NOTE: prevent_cse only matters where XLA could merge the recomputation back into the
    # forward pass, i.e. when unrolled; inside a scan it would only cost a barrier.
    layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=unroll)
  if unroll:
    # A Python loop rather than jax.lax.scan(..., unroll=True): a faster CPU train step
    # in an in-process A/B (docs/benchmarks.md).
    per_layer = _unstack(layers)
    for params, key in zip(per_layer, [None] * len(per_layer) if keys is None else keys):
      x, _ = layer(x, (params, key))
    return x
  x, _ = jax.lax.scan(layer, x, (layers, keys))
  return x


def decode_layers(graphdef: nnx.GraphDef, layers: nnx.State, x: jax.Array,
                  positions: jax.Array, cache: LayerCache, index: jax.Array,
                  kv_start: jax.Array | None = None) -> tuple[jax.Array, LayerCache]:
  """Run t new tokens x (B, t, D) through the stacked layers against their stacked cache
  (k/v (L, B, S, K, H)); write them at slot `index`. Returns (x, updated cache).
  `kv_start` (B,): each row's left-padding slots, which attention skips (`cache_mask`).

  The scan carries only x and emits each layer's t new keys/values (L, B, t, K, H); one
  write after the scan puts them into the cache, so a donated cache is updated in place
  (no copy in the compiled step). NOTE: decode scans whatever `scan_layers` says: unrolled,
  XLA:CPU copied the whole donated cache twice per step, and was no faster.
  """

  def layer(x, inputs):
    params, layer_cache = inputs
    return nnx.merge(graphdef, params).decode(x, positions, layer_cache, index, kv_start)

  x, new = jax.lax.scan(layer, x, (layers, cache))  # new: (L, B, t, K, H)
  start = (0, 0, index, 0, 0)
  k = jax.lax.dynamic_update_slice(cache.k, new.k, start)  # new is in the cache dtype
  v = jax.lax.dynamic_update_slice(cache.v, new.v, start)
  if cache.k_scale is None:
    return x, LayerCache(k=k, v=v)
  # int8 cache: the per-(token, kv head) scales (L, B, S, K) are written the same way.
  k_scale = jax.lax.dynamic_update_slice(cache.k_scale, new.k_scale, start[:4])
  v_scale = jax.lax.dynamic_update_slice(cache.v_scale, new.v_scale, start[:4])
  return x, LayerCache(k=k, v=v, k_scale=k_scale, v_scale=v_scale)


class LayerStack(nnx.Module):
  """`cfg.n_layers` Blocks as one Block whose parameters have a leading 'layers' axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg

    # Each layer draws its own keys (split_rngs), and vmap puts 'layers' first in every
    # parameter's logical names (flax's spmd.add_axis on the out_sharding metadata).
    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_block(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs)

    self.block = make_block(rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               key: jax.Array | None = None) -> jax.Array:  # (B, T, D) -> (B, T, D)
    graphdef, layers = nnx.split(self.block)
    keys = None if key is None else jax.random.split(key, self.cfg.n_layers)
    return run_layers(graphdef, layers, x, positions, segment_ids, remat=self.cfg.remat,
                      unroll=not self.cfg.scan_layers, keys=keys)

  def init_cache(self, batch: int, max_len: int) -> LayerCache:
    """Zero keys/values (L, B, max_len, K, H) in the compute dtype, or int8 with float32
    scales (L, B, max_len, K) when `cfg.kv_cache_dtype` is 'int8'."""
    cfg = self.cfg
    shape = (cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.dim_per_head)
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
