"""Parity of this project's released-behaviour cascade with the official Show-1 code, on tiny random weights.

    python scripts/official_parity.py --setup                                  # once: the reference environment
    python scripts/official_parity.py --seed 7 --prompt "a panda playing guitar"

``--setup`` (idempotent, cached) creates a separate, test-only virtual environment under
``.cache/official_ref/venv`` with the versions the official repository pins (``requirements.txt`` of
showlab/Show-1: diffusers 0.19.3, transformers 4.29.1, accelerate 0.18.0) and this machine's torch 2.14.1 (the
pinned torch 2.0.0 has no build for this Python; diffusers 0.19.3 runs on 2.14.1 for everything used here), plus
what those old versions need from their time: huggingface_hub < 0.26 (diffusers 0.19.3 imports
``cached_download``), numpy < 2, setuptools 77-80 (torch 2.14.1 needs >= 77, accelerate 0.18 needs
``pkg_resources``, removed in 81), einops. The official
repository is not copied into this project: ``--official-repo`` points at a checkout of it (default
``.cache/official_ref/Show-1``, extracted on ``--setup`` from a local git mirror given by ``--official-git-dir``,
else cloned from GitHub); its ``showone`` package is put on the reference interpreter's path at run time.

The run:

1. writes tiny random models in the released Hub layouts (``show1_lightning.pipelines.released_tiny``:
   show-1-base, -interpolation, -sr1, -sr2 and IF-II-L, scheduler configs as diffusers 0.19.3 writes them);
2. runs the official flow of ``run_inference.py`` on them in the reference environment (a subprocess: the
   official pipelines ``TextToVideoIFPipeline``, ``TextToVideoIFInterpPipeline``,
   ``TextToVideoIFSuperResolutionPipeline_Cond``, diffusers' ``IFSuperResolutionPipeline`` and
   ``VideoToVideoSDPipeline``, float32 on the CPU, the same seeds, prompts and step counts; only the frame sizes are
   the tiny ones);
3. runs this project's ``Show1Cascade`` on the same folders with ``conf/behaviour/released.yaml``;
4. prints ``stage <name>: max_abs_diff=<x>`` for every stage and the end-to-end video, and exits 1 when any is
   above ``--tol`` (1e-4).

On CPU the official base pipeline cannot call ``enable_model_cpu_offload`` (it needs CUDA); the reference flow
does what that call does to the numbers, ``pipe_base.unet.train()`` (pipeline_t2v_base_pixel.py:130).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "official_ref"
VENV = CACHE / "venv"
DEFAULT_REPO = CACHE / "Show-1"
DEFAULT_GIT_DIR = Path("/work/.mirror/showlab+Show-1/repo")
OFFICIAL_URL = "https://github.com/showlab/Show-1"
PINNED = [
    "torch==2.14.1",
    "diffusers==0.19.3",
    "transformers==4.29.1",
    "accelerate==0.18.0",
    "huggingface_hub<0.26",
    "numpy<2",
    "setuptools>=77,<81",
    "einops",
    "safetensors",
    "pillow",
    "sentencepiece",
]
STAGES = ("keyframe", "interpolation", "pixel_sr", "latent_sr")
# Tiny frame sizes (the released 40x64 keyframes, 4x SR1 and 320x576 SR2, scaled down); step counts are
# run_inference.py's.
TINY = {"height": 8, "width": 12, "num_frames": 8, "sr2_height": 64, "sr2_width": 96}
#: run_inference.py's step counts (``--max-steps`` caps them on both sides, for quick checks).
STEPS = {"keyframe": 75, "interpolation": 75, "image_sr": 70, "pixel_sr": 125, "latent_sr": 50}


def _python() -> Path:
    return VENV / "bin" / "python"


def setup(official_repo: Path, git_dir: Path) -> None:
    """Create the reference environment and the official checkout (no-op when both are up to date)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    marker = VENV / "show1_parity_pins.json"
    if not (marker.exists() and json.loads(marker.read_text()) == PINNED):
        if not _python().exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(_python()), "-m", "pip", "install", "-q", *PINNED], check=True)
        marker.write_text(json.dumps(PINNED))
    if not (official_repo / "showone" / "pipelines").is_dir():
        if official_repo.exists():
            shutil.rmtree(official_repo)
        official_repo.mkdir(parents=True)
        if git_dir.is_dir():
            archive = subprocess.run(
                ["git", f"--git-dir={git_dir}", "archive", "HEAD"], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(official_repo)], input=archive, check=True)
        else:
            shutil.rmtree(official_repo)
            subprocess.run(["git", "clone", "--depth", "1", OFFICIAL_URL, str(official_repo)], check=True)
    check = subprocess.run(
        [
            str(_python()),
            "-c",
            "import diffusers, transformers, torch, showone.pipelines; "
            "print(diffusers.__version__, transformers.__version__, torch.__version__)",
        ],
        env={**os.environ, "PYTHONPATH": str(official_repo)},
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise SystemExit(f"reference environment broken:\n{check.stderr[-3000:]}")
    print(
        f"reference environment ready: diffusers / transformers / torch {check.stdout.strip()}; "
        f"official code at {official_repo}"
    )


def reference_ready(official_repo: Path = DEFAULT_REPO) -> bool:
    """True when ``--setup`` has been run (used by the slow test)."""
    return (
        _python().exists()
        and (VENV / "show1_parity_pins.json").exists()
        and (official_repo / "showone" / "pipelines").is_dir()
    )


# ------------------------------------------------------------------------------------------ official side
def official_worker(folders: Path, prompt: str, seed: int, out: Path, steps: dict[str, int]) -> None:
    """The flow of the official ``run_inference.py`` (float32, CPU, tiny sizes); runs in the reference env.

    Saves every stage's output tensor (``output_type="pt"``, unclamped) to ``out`` (.npz).
    """
    import numpy as np
    import torch
    from diffusers import IFSuperResolutionPipeline, VideoToVideoSDPipeline
    from diffusers.utils.torch_utils import randn_tensor
    from PIL import Image
    from showone.models import UNet3DConditionModel
    from showone.pipelines import TextToVideoIFInterpPipeline, TextToVideoIFPipeline
    from showone.pipelines.pipeline_t2v_base_pixel import tensor2vid
    from showone.pipelines.pipeline_t2v_sr_pixel_cond import TextToVideoIFSuperResolutionPipeline_Cond

    torch.set_num_threads(1)

    def load(cls, name):
        unet = UNet3DConditionModel.from_pretrained(str(folders / name), subfolder="unet")
        pipe = cls.from_pretrained(str(folders / name), unet=unet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe_base = load(TextToVideoIFPipeline, "show-1-base")
    pipe_base.unet.train()  # what enable_model_cpu_offload() does to the numbers (base_pixel.py:130)
    pipe_interp = load(TextToVideoIFInterpPipeline, "show-1-interpolation")
    pipe_sr_1_image = IFSuperResolutionPipeline.from_pretrained(str(folders / "IF-II-L-v1.0"), text_encoder=None)
    pipe_sr_1_image.set_progress_bar_config(disable=True)
    pipe_sr_1_cond = load(TextToVideoIFSuperResolutionPipeline_Cond, "show-1-sr1")
    pipe_sr_2 = VideoToVideoSDPipeline.from_pretrained(str(folders / "show-1-sr2"))
    pipe_sr_2.set_progress_bar_config(disable=True)
    negative_prompt = "low resolution, blur"
    h, w = TINY["height"], TINY["width"]
    saved = {}

    prompt_embeds, negative_embeds = pipe_base.encode_prompt(prompt)
    video_frames = pipe_base(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        num_frames=TINY["num_frames"],
        height=h,
        width=w,
        num_inference_steps=steps["keyframe"],
        guidance_scale=9.0,
        generator=torch.manual_seed(seed),
        output_type="pt",
    ).frames
    saved["keyframe"] = video_frames.clone()

    bsz, channel, num_frames, height, width = video_frames.shape
    new_num_frames = 3 * (num_frames - 1) + num_frames
    new_video_frames = torch.zeros((bsz, channel, new_num_frames, height, width), dtype=video_frames.dtype)
    new_video_frames[:, :, torch.arange(0, new_num_frames, 4), ...] = video_frames
    init_noise = randn_tensor(
        (bsz, channel, 5, height, width),
        dtype=video_frames.dtype,
        device=video_frames.device,
        generator=torch.manual_seed(seed),
    )
    for i in range(num_frames - 1):
        batch_i = torch.zeros((bsz, channel, 5, height, width), dtype=video_frames.dtype)
        batch_i[:, :, 0, ...] = video_frames[:, :, i, ...]
        batch_i[:, :, -1, ...] = video_frames[:, :, i + 1, ...]
        batch_i = pipe_interp(
            pixel_values=batch_i,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_frames=batch_i.shape[2],
            height=h,
            width=w,
            num_inference_steps=steps["interpolation"],
            guidance_scale=4.0,
            generator=torch.manual_seed(seed),
            output_type="pt",
            init_noise=init_noise,
            cond_interpolation=True,
        ).frames
        new_video_frames[:, :, i * 4 : i * 4 + 5, ...] = batch_i
    video_frames = new_video_frames
    saved["interpolation"] = video_frames.clone()

    bsz, channel, num_frames, height, width = video_frames.shape
    window_size, stride = 8, 7
    new_video_frames = torch.zeros((bsz, channel, num_frames, height * 4, width * 4), dtype=video_frames.dtype)
    for i in range(0, num_frames - window_size + 1, stride):
        batch_i = video_frames[:, :, i : i + window_size, ...]
        if i == 0:
            first_frame_cond = pipe_sr_1_image(
                image=video_frames[:, :, 0, ...],
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                height=height * 4,
                width=width * 4,
                num_inference_steps=steps["image_sr"],
                guidance_scale=4.0,
                noise_level=150,
                generator=torch.manual_seed(seed),
                output_type="pt",
            ).images
            saved["image_sr"] = first_frame_cond.clone()
            first_frame_cond = first_frame_cond.unsqueeze(2)
        else:
            first_frame_cond = new_video_frames[:, :, i : i + 1, ...]
        batch_i = pipe_sr_1_cond(
            image=batch_i,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            first_frame_cond=first_frame_cond,
            height=height * 4,
            width=width * 4,
            num_inference_steps=steps["pixel_sr"],
            guidance_scale=7.0,
            noise_level=250,
            generator=torch.manual_seed(seed),
            output_type="pt",
        ).frames
        new_video_frames[:, :, i : i + window_size, ...] = batch_i
    video_frames = new_video_frames
    saved["pixel_sr"] = video_frames.clone()

    frames = [
        Image.fromarray(f).resize((TINY["sr2_width"], TINY["sr2_height"])) for f in tensor2vid(video_frames.clone())
    ]
    video_frames = pipe_sr_2(
        prompt,
        negative_prompt=negative_prompt,
        video=frames,
        strength=0.8,
        num_inference_steps=steps["latent_sr"],
        generator=torch.manual_seed(seed),
        output_type="pt",
    ).frames
    saved["latent_sr"] = video_frames.clone()
    np.savez(out, **{k: v.detach().float().cpu().numpy() for k, v in saved.items()})


# ------------------------------------------------------------------------------------------ our side
def ours(folders: Path, prompt: str, seed: int, steps: dict[str, int], behaviour: str = "released") -> dict:
    """This project's cascade with the released preset on the same folders; every stage's output."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from show1_lightning.pipelines.cascade import Show1Cascade

    with initialize_config_dir(config_dir=str(ROOT / "conf" / "behaviour"), version_base="1.3"):
        beh = OmegaConf.to_container(compose(config_name=behaviour), resolve=True)
    beh["schedules"]["keyframe"].update(num_frames=TINY["num_frames"], height=TINY["height"], width=TINY["width"])
    beh["schedules"]["latent_sr"].update(height=TINY["sr2_height"], width=TINY["sr2_width"])
    for name, n in steps.items():
        assert beh["schedules"][name]["num_steps"] == STEPS[name], name  # the preset has the official counts
        beh["schedules"][name]["num_steps"] = n
    cascade = Show1Cascade(
        keyframe=folders / "show-1-base",
        interpolation=folders / "show-1-interpolation",
        pixel_sr=folders / "show-1-sr1",
        latent_sr=folders / "show-1-sr2",
        device="cpu",
        behaviour=beh,
        if_ii_l=folders / "IF-II-L-v1.0",
    )
    result = cascade([prompt], [seed])
    out = {k: v.float() for k, v in result.intermediates.items()}
    out["video"] = result.video.float()
    return out, cascade


def ours_isolated(cascade, official: dict, prompt: str, seed: int) -> dict:
    """Each of our stages on the official previous stage's output (its own arithmetic, no upstream drift)."""
    import torch

    out, prev = {}, None
    for name in STAGES:
        stage = cascade.stages[name]
        x = None if prev is None else torch.from_numpy(official[prev])
        with torch.no_grad():
            out[name] = cascade.released.run(name, stage, x, [prompt], [seed], {}).float()
        prev = name
    return out


def compare(official: dict, isolated: dict, chained: dict) -> dict[str, float]:
    """max |a - b| per stage (ours on the official stage inputs) and for the end-to-end video (our whole cascade
    against the official flow, both clamped to [-1, 1] as written)."""
    import torch

    diffs = {}
    for name in STAGES:
        a, b = torch.from_numpy(official[name]), isolated[name]
        if a.shape != b.shape:
            raise SystemExit(f"stage {name}: shapes differ, official {tuple(a.shape)} vs ours {tuple(b.shape)}")
        diffs[name] = float((a - b).abs().max())
    a = torch.from_numpy(official["latent_sr"]).clamp(-1, 1)
    diffs["video"] = float((a - chained["video"]).abs().max())
    for name in STAGES:  # informational: how far the chained stages drifted
        diffs[f"chained_{name}"] = float((torch.from_numpy(official[name]) - chained[name]).abs().max())
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create the reference environment (idempotent) and exit")
    ap.add_argument("--official-repo", type=Path, default=DEFAULT_REPO, help="checkout of showlab/Show-1")
    ap.add_argument(
        "--official-git-dir",
        type=Path,
        default=DEFAULT_GIT_DIR,
        help="local git mirror of showlab/Show-1 to extract --official-repo from on --setup",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prompt", default="a panda playing guitar")
    ap.add_argument("--weights-seed", type=int, default=0, help="seed of the tiny random weights")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-steps", type=int, default=None, help="cap every stage's step count (quick checks)")
    ap.add_argument("--workdir", type=Path, default=CACHE / "runs")
    ap.add_argument("--official-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folders", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=json.loads, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.official_worker:
        official_worker(args.folders, args.prompt, args.seed, args.out, args.steps)
        return
    if args.setup:
        setup(args.official_repo, args.official_git_dir)
        return
    if not reference_ready(args.official_repo):
        raise SystemExit("no reference environment: run `python scripts/official_parity.py --setup` first")

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from show1_lightning.pipelines.released_tiny import build_tiny_released_folders

    folders = args.workdir / f"tiny_weights_{args.weights_seed}"
    if not (folders / "IF-II-L-v1.0" / "model_index.json").exists():
        build_tiny_released_folders(folders, seed=args.weights_seed)
    steps = {k: min(v, args.max_steps or v) for k, v in STEPS.items()}
    out = args.workdir / f"official_seed{args.seed}.npz"
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(args.official_repo.resolve()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(_python()),
            str(Path(__file__).resolve()),
            "--official-worker",
            "--folders",
            str(folders),
            "--prompt",
            args.prompt,
            "--seed",
            str(args.seed),
            "--out",
            str(out),
            "--steps",
            json.dumps(steps),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"official pipelines failed:\n{proc.stderr[-5000:]}")
    t1 = time.perf_counter()
    official = dict(np.load(out))
    chained, cascade = ours(folders, args.prompt, args.seed, steps)
    isolated = ours_isolated(cascade, official, args.prompt, args.seed)
    t2 = time.perf_counter()
    diffs = compare(official, isolated, chained)
    for name, d in diffs.items():
        if not name.startswith("chained_"):
            print(f"stage {name}: max_abs_diff={d:.3e}")
    print(
        "chained (each stage on our previous output): "
        + ", ".join(f"{n[8:]} {d:.3e}" for n, d in diffs.items() if n.startswith("chained_"))
    )
    print(
        f"(official {t1 - t0:.0f}s, ours {t2 - t1:.0f}s; seed {args.seed}, prompt {args.prompt!r}, "
        f"steps {steps}, tolerance {args.tol:g})"
    )
    bad = [n for n, d in diffs.items() if not n.startswith("chained_") and not d <= args.tol]
    if bad:
        print(f"above tolerance: {', '.join(bad)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
