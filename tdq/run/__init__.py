"""`tdq run`: the Hydra-configured main job (load → reference → profile → plan → quantize → calibrate → sample →
evaluate → report)."""
