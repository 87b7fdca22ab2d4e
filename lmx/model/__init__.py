"""lmx.model: the decoder-only Transformer (Flax NNX)."""

from lmx.model.layers import count_model_params, param
from lmx.model.stack import LayerStack, run_layers
from lmx.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "LayerStack", "Transformer", "count_model_params", "param", "run_layers"]
