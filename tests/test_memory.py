"""Memory features: gradient checkpointing of the stock-3D-block UNets (latent SR), sharded EMA / state dicts."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from diffusers import UNet3DConditionModel
from numerics import assert_close_rel

from show1_lightning.models import checkpointing
from show1_lightning.models.checkpointing import (
    checkpointed_layers,
    enable_gradient_checkpointing,
    is_checkpointed,
    saved_activation_bytes,
    set_stock_3d_checkpointing,
)
from show1_lightning.models.show1_unet import Show1SR2UNet3DConditionModel, build_show1_unet

torch.set_num_threads(1)

# A tiny show-1-sr2 (zeroscope layout: stock diffusers 3D blocks, input temporal transformer) on 4 latent channels.
TINY_SR2 = dict(
    block_out_channels=[16, 32],
    down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
    up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"],
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=4,
    cross_attention_dim=16,
)


def _tiny_sr2() -> Show1SR2UNet3DConditionModel:
    torch.manual_seed(0)
    return build_show1_unet("show-1-sr2", **TINY_SR2).train()


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 3, 16, 16, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
    }


def _grads(model: torch.nn.Module, kw: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the temporal convs' dropout (p=0.1, train mode): same masks in both runs
    model(**kw).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sr2_unet_checkpointing_gives_the_same_gradients():
    """Checkpointed layers recompute the same maths, dropout included (RNG state preserved): equal gradients."""
    model, kw = _tiny_sr2(), _inputs()
    plain = _grads(model, kw)
    model.enable_gradient_checkpointing()  # diffusers' switch, implemented for the stock 3D blocks
    assert is_checkpointed(model) and model.is_gradient_checkpointing
    ckpt = _grads(model, kw)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert_close_rel(ckpt[name], plain[name], msg=name)
    model.disable_gradient_checkpointing()
    assert not is_checkpointed(model)


def test_checkpointing_is_applied_not_silently_skipped(monkeypatch):
    """Every stock-block layer goes through torch.utils.checkpoint, and autograd keeps far fewer activations."""
    model, kw = _tiny_sr2(), _inputs()
    forward = lambda: model(**kw).sample.sum()  # noqa: E731
    plain_bytes = saved_activation_bytes(forward)
    n_layers = set_stock_3d_checkpointing(model, True)
    assert n_layers == len(list(checkpointed_layers(model))) > 0
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        checkpointing.torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    ckpt_bytes = saved_activation_bytes(forward)
    assert len(calls) == n_layers  # one checkpointed call per layer per forward
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)
    calls.clear()
    with torch.no_grad():  # no autograd: plain forward, no checkpoint overhead
        model(**kw)
    assert not calls


def test_stock_unet3d_checkpointing_through_the_stage_switch():
    """The toy stages' stock diffusers UNet3DConditionModel (no support of its own) is checkpointed too, and a
    deep copy (EMA, cascade) keeps checkpointing bound to the copy's own layers."""
    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=16,
    ).train()
    kw = _inputs()
    plain = _grads(unet, kw)
    enable_gradient_checkpointing(unet)
    assert is_checkpointed(unet)
    twin = copy.deepcopy(unet)
    for layer, twin_layer in zip(checkpointed_layers(unet), checkpointed_layers(twin), strict=True):
        assert twin_layer.forward.args[0] is twin_layer and layer.forward.args[0] is layer
    assert is_checkpointed(pickle.loads(pickle.dumps(twin)))
    for name, grad in _grads(twin, kw).items():
        assert_close_rel(grad, plain[name], msg=name)
    assert set(unet.state_dict()) == set(UNet3DConditionModel.from_config(unet.config).state_dict())


def test_checkpointing_refuses_a_unet_without_blocks():
    with pytest.raises(ValueError, match="stage.gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
