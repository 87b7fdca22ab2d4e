"""lmx: a JAX/Flax NNX research framework for decoder-only language models."""

__version__ = "0.1.0"
