"""Gradient (activation) checkpointing for UNets built from diffusers' stock 3D blocks.

diffusers' ``UNet3DConditionModel`` (zeroscope / ModelScope layout: the show-1-sr2 latent SR UNet and the tiny
stock UNets of the toy stages) declares ``_supports_gradient_checkpointing = False``: its blocks
(``CrossAttnDownBlock3D``, ``DownBlock3D``, ``UNetMidBlock3DCrossAttn``, ``CrossAttnUpBlock3D``, ``UpBlock3D``) carry
a ``gradient_checkpointing`` flag but never read it. Here every layer of those blocks (spatial resnet, temporal
conv, spatial transformer, temporal transformer) and the UNet's input temporal transformer is run under
``torch.utils.checkpoint`` (non-reentrant, RNG state preserved so the temporal convs' dropout recomputes the same
mask): the forward keeps only each layer's input, the backward recomputes the layer. The module tree, parameter
names and state dict are unchanged, so checkpoints and exports still load into the stock class.

Per layer rather than per block: a block's recomputation would hold all its layers' activations at once (at
576x320 the first block alone holds several full-resolution attention layers); per layer the backward peak is one
layer's activations on top of the kept layer inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

#: diffusers' stock 3D blocks whose layers are checkpointed here.
STOCK_3D_BLOCKS = (
    "CrossAttnDownBlock3D",
    "DownBlock3D",
    "UNetMidBlock3DCrossAttn",
    "CrossAttnUpBlock3D",
    "UpBlock3D",
)
#: the per-layer module lists of those blocks.
_LAYER_LISTS = ("resnets", "temp_convs", "attentions", "temp_attentions")
#: instance attribute holding a wrapped layer's own bound ``forward`` (the patch is undone by deleting ``forward``).
_PLAIN = "_show1_plain_forward"


def _checkpointed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module``'s own forward, under non-reentrant checkpointing while autograd records."""
    plain = module.__dict__[_PLAIN]
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(plain, *args, use_reentrant=False, **kwargs)
    return plain(*args, **kwargs)


def stock_3d_blocks(unet: nn.Module) -> list[nn.Module]:
    """The stock diffusers 3D blocks of ``unet`` (down, mid, up), in order."""
    blocks = [*getattr(unet, "down_blocks", ()), getattr(unet, "mid_block", None), *getattr(unet, "up_blocks", ())]
    return [b for b in blocks if b is not None and type(b).__name__ in STOCK_3D_BLOCKS]


def checkpointed_layers(unet: nn.Module) -> Iterator[nn.Module]:
    """The layers that :func:`set_stock_3d_checkpointing` wraps: every layer of the stock 3D blocks and the
    input temporal transformer (``transformer_in``) when the UNet has one."""
    for block in stock_3d_blocks(unet):
        for name in _LAYER_LISTS:
            yield from getattr(block, name, ())
    transformer_in = getattr(unet, "transformer_in", None)
    if isinstance(transformer_in, nn.Module) and any(True for _ in transformer_in.parameters()):
        yield transformer_in


def set_stock_3d_checkpointing(unet: nn.Module, enable: bool = True) -> int:
    """Switch checkpointing of the stock-3D-block layers of ``unet`` on or off; returns how many layers are
    affected. Idempotent. Sets each block's (otherwise unused) ``gradient_checkpointing`` flag to ``enable`` so it
    reports the state. Raises ``ValueError`` when the UNet has no stock 3D block."""
    blocks = stock_3d_blocks(unet)
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has none of diffusers' stock 3D blocks {STOCK_3D_BLOCKS}")
    layers = list(checkpointed_layers(unet))
    for layer in layers:
        wrapped = _PLAIN in layer.__dict__
        if enable and not wrapped:
            # A partial of a module-level function (not a closure): deepcopy and pickle rebind it to the copy.
            layer.__dict__[_PLAIN] = layer.forward
            layer.forward = functools.partial(_checkpointed_forward, layer)
        elif not enable and wrapped:
            del layer.__dict__["forward"]
            del layer.__dict__[_PLAIN]
    for block in blocks:
        block.gradient_checkpointing = enable
    return len(layers)


def is_checkpointed(unet: nn.Module) -> bool:
    """Whether :func:`set_stock_3d_checkpointing` is on for ``unet``, or diffusers' own checkpointing is."""
    layers = list(checkpointed_layers(unet))
    if layers and all(_PLAIN in layer.__dict__ for layer in layers):
        return True
    return bool(getattr(unet, "is_gradient_checkpointing", False))


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """Turn on activation checkpointing for any of this project's UNets.

    UNets whose class implements it (the Show-1 pixel UNets, diffusers models with
    ``_supports_gradient_checkpointing``) use their own; UNets of diffusers' stock 3D blocks get
    :func:`set_stock_3d_checkpointing`. Anything else raises ``ValueError`` naming ``stage.gradient_checkpointing``.
    """
    if getattr(unet, "_supports_gradient_checkpointing", False):
        unet.enable_gradient_checkpointing()
    elif stock_3d_blocks(unet):
        set_stock_3d_checkpointing(unet, True)
    else:
        raise ValueError(
            f"stage.gradient_checkpointing=true but {type(unet).__name__} supports no gradient checkpointing "
            "(neither diffusers' own nor stock 3D blocks); set stage.gradient_checkpointing=false"
        )


def saved_activation_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs (outside checkpointed
    regions: those keep only their inputs). Parameters saved by reference count too."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
