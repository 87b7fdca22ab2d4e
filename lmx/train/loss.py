"""Next-token cross entropy over a loss mask, with the optional PaLM z-loss.

Everything here is float32 whatever the compute dtype: the softmax over a large vocabulary
is the first place bf16/fp16 loses precision.

`chunked_lm_loss` gives the same sums without ever holding the (B, T, V) logits: it applies
the LM head to a few sequence positions at a time and, under differentiation, forms each
chunk's gradients in the forward pass (nothing stored or recomputed per chunk but d/d(hidden)
and the running d/d(head)). Measured on the default CPU step: ~3% faster than full logits
(docs/benchmarks.md); its point is memory -- at V=50257 one step's full logits are 400 MiB.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lmx.model.transformer import head_logits


def _sums(logits, targets, mask, z_loss):
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                     axis=-1)[..., 0]
  ce_sum = jnp.sum((lse - target_logit) * mask)
  return ce_sum, jnp.float32(z_loss) * jnp.sum(jnp.square(lse) * mask)


def _with_aux(ce_sum, z_sum, mask):
  n_tokens = jnp.sum(mask)
  # NOTE: an all-padding batch gives 0 / 1 = 0 rather than NaN.
  denom = jnp.maximum(n_tokens, 1.0)
  loss = (ce_sum + z_sum) / denom
  return loss, {"ce_sum": ce_sum, "z_sum": z_sum, "n_tokens": n_tokens, "ce": ce_sum / denom}


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
            z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-mean cross entropy (plus z-loss) over the positions where `loss_mask` is 1.

  Args:
    logits: (B, T, V) any float dtype (upcast to float32).
    targets: (B, T) int32 next-token ids.
    loss_mask: (B, T) float32, 1 where the target counts, 0 for padding / document ends.
    z_loss: weight of mean(logsumexp(logits)^2) over the counted tokens (PaLM uses 1e-4).

  Returns:
    (loss, aux): loss = (ce_sum + z_sum) / n_tokens, a float32 scalar. `aux` holds the sums
    `ce_sum`, `z_sum` (already weighted), `n_tokens` and the mean `ce`, so microbatches can
    be combined exactly by adding sums and dividing once.
  """
  mask = loss_mask.astype(jnp.float32)
  return _with_aux(*_sums(logits, targets, mask, z_loss), mask)


def seq_chunk(batch: int, seq_len: int, chunk_tokens: int) -> int:
  """Sequence positions per loss chunk: the largest divisor of seq_len with
  batch * positions <= chunk_tokens (at least 1)."""
  best = 1
  for t in range(1, seq_len + 1):
    if seq_len % t == 0 and batch * t <= chunk_tokens:
      best = t
  return best


def chunked_lm_loss(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                    loss_mask: jax.Array, z_loss: float = 0.0,
                    chunk_tokens: int = 256) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`lm_loss(hidden @ head, ...)` computed `seq_chunk(B, T, chunk_tokens)` positions at a
  time; equal to it up to float summation order.

  Under differentiation the gradients are formed chunk by chunk in the forward pass (the
  loss is a sum, so d(loss)/d(logits) = softmax - onehot is known there) and only scaled
  by the incoming cotangent in the backward pass: no logits are stored or recomputed.

  Args:
    hidden: (B, T, D) final-normed hidden states; head: (D, V) output projection.
    Other arguments and the result as in `lm_loss`.
  """
  b, t = targets.shape
  mask = loss_mask.astype(jnp.float32)
  step = seq_chunk(b, t, chunk_tokens)
  ce_sum, z_sum = _head_ce(hidden, head, targets, mask, float(z_loss), step)
  return _with_aux(ce_sum, z_sum, mask)


def _chunks(x, step):  # (B, T, ...) -> (T/step, B, step, ...): batch stays the sharded axis
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // step, step, *x.shape[2:]), 1, 0)


def _unchunk(x):  # inverse of _chunks
  c, b, step = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, c * step, *x.shape[3:])


def _head_ce_sums(hidden, head, targets, mask, z_loss, step):
  def one(_, chunk):
    h, tg, m = chunk
    return None, _sums(head_logits(h, head), tg, m, z_loss)

  _, (ce, z) = jax.lax.scan(one, None, (_chunks(hidden, step), _chunks(targets, step),
                                        _chunks(mask, step)))
  return jnp.sum(ce), jnp.sum(z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_ce(hidden, head, targets, mask, z_loss, step):
  return _head_ce_sums(hidden, head, targets, mask, z_loss, step)


def _head_ce_fwd(hidden, head, targets, mask, z_loss, step):
  d, v = head.shape
  with_z = z_loss > 0

  def one(dw, chunk):
    h, tg, m = chunk  # (B, s, D), (B, s), (B, s)
    logits = head_logits(h, head)  # (B, s, V) float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    p = jnp.exp(logits - lse[..., None])
    onehot = tg[..., None] == jnp.arange(v, dtype=tg.dtype)
    ce = jnp.sum((lse - jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)) * m)
    g = [(p - onehot.astype(p.dtype)) * m[..., None]]  # d ce / d logits
    z = jnp.float32(z_loss) * jnp.sum(jnp.square(lse) * m)
    if with_z:
      g.append(p * (2.0 * z_loss * lse * m)[..., None])  # d z / d logits
    dh = [jnp.einsum("BSV,DV->BSD", gi.astype(head.dtype), head,
                     preferred_element_type=jnp.float32) for gi in g]
    dw = [acc + jnp.einsum("BSD,BSV->DV", h, gi.astype(h.dtype),
                           preferred_element_type=jnp.float32) for acc, gi in zip(dw, g)]
    return dw, (ce, z, dh)

  dw0 = [jnp.zeros((d, v), jnp.float32) for _ in range(2 if with_z else 1)]
  dw, (ce, z, dh) = jax.lax.scan(one, dw0, (_chunks(hidden, step), _chunks(targets, step),
                                            _chunks(mask, step)))
  dh = [_unchunk(x) for x in dh]
  # Empty arrays carry the primal dtypes (residuals must be arrays).
  dtypes = (jnp.zeros((0,), hidden.dtype), jnp.zeros((0,), head.dtype))
  return (jnp.sum(ce), jnp.sum(z)), (dh, dw, dtypes)


def _head_ce_bwd(z_loss, step, res, cot):
  del z_loss, step
  dh, dw, (h_like, w_like) = res
  g_ce, g_z = cot
  scale = [g_ce, g_z][:len(dh)]
  d_hidden = sum(g * x for g, x in zip(scale, dh)).astype(h_like.dtype)
  d_head = sum(g * x for g, x in zip(scale, dw)).astype(w_like.dtype)
  return d_hidden, d_head, None, None


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)
