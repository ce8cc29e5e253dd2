"""Rebuilding a trained stage from a Lightning checkpoint written by train.py or an export folder, safely.

Checkpoints and export folders are untrusted input: a ``torch.load`` pickle can run any code, and
``hydra.utils.instantiate`` calls whatever ``_target_`` a stored config names. So:

- checkpoints are read with ``torch.load(weights_only=True)`` (tensors, containers and plain values
  only); a checkpoint whose pickle names anything else is refused *before* it is unpickled
  (:func:`check_checkpoint_pickle`), so its code never runs;
- a stored stage config (``stage_config`` in a checkpoint, ``stage.json`` in an export) is instantiated
  only when every ``_target_`` in it is one of the project's own stage targets (:data:`ALLOWED_TARGETS`)
  and it holds no ``${...}`` interpolation (stored configs are resolved at training time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch

from show1_lightning.diffusion.lora import LORA_WEIGHT_NAME
from show1_lightning.diffusion.module import DiffusionStage
from show1_lightning.diffusion.safe_loading import (
    ALLOWED_TARGETS,
    UnsafeCheckpointError,
    check_checkpoint_pickle,
    check_stage_config,
    safe_torch_load,
)

__all__ = [
    "ALLOWED_TARGETS",
    "UnsafeCheckpointError",
    "check_checkpoint_pickle",
    "safe_torch_load",
    "check_stage_config",
    "instantiate_stage_config",
    "load_stage_from_checkpoint",
    "load_stage",
    "build_stage",
]


def instantiate_stage_config(config: dict, source: str | Path) -> DiffusionStage:
    """The stage a stored config describes, after :func:`check_stage_config`."""
    check_stage_config(config, source)
    stage = hydra.utils.instantiate(config, _convert_="all")
    if not isinstance(stage, DiffusionStage):
        raise UnsafeCheckpointError(f"{source}: its stage config built a {type(stage).__name__}, not a stage")
    return stage


def load_stage_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionStage:
    """Instantiate the stage from the config stored in the checkpoint (``stage_config``, resolved at
    training time) and load its weights and EMA state. The result is in eval mode.

    Raises:
        UnsafeCheckpointError: the checkpoint's pickle or its stage config would run foreign code.
    """
    path = Path(path)
    ckpt = safe_torch_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or "stage_config" not in ckpt:
        raise KeyError(f"{path} has no 'stage_config': not a checkpoint written by train.py")
    stage = instantiate_stage_config(ckpt["stage_config"], path)
    stage.on_load_checkpoint(ckpt)  # also drops state that older checkpoints kept in the state_dict
    stage.load_state_dict(ckpt["state_dict"])
    stage.stage_config = ckpt["stage_config"]
    return stage.eval()


def load_stage(
    source: str | Path,
    map_location: str | torch.device = "cpu",
    lora: Sequence[Mapping[str, Any] | str] | None = None,
) -> DiffusionStage:
    """A stage from a Lightning checkpoint (``*.ckpt`` written by train.py) or from an export folder
    (``stage.json`` + ``unet/`` in the diffusers layout, written at the end of fit by ExportEMACallback), or from
    a LoRA export (``stage.json`` + ``pytorch_lora_weights.safetensors``: its base, ``lora.init_from``, with the
    adapter on top). ``lora``: further LoRA folders applied on top, ``[{path, scale}]``
    (``show1_lightning.diffusion.lora.apply_loras``).

    An export holds the EMA weights already, so its stage is built without an EMA copy.
    """
    from show1_lightning.diffusion.lora import apply_loras

    stage = _load_stage(Path(source), map_location)
    apply_loras(stage.unet, lora)
    return stage


def _load_stage(source: Path, map_location: str | torch.device) -> DiffusionStage:
    if source.is_file():
        return load_stage_from_checkpoint(source, map_location)
    if (source / "stage.json").is_file() and (source / LORA_WEIGHT_NAME).is_file():
        return _load_lora_export(source)
    spec = source / "stage.json"
    weights = source / "unet" / "diffusion_pytorch_model.safetensors"
    if not spec.exists() or not weights.exists():
        raise FileNotFoundError(f"{source}: neither a checkpoint file nor an export folder (stage.json + unet/)")
    import json

    from safetensors.torch import load_file

    config = json.loads(spec.read_text())
    check_stage_config(config, spec)  # before the copy below: a bad config is refused as stored
    build = {**config, "ema": {**dict(config.get("ema") or {}), "enabled": False}}
    stage = instantiate_stage_config(build, spec)  # refuses _target_s outside the allow-list
    stage.unet.load_state_dict(load_file(str(weights), device=str(map_location)))
    _load_stage_extras(stage, source, map_location)
    stage.stage_config = config
    return stage.eval()


#: the export file of a stage's trainable parts besides the UNet (the keyframe stage's layout planner).
STAGE_EXTRAS_NAME = "stage_extras.safetensors"


def _load_stage_extras(stage: DiffusionStage, source: Path, map_location: str | torch.device) -> None:
    """The export's state outside the UNet (``stage_extras.safetensors``: a layout planner), exactly what the
    stage has there: a missing file or key is an error, not a silently random part."""
    expected = {k for k in stage.state_dict() if not k.startswith("unet.")}
    path = source / STAGE_EXTRAS_NAME
    if not expected:
        return
    if not path.is_file():
        raise FileNotFoundError(
            f"{source}: the stage has {sorted(expected)[:3]}... besides its UNet but no {path.name}"
        )
    from safetensors.torch import load_file

    extras = load_file(str(path), device=str(map_location))
    if set(extras) != expected:
        raise KeyError(f"{path}: holds {sorted(extras)}, the stage expects {sorted(expected)}")
    stage.load_state_dict(extras, strict=False)  # the UNet's keys, loaded above, are the only ones left out


def _load_lora_export(source: Path) -> DiffusionStage:
    """A LoRA export: the stage of its ``stage.json`` without EMA and adapter, its base weights
    (``lora.init_from``), then the exported adapter (``"default"``, scale 1)."""
    import json

    from show1_lightning.diffusion.lora import TRAIN_ADAPTER, apply_lora, load_base_weights

    spec = source / "stage.json"
    config = json.loads(spec.read_text())
    check_stage_config(config, spec)
    init_from = (config.get("lora") or {}).get("init_from")
    build = {**config, "ema": {**dict(config.get("ema") or {}), "enabled": False}, "lora": None}
    stage = instantiate_stage_config(build, spec)
    if init_from:
        load_base_weights(stage.unet, init_from)
    apply_lora(stage.unet, source / LORA_WEIGHT_NAME, 1.0, adapter_name=TRAIN_ADAPTER)
    stage.stage_config = config
    return stage.eval()


def build_stage(config: Any) -> DiffusionStage:
    """A new stage from its config (a Hydra node or a plain mapping), which it keeps as ``stage_config``: the
    resolved config that checkpoints and exports store, so the stage can be rebuilt from them."""
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    stage = hydra.utils.instantiate(resolved, _convert_="all")
    if not isinstance(stage, DiffusionStage):
        raise TypeError(f"the stage config built a {type(stage).__name__}, not a DiffusionStage")
    stage.stage_config = resolved
    return stage
