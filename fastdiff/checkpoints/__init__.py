"""Checkpoint formats: detection, safe reading and one converter per foreign layout."""
