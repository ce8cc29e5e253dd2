"""Safe reading of stored weights and stage configs (checkpoints and export folders are untrusted input).

Below the stages layer so that anything loading weights (the stage loader in ``stages.loading``, LoRA's
``init_from`` in ``diffusion.lora``) shares one rule: pickles are inspected before ``torch.load(weights_only=True)``
and a stored stage config may name only the project's own ``_target_``s. ``stages.loading`` re-exports these names.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ALLOWED_TARGETS",
    "UnsafeCheckpointError",
    "check_checkpoint_pickle",
    "safe_torch_load",
    "check_stage_config",
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
                    "targets (show1_lightning.diffusion.safe_loading.ALLOWED_TARGETS); nothing was instantiated"
                )
        elif isinstance(node, str) and "${" in node:
            raise UnsafeCheckpointError(
                f"refusing to load {source}: '{loc}' holds the interpolation {node!r}; stored stage configs are "
                "resolved at training time and never contain one"
            )
