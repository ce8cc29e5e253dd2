"""Config values as plain Python: what Hydra passes (``DictConfig`` / ``ListConfig``) turned into dicts and lists.

Needed wherever a value is stored (checkpoint hyper-parameters that ``torch.load(weights_only=True)`` must read,
JSON markers) or handed to a library that wants plain types (open_clip's dataclasses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def plain(value: Any) -> Any:
    """OmegaConf containers resolved to dicts / lists, paths to strings, tuples to lists (recursively)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
