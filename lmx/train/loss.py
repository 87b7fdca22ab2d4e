"""Next-token cross entropy over a loss mask, with the optional PaLM z-loss.

Everything here is float32 whatever the compute dtype: the softmax over a large vocabulary
is the first place bf16/fp16 loses precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
  logits = logits.astype(jnp.float32)
  mask = loss_mask.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                     axis=-1)[..., 0]  # (B, T)
  ce_sum = jnp.sum((lse - target_logit) * mask)
  z_sum = jnp.float32(z_loss) * jnp.sum(jnp.square(lse) * mask)
  n_tokens = jnp.sum(mask)
  # NOTE: an all-padding batch gives 0 / 1 = 0 rather than NaN.
  denom = jnp.maximum(n_tokens, 1.0)
  loss = (ce_sum + z_sum) / denom
  return loss, {"ce_sum": ce_sum, "z_sum": z_sum, "n_tokens": n_tokens, "ce": ce_sum / denom}
