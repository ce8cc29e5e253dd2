"""Released Hub folders in, videos out: generate.py and generator=cascade on tiny released-layout folders
(no conversion step), each folder's own scheduler, clear start-up errors naming the folder and what it lacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from show1_lightning.pipelines.released import (
    ReleasedCascade,
    check_released_folder,
    is_released_folder,
    load_folder_scheduler,
    load_released_stage,
)
from show1_lightning.pipelines.released_tiny import build_tiny_released_folders

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "keyframe": "show-1-base",
    "interpolation": "show-1-interpolation",
    "pixel_sr": "show-1-sr1",
    "latent_sr": "show-1-sr2",
}
# Tiny and fast: 2 keyframes of 8 x 12 -> 5 frames -> 32 x 48 -> 64 x 96, one or two sampling steps per stage.
FAST = [
    "behaviour.schedules.keyframe={num_steps:2,guidance_scale:9.0,num_frames:2,height:8,width:12}",
    "behaviour.schedules.interpolation.num_steps=1",
    "behaviour.schedules.image_sr.num_steps=1",
    "behaviour.schedules.pixel_sr.num_steps=1",
    "behaviour.schedules.latent_sr={num_steps:2,guidance_scale:15.0,strength:0.8,height:64,width:96,"
    "negative_prompt:'low resolution, blur'}",
]


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory) -> Path:
    """Tiny random models in the released Hub layouts (built once for the module)."""
    root = tmp_path_factory.mktemp("released")
    build_tiny_released_folders(root)
    return root


def _compose(config: str, overrides: list[str]):
    import generate  # noqa: F401  (registers the resolvers)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def test_layout_is_the_hub_layout(released_dir):
    """The tiny folders hold what the Hub repos hold (model_index.json, unet/, scheduler/, text encoders)."""
    for name in FOLDERS.values():
        f = released_dir / name
        assert (f / "model_index.json").is_file() and (f / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert json.loads((f / "unet" / "config.json").read_text())["_class_name"] == "UNet3DConditionModel"
        assert is_released_folder(f)
    assert (released_dir / "show-1-sr1" / "image_noising_scheduler" / "scheduler_config.json").is_file()
    assert (released_dir / "show-1-sr2" / "vae" / "config.json").is_file()


def test_generate_py_runs_on_released_folders(released_dir, tmp_path, capsys):
    """generate.py on the four released folders + IF-II-L, as downloaded: videos out, every stage's shape."""
    from generate import generate

    out = tmp_path / "gen"
    cfg = _compose(
        "generate",
        [
            *(f"stages.{k}={released_dir / v}" for k, v in FOLDERS.items()),
            f"if_ii_l={released_dir / 'IF-II-L-v1.0'}",
            "prompts=[A Panda playing guitar]",
            "batch_size=1",
            "logger.wandb=false",
            f"output_dir={out}",
            "device=cpu",
            *FAST,
        ],
    )
    paths = generate(cfg)
    assert len(paths) == 1 and paths[0].is_file() and paths[0].stat().st_size > 0
    for name in FOLDERS:
        assert (out / "stages" / f"000_{name}.mp4").is_file()
    timings = json.loads((out / "timings.json").read_text())
    shapes = {t["name"]: tuple(t["output_shape"]) for t in timings}
    assert shapes == {
        "keyframe": (1, 3, 2, 8, 12),
        "interpolation": (1, 3, 5, 8, 12),
        "pixel_sr": (1, 3, 5, 32, 48),
        "latent_sr": (1, 3, 5, 64, 96),
    }
    assert "no IF-II-L folder configured" not in capsys.readouterr().out


def test_evaluate_generator_cascade_takes_released_folders(released_dir):
    """generator=cascade (evaluate.py) composes with the released preset and generates from a released folder."""
    import hydra

    cfg = _compose(
        "eval",
        [
            "generator=cascade",
            f"generator.keyframe={released_dir / 'show-1-base'}",
            "generator.device=cpu",
            FAST[0].replace("behaviour.", "generator.behaviour."),
        ],
    )
    assert cfg.generator.behaviour.name == "released"
    gen = hydra.utils.instantiate(cfg.generator)
    video = gen.generate(["a red circle"], [3])
    assert video.shape == (1, 3, 2, 8, 12) and video.abs().max() <= 1.0
    assert gen.describe()["behaviour"]["stages"] == ["keyframe"]


def test_folder_scheduler_class_and_every_option(released_dir):
    """Each stage samples with its folder's scheduler class and options (sr2: DDIM with steps_offset 1)."""
    stage = load_released_stage(released_dir / "show-1-sr2", "latent_sr")
    sched = stage.released.scheduler
    cfg = json.loads((released_dir / "show-1-sr2" / "scheduler" / "scheduler_config.json").read_text())
    assert type(sched).__name__ == cfg["_class_name"] == "DDIMScheduler"
    for key, value in cfg.items():
        if not key.startswith("_"):
            assert sched.config[key] == value, key
    sr1 = load_released_stage(released_dir / "show-1-sr1", "pixel_sr")
    assert type(sr1.released.image_noising_scheduler).__name__ == "DDPMScheduler"
    assert sr1.released.scheduler.config.dynamic_thresholding_ratio == 0.995  # sr1's own value, not base's 0.95


def test_old_dpm_config_keeps_its_final_step(released_dir):
    """A DPM-Solver config written by diffusers 0.19.3 (no final_sigmas_type) keeps that version's last step."""
    sched = load_folder_scheduler(released_dir / "show-1-base")
    assert sched.config.final_sigmas_type == "sigma_min"


@pytest.mark.parametrize(
    "kind,remove,expect",
    [
        ("keyframe", "scheduler", "scheduler/scheduler_config.json"),
        ("keyframe", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
        ("pixel_sr", "image_noising_scheduler", "image_noising_scheduler/scheduler_config.json"),
        ("latent_sr", "vae", "vae/config.json"),
    ],
)
def test_missing_component_names_folder(released_dir, tmp_path, kind, remove, expect):
    """A folder without a component fails at start-up with the folder and the missing file in the message."""
    folder = tmp_path / FOLDERS[kind]
    shutil.copytree(released_dir / FOLDERS[kind], folder)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError) as err:
        check_released_folder(folder, kind)
    assert str(folder) in str(err.value) and expect in str(err.value)


def test_missing_text_encoder_needs_t5(released_dir, tmp_path):
    """A pixel folder without text_encoder/ names it and points at t5=; with t5= it loads."""
    folder = tmp_path / "show-1-base"
    shutil.copytree(released_dir / "show-1-base", folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"show-1-base lacks text_encoder/.*t5="):
        load_released_stage(folder, "keyframe")
    stage = load_released_stage(folder, "keyframe", t5=released_dir / "show-1-interpolation")
    assert stage.text_encoder is not None


def test_released_preset_is_default_for_released_folders_only(released_dir):
    """generate.yaml's default preset applies to released folders; apply_to=all extends it to trained stages."""
    cfg = _compose("generate", [])
    assert cfg.behaviour.name == "released" and cfg.behaviour.apply_to == "released_folders"
    released = load_released_stage(released_dir / "show-1-base", "keyframe")
    trained = load_released_stage(released_dir / "show-1-base", "keyframe")
    trained.released = None  # what a stage from a checkpoint looks like
    stages = {"keyframe": released, "interpolation": trained}
    beh = dict(cfg.behaviour)
    assert ReleasedCascade(stages, beh).active == {"keyframe": True, "interpolation": False}
    assert ReleasedCascade(stages, {**beh, "apply_to": "all"}).active == {"keyframe": True, "interpolation": True}
    assert ReleasedCascade(stages, {"name": "none", "apply_to": "none"}).active == {
        "keyframe": False,
        "interpolation": False,
    }
    torch.manual_seed(0)


def test_behaviour_none_uses_training_sampling_defaults(released_dir):
    """Released folders sampled with behaviour=none get the stage configs' sampling (conf/stage/*.yaml)."""
    stage = load_released_stage(released_dir / "show-1-sr2", "latent_sr")
    assert stage.sampling_cfg["num_steps"] == 50 and stage.sampling_cfg["negative_prompt"] == "low resolution, blur"
    assert load_released_stage(released_dir / "show-1-base", "keyframe").sampling_cfg["guidance_scale"] == 9.0


def test_cascade_checks_every_folder_before_loading(released_dir, tmp_path, monkeypatch):
    """A component missing in the last folder fails before any stage is loaded (start-up, not after minutes)."""
    from show1_lightning.pipelines import released as rel
    from show1_lightning.pipelines.cascade import Show1Cascade

    sr2 = tmp_path / "show-1-sr2"
    shutil.copytree(released_dir / "show-1-sr2", sr2)
    shutil.rmtree(sr2 / "vae")
    monkeypatch.setattr(rel, "load_released_stage", lambda *a, **k: pytest.fail("a stage was loaded first"))
    with pytest.raises(FileNotFoundError, match=r"latent_sr: released folder .*show-1-sr2 lacks vae/config.json"):
        Show1Cascade(
            keyframe=released_dir / "show-1-base",
            interpolation=released_dir / "show-1-interpolation",
            pixel_sr=released_dir / "show-1-sr1",
            latent_sr=sr2,
            device="cpu",
        )
