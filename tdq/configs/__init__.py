"""Hydra configs of `tdq run` (also reachable as the top-level `configs/` folder)."""
