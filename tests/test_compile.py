"""stage.compile (torch.compile of the UNet in place) and fused attention in every UNet of the cascade."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from show1_lightning.diffusion.compile import compile_in_place, compile_options, is_compiled
from show1_lightning.models.show1_unet import build_show1_unet, load_released_config
from show1_lightning.models.text_encoder import TextEncoder
from show1_lightning.stages.keyframe import KeyframeStage

PAPER_UNETS = ("show-1-base", "show-1-interpolation", "show-1-sr1", "show-1-sr2")


def tiny_paper_unet(name: str) -> nn.Module:
    """The paper config's block types, head width and attention layout at 64 channels per block."""
    cfg = load_released_config(name)
    n = len(cfg["down_block_types"])
    over: dict = {"block_out_channels": [64] * n, "layers_per_block": 1, "cross_attention_dim": 32}
    if "encoder_hid_dim" in cfg:
        over.update(encoder_hid_dim=16, addition_embed_type_num_heads=2, time_embedding_dim=64)
    return build_show1_unet(name, **over).eval()


@contextlib.contextmanager
def fused_attention_only() -> Iterator[list[int]]:
    """Count ``F.scaled_dot_product_attention`` calls; any softmax/bmm/einsum (a naive attention) raises."""
    calls = [0]
    real = F.scaled_dot_product_attention

    def sdpa(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    def naive(*a, **k):
        raise AssertionError("naive attention path (softmax / bmm / baddbmm / einsum) taken")

    mp = pytest.MonkeyPatch()
    mp.setattr(F, "scaled_dot_product_attention", sdpa)
    for mod, name in (
        (torch, "softmax"),
        (torch.Tensor, "softmax"),
        (F, "softmax"),
        (torch, "bmm"),
        (torch, "baddbmm"),
        (torch, "einsum"),
        (torch.Tensor, "bmm"),
    ):
        mp.setattr(mod, name, naive)
    try:
        yield calls
    finally:
        mp.undo()


@pytest.mark.parametrize("name", PAPER_UNETS)
def test_every_attention_of_the_paper_unets_is_fused(name: str) -> None:
    unet = tiny_paper_unet(name)
    cfg = unet.config
    attn_layers = sum(
        1 for m in unet.modules() if type(m).__name__ in ("Attention", "AttentionPooling", "FusedAttentionPooling")
    )
    assert attn_layers > 0
    b, t, size = 1, 2, 2 ** (len(cfg.down_block_types) - 1) * 2
    x = torch.randn(b, cfg.in_channels, t, size, size)
    text_dim = getattr(cfg, "encoder_hid_dim", None) or cfg.cross_attention_dim
    kwargs = {"encoder_hidden_states": torch.randn(b, 5, text_dim)}
    if getattr(cfg, "class_embed_type", None) is not None:
        kwargs["class_labels"] = torch.tensor([100])
    with torch.no_grad(), fused_attention_only() as calls:
        unet(x, torch.tensor([10]), **kwargs)
    # every attention module ran through SDPA (temporal transformers may run 2 attentions each)
    assert calls[0] >= attn_layers, (calls[0], attn_layers)


def test_the_naive_path_is_caught() -> None:
    """The check above can fail: diffusers' classic AttnProcessor (bmm + softmax) is refused."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_paper_unet("show-1-sr2")
    unet.set_attn_processor(AttnProcessor())
    x = torch.randn(1, unet.config.in_channels, 2, 8, 8)
    with torch.no_grad(), fused_attention_only(), pytest.raises(AssertionError, match="naive attention"):
        unet(x, torch.tensor([10]), encoder_hidden_states=torch.randn(1, 5, 32))


def test_fused_pooling_matches_diffusers() -> None:
    from diffusers.models.embeddings import AttentionPooling

    from show1_lightning.models.show1_unet_blocks import fuse_attention_pooling

    torch.manual_seed(0)
    ref = AttentionPooling(4, 32)
    fused = fuse_attention_pooling(nn.ModuleList([AttentionPooling(4, 32)]))[0]
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-6, rtol=1e-5)
    assert list(fused.state_dict()) == list(ref.state_dict())


# ----------------------------------------------------------------------------- stage.compile
def tiny_keyframe(compile_spec) -> KeyframeStage:
    torch.manual_seed(0)
    unet = build_show1_unet(
        "show-1-base",
        block_out_channels=[32, 32],
        layers_per_block=1,
        down_block_types=["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
        up_block_types=["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
        attention_head_dim=8,
        cross_attention_dim=32,
        encoder_hid_dim=16,
        addition_embed_type_num_heads=2,
        time_embedding_dim=32,
        norm_num_groups=8,
        out_channels=3,
    )
    return KeyframeStage(
        unet=unet,
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        text_encoder=TextEncoder(kind="t5", max_length=8, tiny_dim=16, tiny_layers=1),
        num_frames=2,
        height=8,
        width=8,
        ema={"enabled": True},
        sampling={"num_steps": 2, "guidance_scale": 3.0},
        compile=compile_spec,
    )


def test_compile_options() -> None:
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"backend": "eager", "enabled": False}) is None
    assert compile_options({"backend": "eager"}) == {"backend": "eager"}
    with pytest.raises(ValueError, match="unknown"):
        compile_options({"bakend": "eager"})
    with pytest.raises(ValueError):
        tiny_keyframe("yes")


class MiniDenoiser(nn.Module):
    """A stand-in UNet (conv + text bias) that dynamo traces in seconds: the fast check of the compile plumbing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 3, 3, padding=1)
        self.text = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor):
        from types import SimpleNamespace

        bias = self.text(encoder_hidden_states.mean(1))[:, :, None, None, None]
        return SimpleNamespace(sample=self.conv(x) + bias * (t[:, None, None, None, None] / 1000))


def test_compiled_stage_fast_path(tmp_path) -> None:
    """stage.compile on a small denoiser: sampling goes through dynamo and equals eager; keys stay plain."""
    torch._dynamo.reset()

    def make(spec):
        torch.manual_seed(0)
        return KeyframeStage(
            unet=MiniDenoiser(),
            noise_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
            text_encoder=TextEncoder(kind="t5", max_length=8, tiny_dim=16, tiny_layers=1),
            num_frames=2,
            height=8,
            width=8,
            ema={"enabled": False},
            sampling={"num_steps": 3, "guidance_scale": 3.0},
            compile=spec,
        )

    eager, compiled = make(False), make({"backend": "eager"})
    want = eager.generate(["a red circle"], [1])
    torch._dynamo.utils.counters.clear()
    got = compiled.generate(["a red circle"], [1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path ran
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert is_compiled(compiled.unet) and list(compiled.state_dict()) == list(eager.state_dict())
    torch.save(compiled.state_dict(), tmp_path / "s.pt")
    assert not any("_orig_mod" in k for k in torch.load(tmp_path / "s.pt"))


@pytest.mark.slow
def test_compiled_stage_samples_and_trains_with_unchanged_keys(tmp_path) -> None:
    """Dynamo traces the UNet (backend=eager: no code generation, fast), sampling equals the eager stage's, and a
    Lightning fit + checkpoint keep the plain state_dict keys (no ``_orig_mod.``)."""
    import lightning as L

    torch._dynamo.reset()
    eager, compiled = tiny_keyframe(False), tiny_keyframe({"backend": "eager"})
    keys = list(eager.state_dict())
    assert keys == list(compiled.state_dict())
    want = eager.generate(["a red circle"], [1])
    torch._dynamo.utils.counters.clear()
    got = compiled.generate(["a red circle"], [1])
    assert is_compiled(compiled.unet) and not is_compiled(eager.unet)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled path ran
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert list(compiled.state_dict()) == keys

    batch = {"video": torch.rand(2, 3, 2, 8, 8) * 2 - 1, "caption": ["a", "b"]}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(compiled, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert not any("_orig_mod" in k for k in saved) and list(saved) == keys
    assert json.dumps(sorted(saved)) == json.dumps(sorted(keys))


def test_compile_is_idempotent() -> None:
    m = nn.Linear(2, 2)
    assert compile_in_place(m, {"backend": "eager"})
    first = m._compiled_call_impl
    assert compile_in_place(m, {"backend": "eager"}) and m._compiled_call_impl is first
    assert list(m.state_dict()) == ["weight", "bias"]
    assert not compile_in_place(nn.Linear(2, 2), False)


@pytest.mark.slow
def test_inductor_compiled_sampling_matches_eager() -> None:
    """The default backend (inductor: C++ code generation on a CPU) gives the eager samples within 1e-4."""
    torch._dynamo.reset()
    want = tiny_keyframe(False).generate(["a red circle"], [1])
    got = tiny_keyframe(True).generate(["a red circle"], [1])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
