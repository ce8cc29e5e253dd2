"""Tests of the latent expert SR stage (show1_lightning.stages.latent_sr)."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from numerics import assert_close_rel, assert_differ_rel
from omegaconf import DictConfig, open_dict

import train  # noqa: F401  (registers the OmegaConf resolvers)
from show1_lightning.models.vae import VideoVAE, tiny_autoencoder
from show1_lightning.stages.latent_sr import LatentSRStage
from show1_lightning.stages.loading import load_stage_from_checkpoint

torch.set_num_threads(1)

# A stage small enough for CPU unit tests: 2-level UNet on 4 latent channels, 32-d tiny CLIP text.
TINY_STAGE = [
    "experiment=toy_latent_sr",
    "vae@stage.vae=tiny",
    "text_dim=32",
    "model.block_out_channels=[16,32]",
    "model.down_block_types=[DownBlock3D,CrossAttnDownBlock3D]",
    "model.up_block_types=[CrossAttnUpBlock3D,UpBlock3D]",
    # Show-1's expert semantics (the toy experiment diffuses a latent residual conditioned on the input's latents
    # instead; test_residual_latent_target... covers that).
    "stage.residual=false",
    "stage.condition_on_input=false",
    "model.in_channels=4",
    "stage.residual_scale=1.0",
    "stage.strength=0.8",
    "stage.t_min=0",
    "stage.t_max=900",
    "stage.noise_scheduler.prediction_type=epsilon",
    "stage.zero_init_output=false",
]


# 32x48 output from a 16x24 input, 2 frames: the unit tests' stage size.
SMALL = ("stage.height=32", "stage.width=48", "stage.input_height=16", "stage.input_width=24", "stage.num_frames=2")


def _compose(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize(config_path="../conf", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def _stage(*overrides: str) -> LatentSRStage:
    cfg = _compose(*TINY_STAGE, *overrides)
    return hydra.utils.instantiate(cfg.stage)


@pytest.fixture(scope="module")
def stage() -> LatentSRStage:
    return _stage(*SMALL)


def _batch(b: int = 2, t: int = 2, h: int = 32, w: int = 48, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "video": torch.rand(b, 3, t, h, w, generator=g) * 2 - 1,
        "caption": ["a red circle moving left", "a blue square moving up"][:b] * (b // 2 or 1),
    }


class TimestepSpy:
    """Records the timesteps the UNet is called with (a forward pre-hook)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):  # noqa: ANN001
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.seen.append(torch.as_tensor(t).detach().flatten().clone())

    def all(self) -> torch.Tensor:
        return torch.cat(self.seen)

    def close(self) -> None:
        self.handle.remove()


def test_config_values_match_the_paper() -> None:
    cfg = _compose("experiment=paper_latent_sr")
    st = cfg.stage
    assert (st.height, st.width, st.sample_channels) == (320, 576, 4)
    assert (st.t_min, st.t_max, st.strength) == (0, 900, 0.8)
    assert (st.sampling.num_steps, st.sampling.guidance_scale) == (50, 15.0)
    assert st.sampling.negative_prompt == "low resolution, blur"
    assert cfg.text_dim == 1024 and cfg.text_encoder.kind == "clip"
    assert cfg.model.config == "show-1-sr2" and cfg.trainer.precision == "bf16-mixed"
    assert st.vae.subfolder == "vae" and st.vae.pretrained_path is not None


def test_training_step_encodes_target_and_trains_only_the_unet(stage: LatentSRStage) -> None:
    stage.train()
    batch = _batch()
    x0, cond = stage.training_inputs(batch)
    assert x0.shape == (2, 4, 2, 4, 6) and cond.concat is None
    assert_close_rel(x0, stage.vae.encode(batch["video"]))  # the same encoder call: rounding at most
    loss, _ = stage.diffusion_step(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.unet.parameters())
    assert all(not p.requires_grad and p.grad is None for p in stage.vae.parameters())
    stage.unet.zero_grad(set_to_none=True)
    # The frozen VAE (and text encoder) stay out of the module tree: not in checkpoints, not optimised.
    assert not any(k.startswith(("vae", "_frozen")) or ".vae." in k for k in stage.state_dict())
    assert {id(p) for p in stage.parameters()} == {id(p) for p in stage.unet.parameters()}


def test_training_timesteps_stay_in_the_expert_range(stage: LatentSRStage) -> None:
    stage.train()
    spy = TimestepSpy(stage.unet)
    try:
        with torch.no_grad():
            for i in range(40):
                stage.diffusion_step(_batch(b=2, seed=i))
        ts = spy.all()
    finally:
        spy.close()
    assert ts.numel() == 80
    assert int(ts.max()) <= 900 and int(ts.min()) >= 0
    assert int(ts.max()) > 700  # the range is used, not just its bottom


def test_residual_latent_target_conditioned_on_the_input_and_upscale_starts_at_the_baseline() -> None:
    """The toy recipe: target = (latents(clip) - latents(its resized input)) * residual_scale, the latter also
    concatenated to the UNet's input (condition_on_input); zero-initialised x0 prediction, so the untrained stage's
    upscale() is exactly its baseline (the VAE round trip of the resized input)."""
    st = _stage(
        *SMALL,
        "stage.residual=true",
        "stage.residual_scale=20",
        "stage.condition_on_input=true",
        "model.in_channels=8",
        "stage.strength=1.0",
        "stage.t_min=850",
        "stage.t_max=null",
        "stage.noise_scheduler.prediction_type=sample",
        "stage.zero_init_output=true",
    ).eval()
    batch = _batch()
    x0, cond = st.training_inputs(batch)
    base = st.vae.encode(st.resize_to_output(st.make_upstream(batch["video"])))
    assert_close_rel(x0, (st.vae.encode(batch["video"]) - base) * 20)
    assert_close_rel(cond.concat, base)
    low = st.make_upstream(batch["video"])
    seen: list[torch.Tensor] = []
    hook = st.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    out = st.run(low, batch["caption"], [0, 1], num_steps=4)
    hook.remove()
    assert_close_rel(out, st.baseline(low))
    # Every UNet call saw the input's latents after the 4 noisy residual channels.
    assert len(seen) == 4 and all(x.shape[1] == 8 for x in seen)
    for x in seen:
        assert_close_rel(x[:, 4:], st.vae.encode(st.resize_to_output(low)))
    with pytest.raises(ValueError, match="needs one: pass init"):
        st.generate(batch["caption"], [0, 1], num_steps=4)
    with pytest.raises(InstantiationException, match="in_channels=4"):
        _stage("stage.condition_on_input=true", "model.in_channels=4")


def test_full_range_stage_exceeds_900() -> None:
    """Control for the test above: with t_max null the same spy sees timesteps above 900."""
    st = _stage("stage.height=32", "stage.width=48", "stage.num_frames=1", "stage.t_max=null")
    spy = TimestepSpy(st.unet)
    try:
        with torch.no_grad():
            for i in range(40):
                st.diffusion_step(_batch(b=2, t=1, seed=i))
        assert int(spy.all().max()) > 900
    finally:
        spy.close()


def test_upscale_starts_at_t799_with_50_steps(stage: LatentSRStage) -> None:
    spy = TimestepSpy(stage.unet)
    try:
        out = stage.upscale(
            _batch(b=1, h=16, w=24)["video"], ["a red circle moving left"], [0], num_steps=50, use_ema=False
        )
        ts = spy.all()
    finally:
        spy.close()
    assert out.shape == (1, 3, 2, 32, 48)
    # Guided: each call carries the unconditional and conditional halves at the same timestep.
    firsts = [int(s[0]) for s in spy.seen]
    assert firsts[0] == 799
    assert len(firsts) == 40 and firsts == sorted(firsts, reverse=True)
    assert int(ts.max()) == 799


def test_upscale_256x160_to_576x320(tmp_path: Path) -> None:
    st = _stage("stage.num_frames=2", "stage.height=320", "stage.width=576")  # the paper's output size
    low = _batch(b=1, t=2, h=160, w=256)["video"]
    out = st.upscale(low, ["a green triangle moving right"], [3], num_steps=2)
    assert out.shape == (1, 3, 2, 320, 576)
    assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1
    again = st.upscale(low, ["a green triangle moving right"], [3], num_steps=2)
    assert_close_rel(again, out)  # seeded: the same computation again
    other = st.upscale(low, ["a green triangle moving right"], [4], num_steps=2)
    assert_differ_rel(other, out)


def test_generate_returns_pixels_or_latents(stage: LatentSRStage) -> None:
    video = stage.generate(["a red circle moving left"], [0], num_steps=2)
    assert video.shape == (1, 3, 2, 32, 48)
    latents = stage.generate(["a red circle moving left"], [0], num_steps=2, return_latents=True)
    assert latents.shape == (1, 4, 2, 4, 6)
    assert_close_rel(stage.decode_latents(latents), video)  # values in [-1, 1], same decoder


def test_stage_device_moves_carry_the_vae_but_not_dtype_changes() -> None:
    st = _stage("stage.height=32", "stage.width=48", "stage.num_frames=1")
    st.double()  # dtype changes leave the VAE in its configured dtype
    assert next(st.unet.parameters()).dtype == torch.float64
    assert next(st._frozen["vae"].parameters()).dtype == torch.float32
    st.to("meta")  # a device move (no GPU in CI: the meta device stands in for one)
    assert next(st.unet.parameters()).device.type == "meta"
    assert st._frozen["vae"].device.type == "meta"


def test_resize_to_output(stage: LatentSRStage) -> None:
    low = _batch(b=1, t=3, h=16, w=24)["video"]
    up = stage.resize_to_output(low)
    assert up.shape == (1, 3, 3, 32, 48) and up.min() >= -1 and up.max() <= 1
    # Each frame is resized on its own: a constant frame stays constant.
    const = torch.full((1, 3, 2, 16, 24), 0.25)
    # A filter's weights sum to 1 up to float32 rounding: 0.25 comes back to within ~1e-7.
    torch.testing.assert_close(stage.resize_to_output(const), torch.full((1, 3, 2, 32, 48), 0.25), rtol=0, atol=1e-6)


def test_errors(stage: LatentSRStage) -> None:
    with pytest.raises(ValueError, match="training clips are"):
        stage.training_inputs(_batch(h=40, w=48))
    with pytest.raises(ValueError, match="prompts"):
        stage.upscale(_batch(b=2)["video"], ["one prompt"], [0])
    with pytest.raises(InstantiationException, match="multiple of the VAE factor"):
        _stage("stage.height=36", "stage.width=48")
    with pytest.raises(InstantiationException, match=r"timestep range \[0, 1000\] must lie in \[0, 999\]"):
        _stage("stage.height=32", "stage.width=48", "stage.t_max=1000")
    cfg = _compose(*TINY_STAGE, "stage.height=32", "stage.width=48")
    eight = VideoVAE(tiny_autoencoder([8, 16, 16, 32], latent_channels=8, norm_num_groups=4))
    with pytest.raises(InstantiationException, match="latent channels"):
        hydra.utils.instantiate(cfg.stage, vae=eight)
    with pytest.raises(InstantiationException, match="VideoVAE"):
        hydra.utils.instantiate(cfg.stage, vae=eight.vae)


def test_toy_experiment_trains_through_hydra(tmp_path: Path) -> None:
    """`python train.py experiment=toy_latent_sr`, shortened: 2 steps, checkpoint, reload without the VAE."""
    data_dir = Path(__file__).resolve().parents[1] / ".cache" / "data"
    cfg = _compose(
        "experiment=toy_latent_sr",
        "vae@stage.vae=tiny",
        "logger=csv",
        "callbacks=none",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        "data.batch_size=1",
        "data.epoch_length=2",
        "data.val_batches=1",
        "stage.num_frames=2",
        "stage.train_crop=[32,64]",  # whole latents of this test's f=8 VAE that its UNet can halve twice
        f"paths.data_dir={data_dir}",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.work_dir = str(tmp_path)
        cfg.callbacks = {
            "ckpt": {
                "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                "dirpath": str(tmp_path / "checkpoints"),
                "save_last": True,
            }
        }
    metrics = train.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/loss" in metrics
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert not any("vae" in k for k in ckpt["state_dict"])  # the VAE is rebuilt from its config
    st = load_stage_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    # 64 x 96 output, the tiny (f=8) VAE of this test: 8 x 12 latents
    assert isinstance(st, LatentSRStage) and st.sample_shape() == (4, 2, 8, 12)
    out = st.upscale(torch.zeros(1, 3, 2, 32, 48), ["a red circle moving left"], [0], num_steps=8)
    assert out.shape == (1, 3, 2, 64, 96)


@pytest.mark.slow
def test_toy_experiment_with_fitted_toy_vae(tmp_path: Path) -> None:
    """The real toy config (vae=toy: the tiny VAE fitted on the toy clips on first use, cached in data_dir)."""
    data_dir = Path(__file__).resolve().parents[1] / ".cache" / "data"
    cfg = _compose(
        "experiment=toy_latent_sr",
        "logger=csv",
        "callbacks=none",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "data.num_workers=0",
        "data.epoch_length=2",
        "data.val_batches=1",
        f"paths.data_dir={data_dir}",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.work_dir = str(tmp_path)
        cfg.callbacks = {}  # the experiment's model_checkpoint tweak has no base node under callbacks=none
    metrics = train.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (data_dir / "toy_vae_64x96" / "DONE.json").exists()  # the toy latent SR output size


def test_train_crop_cuts_clip_and_input_at_the_same_place() -> None:
    st = _stage(
        *SMALL,
        "stage.residual=true",
        "stage.condition_on_input=true",
        "model.in_channels=8",
        "stage.train_crop=[16,24]",
    )
    batch = _batch()
    st.train()
    x0, cond = st.training_inputs(batch)
    assert x0.shape[-2:] == cond.concat.shape[-2:] == (2, 3)  # 16x24 pixels through the f=8 VAE
    resized = st.resize_to_output(st.make_upstream(batch["video"]))
    for i in range(2):  # each clip: the crop of clip and input at one aligned offset (the VAE factor)
        matches = []
        for y in range(0, 32 - 16 + 1, 8):
            for x in range(0, 48 - 24 + 1, 8):
                clip = st.vae.encode(batch["video"][i : i + 1, ..., y : y + 16, x : x + 24])
                base = st.vae.encode(resized[i : i + 1, ..., y : y + 16, x : x + 24])
                if torch.allclose(cond.concat[i : i + 1], base, atol=1e-5) and torch.allclose(
                    x0[i : i + 1], clip - base, atol=1e-5
                ):
                    matches.append((y, x))
        assert len(matches) == 1, matches
    st.eval()  # validation: whole frames
    assert st.training_inputs(batch)[0].shape[-2:] == (4, 6)
    with pytest.raises(InstantiationException, match="train_crop"):
        _stage("stage.height=32", "stage.width=48", "stage.train_crop=[12,24]")
