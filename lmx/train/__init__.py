"""lmx.train."""
