"""Show1Pipeline: trained stages -> one diffusers folder (model_index.json) -> from_pretrained -> the same video as
Show1Cascade for the same seeds; save_pretrained, DiffusionPipeline loading, model card and --push-to-hub."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from show1_lightning.callbacks.export import export_stage
from show1_lightning.data.video_io import decode_video, to_uint8_frames
from show1_lightning.pipelines.cascade import Show1Cascade
from show1_lightning.pipelines.diffusers_pipeline import Show1Pipeline, export_pipeline, main
from show1_lightning.stages.loading import UnsafeCheckpointError

TOY = {
    "keyframe": "toy",
    "interpolation": "toy_interpolation",
    "pixel_sr": "toy_pixel_sr",
    "latent_sr": "toy_latent_sr",
}
# Small sizes so all four stages run in seconds: 2 keyframes of 16x8 -> 5 frames -> 64x32 pixels -> 64x32 latent SR.
SMALL = {
    "keyframe": ("stage.height=8", "stage.width=16", "stage.num_frames=2"),
    "latent_sr": ("vae@stage.vae=tiny", "stage.height=32", "stage.width=64"),
}
# 4 steps: 4 x strength 0.25 = 1 step for the refiners (interpolation, latent SR); pixel SR runs all 4 (t >= 850)
TWO_STEPS = {name: {"num_steps": 4} for name in TOY}
PROMPTS = ["a red circle moving left"]


@pytest.fixture(scope="module")
def stage_exports(toy_data_dir, tmp_path_factory) -> dict[str, Path]:
    """The four toy stages (untrained, seeded) as the per-stage export folders training writes (stage.json + unet/),
    each in a run folder with the composed config where Hydra saves it (``<run>/.hydra/config.yaml``)."""
    out = tmp_path_factory.mktemp("stages")
    folders = {}
    for name, experiment in TOY.items():
        cfg = compose_config(toy_data_dir, out, f"experiment={experiment}", *SMALL.get(name, ()), tiny=False)
        torch.manual_seed(0)
        stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
        stage.stage_config = OmegaConf.to_container(cfg.stage, resolve=True)
        folders[name] = export_stage(stage, out / name / "export")
        (out / name / ".hydra").mkdir()
        OmegaConf.save(cfg, out / name / ".hydra" / "config.yaml")
    return folders


def _record_hub_calls(monkeypatch) -> list[tuple[str, dict]]:
    """The one fake: no network here, so HfApi's repo creation and upload record their arguments."""
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", {"repo_id": repo_id, **kw}))
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)))
    return calls


def test_export_load_and_run_equals_the_cascade(stage_exports, tmp_path, monkeypatch):
    """The round trip of the issue: export -> Show1Pipeline.from_pretrained -> bit-identical video for the same seeds."""
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"metrics": {"fvd": 123.5, "clipsim": 0.25}, "generator": {"name": "cascade"}}))
    calls = _record_hub_calls(monkeypatch)
    out = tmp_path / "pipe"
    args = ["--out", str(out), "--report", str(report), "--push-to-hub", "me/show1-toy"]
    for name, folder in stage_exports.items():
        args += [f"--{name.replace('_', '-')}", str(folder)]
    assert main(args) == 0

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "Show1Pipeline"
    assert index["keyframe_unet"] == ["show1_lightning.models.show1_unet", "Show1UNet3DConditionModel"]
    assert index["latent_sr_vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"][1] == "T5EncoderModel" and index["text_encoder_2"][1] == "CLIPTextModel"
    assert sorted(index["show1_stages"]) == sorted(TOY)

    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: text-to-video" in card
    assert "show1_lightning.stages.latent_sr.LatentSRStage" in card and "| metrics.fvd | 123.5 |" in card
    assert "[`training/latent_sr.yaml`](training/latent_sr.yaml)" in card
    assert OmegaConf.load(out / "training" / "pixel_sr.yaml").stage._target_.endswith("PixelSRStage")
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["repo_id"] == "me/show1-toy" and calls[1][1]["repo_id"] == "me/show1-toy"
    assert Path(calls[1][1]["folder_path"]) == out

    reference = Show1Cascade(**stage_exports, device="cpu", sampling=TWO_STEPS)(PROMPTS, [3]).video
    pipe = Show1Pipeline.from_pretrained(out)
    got = pipe(PROMPTS, num_inference_steps=4, seed=3, output_type="raw")
    assert got.seeds == [3] and got.frames.shape == (1, 3, 5, 32, 64)
    assert torch.equal(got.frames, reference)


def test_save_pretrained_generator_and_diffusion_pipeline_loading(stage_exports, tmp_path, monkeypatch):
    two = {k: stage_exports[k] for k in ("keyframe", "interpolation")}
    first = export_pipeline(tmp_path / "a", **two, train_configs=False)
    assert not (first / "training").exists() and "training config of the run" not in (first / "README.md").read_text()
    pipe = Show1Pipeline.from_pretrained(first)
    assert pipe.stage_names == ["keyframe", "interpolation"] and pipe.latent_sr_unet is None
    pipe.save_pretrained(tmp_path / "b")
    again = Show1Pipeline.from_pretrained(tmp_path / "b")
    saved, exported = (json.loads((d / "model_index.json").read_text()) for d in (tmp_path / "b", first))
    saved.pop("_name_or_path", None)  # diffusers records where a loaded pipeline came from
    assert saved == exported
    # The stages a pipeline builds export again to the same stage configs.
    assert Show1Pipeline.from_stages(**pipe.stages).config.show1_stages == pipe.config.show1_stages

    out = pipe(
        ["a blue square moving up", "a red circle moving left"],
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    )
    assert out.frames.shape == (2, 5, 3, 8, 16) and len(set(out.seeds)) == 2
    by_seed = again(
        ["a blue square moving up", "a red circle moving left"],
        num_inference_steps=4,
        seed=out.seeds,
        output_type="pt",
    )
    assert torch.equal(out.frames, by_seed.frames)  # the generator only picks the seeds
    reference = Show1Cascade(**two, device="cpu", sampling=TWO_STEPS)(["a blue square moving up"], out.seeds[:1]).video
    frames = again("a blue square moving up", num_inference_steps=4, seed=out.seeds[0]).frames  # np: B x T x H x W x 3
    expected = ((reference.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy()
    assert isinstance(frames, np.ndarray) and frames.shape == (1, 5, 8, 16, 3)
    np.testing.assert_array_equal(frames, expected)
    # ... and to generate.py's mp4 for the same prompt and seed. The frames are those generate.py hands to
    # write_mp4 (a spy that calls the real writer); they may differ by one rounding step, as float sums on a CPU
    # are not promised to be bit-equal between two cascades, while another seed would differ everywhere. The mp4
    # is checked by decoding it (8 fps, those frames within H.264's loss): a CI machine once encoded the same
    # frames to other bytes, so the bytes of two encodings are not compared.
    import generate

    written: list[np.ndarray] = []
    real_write = generate.write_mp4
    monkeypatch.setattr(
        generate, "write_mp4", lambda path, frames, **kw: written.append(frames) or real_write(path, frames, **kw)
    )
    mp4 = _generate_py(two, "a blue square moving up", out.seeds[0], tmp_path / "gen")
    (frames_u8,) = written
    pipeline_u8 = to_uint8_frames(reference[0])  # == the pipeline's video (above)
    step = np.abs(frames_u8.astype(np.int16) - pipeline_u8.astype(np.int16))
    assert frames_u8.shape == pipeline_u8.shape and step.max() <= 1 and (step > 0).mean() < 0.01
    # H.264 at crf 18 keeps the 2x2 means of these noise-like frames (its chroma is 2x2 subsampled anyway).
    decoded = decode_video(mp4, strict=True)
    assert decoded.fps == 8 and decoded.frames.shape == frames_u8.shape
    other = again("a blue square moving up", num_inference_steps=4, seed=out.seeds[0] + 1, output_type="pt")
    assert not torch.equal(other.frames[0], out.frames[0])
    other_u8 = to_uint8_frames(other.frames[0].permute(1, 0, 2, 3) * 2 - 1)
    loss, to_other = (_coarse_distance(decoded.frames, v) for v in (frames_u8, other_u8))
    assert loss < 12 and to_other > 3 * loss, (loss, to_other)  # measured: 7.9 and 34.7

    # DiffusionPipeline resolves the class through the folder's pipeline.py (one import of this package).
    import diffusers.utils.dynamic_modules_utils as dyn

    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    from diffusers import DiffusionPipeline

    generic = DiffusionPipeline.from_pretrained(tmp_path / "b", custom_pipeline="pipeline", trust_remote_code=True)
    assert type(generic) is Show1Pipeline
    got = generic("a blue square moving up", num_inference_steps=4, seed=out.seeds[0], output_type="raw").frames
    assert torch.equal(got, reference)


def _coarse_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference (uint8 levels) of the 2x2 block means of two T x H x W x 3 videos."""
    pooled = (torch.nn.functional.avg_pool2d(torch.from_numpy(v).permute(0, 3, 1, 2).float(), 2) for v in (a, b))
    return float(torch.sub(*pooled).abs().mean())


def _generate_py(stages: dict[str, Path], prompt: str, seed: int, out: Path) -> Path:
    """generate.py's final mp4 (its generate() on the composed `generate` config) for one prompt."""
    import generate

    GlobalHydra.instance().clear()
    overrides = [
        f"output_dir={out}",
        f"prompts=[{prompt}]",
        f"seeds=[{seed}]",
        "batch_size=1",
        "device=cpu",
        "logger.wandb=false",
        "save_intermediates=false",
        *[f"stages.{n}={stages[n] if n in stages else 'null'}" for n in TOY],
        *[f"+sampling.{n}.num_steps=4" for n in stages],
    ]
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("generate", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    (path,) = generate.generate(cfg)
    return path


def test_a_tampered_stage_config_is_refused(stage_exports, tmp_path):
    folder = export_pipeline(tmp_path / "p", stage_exports["keyframe"])
    index = json.loads((folder / "model_index.json").read_text())
    index["show1_stages"]["keyframe"]["stage"]["optimizer"]["_target_"] = "os.system"
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = Show1Pipeline.from_pretrained(folder)
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        pipe("x", num_inference_steps=1, seed=0)
    with pytest.raises(ValueError, match="prefix"):
        Show1Pipeline.from_stages(stage_exports["keyframe"], pixel_sr=stage_exports["pixel_sr"])
