"""Export of the EMA weights in the diffusers layout at the end of fit."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from show1_lightning.fileio import replace_dir, temp_sibling_dir
from show1_lightning.stages.loading import STAGE_EXTRAS_NAME


def export_stage(
    pl_module: L.LightningModule, out_dir: str | Path, use_ema: bool = True, unet: nn.Module | None = None
) -> Path:
    """Save the stage's UNet (EMA weights when available) with ``save_pretrained`` into ``out_dir/unet``
    (``config.json`` + ``diffusion_pytorch_model.safetensors``), its noise schedule into
    ``out_dir/scheduler`` and, when known, the stage config as ``out_dir/stage.json`` (so the cascade can
    rebuild the stage from the folder).

    The folder is built in a hidden temporary sibling and renamed into place (an existing export is swapped
    out, see ``fileio.replace_dir``): a kill leaves the previous export or the new one, never a mix or a
    half-written weights file. Temporary siblings left by a killed export are removed first.

    A LoRA stage exports its adapter only (``diffusion.lora.export_lora_stage``). ``unet``: the full-weight UNet
    to write (a sharded run gathers it first, see :class:`ExportEMACallback`); default: a copy of the stage's,
    with the EMA weights when ``use_ema``."""
    if getattr(pl_module, "lora_spec", None) is not None:
        from show1_lightning.diffusion.lora import export_lora_stage

        return export_lora_stage(pl_module, out_dir, use_ema)
    out_dir = Path(out_dir)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*") if out_dir.parent.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)
    if unet is None:
        unet = _unet_copy(pl_module, use_ema)
    tmp = temp_sibling_dir(out_dir)
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        pl_module.noise_scheduler.save_pretrained(tmp / "scheduler")
        extras = stage_extras(pl_module)
        if extras:
            from safetensors.torch import save_file

            save_file(extras, str(tmp / STAGE_EXTRAS_NAME))
        if getattr(pl_module, "stage_config", None):
            (tmp / "stage.json").write_text(json.dumps(pl_module.stage_config, indent=2))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def stage_extras(pl_module: nn.Module) -> dict:
    """CPU copies of the stage's state outside its UNet (e.g. ``planner.*``); empty for most stages."""
    return {k: v.detach().cpu().contiguous() for k, v in pl_module.state_dict().items() if not k.startswith("unet.")}


def _unet_copy(pl_module: L.LightningModule, use_ema: bool) -> nn.Module:
    """A CPU copy of an unsharded stage's UNet, with the EMA weights when ``use_ema`` and there is an EMA."""
    unet = copy.deepcopy(pl_module.unet).to("cpu")
    if use_ema and getattr(pl_module, "ema", None) is not None:
        ema = copy.deepcopy(pl_module.ema)
        ema.to("cpu")
        ema.copy_to(unet.parameters())
    return unet


class ExportEMACallback(L.Callback):
    """At the end of fit, global rank 0 writes the EMA UNet in the diffusers layout to ``dirpath``. Under FSDP
    every rank first takes part in gathering the full weights (a collective), then rank 0 writes them.
    ``dirpath`` None (``export_dir=null``) exports nothing: one line says so at the end of fit."""

    def __init__(self, dirpath: str | None = "export", use_ema: bool = True) -> None:
        self.dirpath = dirpath
        self.use_ema = use_ema

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from show1_lightning.diffusion.sharding import full_unet, is_sharded

        if self.dirpath is None:
            rank_zero_info("export skipped: export_dir is null")
            return
        unet = None
        if is_sharded(pl_module) and getattr(pl_module, "lora_spec", None) is None:
            unet = full_unet(pl_module, use_ema=self.use_ema)  # every rank: a collective
        if not trainer.is_global_zero:
            return
        path = export_stage(pl_module, self.dirpath, self.use_ema, unet=unet)
        rank_zero_info(f"exported {'EMA ' if self.use_ema else ''}weights (diffusers layout) to {path}")
