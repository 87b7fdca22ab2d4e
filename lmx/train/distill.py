"""Knowledge-distillation loss (Hinton et al. 2015): a student matches a teacher's softened
next-token distribution, mixed with the usual hard-label cross entropy.

Like `chunked_lm_loss`, it applies both LM heads a few sequence positions at a time, so
neither model's (B, T, V) logits are ever held. Each chunk's body is under `jax.checkpoint`:
the backward pass recomputes that chunk's logits from its hidden states rather than storing
them (unlike `chunked_lm_loss` there is no closed-form gradient to form in the forward pass
here, so recomputing is the cheap way to keep memory at one chunk). Everything is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmx.model.transformer import head_logits
from lmx.train.loss import _chunks, seq_chunk


def _kd_per_token(s_logits, t_logits, temperature, top_k):
  """KL(p_teacher^T || p_student^T) per position, float32 (B, s)."""
  log_q = jax.nn.log_softmax(s_logits / temperature, axis=-1)  # (B, s, V) student, full vocab
  t_scaled = t_logits / temperature
  if top_k:
    # Teacher renormalized over its top-k ids; the student's full-vocabulary log-probs read
    # at those ids. This is the exact KL between the truncated teacher (zero off its
    # support) and the untruncated student, so it is >= 0 and top_k = V is the full KL.
    t_top, ids = jax.lax.top_k(t_scaled, top_k)  # (B, s, k), (B, s, k)
    log_p = jax.nn.log_softmax(t_top, axis=-1)
    log_q = jnp.take_along_axis(log_q, ids, axis=-1)
  else:
    log_p = jax.nn.log_softmax(t_scaled, axis=-1)
  # NOTE: p = exp(log_p) may underflow to 0 where log_p stays finite, so 0 * finite = 0.
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _ce_per_token(s_logits, targets):
  lse = jax.nn.logsumexp(s_logits, axis=-1)
  target_logit = jnp.take_along_axis(s_logits, targets[..., None].astype(jnp.int32),
                                     axis=-1)[..., 0]
  return lse - target_logit


def distill_sums(s_hidden: jax.Array, s_head: jax.Array, t_hidden: jax.Array,
                 t_head: jax.Array, targets: jax.Array, loss_mask: jax.Array, *,
                 temperature: float, alpha: float, top_k: int = 0,
                 chunk_tokens: int = 512) -> dict[str, jax.Array]:
  """Distillation and hard-label sums over the positions where `loss_mask` is 1.

  loss_sum = alpha * kd_sum + (1 - alpha) * ce_sum: `alpha` weights the soft (teacher) term,
  so alpha = 1 is pure distillation and alpha = 0 the plain next-token cross entropy.

  kd_sum = sum_tokens T^2 * KL(softmax(t_logits / T) || softmax(s_logits / T)). The T^2
  keeps the soft term's gradient (which scales as 1/T^2) comparable to the hard term's as
  T changes. With top_k > 0 the teacher is renormalized over its k largest logits per
  position and the KL is taken over that support, with the student's log-probs over the
  full vocabulary (it is not renormalized); top_k = 0 uses the full vocabulary.

  Args:
    s_hidden: (B, T, Ds) student final-normed hidden states, in its compute dtype.
    s_head: (Ds, V) student output projection.
    t_hidden: (B, T, Dt) teacher hidden states; t_head: (Dt, V). No gradient reaches
      either (both go through `stop_gradient`).
    targets: (B, T) int32 next-token ids (the hard labels for ce_sum).
    loss_mask: (B, T), 1 where the position counts, 0 for padding / document ends.
    temperature: T > 0, a static Python number; ce_sum is always at T = 1.
    alpha: static, in [0, 1].
    top_k: 0 for the full teacher distribution, else 1 <= top_k <= V.
    chunk_tokens: at most this many (B * positions) per chunk; see `seq_chunk`.

  Returns:
    float32 scalars `kd_sum`, `ce_sum`, `loss_sum` and `n_tokens` (sum of the mask), so
    microbatches combine by adding sums and dividing once by n_tokens.
  """
  temperature, alpha, top_k = float(temperature), float(alpha), int(top_k)
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
  vocab = s_head.shape[-1]
  if t_head.shape[-1] != vocab:
    raise ValueError(f"teacher vocab {t_head.shape[-1]} != student vocab {vocab}.")
  if not 0 <= top_k <= vocab:
    raise ValueError(f"top_k must be in [0, V={vocab}], got {top_k}.")

  t_hidden, t_head = jax.lax.stop_gradient(t_hidden), jax.lax.stop_gradient(t_head)
  b, t = targets.shape
  mask = loss_mask.astype(jnp.float32)
  step = seq_chunk(b, t, chunk_tokens)

  def one(_, chunk):
    sh, th, tg, m = chunk  # (B, s, Ds), (B, s, Dt), (B, s), (B, s)
    s_logits = head_logits(sh, s_head)  # (B, s, V) float32
    t_logits = head_logits(th, t_head)  # (B, s, V) float32
    kd = jnp.sum(_kd_per_token(s_logits, t_logits, temperature, top_k) * m)
    ce = jnp.sum(_ce_per_token(s_logits, tg) * m)
    return None, (kd, ce)

  # prevent_cse=False: scan already keeps the recomputation from being merged away.
  _, (kd, ce) = jax.lax.scan(jax.checkpoint(one, prevent_cse=False), None,
                             (_chunks(s_hidden, step), _chunks(t_hidden, step),
                              _chunks(targets, step), _chunks(mask, step)))
  kd_sum = jnp.float32(temperature ** 2) * jnp.sum(kd)
  ce_sum = jnp.sum(ce)
  return {"kd_sum": kd_sum, "ce_sum": ce_sum,
          "loss_sum": jnp.float32(alpha) * kd_sum + jnp.float32(1.0 - alpha) * ce_sum,
          "n_tokens": jnp.sum(mask)}
