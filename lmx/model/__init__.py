"""lmx.model: the decoder-only Transformer (Flax NNX)."""

from lmx.model.layers import count_model_params, param
from lmx.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "Transformer", "count_model_params", "param"]
