"""lmx.model."""
