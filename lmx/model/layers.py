"""Parameter creation and dtype helpers shared by every layer.

Every trainable array in lmx is made by `param`, which records its *logical* axis names
(see `lmx.parallel.rules`) as the Variable's `out_sharding` metadata. Nothing is placed on
devices here (`eager_sharding=False`): the trainer reads the names back with
`lmx.parallel.mesh.state_shardings` and allocates the state sharded in one jitted init.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lmx.config import ModelConfig
from lmx.parallel.rules import DEFAULT_RULES

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]
_KNOWN_NAMES = frozenset(name for name, _ in DEFAULT_RULES)


def normal(std: float) -> Initializer:
  return jax.nn.initializers.normal(stddev=std)


zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones


def param(key: jax.Array, shape: Sequence[int], names: Sequence[str | None],
          init: Initializer = zeros, dtype=jnp.float32) -> nnx.Param:
  """A float32 (by default) `nnx.Param` of `shape`, annotated with logical axis `names`."""
  shape, names = tuple(int(s) for s in shape), tuple(names)
  if len(shape) != len(names):
    raise ValueError(f"param: shape {shape} has {len(shape)} dims but names {names} has "
                     f"{len(names)}; give one logical name (or None) per dimension.")
  unknown = [n for n in names if n is not None and n not in _KNOWN_NAMES]
  if unknown:
    raise ValueError(f"param: logical axis {unknown[0]!r} is not in lmx.parallel.rules; "
                     f"known names are {sorted(_KNOWN_NAMES)}.")
  return nnx.Param(init(key, shape, dtype), out_sharding=names, eager_sharding=False)


PROJECTION = "lmx_projection"


def project(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
  """Contract the last `n_in` axes of x (B, T, ...) with the first `n_in` axes of w:
  (B, T, *w.shape[:n_in]) -> (B, T, *w.shape[n_in:]), as one (B*T, K) x (K, N) matmul.

  The value is the einsum's; the VJP is written out (`_matmul`) so the weight gradient is
  contracted over (B, T) in the form XLA:CPU hands to its fast matmul kernel. Plain
  autodiff of the einsum made XLA transpose the wide (tokens, N) cotangent and run a slow
  generic dot instead: 13% of the default train step on CPU (docs/benchmarks.md).
  """
  b, t = x.shape[:2]
  k = math.prod(w.shape[:n_in])
  y = _matmul(x.reshape(b, t, k), w.reshape(k, -1))
  # Named, because remat policies cannot see the dot inside a custom_vjp: the save_dots
  # policy saves values with this name (lmx.model.transformer).
  y = checkpoint_name(y, PROJECTION)
  return y.reshape(b, t, *w.shape[n_in:])


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:  # (B, T, K) x (K, N) -> (B, T, N)
  return jnp.einsum("BTK,KN->BTN", x, w)


def _matmul_fwd(x, w):
  return _matmul(x, w), (x, w)


def _matmul_bwd(res, g):
  x, w = res
  return jnp.einsum("BTN,KN->BTK", g, w), jnp.einsum("BTK,BTN->KN", x, g)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


PEFT_SUFFIX = "_peft"


class Projections(nnx.Module):
  """Mixin for modules whose weights are projections (Attention, MLP): every projection
  goes through `self.proj(name, x)`, the one place adapters and quantized weights plug in.

  `getattr(self, name)` is the weight: an `nnx.Param` (float32, cast to the compute dtype
  at use) or a weight module (e.g. a quantized weight, lmx.peft) called as
  `w(x, dtype, n_in)`. An optional hook `getattr(self, name + '_peft')` (LoRA, BitFit
  biases; attached by lmx.peft.apply_peft) maps (x, y) -> y. Without a hook and with a
  Param weight this is `project(x, w)`, as before.
  """

  cfg: ModelConfig

  def proj(self, name: str, x: jax.Array, n_in: int = 1,
           key: jax.Array | None = None) -> jax.Array:
    """x through projection `name` (and its hook; `key`, when training with dropout, is
    folded with the projection's index so each projection draws its own mask)."""
    w = getattr(self, name)
    dtype = compute_dtype(self.cfg)
    if isinstance(w, nnx.Variable):
      y = project(x, w[...].astype(dtype), n_in)
    else:
      y = w(x, dtype, n_in)
    hook = getattr(self, name + PEFT_SUFFIX, None)
    if hook is None:
      return y
    if key is None:
      return hook(x, y)
    return hook(x, y, key=jax.random.fold_in(key, self.projection_names().index(name)))

  def projection_names(self) -> tuple[str, ...]:
    """The names `proj` is called with (the LoRA / quantization targets)."""
    return tuple(getattr(self, "PROJECTIONS", ()))


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  """The activation dtype; parameters stay float32 and are cast at use."""
  return jnp.dtype(cfg.dtype)


def output_init_std(cfg: ModelConfig) -> float:
  """GPT-2's scaled init for projections that write into the residual stream.

  Each block adds two such outputs (attention and MLP), so the residual variance grows with
  2 * n_layers; scaling their std by 1/sqrt(2 * n_layers) keeps it O(1) at init.
  """
  return cfg.init_std / (2 * cfg.n_layers) ** 0.5


def count_model_params(model_or_state) -> int:
  """Number of scalars in all `nnx.Param`s of a module, an `nnx.State` or an abstract state."""
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
  else:
    state = model_or_state
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  total = 0
  for leaf in leaves:
    if isinstance(leaf, nnx.Variable):
      if not isinstance(leaf, nnx.Param):
        continue
      leaf = leaf.get_value()
    total += int(jnp.size(leaf)) if not hasattr(leaf, "size") else int(leaf.size)
  return total
