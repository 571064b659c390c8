"""Small helpers shared across fastdiff (files, devices)."""
