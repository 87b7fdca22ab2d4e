"""lmx.eval."""
