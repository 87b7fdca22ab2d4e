"""lmx.infer."""
