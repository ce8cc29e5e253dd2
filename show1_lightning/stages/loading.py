"""Rebuilding a trained stage from a Lightning checkpoint written by train.py."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch

from show1_lightning.diffusion.module import DiffusionStage


def load_stage_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionStage:
    """Instantiate the stage from the config stored in the checkpoint (``stage_config``, resolved at
    training time) and load its weights and EMA state. The result is in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "stage_config" not in ckpt:
        raise KeyError(f"{path} has no 'stage_config': not a checkpoint written by train.py")
    stage: DiffusionStage = hydra.utils.instantiate(ckpt["stage_config"], _convert_="all")
    stage.load_state_dict(ckpt["state_dict"])
    stage.on_load_checkpoint(ckpt)
    stage.stage_config = ckpt["stage_config"]
    return stage.eval()
