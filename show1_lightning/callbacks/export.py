"""Export of the EMA weights in the diffusers layout at the end of fit."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from show1_lightning.fileio import replace_dir, temp_sibling_dir


def export_stage(pl_module: L.LightningModule, out_dir: str | Path, use_ema: bool = True) -> Path:
    """Save the stage's UNet (EMA weights when available) with ``save_pretrained`` into ``out_dir/unet``
    (``config.json`` + ``diffusion_pytorch_model.safetensors``), its noise schedule into
    ``out_dir/scheduler`` and, when known, the stage config as ``out_dir/stage.json`` (so the cascade can
    rebuild the stage from the folder).

    The folder is built in a hidden temporary sibling and renamed into place (an existing export is swapped
    out, see ``fileio.replace_dir``): a kill leaves the previous export or the new one, never a mix or a
    half-written weights file. Temporary siblings left by a killed export are removed first."""
    out_dir = Path(out_dir)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*") if out_dir.parent.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)
    unet = copy.deepcopy(pl_module.unet).to("cpu")
    if use_ema and getattr(pl_module, "ema", None) is not None:
        ema = copy.deepcopy(pl_module.ema)
        ema.to("cpu")
        ema.copy_to(unet.parameters())
    tmp = temp_sibling_dir(out_dir)
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        pl_module.noise_scheduler.save_pretrained(tmp / "scheduler")
        if getattr(pl_module, "stage_config", None):
            (tmp / "stage.json").write_text(json.dumps(pl_module.stage_config, indent=2))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
