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

import pickle
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch

from show1_lightning.diffusion.lora import LORA_WEIGHT_NAME
from show1_lightning.diffusion.module import DiffusionStage

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

#: Every ``_target_`` a stored stage config may name: the stages, their UNets, text encoders, VAEs, the noise
#: scheduler and the optimizer of ``conf/{stage,model,text_encoder,vae}`` (tests/test_safe_loading.py checks
#: that every target there is listed). Exact names only: a prefix such as ``show1_lightning.`` would also let
#: ``show1_lightning.runtime.os.system`` or a project file-writing helper through.
ALLOWED_TARGETS: frozenset[str] = frozenset(
    {
        "show1_lightning.stages.keyframe.KeyframeStage",
        "show1_lightning.stages.interpolation.InterpolationStage",
        "show1_lightning.stages.pixel_sr.PixelSRStage",
        "show1_lightning.stages.latent_sr.LatentSRStage",
        "show1_lightning.models.show1_unet.build_show1_unet",
        "show1_lightning.models.text_encoder.TextEncoder",
        "show1_lightning.models.vae.build_video_vae",
        "diffusers.UNet3DConditionModel",
        "diffusers.DDPMScheduler",
        "torch.optim.AdamW",
    }
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint or export that would run code (or call an unknown ``_target_``) when loaded."""


def check_checkpoint_pickle(path: str | Path) -> None:
    """Refuse a ``torch.save`` file whose pickle names a global outside torch's ``weights_only`` allow-list.

    The pickle is disassembled, not executed. Files in torch's legacy (non-zip) format are left to
    ``torch.load(weights_only=True)``, which refuses the same globals while unpickling.
    """
    path = Path(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:  # not a zip checkpoint (legacy format): weights_only unpickling still guards it
        return
    except Exception as exc:  # unreadable zip, no data.pkl, ...
        raise UnsafeCheckpointError(f"refusing to load {path}: not a readable torch checkpoint ({exc})") from exc
    if unsafe:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle names {sorted(unsafe)}, which a checkpoint written by train.py "
            "never holds; loading it could run arbitrary code, so it was not unpickled"
        )


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` after :func:`check_checkpoint_pickle`; refusals raise
    :class:`UnsafeCheckpointError` with the offending names."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    check_checkpoint_pickle(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle holds more than tensors and plain values, so loading it could "
            f"run arbitrary code ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc


def _nodes(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted location, value) of ``node`` and of everything under it."""
    yield where, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _nodes(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _nodes(v, f"{where}[{i}]")


def check_stage_config(config: Any, source: str | Path) -> None:
    """Refuse a stored stage config that names a ``_target_`` outside :data:`ALLOWED_TARGETS` or holds an
    interpolation. Raises :class:`UnsafeCheckpointError` naming the key."""
    if not isinstance(config, dict) or "_target_" not in config:
        raise UnsafeCheckpointError(f"refusing to load {source}: its stage config is not a mapping with a _target_")
    for loc, node in _nodes(config):
        if isinstance(node, dict):
            bad = [k for k in node if not isinstance(k, str)]
            if bad:
                raise UnsafeCheckpointError(f"refusing to load {source}: non-string key {bad[0]!r} under '{loc}'")
            target = node.get("_target_")
            if "_target_" in node and (not isinstance(target, str) or target not in ALLOWED_TARGETS):
                where = f"{loc}._target_" if loc else "_target_"
                raise UnsafeCheckpointError(
                    f"refusing to load {source}: '{where}' names {target!r}, which is not one of the project's stage "
                    "targets (show1_lightning.stages.loading.ALLOWED_TARGETS); nothing was instantiated"
                )
        elif isinstance(node, str) and "${" in node:
            raise UnsafeCheckpointError(
                f"refusing to load {source}: '{loc}' holds the interpolation {node!r}; stored stage configs are "
                "resolved at training time and never contain one"
            )


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
    stage.stage_config = config
    return stage.eval()


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
