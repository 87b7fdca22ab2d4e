"""Parameter-efficient fine-tuning as modules attached to an unchanged model.

The model has four hook points, each a named attribute looked up at run time, so a method
attaches modules without editing any layer:

    projection   Attention/MLP `proj(name, x)` -> `<name>_peft(x, y)`   LoRA, QLoRA, BitFit
    sublayer     Block output of attention / MLP -> `attn_peft(y)`, `mlp_peft(y)`   adapters
    attention    Attention `prefix_peft(batch, dtype)` -> (P, K, H) keys/values   prefix
    input        Transformer `prompt_peft(batch, dtype)` -> (P, D) vectors   prompt
    vocabulary   Transformer `embed_peft(table)` -> table   rows of added tokens (SFT)

Everything a method adds is named `*_peft`, and that is what trains (`trainable_pattern`;
BitFit also trains the model's own biases). Modules inside the layer stack are created
with its leading 'layers' axis, so the scan slices them with the layer they belong to.
QLoRA also swaps each target's float weight for an NF4 copy (lmx.quant) that the
projection dequantizes on the fly.

    apply_peft(model, cfg.peft, rngs)   # in place, after loading the base weights
    merge_lora(model)                   # fold LoRA into the base weights (for export)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmx.config import ConfigError, PeftConfig
from lmx.model.layers import PEFT_SUFFIX, normal, param, project, zeros

LEAD, LEAD_NAMES = None, ("layers",)
_BIASES = r"\.b(q|k|v|o|_up|_gate|_down)$"


def trainable_pattern(cfg: PeftConfig) -> str:
  """The `train.trainable` regular expression of a PEFT method."""
  if cfg.method == "bitfit":
    return PEFT_SUFFIX + "|" + _BIASES
  return PEFT_SUFFIX


def _names(v: nnx.Variable) -> tuple:
  return tuple(v.get_metadata().get("out_sharding") or (None,) * v.get_value().ndim)


class LoRA(nnx.Module):
  """y + (alpha / rank) * (x A) B for a projection weight w (*in, *out), n_in input axes.

  A (*in, r) starts normal(1 / sqrt(fan_in)), B (r, *out) at zero, so the adapted model
  starts equal to the base (Hu et al. 2021). Both follow w's logical axis names (and its
  leading 'layers' axis when w is stacked), so they shard like the weight they adapt.
  """

  def __init__(self, w: nnx.Variable, n_in: int, rank: int, alpha: float, *, rngs: nnx.Rngs,
               dropout: float = 0.0):
    shape, names = w.get_value().shape, _names(w)
    lead = 1 if names and names[0] == "layers" else 0
    ins, outs = shape[lead:lead + n_in], shape[lead + n_in:]
    self.n_in, self.scale, self.dropout = n_in, alpha / rank, dropout
    self.a = param(rngs.params(), shape[:lead] + ins + (rank,),
                   names[:lead] + names[lead:lead + n_in] + (None,),
                   normal(1.0 / math.sqrt(math.prod(ins))))
    self.b = param(rngs.params(), shape[:lead] + (rank,) + outs,
                   names[:lead] + (None,) + names[lead + n_in:], zeros)

  def delta_weight(self) -> jax.Array:
    """scale * A B in w's shape (float32): what merging adds to the weight."""
    a, b = self.a.get_value(), self.b.get_value()
    lead = a.ndim - self.n_in - 1
    a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
    b2 = b.reshape(b.shape[:lead + 1] + (-1,))
    w = jnp.einsum("...kr,...rn->...kn", a2, b2)
    return self.scale * w.reshape(a.shape[:-1] + b.shape[lead + 1:])

  def __call__(self, x: jax.Array, y: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """y + the low-rank update of x; with a training step's `key` and dropout > 0, x is
    dropped out (inverted dropout) on the adapter's path only, as in Hu et al."""
    if key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros((), x.dtype))
    a = self.a[...].astype(x.dtype)
    b = self.b[...].astype(x.dtype)
    return y + (self.scale * project(project(x, a, self.n_in), b)).astype(y.dtype)


class Bias(nnx.Module):
  """BitFit's trainable output bias (zero at init) on a projection without one."""

  def __init__(self, w: nnx.Variable, n_in: int):
    shape, names = w.get_value().shape, _names(w)
    lead = 1 if names and names[0] == "layers" else 0
    self.b = param(None, shape[:lead] + shape[lead + n_in:], names[:lead] + names[lead + n_in:],
                   lambda k, s, d: jnp.zeros(s, d))

  def __call__(self, x: jax.Array, y: jax.Array, key: jax.Array | None = None) -> jax.Array:
    return y + self.b[...].astype(y.dtype)


class Adapter(nnx.Module):
  """Bottleneck adapter (Houlsby et al. 2019): y + up(gelu(down(y))), up zero at init."""

  def __init__(self, d: int, dim: int, layers: int, *, rngs: nnx.Rngs):
    self.down = param(rngs.params(), (layers, d, dim), ("layers", "embed", None),
                      normal(1.0 / math.sqrt(d)))
    self.up = param(rngs.params(), (layers, dim, d), ("layers", None, "embed"), zeros)

  def __call__(self, y: jax.Array) -> jax.Array:
    h = jax.nn.gelu(project(y, self.down[...].astype(y.dtype)))
    return y + project(h, self.up[...].astype(y.dtype))


class Prefix(nnx.Module):
  """Prefix tuning (Li & Liang 2021): P learned keys and values per layer, (L, P, K, H)
  stacked, read by every query before the sequence's own keys."""

  def __init__(self, length: int, kv_heads: int, head_dim: int, layers: int, std: float, *,
               rngs: nnx.Rngs):
    shape, names = (layers, length, kv_heads, head_dim), ("layers", None, "kv_heads", "head_dim")
    self.k = param(rngs.params(), shape, names, normal(std))
    self.v = param(rngs.params(), shape, names, normal(std))

  def __call__(self, batch: int, dtype) -> tuple[jax.Array, jax.Array]:
    k, v = (jnp.broadcast_to(p[...].astype(dtype)[None], (batch,) + p.shape)
            for p in (self.k, self.v))
    return k, v


class Prompt(nnx.Module):
  """Prompt tuning (Lester et al. 2021): P learned input vectors before every row."""

  def __init__(self, length: int, init_rows: jax.Array):
    self.length = length
    self.table = nnx.Param(init_rows, out_sharding=(None, "embed"), eager_sharding=False)

  def __call__(self, batch: int, dtype) -> jax.Array:
    return jnp.broadcast_to(self.table[...].astype(dtype)[None], (batch,) + self.table.shape)


class NewTokens(nnx.Module):
  """Trainable rows for tokens the base never saw (SFT's chat role tokens), as a delta on
  the frozen embedding's last `n` rows (and the untied head's last `n` columns), zero at
  init. Without it a frozen, tied embedding could never learn to emit `<|end|>`: its row
  stays where the base put it."""

  def __init__(self, vocab: int, d: int, n: int, tied: bool):
    self.start = vocab - n
    self.rows = param(None, (n, d), (None, "embed"), lambda k, s, dt: jnp.zeros(s, dt))
    self.cols = None if tied else param(None, (d, n), ("embed", None),
                                        lambda k, s, dt: jnp.zeros(s, dt))

  def __call__(self, table: jax.Array) -> jax.Array:  # (V, D) -> (V, D)
    return table.at[self.start:].add(self.rows[...])

  def head(self, w: jax.Array) -> jax.Array:  # (D, V) -> (D, V), untied heads only
    return w.at[:, self.start:].add(self.cols[...].astype(w.dtype))


def new_token_count(exp) -> int:
  """Tokens a run adds to its base's vocabulary: the chat role tokens for SFT data."""
  if exp.data.format != "sft":
    return 0
  from lmx.data.sft import ROLE_TOKENS
  return len(ROLE_TOKENS)


def projection_targets(model, cfg: PeftConfig) -> list[tuple[nnx.Module, str, int]]:
  """(module, weight name, n_in) of every LoRA/QLoRA target in the layer stack; a name that
  matches nothing fails with the valid names."""
  block = model.layers.block
  available = {}
  for mod in (block.attn, block.mlp):
    for name in mod.projection_names():
      if getattr(mod, name, None) is not None:
        available[name] = (mod, name, 2 if name == "wo" else 1)
  wanted = list(available) if cfg.targets.strip() == "all" else [
      t.strip() for t in cfg.targets.split(",") if t.strip()]
  bad = [t for t in wanted if t not in available]
  if bad or not wanted:
    raise ConfigError(f"Invalid config: `peft.targets` is {cfg.targets!r}; "
                      f"{bad[0] if bad else 'it'!r} names no projection of this model: valid "
                      f"names are {', '.join(available)} (or 'all').")
  return [available[t] for t in wanted]


def apply_peft(model, cfg: PeftConfig, rngs: nnx.Rngs, new_tokens: int = 0) -> None:
  """Attach `cfg.method`'s modules to `model` in place (see the module docstring), and
  trainable rows for the last `new_tokens` vocabulary entries (`new_token_count(exp)`)."""
  if not cfg.method:
    return
  mcfg = model.cfg
  if new_tokens:
    model.embed_peft = NewTokens(mcfg.vocab_size, mcfg.d_model, new_tokens,
                                 model.lm_head is None)
  block = model.layers.block
  L = mcfg.n_layers
  if cfg.method in ("lora", "qlora"):
    model.uses_dropout = cfg.dropout > 0  # the train step's key then reaches the layers
    for mod, name, n_in in projection_targets(model, cfg):
      w = getattr(mod, name)
      setattr(mod, name + PEFT_SUFFIX, LoRA(w, n_in, cfg.rank, cfg.alpha, rngs=rngs,
                                            dropout=cfg.dropout))
      if cfg.method == "qlora":
        from lmx.peft.qlora import NF4Weight
        setattr(mod, name, NF4Weight(w, n_in, cfg.quant_group))
  elif cfg.method == "bitfit":
    for mod in (block.attn, block.mlp):
      for name in mod.projection_names():
        w = getattr(mod, name, None)
        has_bias = getattr(mod, "b" + name[1:], None) is not None
        if w is not None and not has_bias:
          setattr(mod, name + PEFT_SUFFIX, Bias(w, 2 if name == "wo" else 1))
  elif cfg.method == "adapter":
    setattr(block, "attn" + PEFT_SUFFIX, Adapter(mcfg.d_model, cfg.adapter_dim, L, rngs=rngs))
    setattr(block, "mlp" + PEFT_SUFFIX, Adapter(mcfg.d_model, cfg.adapter_dim, L, rngs=rngs))
  elif cfg.method == "prefix":
    setattr(block.attn, "prefix" + PEFT_SUFFIX,
            Prefix(cfg.num_virtual_tokens, mcfg.kv_heads, mcfg.dim_per_head, L, mcfg.init_std,
                   rngs=rngs))
  elif cfg.method == "prompt":
    if mcfg.position == "learned" and cfg.num_virtual_tokens + 1 > mcfg.max_seq_len:
      raise ConfigError("Invalid config: `peft.num_virtual_tokens` must leave room in "
                        f"model.max_seq_len={mcfg.max_seq_len} for the sequence.")
    # Initialized from the embeddings of P vocabulary tokens (Lester et al.): rows that
    # already live where the model's inputs do.
    ids = jax.random.randint(rngs.params(), (cfg.num_virtual_tokens,), 4, mcfg.vocab_size)
    setattr(model, "prompt" + PEFT_SUFFIX,
            Prompt(cfg.num_virtual_tokens, jnp.take(model.embed.get_value(), ids, axis=0)))
    block.attn.shared_segments = True  # every segment reads the virtual tokens (segment -1)


def merge_lora(model) -> int:
  """Fold every LoRA update into its base weight and remove the adapter (in place):
  w <- w + (alpha / r) A B; added-token rows (`NewTokens`) join the embedding. A QLoRA
  weight is dequantized first (the merged model is float). Returns the number of weights
  merged."""
  n = 0
  block = model.layers.block
  for mod in (block.attn, block.mlp):
    for name in mod.projection_names():
      hook = getattr(mod, name + PEFT_SUFFIX, None)
      if not isinstance(hook, LoRA):
        continue
      w = getattr(mod, name)
      if not isinstance(w, nnx.Variable):  # a quantized base: back to a float Param
        w = w.to_param()
        setattr(mod, name, w)
      w.set_value(w.get_value() + hook.delta_weight())
      delattr(mod, name + PEFT_SUFFIX)
      n += 1
  rows = getattr(model, "embed" + PEFT_SUFFIX, None)
  if rows is not None:  # the added tokens' trained rows become ordinary embedding rows
    model.embed.set_value(rows(model.embed.get_value()))
    if model.lm_head is not None:
      model.lm_head.set_value(rows.head(model.lm_head.get_value()))
    delattr(model, "embed" + PEFT_SUFFIX)
  return n


def peft_counts(exp) -> dict:
  """Trainable vs all parameters of `exp`'s model with its PEFT modules, shape-only:
  {'trainable_params', 'total_params', 'trainable_fraction'}. `total_params` counts
  weights, not storage: a QLoRA base weight counts its float elements (its NF4 codes and
  scales are reported as `frozen_base_bytes`)."""
  from lmx.model import Transformer
  from lmx.model.layers import count_model_params
  from lmx.peft.qlora import NF4Weight, QParam
  from lmx.train.trainable import split_trainable

  def build():
    model = Transformer(exp.model, rngs=nnx.Rngs(params=0))
    apply_peft(model, exp.peft, nnx.Rngs(params=1), new_token_count(exp))
    return model

  model = nnx.eval_shape(build)
  params = nnx.state(model, nnx.Param)
  train, frozen = split_trainable(params, exp.train.trainable)
  n_train = count_model_params(train)
  quant = [m for _, m in nnx.iter_graph(model) if isinstance(m, NF4Weight)]
  stored = sum(x.get_value().size for _, x in nnx.iter_graph(model) if isinstance(x, QParam))
  logical = sum(math.prod(dict(m.static)["shape"]) * (model.cfg.n_layers if m.stacked else 1)
                for m in quant)
  total = count_model_params(params) - stored + logical
  out = {"trainable_params": n_train, "total_params": total,
         "trainable_fraction": n_train / total}
  if quant:
    out["frozen_base_bytes"] = sum(
        x.get_value().size * x.get_value().dtype.itemsize
        for _, x in nnx.iter_graph(model) if isinstance(x, QParam))
    out["frozen_base_float32_bytes"] = 4 * logical
  return out


def peft_finish(exp):
  """`finish(model, rngs, extra)` for lmx.train.state.plan_train_state: attaches
  `exp.peft`'s modules (None without PEFT)."""
  if not exp.peft.method:
    return None
  n = new_token_count(exp)
  return lambda model, rngs, extra=None: apply_peft(model, exp.peft, rngs, n)
