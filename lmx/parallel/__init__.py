"""Meshes, logical-axis rules and activation sharding."""
