"""lmx.interop."""
