"""Export of the EMA weights in the diffusers layout at the end of fit."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


def export_stage(pl_module: L.LightningModule, out_dir: str | Path, use_ema: bool = True) -> Path:
    """Save the stage's UNet (EMA weights when available) with ``save_pretrained`` into ``out_dir/unet``
    (``config.json`` + ``diffusion_pytorch_model.safetensors``), its noise schedule into
    ``out_dir/scheduler`` and, when known, the stage config as ``out_dir/stage.json`` (so the cascade can
    rebuild the stage from the folder)."""
    out_dir = Path(out_dir)
    unet = copy.deepcopy(pl_module.unet).to("cpu")
    if use_ema and getattr(pl_module, "ema", None) is not None:
        ema = copy.deepcopy(pl_module.ema)
        ema.to("cpu")
        ema.copy_to(unet.parameters())
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    pl_module.noise_scheduler.save_pretrained(out_dir / "scheduler")
    if getattr(pl_module, "stage_config", None):
        (out_dir / "stage.json").write_text(json.dumps(pl_module.stage_config, indent=2))
    return out_dir


class ExportEMACallback(L.Callback):
    """At the end of fit, global rank 0 writes the EMA UNet in the diffusers layout to ``dirpath``."""

    def __init__(self, dirpath: str = "export", use_ema: bool = True) -> None:
        self.dirpath = dirpath
        self.use_ema = use_ema

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = export_stage(pl_module, self.dirpath, self.use_ema)
        rank_zero_info(f"exported {'EMA ' if self.use_ema else ''}weights (diffusers layout) to {path}")
