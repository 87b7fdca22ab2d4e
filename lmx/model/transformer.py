"""The decoder-only Transformer: embeddings, the layer stack, final norm and LM head.

    tokens (B, T) -> embed (+ positions) -> LayerStack (scan over L blocks) -> norm
                  -> logits (B, T, V)

The blocks live in one `LayerStack` (lmx.model.stack): a single Block whose parameters
carry a leading 'layers' axis (`layers.block.attn.wq` is (L, D, N, H)), run by a scan, so
compile time does not grow with depth and a pipeline stage is a slice of that axis
(`cfg.scan_layers=False` runs the same parameters unrolled). The KV cache is stacked the
same way: k/v (L, B, K, S_max, H).
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
from lmx.model.attention import LayerCache
from lmx.model.layers import PEFT_SUFFIX, compute_dtype, normal, param
from lmx.model.moe import LOSS_NAMES, METRIC_NAMES
from lmx.model.norms import make_norm
from lmx.model.positions import LearnedPositions, sinusoidal
from lmx.model.stack import LayerStack
from lmx.parallel.mesh import constrain

_ACT = ("batch", "seq", "embed")


@struct.dataclass
class KVCache:
  """The stack's keys/values, k/v (L, B, K, S_max, H) (int8 plus scales when
  model.kv_cache_dtype='int8', `LayerCache`), plus `index`: the int32 number of
  slots already written (the same for every row and layer), and optionally `kv_start`
  (B,) int32: row b's first real slot; slots before it hold left padding that attention
  skips (ragged prompts, `lmx.infer.engine`). None means every slot is real.
  In the decode loops on CPU `layers` is instead a tuple of per-layer LayerCaches, k/v
  (B, K, S_max, H) (`for_decoding`, `lmx.model.stack.UnrolledLayers`)."""
  layers: LayerCache | tuple[LayerCache, ...]
  index: jax.Array
  kv_start: jax.Array | None = None


def head_logits(x: jax.Array, w: jax.Array) -> jax.Array:
  """(..., T, D) hidden states times the (D, V) head -> float32 logits (..., T, V)."""
  logits = jnp.einsum("...TD,DV->...TV", x, w, preferred_element_type=jnp.float32)
  return constrain(logits, ("batch", "seq", "vocab")) if logits.ndim == 3 else logits


class DecodingView:
  """A model whose layers run through `layers` (`LayerStack.decoder()`) in `init_cache` and
  `decode`; everything else is the model's. Made once per jitted call, outside the loop."""

  def __init__(self, model: Transformer, layers):
    self._model, self._layers = model, layers

  def init_cache(self, *args, **kwargs) -> KVCache:
    return self._model.init_cache(*args, layers=self._layers, **kwargs)

  def decode(self, *args, **kwargs) -> tuple[jax.Array, KVCache]:
    return self._model.decode(*args, layers=self._layers, **kwargs)

  def __getattr__(self, name):
    return getattr(self._model, name)


def for_decoding(model):
  """What a decode loop should call: the model with its layers laid out for decoding
  (`model.decode_layers`: on CPU by default each layer's weights and cache as separate
  buffers, `lmx.model.stack.UnrolledLayers`). Call it inside the jitted function, before
  the loop. Other objects with the decode interface (test doubles) pass through."""
  layers = getattr(model, "layers", None)
  decoder = getattr(layers, "decoder", None)
  if decoder is None:
    return model
  chosen = decoder()
  return model if chosen is layers else DecodingView(model, chosen)


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    d, v = cfg.d_model, cfg.vocab_size
    self.embed = param(rngs.params(), (v, d), ("vocab", "embed"), normal(cfg.init_std))
    self.pos_embed = LearnedPositions(cfg, rngs=rngs) if cfg.position == "learned" else None
    self.layers = LayerStack(cfg, rngs=rngs)
    self.final_norm = make_norm(cfg, rngs=rngs)
    self.lm_head = (None if cfg.tie_embeddings else
                    param(rngs.params(), (d, v), ("embed", "vocab"), normal(cfg.init_std)))

  def aux_losses(self) -> dict[str, jax.Array]:
    """Loss sums of the last forward pass beyond the LM loss -- the MoE balance and router
    z-losses (lmx.model.moe.aux_sums) -- which the LM objective adds; {} for a dense model."""
    aux = getattr(self.layers, "moe_aux", None)
    return {} if aux is None else {k: aux[k][...] for k in LOSS_NAMES}

  def aux_metrics(self) -> dict[str, jax.Array]:
    """Sums the objective logs but does not train on: MoE dropped fraction and load."""
    aux = getattr(self.layers, "moe_aux", None)
    return {} if aux is None else {k: aux[k][...] for k in METRIC_NAMES}

  def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    dtype = compute_dtype(self.cfg)
    x = jnp.take(self.embedding_table(), tokens, axis=0)  # (B, T, D) float32
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions)
    elif self.cfg.position == "sinusoidal":
      x = x + sinusoidal(positions, self.cfg.d_model)
    return constrain(x.astype(dtype), _ACT)

  def embed_inputs(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token (+ position) embeddings (B, T, D) in the compute dtype: what the layer stack
    takes (a pipeline runs the stack itself, lmx.parallel.pipeline)."""
    return self._embed(tokens, positions)

  def embedding_table(self) -> jax.Array:
    """The (V, D) float32 embedding, with trainable rows of added tokens if PEFT attached
    them (`embed_peft`, lmx.peft.NewTokens)."""
    hook = getattr(self, "embed" + PEFT_SUFFIX, None)
    return self.embed[...] if hook is None else hook(self.embed[...])

  def head_weight(self) -> jax.Array:
    """The (D, V) output projection in the compute dtype (the embedding's transpose if tied)."""
    if self.lm_head is None:
      w = self.embedding_table().T
    else:
      hook = getattr(self, "embed" + PEFT_SUFFIX, None)
      w = self.lm_head[...] if hook is None else hook.head(self.lm_head[...])
    return w.astype(compute_dtype(self.cfg))

  def _logits(self, x: jax.Array) -> jax.Array:  # (B, T, D) -> float32 (B, T, V)
    return head_logits(self.final_norm(x), self.head_weight())

  def hidden(self, tokens: jax.Array, *, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None,
             dropout_key: jax.Array | None = None) -> jax.Array:
    """The final-normed hidden states (B, T, D) in the compute dtype: everything but the LM
    head, so a loss can apply `head_weight()` chunk by chunk (`lmx.train.loss`)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    # A train step's dropout key reaches the layers only if something draws from it
    # (`uses_dropout`, set by lmx.peft for LoRA dropout): otherwise the program is unchanged.
    key = dropout_key if getattr(self, "uses_dropout", False) else None
    prompt = getattr(self, "prompt" + PEFT_SUFFIX, None)
    if prompt is not None:  # prompt tuning: P learned input vectors before every row
      return self._with_prompt(prompt, tokens, positions, segment_ids, key)
    x = self._embed(tokens, positions)
    return self.final_norm(self.layers(x, positions, segment_ids, key))

  def _with_prompt(self, prompt, tokens, positions, segment_ids, key=None):
    """Run [P virtual tokens; the row] and return the row's hidden states (B, T, D). The
    virtual tokens take positions 0..P-1 (the row's shift by P) and segment -1, which
    every segment of a packed row may attend to (`segment_mask`)."""
    b, t = tokens.shape
    p = prompt.length
    x = jnp.concatenate([prompt(b, compute_dtype(self.cfg)),
                         self._embed(tokens, positions + p)], axis=1)
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)),
                           positions + p], axis=1)
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    seg = jnp.concatenate([jnp.full((b, p), -1, seg.dtype), seg], axis=1)
    return self.final_norm(self.layers(x, pos, seg, key))[:, p:]

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits float32 (B, T, V) for int32 tokens (B, T).

    positions default to 0..T-1 per row. segment_ids (B, T) restrict attention to tokens of
    the same packed document (0 = padding); packed data should pass positions that restart
    at 0 in each segment.
    """
    x = self.hidden(tokens, positions=positions, segment_ids=segment_ids,
                    dropout_key=dropout_key)
    return head_logits(x, self.head_weight())

  def init_cache(self, batch: int, max_len: int, kv_start: jax.Array | None = None, *,
                 layers=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` slots (prompt + generated).

    kv_start: optional (batch,) int32, the number of left-padding slots of each row.
    layers: what runs the layers (`self.layers.decoder()` in the decode loops; default the
    stack itself); the cache's layout is its, and `decode` must get the same.
    """
    if self.cfg.position == "learned" and max_len > self.cfg.max_seq_len:
      raise ValueError(f"init_cache: max_len={max_len} exceeds model.max_seq_len="
                       f"{self.cfg.max_seq_len}, the size of the learned position table.")
    if kv_start is not None:
      kv_start = jnp.asarray(kv_start, jnp.int32)
      if kv_start.shape != (batch,):
        raise ValueError(f"init_cache: kv_start has shape {kv_start.shape}; it must be "
                         f"({batch},), one start slot per row.")
    runner = self.layers if layers is None else layers
    return KVCache(layers=runner.init_cache(batch, max_len),
                   index=jnp.zeros((), jnp.int32), kv_start=kv_start)

  def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *,
             last_only: bool = False, layers=None) -> tuple[jax.Array, KVCache]:
    """Run t new tokens (B, t) at `positions` (B, t) against the cache; append them.

    Returns logits float32 (B, t, V) -- (B, 1, V) for the last token only with
    `last_only`, which is all a prefill needs (the LM head never sees the other t - 1) --
    and the cache with index advanced by t. The caller keeps cache.index + t <= max_len
    (writes past the end are clamped by XLA). `layers`: as in `init_cache`.
    """
    if getattr(self, "prompt" + PEFT_SUFFIX, None) is not None:
      raise NotImplementedError("decode: a prompt-tuned model cannot use the KV cache yet "
                                "(its virtual tokens are not cached); evaluate it with "
                                "`lmx evaluate`, or use prefix tuning (peft.method='prefix').")
    x = self._embed(tokens, positions)
    runner = self.layers if layers is None else layers
    x, new = runner.decode(x, positions, cache.layers, cache.index, cache.kv_start)
    new_index = cache.index + jnp.int32(tokens.shape[1])
    if last_only:
      x = x[:, -1:]  # (B, 1, D)
    return self._logits(x), KVCache(layers=new, index=new_index, kv_start=cache.kv_start)
