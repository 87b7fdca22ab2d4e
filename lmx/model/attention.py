"""Causal self-attention with MHA / GQA / MQA and a key-value cache.

Einsum letters: B batch, T query length, S key length, D d_model, N query heads,
K key/value heads, H head dim. `n_kv_heads` picks the variant: K == N is MHA, K == 1 MQA,
anything between GQA. K/V are never repeated in memory: query head n reads kv head
n // (N/K). `ModelConfig.attention_impl` picks the kernel: `jax.nn.dot_product_attention`
(with `implementation=None` a GPU backend may choose cuDNN's fused kernel) or
`blocked_causal_attention`, which skips the masked upper triangle and is what 'auto' uses
on CPU, where XLA has no fused attention (docs/benchmarks.md).
`ModelConfig.sliding_window` w > 0 (Mistral) adds one more mask everywhere: query i reads
key j only if i - j < w (in cache slots when decoding; a row's slots and positions differ
by a constant, so the distance is the same). The KV cache still holds every slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from lmx.config import ModelConfig
from lmx.model.layers import PEFT_SUFFIX, Projections, compute_dtype, normal, output_init_std, param, zeros
from lmx.model.positions import apply_rope, rope_inv_freq
from lmx.parallel.mesh import constrain


@struct.dataclass
class LayerCache:
  """Keys and values (B, K, S_max, H) for one layer, with a leading L axis for a layer
  stack (`lmx.model.stack`): in the compute dtype, or int8 with `k_scale`/`v_scale`
  float32 (B, K, S_max), one scale per (kv head, token) (ModelConfig.kv_cache_dtype='int8').

  Heads before slots: (batch, kv head) are the batch dimensions of attention's two
  matmuls, so `cached_attention` reads the cache where it lies. In the (B, S, K, H) layout
  of the activations XLA:CPU transposed every layer's keys and values into a temporary
  each decode step: 0.45 ms per layer and tensor at batch 8 for the 58M shape, more than
  its matmuls (docs/decoding.md).
  """
  k: jax.Array
  v: jax.Array
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keys or values (..., H) -> int8 codes (..., H) and float32 scales (...): absmax over
  the head dim / 127, symmetric (an all-zero vector gets scale 0 and codes 0)."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / 127
  codes = jnp.round(x / jnp.where(scale == 0, 1.0, scale)[..., None])
  return jnp.clip(codes, -127, 127).astype(jnp.int8), scale


def dequantize_kv(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """The inverse of `quantize_kv` up to rounding: (..., H) in `dtype`."""
  return (codes.astype(jnp.float32) * scale[..., None]).astype(dtype)


def segment_mask(segment_ids: jax.Array, shared: bool = False) -> jax.Array:
  """Boolean (B, 1, T, T): query t may see key s iff they are in the same segment; with
  `shared`, also if key s is in segment -1 (prompt tuning's virtual tokens, which every
  segment of a packed row reads; lmx.peft).

  Padding (segment 0) attends only to padding, so no row is fully masked (no NaNs); its
  outputs are masked out of the loss anyway. Causality is added separately.
  """
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  if shared:
    same = same | (segment_ids[:, None, :] < 0)
  return same[:, None, :, :]


def cache_mask(index: jax.Array, t: int, s_max: int,
               kv_start: jax.Array | None = None) -> jax.Array:
  """Boolean (1, 1, t, S_max) for t new queries written at cache slots index..index+t-1;
  (B, 1, t, S_max) with `kv_start`.

  Query i sits in slot index + i and may read slots 0..index + i. The cache's unwritten
  tail is excluded by the same rule. (`is_causal=True` would align the triangle to slot 0,
  which is wrong once the cache holds a prefix.) `kv_start` (B,) int32: row b's slots
  below kv_start[b] are left padding (`lmx.infer.engine`) and no real query reads them; a
  padding query reads only its own slot, so no softmax row is empty.
  """
  q_slot = index + jnp.arange(t, dtype=jnp.int32)  # (t,)
  k_slot = jnp.arange(s_max, dtype=jnp.int32)  # (S,)
  mask = (k_slot[None, :] <= q_slot[:, None])[None, None]  # (1, 1, t, S)
  if kv_start is None:
    return mask
  real = k_slot[None, :] >= kv_start[:, None]  # (B, S)
  own = k_slot[None, :] == q_slot[:, None]  # (t, S)
  return mask & (real[:, None, None, :] | own[None, None])  # (B, 1, t, S)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Attention of t new queries q (B, t, N, H) over a cache k/v (B, K, S, H) (LayerCache's
  layout), mask boolean (B or 1, 1, t, S) -> (B, t, N, H) in q's dtype. Query head n
  reads kv head n // (N/K); scores and softmax are float32, as in `_attend`."""
  b, t, n, h = q.shape
  kh = k.shape[1]
  g = n // kh
  qg = (q * jnp.asarray(h**-0.5, q.dtype)).reshape(b, t, kh, g, h)
  scores = jnp.einsum("btkgh,bksh->bkgts", qg, k.astype(q.dtype),
                      preferred_element_type=jnp.float32)  # (B, K, G, t, S)
  scores = jnp.where(mask[:, :, None], scores, jnp.float32(-1e30))
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksh->btkgh", probs, v)  # (B, t, K, G, H)
  return out.reshape(b, t, n, h).astype(q.dtype)


def window_mask(q_slot: jax.Array, k_slot: jax.Array, window: int) -> jax.Array:
  """Boolean (t, S): key slot s is within `window` of query slot q (q - s < window).
  Causality is applied separately."""
  return k_slot[None, :] > q_slot[:, None] - window


def query_block(t: int) -> int:
  """Queries per block of `blocked_causal_attention`: 64 up to T=512 (4 blocks at T=256,
  the size measured fastest on CPU), then T/8 so long sequences stay at 8 blocks."""
  return max(64, -(-t // 8))


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                             mask: jax.Array | None = None, block: int = 0) -> jax.Array:
  """Causal self-attention, one block of queries at a time: q (B, T, N, H), k/v (B, T, K, H)
  -> (B, T, N, H); mask None or boolean (B, 1, T, T) ANDed with causality.

  Query block [lo, hi) only meets keys [0, hi), so the fully masked upper triangle is never
  multiplied, exponentiated or differentiated (at 4 blocks, 10/16 of the full score
  matrix). Each block is one batched matmul per (batch, kv head) with the G = N/K query
  heads of a group stacked along the rows. Scores and softmax are float32; the result has
  q's dtype. Equal to `jax.nn.dot_product_attention(..., is_causal=True)` up to float
  summation order (tested).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  block = block or query_block(t)
  # (B, T, N, H) -> (B, K, G, T, H): query head n reads kv head n // G.
  qg = (q * jnp.asarray(h**-0.5, q.dtype)).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)
  # Batch and kv heads stay two dimensions (XLA merges them into one dot batch itself):
  # a reshape to B*K would merge a `data`-sharded and a `tensor`-sharded axis, which the
  # partitioner can only do by gathering q, k and v onto every device.
  kt = k.transpose(0, 2, 1, 3)  # (B, K, S, H)
  vt = v.transpose(0, 2, 1, 3)
  outs = []
  for lo in range(0, t, block):
    hi = min(lo + block, t)
    rows = hi - lo
    allowed = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]  # (rows, hi)
    allowed = allowed[None, None, None]  # (1, 1, 1, rows, hi)
    if mask is not None:
      allowed = allowed & mask[:, :, None, lo:hi, :hi]  # (B, 1, 1, rows, hi)
    qi = qg[:, :, :, lo:hi].reshape(b, kh, g * rows, h)
    scores = jnp.einsum("bkmh,bksh->bkms", qi, kt[:, :, :hi],
                        preferred_element_type=jnp.float32)
    scores = jnp.where(allowed, scores.reshape(b, kh, g, rows, hi), jnp.float32(-1e30))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kh, g * rows, hi)
    outs.append(jnp.einsum("bkms,bksh->bkmh", probs, vt[:, :, :hi]).reshape(b, kh, g, rows, h))
  out = jnp.concatenate(outs, axis=3)  # (B, K, G, T, H)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def _attend(q, k, v, mask, is_causal: bool, impl: str = "jax") -> jax.Array:
  """q (B, T, N, H), k/v (B, S, K, H) -> (B, T, N, H) by `impl` (ModelConfig.attention_impl):
  jax.nn.dot_product_attention, or `blocked_causal_attention` for full-sequence causal
  attention when impl is 'blocked' (or 'auto' on the CPU backend)."""
  blocked = impl == "blocked" or (impl == "auto" and jax.default_backend() == "cpu")
  blocked = blocked and is_causal and q.shape[1] == k.shape[1]
  dtype = q.dtype
  if dtype == jnp.float16 and jax.default_backend() == "cpu":
    # NOTE: XLA:CPU has no f16 x f16 -> f32 dot; fp16 runs there attend in float32.
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if blocked:
    return blocked_causal_attention(q, k, v, mask).astype(dtype)
  # NOTE: jax 0.10.2's XLA path promotes bf16 with float32 internally, which fails under
  # the strict dtype promotion our tests enable; allow standard promotion just here.
  with jax.numpy_dtype_promotion("standard"):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal).astype(dtype)


class Attention(Projections):
  PROJECTIONS = ("wq", "wk", "wv", "wo")

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    self.cfg = cfg
    init, out_init = normal(cfg.init_std), normal(output_init_std(cfg))
    self.wq = param(rngs.params(), (d, n, h), ("embed", "heads", "head_dim"), init)
    self.wk = param(rngs.params(), (d, k, h), ("embed", "kv_heads", "head_dim"), init)
    self.wv = param(rngs.params(), (d, k, h), ("embed", "kv_heads", "head_dim"), init)
    self.wo = param(rngs.params(), (n, h, d), ("heads", "head_dim", "embed"), out_init)
    if cfg.use_bias:
      self.bq = param(rngs.params(), (n, h), ("heads", "head_dim"), zeros)
      self.bk = param(rngs.params(), (k, h), ("kv_heads", "head_dim"), zeros)
      self.bv = param(rngs.params(), (k, h), ("kv_heads", "head_dim"), zeros)
      self.bo = param(rngs.params(), (d,), ("embed",), zeros)
    else:
      self.bq = self.bk = self.bv = self.bo = None

  def _w(self, p) -> jax.Array:
    return p[...].astype(compute_dtype(self.cfg))

  def _qkv(self, x: jax.Array, positions: jax.Array, key: jax.Array | None = None):
    q = self.proj("wq", x, key=key)  # (B, T, N, H)
    k = self.proj("wk", x, key=key)  # (B, T, K, H)
    v = self.proj("wv", x, key=key)
    if self.bq is not None:
      q, k, v = q + self._w(self.bq), k + self._w(self.bk), v + self._w(self.bv)
    if self.cfg.position == "rope":
      inv_freq = rope_inv_freq(self.cfg)  # None: plain RoPE
      q = apply_rope(q, positions, self.cfg.rope_theta, inv_freq)
      k = apply_rope(k, positions, self.cfg.rope_theta, inv_freq)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, v

  def _out(self, o: jax.Array, key: jax.Array | None = None) -> jax.Array:
    y = self.proj("wo", o, n_in=2, key=key)  # (B, T, N, H) -> (B, T, D)
    if self.bo is not None:
      y = y + self._w(self.bo)
    return y

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
    """Full-sequence causal attention: x (B, T, D), positions/segment_ids (B, T) -> (B, T, D).
    `key`: the dropout key of a training step (None: deterministic)."""
    q, k, v = self._qkv(x, positions, key)
    shared = getattr(self, "shared_segments", False)  # set by prompt tuning (lmx.peft)
    mask = None if segment_ids is None else segment_mask(segment_ids, shared)
    t = x.shape[1]
    if self.cfg.sliding_window:  # (1, 1, T, T), ANDed with causality and the segments
      idx = jnp.arange(t, dtype=jnp.int32)
      window = window_mask(idx, idx, self.cfg.sliding_window)[None, None]
      mask = window if mask is None else mask & window
    prefix = getattr(self, "prefix" + PEFT_SUFFIX, None)
    if prefix is not None:  # prefix tuning: P learned keys/values every query may read
      pk, pv = prefix(x.shape[0], k.dtype)  # (B, P, K, H)
      causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
      mask = causal if mask is None else mask & causal
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (pk.shape[1],), bool),
                              jnp.broadcast_to(mask, mask.shape[:-1] + (t,))], axis=-1)
      o = _attend(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), mask,
                  is_causal=False)
      return self._out(o, key)
    o = _attend(q, k, v, mask, is_causal=True, impl=self.cfg.attention_impl)  # (B, T, N, H)
    return self._out(o, key)

  def decode(self, x: jax.Array, positions: jax.Array, cache: LayerCache,
             index: jax.Array, kv_start: jax.Array | None = None, *,
             whole: bool = False) -> tuple[jax.Array, LayerCache]:
    """Attend t new tokens x (B, t, D) to the cached prefix plus themselves, as if written
    at slot `index`. Returns (B, t, D) and the t new keys/values (B, K, t, H) in the cache
    dtype; the caller writes them into the cache (`lmx.model.stack.decode_layers` does it
    once for all layers). whole=True returns instead this layer's whole cache with them
    written (B, K, S, H): the buffer attention read, so a caller that keeps it as the new
    cache (`UnrolledLayers`) updates it in place with no second write (two writes into one
    buffer can make XLA copy it every step). `kv_start` (B,): per-row left padding to skip
    (`cache_mask`). An int8 cache (k_scale set) gets the new keys/values quantized, and
    attention reads the whole cache dequantized, the new tokens included (what later steps
    will read too)."""
    q, k, v = self._qkv(x, positions)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, t, H): the cache layout
    start = (0, 0, index, 0)
    if cache.k_scale is None:
      k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
      k_all = jax.lax.dynamic_update_slice(cache.k, k, start)  # (B, K, S, H)
      v_all = jax.lax.dynamic_update_slice(cache.v, v, start)
      new = LayerCache(k=k_all, v=v_all) if whole else LayerCache(k=k, v=v)
    else:
      (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)  # (B, K, t, H), (B, K, t)
      written = LayerCache(k=jax.lax.dynamic_update_slice(cache.k, k, start),
                           v=jax.lax.dynamic_update_slice(cache.v, v, start),
                           k_scale=jax.lax.dynamic_update_slice(cache.k_scale, k_scale, start[:3]),
                           v_scale=jax.lax.dynamic_update_slice(cache.v_scale, v_scale, start[:3]))
      k_all = dequantize_kv(written.k, written.k_scale, q.dtype)  # (B, K, S, H)
      v_all = dequantize_kv(written.v, written.v_scale, q.dtype)
      new = written if whole else LayerCache(k=k, v=v, k_scale=k_scale, v_scale=v_scale)
    s_max = cache.k.shape[2]
    mask = cache_mask(index, x.shape[1], s_max, kv_start)
    if self.cfg.sliding_window:
      q_slot = index + jnp.arange(x.shape[1], dtype=jnp.int32)  # (t,)
      k_slot = jnp.arange(s_max, dtype=jnp.int32)  # (S,)
      mask = mask & window_mask(q_slot, k_slot, self.cfg.sliding_window)[None, None]
    prefix = getattr(self, "prefix" + PEFT_SUFFIX, None)
    if prefix is not None:  # prefix tuning: the learned keys/values sit before the cache
      pk, pv = prefix(x.shape[0], k_all.dtype)  # (B, P, K, H)
      k_all = jnp.concatenate([pk.transpose(0, 2, 1, 3), k_all], 2)
      v_all = jnp.concatenate([pv.transpose(0, 2, 1, 3), v_all], 2)
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (pk.shape[1],), bool), mask], -1)
    o = cached_attention(q, k_all, v_all, mask)  # (B, t, N, H)
    return self._out(o), new
