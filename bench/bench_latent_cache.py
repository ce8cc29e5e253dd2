"""Latent SR training step with on-the-fly VAE encoding vs cached latents, side by side in one run.

    OMP_NUM_THREADS=1 python bench/bench_latent_cache.py [--steps 6] [--warmup 2] [--vaes toy,sd_like]

For each VAE, one batch of the toy latent SR experiment (``experiment=toy_latent_sr``: 8 frames at 96x64,
residual target, so the clip *and* its low-res input are encoded) is trained on for ``--steps`` optimizer
steps (forward, backward, AdamW) in two ways, alternating step by step so machine load hits both alike:

- ``on the fly``: the batch holds pixels; the stage encodes them with the frozen VAE every step (today's path);
- ``cached``: the batch holds the latents of the same clips (what ``data.latent_cache_dir`` gives); nothing
  is encoded.

The losses of the two paths are checked to be equal (same batch, same noise). VAEs: ``toy`` (the experiment's
f=2 VAE fitted on the toy clips; fitted and cached on first use), ``sd_like`` (Stable Diffusion's
AutoencoderKL architecture, f=8, 84M parameters, randomly initialised: its cost, not its latents, matters
here; the UNet then works on 12x8 latents). Prints seconds per step (median) and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import train  # noqa: F401  (registers the config resolvers)
from show1_lightning.data.latent_cache import condition_video, encode_posterior
from show1_lightning.models.vae import VideoVAE
from show1_lightning.stages.loading import build_stage

ROOT = Path(__file__).resolve().parents[1]
SD_LIKE = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
    "scaling_factor": 0.18215,
}


def _cfg(vae: str, data_dir: Path, batch_size: int) -> object:
    overrides = ["experiment=toy_latent_sr", f"paths.data_dir={data_dir}", f"data.batch_size={batch_size}"]
    if vae == "sd_like":
        overrides.append("vae@stage.vae=tiny")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        if vae == "sd_like":
            cfg.stage.vae.tiny = SD_LIKE
        elif (Path(cfg.stage.vae.fit_on_toy.root) / "config.json").exists():
            # The toy VAE fitted before (even one a fit time limit stopped early): its cost is what is measured.
            cfg.stage.vae.pretrained_path, cfg.stage.vae.fit_on_toy = cfg.stage.vae.fit_on_toy.root, None
    return cfg


def _batch(cfg: object, n: int) -> dict:
    """The first training batch of the toy data at the experiment's clip settings (pixels)."""
    import hydra

    dm = hydra.utils.instantiate(cfg.data, num_workers=0, shuffle_buffer=1)
    dm.prepare_data()
    return next(iter(dm.train_dataset(start_step=0)))


def bench(vae_name: str, steps: int, warmup: int, data_dir: Path, batch_size: int) -> dict:
    """Seconds per step (list per path), the loss of both paths at a fixed noise, and VAE facts."""
    cfg = _cfg(vae_name, data_dir, batch_size)
    torch.manual_seed(0)
    stage = build_stage(cfg.stage)
    stage.train()
    vae: VideoVAE = stage.vae
    video_batch = _batch(cfg, batch_size)
    video = video_batch["video"]
    mean, _ = encode_posterior(vae, video)
    cond, _ = encode_posterior(vae, condition_video(video, stage.input_height, stage.input_width, stage.resize_mode))
    cached_batch = {**video_batch, "video": video[:, :, :0], "latents": mean, "cond_latents": cond}
    batches = {"on the fly": video_batch, "cached": cached_batch}
    # Same loss for the same batch and noise (the check the tests make, on this configuration).
    losses = {}
    for name, batch in batches.items():
        with torch.no_grad():
            losses[name] = stage.diffusion_step(batch, generator=torch.Generator().manual_seed(0))[0].item()
    opt = torch.optim.AdamW([p for p in stage.unet.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in batches}
    for i in range(warmup + steps):
        for name, batch in batches.items():  # alternating: load on the shared machine hits both paths alike
            t0 = time.perf_counter()
            loss, _ = stage.diffusion_step(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {
        "times": times,
        "losses": losses,
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "unet_params": sum(p.numel() for p in stage.unet.parameters()),
        "latent": tuple(mean.shape[1:]),
        "clip": tuple(video.shape[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="the toy experiment's")
    ap.add_argument("--vaes", default="toy,sd_like")
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".cache" / "data")
    args = ap.parse_args(argv)
    print(f"torch threads: {torch.get_num_threads()}; batch {args.batch_size}; median of {args.steps} steps")
    header = (
        "| VAE | VAE params | clip (C,T,H,W) | latents | UNet params | on the fly s/step | cached s/step "
        "| speed-up | loss on the fly / cached |"
    )
    rows = [header, "|" + "---|" * 9]
    for name in args.vaes.split(","):
        r = bench(name, args.steps, args.warmup, args.data_dir, args.batch_size)
        fly, cached = (statistics.median(r["times"][k]) for k in ("on the fly", "cached"))
        rows.append(
            f"| {name} | {r['vae_params'] / 1e6:.2f}M | {r['clip']} | {r['latent']} | {r['unet_params'] / 1e6:.2f}M "
            f"| {fly:.3f} | {cached:.3f} | {fly / cached:.2f}x "
            f"| {r['losses']['on the fly']:.6f} / {r['losses']['cached']:.6f} |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
