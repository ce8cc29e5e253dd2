"""Sharded (FSDP) training of a stage: the strategy, and an EMA that lives on the parameter shards.

``trainer=fsdp`` builds Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` through
:func:`fsdp_strategy`: every UNet block (diffusers' stock 3D blocks and the Show-1 blocks) becomes one FSDP unit, so
at most one block's full parameters exist at a time besides the shards. Lightning keeps ``use_orig_params=True``:
outside forward/backward each UNet parameter is a flat view of this rank's slice of it (possibly empty).

The stage's EMA (diffusers' ``EMAModel``) is built at construction on the full parameters. Once the model is
sharded, :func:`sync_ema_layout` re-lays the EMA's shadow parameters onto the same local slices (the EMA update
is elementwise, so the EMA of a slice is the slice of the EMA): EMA memory shrinks with the world size like the
parameters. Full EMA weights are gathered and scattered only through FSDP's own full-state-dict API
(:func:`gather_full_ema`, :func:`load_full_ema`): the EMA slices are swapped into the parameters, the model's
full state dict is taken (or loaded), and the parameters are put back. Both are collectives: every rank calls them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

#: names of the UNet block classes that become FSDP units (diffusers' stock 3D blocks, Show-1's pixel blocks).
BLOCK_CLASS_NAMES = frozenset(
    {
        "CrossAttnDownBlock3D",
        "DownBlock3D",
        "UNetMidBlock3DCrossAttn",
        "CrossAttnUpBlock3D",
        "UpBlock3D",
        "ResnetDownsampleBlock3D",
        "SimpleCrossAttnDownBlock3D",
        "UNetMidBlock3DSimpleCrossAttn",
        "SimpleCrossAttnUpBlock3D",
        "ResnetUpsampleBlock3D",
    }
)
FSDP_PREFIX = "_fsdp_wrapped_module."


def _is_unet_block(module: nn.Module, class_names: frozenset[str]) -> bool:
    return type(module).__name__ in class_names


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD",
    wrap_blocks: bool = True,
    block_class_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Lightning's ``FSDPStrategy`` with the UNet blocks as FSDP units (Hydra ``_target_`` of ``trainer=fsdp``).

    Args:
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients, optimizer state sharded), ``SHARD_GRAD_OP``
            (parameters kept whole between forward and backward) or ``NO_SHARD`` (DDP-like).
        wrap_blocks: wrap each UNet block as its own FSDP unit (False: the whole module is one unit, so all
            parameters are gathered at once in the forward).
        block_class_names: class names of the blocks to wrap (default :data:`BLOCK_CLASS_NAMES`).
        kwargs: further ``FSDPStrategy`` arguments (``state_dict_type``, ``cpu_offload``, ``process_group_backend``).
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    if wrap_blocks:
        names = frozenset(block_class_names) if block_class_names else BLOCK_CLASS_NAMES
        policy = functools.partial(
            lambda_auto_wrap_policy, lambda_fn=functools.partial(_is_unet_block, class_names=names)
        )
        kwargs.setdefault("auto_wrap_policy", policy)
    return Show1FSDPStrategy(sharding_strategy=sharding_strategy, **kwargs)


class Show1FSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy``, also on CPUs (gloo).

    torch's FSDP runs on CPU tensors when given ``device_id=torch.device("cpu")``, but Lightning's strategy refuses
    a CPU accelerator (an ``is FSDPStrategy`` check in its accelerator connector, which a subclass passes) and wraps
    with ``device_id=None``, for which FSDP looks for an accelerator and fails ("FSDP needs a non-CPU accelerator
    device"). On a CPU root device this wraps the module itself with the CPU ``device_id`` (same arguments as
    Lightning) before Lightning's own setup, which then finds it wrapped. On GPUs nothing differs.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if self.root_device.type == "cpu" and not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied above (Lightning warns about a policy left unused)
        return super()._setup_model(model)


# ----------------------------------------------------------------------------- sharded model helpers
def fsdp_root(module: nn.Module) -> nn.Module | None:
    """The outermost FSDP wrapper of ``module`` (Lightning wraps the LightningModule itself), or None."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    trainer = getattr(module, "_trainer", None)
    candidates = [getattr(getattr(trainer, "strategy", None), "model", None), module]
    for candidate in candidates:
        if isinstance(candidate, FSDP):
            return candidate
    return None


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or one of its submodules) is wrapped by FSDP."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return fsdp_root(module) is not None or any(isinstance(m, FSDP) for m in module.modules())


def clean_name(name: str) -> str:
    """A parameter name without FSDP's wrapper prefixes (the name in a full state dict)."""
    return name.replace(FSDP_PREFIX, "")


@contextlib.contextmanager
def _swapped(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily copy ``values`` into ``params`` (same shapes: local slices); the old data are restored."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, values, strict=True):
                p.copy_(v.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def _full_state_dict_type(root: nn.Module, rank0_only: bool) -> contextlib.AbstractContextManager:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only)
    return FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, cfg)


def _root_names(root: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    """Full-state-dict keys (relative to ``root``) of ``params``."""
    by_id = {id(p): clean_name(n) for n, p in root.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} EMA parameters are not parameters of the FSDP root module")
    return [by_id[id(p)] for p in params]


def full_state_dict(root: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded, CPU) state dict of an FSDP ``root`` (a collective; every rank calls it)."""
    with _full_state_dict_type(root, rank0_only):
        return root.state_dict()


def gather_full_ema(
    root: nn.Module, params: Sequence[nn.Parameter], shadow: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The full EMA tensors (CPU) of sharded ``params`` whose local slices are ``shadow`` (a collective)."""
    names = _root_names(root, params)
    with _swapped(params, shadow):
        state = full_state_dict(root)
    return [state[n].detach().clone() for n in names]


def load_full_ema(root: nn.Module, params: Sequence[nn.Parameter], full: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's slices of full EMA tensors ``full`` (one per parameter of ``params``), laid out like the sharded
    parameters (a collective: loads them through FSDP's full state dict, reads the slices, restores the params)."""
    names = _root_names(root, params)
    saved = [p.detach().clone() for p in params]
    with _full_state_dict_type(root, rank0_only=False):
        state = root.state_dict()
        for name, value in zip(names, full, strict=True):
            if state[name].shape != value.shape:
                raise ValueError(
                    f"EMA tensor for {name}: shape {tuple(value.shape)}, model {tuple(state[name].shape)}"
                )
            state[name] = value.detach().to(state[name].dtype)
        root.load_state_dict(state)
    try:
        return [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def sync_ema_layout(ema: Any, root: nn.Module | None, params: Sequence[nn.Parameter]) -> bool:
    """Lay the shadow parameters of a diffusers ``EMAModel`` out like ``params``: full -> this rank's slices once
    the model is sharded (a collective), and back to full shapes without FSDP (e.g. a stage rebuilt from a
    checkpoint). Returns whether anything changed."""
    shadow = ema.shadow_params
    if len(shadow) != len(params):
        raise ValueError(f"EMA holds {len(shadow)} tensors for {len(params)} parameters")
    if all(s.shape == p.shape for s, p in zip(shadow, params, strict=True)):
        return False
    if root is None:
        raise ValueError("EMA shadow shapes differ from the parameters' and the model is not sharded")
    ema.shadow_params = [s.to(p.device) for s, p in zip(load_full_ema(root, params, shadow), params, strict=True)]
    return True


# ----------------------------------------------------------------------------- the stage's EMA and export
def _ema_params(stage: nn.Module) -> list[nn.Parameter]:
    """The parameters the stage's EMA averages (its ``ema_parameters()`` when it has one, else the UNet's)."""
    getter = getattr(stage, "ema_parameters", None)
    return list(getter()) if callable(getter) else list(stage.unet.parameters())


def sync_stage_ema(stage: nn.Module, root: nn.Module | None = None) -> bool:
    """:func:`sync_ema_layout` for a stage's EMA (a collective when the stage is sharded; no-op without an EMA or
    when the layout already matches)."""
    ema = getattr(stage, "ema", None)
    if ema is None:
        return False
    return sync_ema_layout(ema, root if root is not None else fsdp_root(stage), _ema_params(stage))


def stage_ema_state_dict(stage: nn.Module, root: nn.Module | None = None) -> dict:
    """The EMA's state dict with full shadow tensors (gathered from the shards when sharded: a collective), so a
    checkpoint of a sharded run loads into an unsharded stage and vice versa."""
    state = stage.ema.state_dict()
    root = root if root is not None else fsdp_root(stage)
    if root is not None:
        sync_stage_ema(stage, root)
        state["shadow_params"] = gather_full_ema(root, _ema_params(stage), stage.ema.shadow_params)
    return state


def full_unet(stage: nn.Module, use_ema: bool = True, root: nn.Module | None = None) -> nn.Module:
    """An unsharded CPU copy of the stage's UNet with full weights (the EMA's when ``use_ema`` and there is one).

    Without FSDP: a deep copy. Sharded: a collective (every rank calls it); the UNet is rebuilt from its config
    (``from_config``) and loaded with the gathered full state dict, FSDP's wrapper names removed. ``root``: the
    FSDP module wrapping ``stage`` (default: the trainer's).
    """
    import copy

    root = root if root is not None else fsdp_root(stage)
    ema = getattr(stage, "ema", None) if use_ema else None
    if root is None:
        unet = copy.deepcopy(stage.unet).to("cpu")
        if ema is not None:
            shadow = copy.deepcopy(ema)
            shadow.to("cpu")
            by_id = {id(p): i for i, p in enumerate(_ema_params(stage))}
            params = dict(zip([id(p) for p in stage.unet.parameters()], unet.parameters(), strict=True))
            with torch.no_grad():
                for pid, i in by_id.items():
                    params[pid].copy_(shadow.shadow_params[i])
        return unet
    params = _ema_params(stage)
    if ema is not None:
        sync_stage_ema(stage, root)
        with _swapped(params, ema.shadow_params):
            state = full_state_dict(root)
    else:
        state = full_state_dict(root)
    prefix = _unet_prefix(stage)
    unet_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    inner = stage.unet
    unet = type(inner).from_config(inner.config)
    unet.load_state_dict(unet_state)
    return unet


def _unet_prefix(stage: nn.Module) -> str:
    """The key prefix of the UNet's entries in the stage's full state dict."""
    for name, module in stage.named_modules():
        if module is stage.unet:
            return clean_name(name) + "." if name else ""
    raise ValueError("the stage has no unet submodule")


def clip_sharded_grad_norm(stage: nn.Module, max_norm: float | None, algorithm: str | None) -> bool:
    """Clip the gradient norm of a sharded stage with FSDP's ``clip_grad_norm_`` (the total norm over all shards;
    Lightning's norm clipping refuses FSDP). Returns False (nothing done) when the stage is not sharded, there is
    nothing to clip, or the algorithm is ``value`` (elementwise: Lightning's own clipping handles it)."""
    root = fsdp_root(stage)
    if root is None or not max_norm or algorithm not in (None, "norm"):
        return False
    root.clip_grad_norm_(max_norm)
    return True
