"""Fit the tiny AutoencoderKL on the toy clips for reconstruction and save it (``save_pretrained``).

    python data/train_toy_vae.py --root .cache/data/toy_vae_160x256 --height 160 --width 256

The toy latent-SR experiment does the same on first use (``vae=toy``, cached under ``paths.data_dir``);
this command builds it ahead of time or with other settings, and prints the reconstruction PSNR on held-out
validation clips. A folder that already holds a VAE fitted with the same settings is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from show1_lightning.models.toy_vae import ensure_toy_vae, reconstruction_psnr
from show1_lightning.models.vae import VideoVAE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="output folder of the fitted VAE")
    ap.add_argument("--toy-root", type=Path, default=Path(".cache/data/toy"), help="toy dataset (made if missing)")
    ap.add_argument("--height", type=int, default=160)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--block-out-channels", type=int, nargs="+", default=[8, 16, 16, 32])
    ap.add_argument("--norm-num-groups", type=int, default=4)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-4)
    ap.add_argument("--num-clips", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=300.0, help="stop fitting after this many seconds")
    ap.add_argument(
        "--sample-posterior",
        action="store_true",
        help="decode a posterior sample while fitting (conf/vae/toy.yaml: off, a plain autoencoder)",
    )
    ap.add_argument(
        "--pixel-skip",
        action="store_true",
        help="PixelSkipAutoencoderKL: a fixed pooled-pixel path beside the learned one (conf/vae/toy.yaml: on)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = {
        "block_out_channels": args.block_out_channels,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": args.norm_num_groups,
        "mid_block_add_attention": False,
        "pixel_skip": args.pixel_skip,
        "scaling_factor": 1.0,
    }
    t0 = time.time()
    root = ensure_toy_vae(
        args.root,
        args.toy_root,
        height=args.height,
        width=args.width,
        tiny=tiny,
        steps=args.steps,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        kl_weight=args.kl_weight,
        num_clips=args.num_clips,
        seed=args.seed,
        time_limit_s=args.time_limit,
        sample_posterior=args.sample_posterior,
    )
    stats = json.loads((root / "DONE.json").read_text())["stats"]
    psnr = reconstruction_psnr(VideoVAE.from_pretrained(root), args.toy_root, args.height, args.width)
    print(json.dumps({"root": str(root), **stats, "val_psnr_db": round(psnr, 2)}, indent=1))
    print(f"ready in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
