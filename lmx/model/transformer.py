"""The decoder-only Transformer: embeddings, a stack of blocks, final norm and LM head.

    tokens (B, T) -> embed (+ positions) -> [Block] x n_layers -> norm -> logits (B, T, V)

Parameters are float32; activations run in `cfg.dtype`; logits come back float32 (the
softmax over V is where low precision hurts most). `cfg.remat` trades compute for memory
per block: 'full' recomputes the whole block in the backward pass, 'save_dots' keeps the
weight matmuls and recomputes the rest (attention scores, activations, norms).

NOTE: the final norm exists for post-LN too (where the last block already ends in a norm):
the parameter tree is the same for both wirings, as `lmx.scaling.accounting` counts it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from lmx.config import ModelConfig
from lmx.model.attention import Attention, LayerCache
from lmx.model.layers import PROJECTION, compute_dtype, normal, param
from lmx.model.mlp import MLP
from lmx.model.norms import make_norm
from lmx.model.positions import LearnedPositions, sinusoidal
from lmx.parallel.mesh import constrain

_ACT = ("batch", "seq", "embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing but the block inputs
    # Saves x @ W results (no batch dims; `project` names its outputs) but not the batched
    # attention einsums, whose (B, N, T, S) score tensors are the memory hog at long context.
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(PROJECTION)),
}


@struct.dataclass
class KVCache:
  """Per-layer keys/values plus `index`, the int32 number of slots already written."""
  layers: tuple[LayerCache, ...]
  index: jax.Array


class Block(nnx.Module):
  """Attention + MLP with residuals; pre-LN (GPT-2/LLaMA) or post-LN (Vaswani 2017)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.pre = cfg.norm_position == "pre"
    self.attn_norm = make_norm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = make_norm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def _mix(self, x, attn_fn):
    """The residual wiring; attn_fn(y) -> (attention output, aux) and aux is passed on."""
    if self.pre:
      a, aux = attn_fn(self.attn_norm(x))
      h = x + a
      return h + self.mlp(self.mlp_norm(h)), aux
    a, aux = attn_fn(x)
    h = self.attn_norm(x + a)
    return self.mlp_norm(h + self.mlp(h)), aux

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None) -> jax.Array:  # (B, T, D) -> (B, T, D)
    out, _ = self._mix(x, lambda y: (self.attn(y, positions, segment_ids), None))
    return constrain(out, _ACT)

  def decode(self, x, positions, cache: LayerCache, index) -> tuple[jax.Array, LayerCache]:
    return self._mix(x, lambda y: self.attn.decode(y, positions, cache, index))


def _block_forward(block: Block, x, positions, segment_ids):
  return block(x, positions, segment_ids)


def head_logits(x: jax.Array, w: jax.Array) -> jax.Array:
  """(..., T, D) hidden states times the (D, V) head -> float32 logits (..., T, V)."""
  logits = jnp.einsum("...TD,DV->...TV", x, w, preferred_element_type=jnp.float32)
  return constrain(logits, ("batch", "seq", "vocab")) if logits.ndim == 3 else logits


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    d, v = cfg.d_model, cfg.vocab_size
    self.embed = param(rngs.params(), (v, d), ("vocab", "embed"), normal(cfg.init_std))
    self.pos_embed = LearnedPositions(cfg, rngs=rngs) if cfg.position == "learned" else None
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = make_norm(cfg, rngs=rngs)
    self.lm_head = (None if cfg.tie_embeddings else
                    param(rngs.params(), (d, v), ("embed", "vocab"), normal(cfg.init_std)))

  def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    dtype = compute_dtype(self.cfg)
    x = jnp.take(self.embed[...], tokens, axis=0)  # (B, T, D) float32
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions)
    elif self.cfg.position == "sinusoidal":
      x = x + sinusoidal(positions, self.cfg.d_model)
    return constrain(x.astype(dtype), _ACT)

  def head_weight(self) -> jax.Array:
    """The (D, V) output projection in the compute dtype (the embedding's transpose if tied)."""
    w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    return w.astype(compute_dtype(self.cfg))

  def _logits(self, x: jax.Array) -> jax.Array:  # (B, T, D) -> float32 (B, T, V)
    return head_logits(self.final_norm(x), self.head_weight())

  def hidden(self, tokens: jax.Array, *, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None) -> jax.Array:
    """The final-normed hidden states (B, T, D) in the compute dtype: everything but the LM
    head, so a loss can apply `head_weight()` chunk by chunk (`lmx.train.loss`)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = self._embed(tokens, positions)
    if self.cfg.remat == "none":
      fn = _block_forward
    else:
      fn = nnx.remat(_block_forward, policy=_REMAT_POLICIES[self.cfg.remat])
    for block in self.blocks:
      x = fn(block, x, positions, segment_ids)
    return self.final_norm(x)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits float32 (B, T, V) for int32 tokens (B, T).

    positions default to 0..T-1 per row. segment_ids (B, T) restrict attention to tokens of
    the same packed document (0 = padding); packed data should pass positions that restart
    at 0 in each segment.
    """
    x = self.hidden(tokens, positions=positions, segment_ids=segment_ids)
    return head_logits(x, self.head_weight())

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
    if self.cfg.position == "learned" and max_len > self.cfg.max_seq_len:
      raise ValueError(f"init_cache: max_len={max_len} exceeds model.max_seq_len="
                       f"{self.cfg.max_seq_len}, the size of the learned position table.")
    layers = tuple(b.attn.init_cache(batch, max_len) for b in self.blocks)
    return KVCache(layers=layers, index=jnp.zeros((), jnp.int32))

  def decode(self, tokens: jax.Array, positions: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run t new tokens (B, t) at `positions` (B, t) against the cache; append them.

    Returns logits float32 (B, t, V) and the cache with index advanced by t. The caller
    keeps cache.index + t <= max_len (writes past the end are clamped by XLA).
    """
    x = self._embed(tokens, positions)
    new_layers = []
    for block, layer_cache in zip(self.blocks, cache.layers):
      x, c = block.decode(x, positions, layer_cache, cache.index)
      new_layers.append(c)
    new_index = cache.index + jnp.int32(tokens.shape[1])
    return self._logits(x), KVCache(layers=tuple(new_layers), index=new_index)
