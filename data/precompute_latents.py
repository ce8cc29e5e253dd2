"""Precompute the VAE latents of the latent SR stage's training clips (one cache shard per video shard).

Pass the same Hydra overrides as the training run: the VAE (``stage.vae``), the clip size and frame
sampling (``data.*``), the stage's input size and resize mode, and the training shards all come from the
composed ``train`` config, so the cache matches the run it is made for::

    # the toy latent SR stage
    python data/precompute_latents.py --out data/toy_latents experiment=toy_latent_sr
    python train.py experiment=toy_latent_sr data.latent_cache_dir=data/toy_latents

    # the paper stage on WebVid shards with SD's VAE, 4 clips per video, on a GPU
    python data/precompute_latents.py --out /data/webvid/sd_latents --clips-per-video 4 --device cuda \
        experiment=paper_latent_sr vae@stage.vae=sd_vae data=webvid

Resumable: shards already cached and unchanged since are skipped. ``--overwrite`` rebuilds a cache made
with other settings. Training refuses a cache made by another VAE, at other sizes or frame sampling
(show1_lightning/data/latent_cache.py explains what a cache fixes, and why it stores the posterior mean).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from show1_lightning.data.latent_cache import POSTERIORS, precompute_latents, vae_identity
from show1_lightning.runtime import register_resolvers

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="cache folder (then: data.latent_cache_dir=<it>)")
    ap.add_argument("--clips-per-video", type=int, default=1, help="clips cached per video (random starts)")
    ap.add_argument("--posterior", choices=POSTERIORS, default="mean", help="mean_logvar: for sample_posterior")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage dtype")
    ap.add_argument("--seed", type=int, default=0, help="seed of the clip starts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the training run, e.g. experiment=toy_latent_sr")
    args = ap.parse_args(argv)

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[*args.overrides, "data.latent_cache_dir=null"])
    finally:
        GlobalHydra.instance().clear()
    if "vae" not in cfg.stage:
        raise SystemExit(f"the stage ({cfg.stage._target_}) has no VAE: pick a latent SR experiment")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    vae = hydra.utils.instantiate(cfg.stage.vae).to(args.device)
    t0 = time.time()
    counts = precompute_latents(
        datamodule.train_urls,
        vae,
        args.out,
        num_frames=datamodule.num_frames,
        height=datamodule.height,
        width=datamodule.width,
        target_fps=datamodule.target_fps,
        frame_stride=datamodule.frame_stride,
        input_height=int(cfg.stage.input_height),
        input_width=int(cfg.stage.input_width),
        resize_mode=str(cfg.stage.resize_mode),
        clips_per_video=args.clips_per_video,
        posterior=args.posterior,
        dtype=args.dtype,
        seed=args.seed,
        min_side=datamodule.min_side,
        max_source_pixels=datamodule.max_source_pixels,
        max_source_frames=datamodule.max_source_frames,
        overwrite=args.overwrite,
        progress=True,
    )
    print(
        f"{counts['samples']} videos in {counts['shards']} shards ({counts['computed_shards']} computed, skipped: "
        f"{counts['skipped'] or 'none'}) in {time.time() - t0:.1f}s; VAE {vae_identity(vae)}\n"
        f"train with: data.latent_cache_dir={args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
