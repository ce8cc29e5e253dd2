"""LoRA adapters for every stage's UNet, through ``peft`` (the library diffusers' own LoRA support is built on).

Training (``stage.lora.rank > 0``): the UNet starts from ``stage.lora.init_from`` (a released folder, a stage
checkpoint, a full export or a LoRA export, whose adapters are merged in first), is frozen, and gets one peft
LoRA adapter (``"default"``) on ``stage.lora.target_modules``; only the adapter's parameters train, and the
optimizer, the EMA, the checkpoint and the export hold only them (plus ``init_from``: the reference to the base).

Export format: diffusers' own LoRA file, ``pytorch_lora_weights.safetensors``, with keys
``unet.<module>.lora_{A,B}.weight`` and the peft ``LoraConfig`` in the safetensors metadata under
``lora_adapter_metadata`` (keys ``unet.r``, ``unet.lora_alpha``, ...), exactly what
``StableDiffusionLoraLoaderMixin.save_lora_weights`` writes. It was preferred over peft's ``save_pretrained``
folder (``adapter_model.safetensors`` + ``adapter_config.json``) because that folder is made for ``PeftModel``
wrappers, which diffusers never uses: diffusers' loaders (``load_lora_weights`` of a pipeline,
``load_lora_adapter(..., prefix="unet")`` of a model) read this file as it is, and it is the format LoRAs on the
Hub are shared in. The metadata also records our ``show1_lightning`` entry: the base (``init_from``) and a
checksum of the base weights, checked (warning) when the adapter is applied to a base.

Inference: :func:`apply_lora` adds an exported adapter (ours, or a diffusers/kohya-free peft-keyed LoRA) to any
stage's UNet under its own name with a scale; several adapters add up, scale 0 is exactly the base.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "LORA_WEIGHT_NAME",
    "LORA_PREFIX",
    "TRAIN_ADAPTER",
    "DEFAULT_TARGET_MODULES",
    "LoraSpec",
    "is_lora_key",
    "is_lora_export",
    "base_checksum",
    "checksum_matches",
    "load_base_weights",
    "add_lora",
    "lora_state_dict",
    "save_lora",
    "export_lora_stage",
    "read_lora",
    "apply_lora",
    "apply_loras",
    "set_lora_scales",
]

#: diffusers' ``LORA_WEIGHT_NAME_SAFE``: the file name its LoRA loaders look for first.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: diffusers' pipeline-level prefix of the UNet's LoRA keys (and of its metadata keys).
LORA_PREFIX = "unet"
#: peft's default adapter name: the adapter a LoRA stage trains.
TRAIN_ADAPTER = "default"
#: The attention projections of every stage's UNet: spatial and temporal self-attention, cross-attention to the
#: text (``to_k``/``to_v`` in diffusers' Transformer blocks) and the text keys/values that the Show-1 pixel UNets'
#: ``SimpleCrossAttn`` blocks add (``add_k_proj``/``add_v_proj``; absent in the latent SR UNet, which peft allows).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
_META_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_OURS_KEY = "show1_lightning"


@dataclass(frozen=True)
class LoraSpec:
    """The ``stage.lora`` config block.

    Args:
        rank: LoRA rank r (0: off).
        alpha: LoRA alpha (the update is scaled by alpha / r); None: alpha = r (scale 1).
        dropout: dropout on the adapter's input.
        target_modules: module-name suffixes peft wraps (``to_q`` matches every ``*.to_q``).
        init_from: the base weights: a released or diffusers model folder (``unet/`` or the UNet folder itself), a
            stage checkpoint (its EMA weights when it has them), a full export or a LoRA export / LoRA checkpoint
            (its adapter merged into its own base). None: the UNet as the stage config builds it.
    """

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)
    init_from: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> LoraSpec | None:
        """The spec of a ``stage.lora`` mapping; None when LoRA is off (``lora: null`` or ``rank: 0``)."""
        if not cfg:
            return None
        cfg = dict(cfg)
        unknown = set(cfg) - {"rank", "alpha", "dropout", "target_modules", "init_from"}
        if unknown:
            raise ValueError(f"stage.lora: unknown keys {sorted(unknown)}")
        rank = int(cfg.get("rank") or 0)
        if rank < 0:
            raise ValueError(f"stage.lora.rank must be >= 0, got {rank}")
        if rank == 0:
            return None
        targets = tuple(cfg.get("target_modules") or DEFAULT_TARGET_MODULES)
        alpha = cfg.get("alpha")
        init = cfg.get("init_from")
        return cls(rank, None if alpha is None else float(alpha), float(cfg.get("dropout") or 0.0), targets, init)

    def peft_config(self) -> Any:
        """The peft ``LoraConfig`` (adapters start as the identity: ``lora_B`` zero)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.rank if self.alpha is None else self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            init_lora_weights=True,
        )


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key belongs to a LoRA adapter (peft's ``lora_A``/``lora_B`` weights)."""
    return ".lora_A." in key or ".lora_B." in key


def is_lora_export(path: str | Path) -> bool:
    """Whether ``path`` is a LoRA folder (``pytorch_lora_weights.safetensors``) rather than a full model."""
    return Path(path).is_dir() and (Path(path) / LORA_WEIGHT_NAME).is_file()


def base_checksum(unet: nn.Module) -> list[float]:
    """[number of base values, sum, sum of absolute values] of the UNet's non-adapter weights (float64).

    Recorded with an adapter and compared when it is applied: an adapter put on another base than the one it
    was trained on gives plausible-looking nonsense, so a mismatch is reported."""
    n, s, a = 0, 0.0, 0.0
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if is_lora_key(name):
                continue
            q = p.detach().double()
            n, s, a = n + q.numel(), s + float(q.sum()), a + float(q.abs().sum())
    return [float(n), s, a]


def checksum_matches(a: Sequence[float], b: Sequence[float], rel: float = 1e-6) -> bool:
    return a[0] == b[0] and all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-6) for x, y in zip(a[1:], b[1:]))


# ---------------------------------------------------------------------------------------------- base weights
def _checkpoint_unet_state(unet: nn.Module, ckpt: dict, source: Path) -> dict[str, torch.Tensor]:
    """The UNet weights a (non-LoRA) stage checkpoint holds: its EMA copy when stored, else the trained ones."""
    state = {k.removeprefix("unet."): v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("unet.")}
    shadow = (ckpt.get("ema") or {}).get("shadow_params")
    if shadow:
        names = [n for n, _ in unet.named_parameters()]
        if len(names) != len(shadow):
            raise ValueError(f"{source}: its EMA holds {len(shadow)} tensors, this UNet has {len(names)} parameters")
        state.update(zip(names, shadow))
    return state


def load_base_weights(unet: nn.Module, source: str | Path) -> None:
    """Load the base weights ``source`` names (see :attr:`LoraSpec.init_from`) into ``unet`` (no adapter on it
    yet), strictly: every key must match."""
    from show1_lightning.diffusion.safe_loading import check_stage_config, safe_torch_load

    source = Path(source)
    if source.is_file():  # a stage checkpoint written by train.py
        ckpt = safe_torch_load(source)
        inner = dict((ckpt.get("stage_config") or {}).get("lora") or {})
        if LoraSpec.from_config(inner) is not None:  # a LoRA checkpoint: its base, then its (EMA) adapter merged
            check_stage_config(ckpt["stage_config"], source)
            spec = LoraSpec.from_config(inner)
            if spec.init_from:
                load_base_weights(unet, spec.init_from)
            adapter = {k.removeprefix("unet."): v for k, v in ckpt["state_dict"].items() if is_lora_key(k)}
            shadow = (ckpt.get("ema") or {}).get("shadow_params")
            _merge_adapter(unet, spec.peft_config(), adapter, shadow)
            return
        missing, unexpected = unet.load_state_dict(_checkpoint_unet_state(unet, ckpt, source), strict=False)
    elif is_lora_export(source):  # a LoRA export: its base, then its adapter merged
        config = json.loads((source / "stage.json").read_text()) if (source / "stage.json").is_file() else {}
        base = _read_ours(source / LORA_WEIGHT_NAME).get("base") or (config.get("lora") or {}).get("init_from")
        if base:
            load_base_weights(unet, base)
        lora_cfg, adapter, _ = read_lora(source)
        _merge_adapter(unet, lora_cfg, adapter, None)
        return
    elif source.is_dir():  # a released / diffusers model folder or a full export: unet/ or the UNet folder itself
        sub = "unet" if (source / "unet" / "config.json").is_file() else None
        if sub is None and not (source / "config.json").is_file():
            raise FileNotFoundError(f"stage.lora.init_from={source}: no unet/config.json or config.json there")
        other = type(unet).from_pretrained(str(source), subfolder=sub, low_cpu_mem_usage=False)
        missing, unexpected = unet.load_state_dict(other.state_dict(), strict=False)
    else:
        raise FileNotFoundError(f"stage.lora.init_from={source} does not exist")
    if missing or unexpected:
        raise RuntimeError(
            f"stage.lora.init_from={source} does not match this stage's UNet: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (the stage config must build the base's architecture)"
        )
    log.info("LoRA base weights loaded from %s", source)


def _merge_adapter(
    unet: nn.Module, config: Any, adapter: Mapping[str, torch.Tensor], shadow: Sequence[torch.Tensor] | None
) -> None:
    """Merge one adapter (``adapter``: peft keys without the adapter name; ``shadow``: EMA values of the adapter's
    parameters, in parameter order, used instead when given) into ``unet``'s weights, leaving no adapter behind."""
    from peft.tuners.lora import LoraModel
    from peft.utils import set_peft_model_state_dict

    name = "merge_base"
    model = LoraModel(unet, config, name)
    result = set_peft_model_state_dict(unet, dict(adapter), adapter_name=name)
    if result.unexpected_keys:
        raise RuntimeError(f"LoRA base: adapter keys the UNet does not have: {result.unexpected_keys[:5]}")
    if shadow:
        params = [p for n, p in unet.named_parameters() if f".{name}." in n]
        if len(params) != len(shadow):
            raise ValueError(f"LoRA base: EMA holds {len(shadow)} tensors for {len(params)} adapter parameters")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s)
    model.merge_and_unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(unet, attr):
            delattr(unet, attr)


# ---------------------------------------------------------------------------------------------- training
def add_lora(unet: nn.Module, spec: LoraSpec, adapter_name: str = TRAIN_ADAPTER) -> list[nn.Parameter]:
    """Load ``spec.init_from`` into ``unet``, freeze it and add a trainable adapter; returns the adapter's
    parameters (the only ones with ``requires_grad``)."""
    from peft import inject_adapter_in_model

    if spec.init_from:
        load_base_weights(unet, spec.init_from)
    unet.requires_grad_(False)
    try:
        inject_adapter_in_model(spec.peft_config(), unet, adapter_name)
    except ValueError as exc:  # peft: no module matched
        raise ValueError(f"stage.lora.target_modules={list(spec.target_modules)}: {exc}") from exc
    params = [p for n, p in unet.named_parameters() if is_lora_key(n) and f".{adapter_name}." in n]
    for n, p in unet.named_parameters():
        p.requires_grad_(is_lora_key(n) and f".{adapter_name}." in n)
    if not params:
        raise ValueError(f"stage.lora.target_modules={list(spec.target_modules)} matched no module of the UNet")
    return params


def lora_state_dict(unet: nn.Module, adapter_name: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's portable keys (``<module>.lora_A.weight``, no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=adapter_name)


def save_lora(
    unet: nn.Module,
    out_dir: str | Path,
    adapter_name: str = TRAIN_ADAPTER,
    base: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the adapter as ``out_dir/pytorch_lora_weights.safetensors`` in diffusers' pipeline LoRA format
    (``unet.``-prefixed keys, the ``LoraConfig`` as ``lora_adapter_metadata``), with the base reference and its
    checksum under the ``show1_lightning`` metadata key."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {
        f"{LORA_PREFIX}.{k}": v.detach().cpu().contiguous() for k, v in lora_state_dict(unet, adapter_name).items()
    }
    config = unet.peft_config[adapter_name].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    meta = {f"{LORA_PREFIX}.{k}": v for k, v in config.items()}
    ours = {"base": base, "base_checksum": base_checksum(unet), **dict(extra or {})}
    save_file(
        weights,
        str(out_dir / LORA_WEIGHT_NAME),
        metadata={
            "format": "pt",
            _META_KEY: json.dumps(meta, sort_keys=True, default=str),
            _OURS_KEY: json.dumps(ours, default=str),
        },
    )
    return out_dir


def export_lora_stage(stage: Any, out_dir: str | Path, use_ema: bool = True) -> Path:
    """Export a LoRA stage: its (EMA) adapter (:func:`save_lora`), ``stage.json`` (the stage config, with
    ``lora.init_from``, the base, made absolute) and ``scheduler/``. Built in a temporary sibling and renamed
    into place, as full exports are."""
    from show1_lightning.fileio import replace_dir, temp_sibling_dir

    out_dir = Path(out_dir)
    spec = stage.lora_spec
    base = None
    if spec.init_from:
        base = str(Path(spec.init_from).resolve()) if Path(spec.init_from).exists() else spec.init_from
    tmp = temp_sibling_dir(out_dir)
    try:
        with stage.ema_weights(use_ema and stage.ema is not None):
            save_lora(stage.unet, tmp, base=base, extra={"stage": (stage.stage_config or {}).get("_target_")})
        stage.noise_scheduler.save_pretrained(tmp / "scheduler")
        if stage.stage_config:
            config = json.loads(json.dumps(stage.stage_config))
            if base is not None:
                config["lora"] = {**dict(config.get("lora") or {}), "init_from": base}
            (tmp / "stage.json").write_text(json.dumps(config, indent=2))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------- inference
def _read_ours(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_OURS_KEY)
    return json.loads(raw) if raw else {}


def read_lora(path: str | Path) -> tuple[Any, dict[str, torch.Tensor], dict]:
    """(peft ``LoraConfig``, adapter weights with peft keys, our metadata) of a LoRA folder or file.

    Files without diffusers' metadata (older diffusers exports) get rank from the ``lora_B`` shapes, alpha = rank
    and the adapted modules from the keys."""
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {LORA_WEIGHT_NAME}")
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    weights = load_file(str(file))
    prefix = f"{LORA_PREFIX}."
    if any(k.startswith(prefix) for k in weights):
        weights = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    bad = [k for k in weights if not is_lora_key(k)]
    if bad:
        raise ValueError(f"{file}: keys that are not peft LoRA weights (e.g. {bad[0]!r}); convert it with diffusers")
    raw = json.loads(metadata[_META_KEY]) if _META_KEY in metadata else {}
    raw = {k.removeprefix(prefix): v for k, v in raw.items()}
    fields = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in raw.items() if k in fields and k not in ("peft_type", "task_type", "runtime_config")}
    if "r" not in kwargs:
        rank = next(v.shape[1] for k, v in weights.items() if ".lora_B." in k)
        modules = sorted({k.split(".lora_")[0] for k in weights})
        kwargs = {"r": rank, "lora_alpha": rank, "target_modules": modules}
    kwargs["inference_mode"] = True
    ours = json.loads(metadata[_OURS_KEY]) if _OURS_KEY in metadata else {}
    return LoraConfig(**kwargs), weights, ours


def set_lora_scales(unet: nn.Module, scales: Mapping[str, float]) -> None:
    """Activate exactly the adapters ``scales`` names, each at its scale (0: no effect; 1: as trained)."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    set_weights_and_activate_adapters(unet, list(scales), [float(s) for s in scales.values()])


def apply_lora(unet: nn.Module, path: str | Path, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Add the LoRA of ``path`` (folder or file) to ``unet`` under ``adapter_name`` (default: a fresh
    ``lora_<i>``) at ``scale``, frozen, next to the adapters already applied; returns the adapter's name."""
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    config, weights, ours = read_lora(path)
    scales: dict[str, float] = dict(getattr(unet, "_show1_lora_scales", {}))
    taken = set(getattr(unet, "peft_config", {}) or {})
    if adapter_name is None:
        adapter_name = next(f"lora_{i}" for i in range(len(taken) + 1) if f"lora_{i}" not in taken)
    if adapter_name in taken:
        raise ValueError(f"adapter name {adapter_name!r} is already in use on this UNet")
    expected = ours.get("base_checksum")
    if expected and not checksum_matches(expected, base_checksum(unet)):
        log.warning("LoRA %s was trained on another base (%s) than the one it is applied to", path, ours.get("base"))
    with warnings.catch_warnings():  # peft warns that a second adapter is added: several adapters are the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, unet, adapter_name)
    result = set_peft_model_state_dict(unet, weights, adapter_name=adapter_name)
    missing = [k for k in getattr(result, "missing_keys", []) if is_lora_key(k) and f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"LoRA {path} does not fit this UNet: unexpected {result.unexpected_keys[:5]}, missing {missing[:5]}"
        )
    for n, p in unet.named_parameters():
        if f".{adapter_name}." in n:
            p.requires_grad_(False)
    scales[adapter_name] = float(scale)
    unet._show1_lora_scales = scales
    set_lora_scales(unet, scales)
    return adapter_name


def apply_loras(unet: nn.Module, loras: Iterable[Mapping[str, Any] | str] | None) -> list[str]:
    """:func:`apply_lora` for each entry of ``loras``: ``{path, scale (default 1), name (optional)}`` or a path."""
    names = []
    for entry in loras or ():
        entry = {"path": entry} if isinstance(entry, (str, Path)) else dict(entry)
        unknown = set(entry) - {"path", "scale", "name"}
        if unknown or "path" not in entry:
            raise ValueError(f"a LoRA entry is {{path, scale, name}}; got keys {sorted(entry)}")
        names.append(apply_lora(unet, entry["path"], float(entry.get("scale", 1.0)), entry.get("name")))
    return names
