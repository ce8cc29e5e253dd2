"""The toy VAE: the tiny ``AutoencoderKL`` fitted for reconstruction on the toy clips, cached, and its PSNR.

The toy latent SR recipe (``conf/vae/tiny.yaml`` with ``fit_on_toy``) needs a VAE whose latents mean something
without downloading SD's: :func:`ensure_toy_vae` fits :func:`show1_lightning.models.vae.tiny_autoencoder` on toy
frames (a couple of CPU minutes) on first use and caches it; :func:`reconstruction_psnr` measures it on held-out
toy frames. Kept apart from :mod:`show1_lightning.models.vae` (the wrapper), which does not depend on the data.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from show1_lightning.fileio import build_once, replace_dir, temp_sibling_dir
from show1_lightning.models.vae import VideoVAE, tiny_autoencoder
from show1_lightning.plain import plain

__all__ = ["fit_vae", "ensure_toy_vae", "reconstruction_psnr", "TOY_VAE_VERSION"]

log = logging.getLogger(__name__)

# Bump when the fitting recipe changes: ensure_toy_vae refits caches made by another version.
TOY_VAE_VERSION = 1


def fit_vae(
    vae: AutoencoderKL,
    frames: torch.Tensor,
    steps: int,
    batch_size: int = 8,
    crop: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    time_limit_s: float | None = None,
    sample_posterior: bool = True,
) -> dict[str, float]:
    """Fit ``vae`` for reconstruction on random crops of ``frames`` (N x 3 x H x W in [-1, 1]).

    Loss: L1 + MSE reconstruction of the posterior sample + ``kl_weight`` * KL (keeps the latent space
    smooth and bounded for the diffusion model). AdamW with cosine decay. Afterwards the config's
    ``scaling_factor`` is set to 1 / std of the latent means over ``frames`` (SD's recipe for 0.18215), so
    scaled latents have unit variance. Returns the final losses. ``time_limit_s`` stops early.
    ``sample_posterior=False`` decodes the posterior mean in training (a plain autoencoder with a KL penalty).
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be N x 3 x H x W, got {tuple(frames.shape)}")
    n, _, h, w = frames.shape
    crop_h, crop_w = min(crop, h), min(crop, w)
    g = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(1, steps)))
    )
    start = time.time()
    rec = kl = torch.zeros(())
    done = 0
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        ys = torch.randint(0, h - crop_h + 1, (batch_size,), generator=g)
        xs = torch.randint(0, w - crop_w + 1, (batch_size,), generator=g)
        x = torch.stack([frames[i, :, y : y + crop_h, x_ : x_ + crop_w] for i, y, x_ in zip(idx, ys, xs)])
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        # The posterior mean (sample_posterior=False) is what VideoVAE encodes to by default; decoding noisy
        # samples as well (SD's recipe) costs a tiny VAE most of a short fit.
        y_hat = vae.decode(post.sample(generator=None) if sample_posterior else post.mode()).sample
        rec = F.l1_loss(y_hat, x) + F.mse_loss(y_hat, x)
        kl = post.kl().mean() / (x.shape[-1] * x.shape[-2])
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if time_limit_s is not None and time.time() - start > time_limit_s:
            log.warning("toy VAE fit stopped by the time limit after %d of %d steps", done, steps)
            break
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(frames[i : i + 16]).latent_dist.mean for i in range(0, n, 16)])
        std = float(means.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return {
        "rec_loss": float(rec.detach()),
        "kl": float(kl.detach()),
        "latent_std": std,
        "steps": done,
        "seconds": time.time() - start,
    }


def _toy_frames(
    toy_root: str | Path,
    height: int,
    width: int,
    num_clips: int,
    frames_per_clip: int,
    seed: int,
    split: str = "train",
) -> torch.Tensor:
    """Frames of toy clips (``split`` "train" or "val"), decoded and resized as in training (N x 3 x H x W)."""
    from show1_lightning.data.datamodule import VideoDataModule  # lazy: models stay importable without data

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    n_batches = max(1, math.ceil(num_clips / 8))
    dm = VideoDataModule(
        toy_root=toy_root,
        num_frames=frames_per_clip,
        target_fps=4,
        height=height,
        width=width,
        batch_size=8,
        num_workers=0,
        epoch_length=n_batches,
        val_batches=n_batches,
        shuffle_buffer=64,
        seed=seed,
        rank=0,
        world_size=1,
    )
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    video = torch.cat([batch["video"] for batch in loader])[:num_clips]
    return video.permute(0, 2, 1, 3, 4).reshape(-1, 3, height, width).contiguous()


@torch.no_grad()
def reconstruction_psnr(
    vae: VideoVAE, toy_root: str | Path, height: int, width: int, num_clips: int = 8, frames_per_clip: int = 4
) -> float:
    """PSNR (dB, signal range [-1, 1]) of ``vae``'s reconstruction of held-out toy validation frames."""
    frames = _toy_frames(toy_root, height, width, num_clips, frames_per_clip, seed=0, split="val")
    video = frames.unsqueeze(0).permute(0, 2, 1, 3, 4)  # 1 x 3 x N x H x W: one long clip, chunked
    rec = vae(video).clamp(-1, 1).cpu()
    mse = float(((rec - video) ** 2).mean())
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def ensure_toy_vae(
    root: str | Path,
    toy_root: str | Path,
    height: int = 160,
    width: int = 256,
    tiny: dict | None = None,
    steps: int = 400,
    batch_size: int = 8,
    crop: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    num_clips: int = 64,
    frames_per_clip: int = 4,
    seed: int = 0,
    time_limit_s: float | None = 240.0,
    sample_posterior: bool = True,
    refit_incomplete: bool = False,
) -> Path:
    """The tiny VAE fitted on the toy clips (frames resized to ``height`` x ``width``), saved with
    ``save_pretrained`` in ``root``; fitted on first use, then read from the cache (``DONE.json`` records the
    recipe: a change refits). Safe to call from several processes at once (:func:`show1_lightning.fileio.build_once`).

    A fit ``time_limit_s`` stopped early is kept, with a warning at every use: stages trained on a cached VAE (their
    latents, a latent cache's identity) need that VAE as it is, so it is never replaced behind their back (a slow
    machine that hit the limit on every use would otherwise get a different VAE each time). ``refit_incomplete``
    (or deleting ``root``) fits it again; retrain what was trained on it."""
    root = Path(root)
    tiny = dict(plain(tiny) or {})
    params = {
        "version": TOY_VAE_VERSION,
        "height": height,
        "width": width,
        "tiny": tiny,
        "steps": steps,
        "batch_size": batch_size,
        "crop": crop,
        "lr": lr,
        "kl_weight": kl_weight,
        "num_clips": num_clips,
        "frames_per_clip": frames_per_clip,
        "seed": seed,
        **({} if sample_posterior else {"sample_posterior": False}),  # older caches stay valid
    }
    params = json.loads(json.dumps(params))  # tuples -> lists: compares equal to what DONE.json holds

    def is_current(done: Any) -> bool:
        if not (isinstance(done, dict) and done.get("params") == params):
            return False
        done_steps = done.get("stats", {}).get("steps", steps)
        if done_steps >= steps:
            return True
        if refit_incomplete:
            return False
        log.warning(
            "the toy VAE in %s was fitted for %d of %d steps (its time limit stopped it): used as it is, since "
            "stages trained on it need this VAE; vae.fit_on_toy.refit_incomplete=true (or deleting the folder) "
            "fits it again, then retrain the stages that use it",
            root,
            done_steps,
            steps,
        )
        return True

    def fit() -> dict[str, Any]:
        log.info("fitting the tiny toy VAE into %s (first use; cached afterwards)", root)
        frames = _toy_frames(toy_root, height, width, num_clips, frames_per_clip, seed)
        vae = tiny_autoencoder(**tiny, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stats = fit_vae(vae, frames, steps, batch_size, crop, lr, kl_weight, seed, time_limit_s, sample_posterior)
        tmp = temp_sibling_dir(root)
        vae.save_pretrained(tmp, safe_serialization=True)
        replace_dir(tmp, root)
        log.info("toy VAE ready: %s", stats)
        if stats["steps"] < steps:
            log.warning(
                "toy VAE fit stopped after %d of %d steps (time_limit_s): cached as it is (kept for the stages "
                "trained on it); raise vae.fit_on_toy.time_limit_s and set vae.fit_on_toy.refit_incomplete=true "
                "to fit it fully",
                stats["steps"],
                steps,
            )
        return {"params": params, "stats": stats}

    build_once(root, is_current, fit)
    return root
