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


def test_stage_switch_checkpoints_a_stock_unet3d(compose_train, tmp_path):
    """`stage.gradient_checkpointing=true` on a stage whose UNet is diffusers' stock UNet3DConditionModel (formerly
    refused): the stage builds and its UNet's block layers are checkpointed."""
    import hydra

    cfg = compose_train(tmp_path, "model=unet3d_tiny", "stage.gradient_checkpointing=true")
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
    assert type(stage.unet) is UNet3DConditionModel and is_checkpointed(stage.unet)
    cfg = compose_train(tmp_path, "model=unet3d_tiny")
    assert not is_checkpointed(hydra.utils.instantiate(cfg.stage, _convert_="all").unet)


def test_checkpointing_refuses_a_unet_without_blocks():
    with pytest.raises(ValueError, match="stage.gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- FSDP
def test_fsdp_config_builds_the_cpu_capable_strategy(compose_train, tmp_path):
    """`trainer=fsdp` composes into Lightning's FSDPStrategy (our subclass), blocks as FSDP units."""
    import hydra
    from lightning.pytorch.strategies import FSDPStrategy

    from show1_lightning.diffusion.sharding import BLOCK_CLASS_NAMES, Show1FSDPStrategy

    cfg = compose_train(tmp_path, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, Show1FSDPStrategy) and isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] and strategy.sharding_strategy.name == "FULL_SHARD"
    policy = strategy.kwargs["auto_wrap_policy"].keywords["lambda_fn"]
    model = _tiny_sr2()
    wrapped = {type(m).__name__ for m in model.modules() if policy(m)}
    assert wrapped == {
        "CrossAttnDownBlock3D",
        "DownBlock3D",
        "UNetMidBlock3DCrossAttn",
        "UpBlock3D",
        "CrossAttnUpBlock3D",
    }
    assert wrapped <= BLOCK_CLASS_NAMES


def test_unsharded_ema_helpers_are_no_ops():
    from diffusers.training_utils import EMAModel

    from show1_lightning.diffusion.sharding import full_unet, sync_ema_layout

    model = _tiny_sr2()
    ema = EMAModel(model.parameters(), decay=0.5, use_ema_warmup=False)
    assert not sync_ema_layout(ema, None, list(model.parameters()))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    holder = torch.nn.Module()
    holder.unet, holder.ema = model, ema
    exported = full_unet(holder, use_ema=True)  # unsharded: a copy with the EMA weights
    for p, s in zip(exported.parameters(), ema.shadow_params, strict=True):
        assert torch.equal(p, s)
    assert not torch.equal(next(exported.parameters()), next(model.parameters()))


@pytest.mark.slow
def test_fsdp_ema_state_dict_and_export_on_two_cpu_ranks(tmp_path):
    """Two gloo processes: the sharded EMA (on each rank's parameter slices) gathers to the unsharded EMA, full
    state dicts save and load (into unsharded and sharded models), the EMA re-slices after a resume, and the export
    of the sharded run loads with from_pretrained and holds the EMA weights."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tests = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tests))
    worker = tests / "fsdp_worker.py"
    proc = subprocess.run(
        [sys.executable, str(worker), "2", str(port), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["layout_changed"] and r["shadow_local_numel"] == r["local_numel"] < r["full_numel"]
        assert r["ema_vs_params"] > 1e-4  # the EMA is not just the weights: the comparisons below can fail
        for key in (
            "ema_diff",
            "param_diff",
            "ckpt_ema_diff",
            "export_diff",
            "reload_diff",
            "sharded_reload_diff",
            "resume_diff",
        ):
            assert r[key] <= 1e-6, (key, r[key])
        assert r["outputs_diff"] <= 1e-4
    assert sum(r["local_numel"] for r in ranks) == ranks[0]["full_numel"]
    assert ranks[0]["export_reload_diff"] <= 1e-6


@pytest.mark.slow
def test_train_py_runs_fsdp_on_two_cpu_processes(toy_data_dir, tmp_path):
    """The real train.py with trainer=fsdp on 2 CPU processes (gloo): trains, clips, validates and checkpoints; the
    checkpoint's EMA holds full tensors (gathered), shaped like the full weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TINY_TRAIN

    root = Path(__file__).resolve().parents[1]
    overrides = [o for o in TINY_TRAIN if not o.startswith(("callbacks.samples", "callbacks.toy_adherence"))]
    # The sampling callbacks sample on rank 0 only: a sharded forward needs every rank (README, Memory).
    overrides += ["callbacks.samples=null", "callbacks.toy_adherence=null", "callbacks.export=null"]
    args = [sys.executable, str(root / "train.py"), "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]
    args += ["trainer.precision=32-true", *overrides, f"paths.data_dir={toy_data_dir}", f"hydra.run.dir={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    weights = [v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")]
    shadow = ckpt["ema"]["shadow_params"]
    assert len(shadow) == len(weights) > 0
    assert all(s.shape == w.shape for s, w in zip(shadow, weights))
