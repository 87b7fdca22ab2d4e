"""lmx.data."""
