"""A frozen image VAE (diffusers ``AutoencoderKL``) applied to videos frame by frame, in chunks.

The latent expert SR stage (Show-1 stage 4, zeroscope lineage) works in the latent space of Stable
Diffusion's f=8 autoencoder: a B x 3 x T x H x W video in [-1, 1] maps to B x 4 x T x H/8 x W/8
latents, multiplied by ``vae.config.scaling_factor`` (0.18215 for SD) so they have about unit variance.

:class:`VideoVAE` folds the frames into the batch and runs at most ``chunk_frames`` frames through
the autoencoder at a time, so peak memory depends on the chunk, not on the clip length.

Encoding is deterministic by default: the posterior **mean** (``sample_posterior=False``). With
``sample_posterior=True`` the latent is ``mean + std * noise``; pass a ``torch.Generator`` for a seeded
draw. The noise is drawn for the whole video before chunking, so a seeded sample does not depend on
``chunk_frames``. (The diffusers ``VideoToVideoSDPipeline`` that the released Show-1 code uses samples the
posterior; for SD's VAE the posterior std is tiny, so the difference is negligible.)

Sources of weights:

- ``pretrained_path``: a local folder written by ``save_pretrained`` (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), or a model folder with a ``vae/`` subfolder (a zeroscope or
  show-1-sr2 download): ``subfolder="vae"``.
- the tiny offline default: a small seeded, randomly initialised ``AutoencoderKL`` with 4 blocks (f=8).
  A random VAE encodes and decodes, but its latents mean nothing; :func:`ensure_toy_vae` fits it on the
  toy clips for reconstruction (a couple of CPU minutes) and caches it, for the toy experiment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

__all__ = [
    "VideoVAE",
    "tiny_autoencoder",
    "build_video_vae",
    "fit_vae",
    "ensure_toy_vae",
    "reconstruction_psnr",
    "TOY_VAE_VERSION",
]

log = logging.getLogger(__name__)

# Bump when the fitting recipe changes: ensure_toy_vae refits caches made by another version.
TOY_VAE_VERSION = 1

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _plain(x: Any) -> Any:
    """Hydra configs (DictConfig / ListConfig) -> plain Python containers; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        return x
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown VAE dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def tiny_autoencoder(
    block_out_channels: Sequence[int] = (16, 32, 32, 32),
    layers_per_block: int = 1,
    latent_channels: int = 4,
    norm_num_groups: int = 8,
    mid_block_add_attention: bool = False,
    scaling_factor: float = 1.0,
    seed: int = 0,
) -> AutoencoderKL:
    """A small randomly initialised ``AutoencoderKL`` (downsampling factor 2^(blocks-1): 8 for 4 blocks).

    Weights come from ``seed`` (the global RNG is left untouched), so every process builds the same model.
    """
    n = len(block_out_channels)
    if n < 1:
        raise ValueError("block_out_channels must have at least one entry")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
            scaling_factor=scaling_factor,
        )


class VideoVAE(nn.Module):
    """Frozen ``AutoencoderKL`` over videos: B x 3 x T x H x W in [-1, 1] <-> B x C_lat x T x H/f x W/f.

    Args:
        vae: the autoencoder (frozen here: eval mode, no gradients).
        chunk_frames: frames (over batch x time) passed through the autoencoder at once.
        sample_posterior: encode to ``mean + std * noise`` instead of the mean (see module docstring).
        dtype: dtype the autoencoder runs in ("float32", "bfloat16", "float16"); autocast is disabled inside
            so this, not the trainer's precision, decides. Returned tensors are float32.
        scaling_factor: overrides ``vae.config.scaling_factor`` (None: use the config's).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        chunk_frames: int = 8,
        sample_posterior: bool = False,
        dtype: torch.dtype | str | None = "float32",
        scaling_factor: float | None = None,
    ) -> None:
        super().__init__()
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.dtype = _as_dtype(dtype)
        if next(vae.parameters()).dtype != self.dtype:
            vae = vae.to(self.dtype)
        self.vae = vae
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.chunk_frames = int(chunk_frames)
        self.sample_posterior = bool(sample_posterior)
        cfg_scale = getattr(vae.config, "scaling_factor", None)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else (cfg_scale or 1.0))
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, **kwargs: Any) -> VideoVAE:
        """Load ``AutoencoderKL`` from a local folder (``subfolder`` e.g. "vae" for a pipeline download)."""
        path = Path(path)
        target = path / subfolder if subfolder else path
        if not (target / "config.json").exists():
            hint = "" if subfolder or not (path / "vae" / "config.json").exists() else " (set subfolder: vae)"
            raise FileNotFoundError(f"no AutoencoderKL config.json in {target}{hint}")
        vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, low_cpu_mem_usage=False)
        return cls(vae, **kwargs)

    def train(self, mode: bool = True) -> VideoVAE:
        # Always frozen: stays in eval mode even when a parent module is put in train mode.
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latents of an H x W frame; H and W must be multiples of the downsampling factor."""
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"frame size {width}x{height} (W x H) must be a multiple of the VAE factor {f}")
        return height // f, width // f

    # -- helpers ---------------------------------------------------------------------------------
    def _autocast_off(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _frames(self, video: torch.Tensor, channels: int, what: str) -> tuple[torch.Tensor, int, int]:
        if video.ndim != 5 or video.shape[1] != channels:
            raise ValueError(f"{what} must be B x {channels} x T x H x W, got {tuple(video.shape)}")
        b, c, t, h, w = video.shape
        return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), b, t

    @staticmethod
    def _unfold(frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
        return frames.reshape(b, t, *frames.shape[1:]).permute(0, 2, 1, 3, 4)

    def _chunks(self, n: int) -> Iterator[slice]:
        for i in range(0, n, self.chunk_frames):
            yield slice(i, min(n, i + self.chunk_frames))

    # -- API -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video in [-1, 1] -> scaled latents (float32, on the VAE's device)."""
        frames, b, t = self._frames(video, 3, "video")
        self.latent_size(frames.shape[-2], frames.shape[-1])
        frames = frames.to(self.device)
        noise = None
        if self.sample_posterior:
            lh, lw = self.latent_size(frames.shape[-2], frames.shape[-1])
            shape = (frames.shape[0], self.latent_channels, lh, lw)
            noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
            noise = noise.to(self.device)
        out = []
        with self._autocast_off():
            for sl in self._chunks(frames.shape[0]):
                dist = self.vae.encode(frames[sl].to(self.dtype)).latent_dist
                z = dist.mean.float()
                if noise is not None:
                    z = z + dist.std.float() * noise[sl]
                out.append(z * self.scaling_factor)
        return self._unfold(torch.cat(out), b, t)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> video (float32, nominally [-1, 1]; not clamped)."""
        frames, b, t = self._frames(latents, self.latent_channels, "latents")
        frames = frames.to(self.device)
        out = []
        with self._autocast_off():
            for sl in self._chunks(frames.shape[0]):
                z = (frames[sl].float() / self.scaling_factor).to(self.dtype)
                out.append(self.vae.decode(z).sample.float())
        return self._unfold(torch.cat(out), b, t)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction: ``decode(encode(video))``."""
        return self.decode(self.encode(video))


# ------------------------------------------------------------------------------------------------ fitting
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
) -> Path:
    """The tiny VAE fitted on the toy clips (frames resized to ``height`` x ``width``), saved with
    ``save_pretrained`` in ``root``; fitted on first use, then read from the cache (``DONE.json`` records the
    recipe: a change refits). Safe to call from several processes at once (an exclusive file lock)."""
    root = Path(root)
    tiny = dict(_plain(tiny) or {})
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

    def ready() -> bool:
        marker = root / "DONE.json"
        if not marker.exists():
            return False
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        # A fit its time limit stopped early is not the recipe's VAE: fitted again (with a warning) next time
        # rather than silently reused.
        return done.get("params") == params and done.get("stats", {}).get("steps", steps) >= steps

    if ready():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other processes wait here, then find the marker
        try:
            if ready():
                return root
            log.info("fitting the tiny toy VAE into %s (first use; cached afterwards)", root)
            frames = _toy_frames(toy_root, height, width, num_clips, frames_per_clip, seed)
            vae = tiny_autoencoder(**tiny, seed=seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                stats = fit_vae(
                    vae, frames, steps, batch_size, crop, lr, kl_weight, seed, time_limit_s, sample_posterior
                )
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
            vae.save_pretrained(tmp, safe_serialization=True)
            (tmp / "DONE.json").write_text(json.dumps({"params": params, "stats": stats}, indent=1))
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
            log.info("toy VAE ready: %s", stats)
            if stats["steps"] < steps:
                log.warning(
                    "toy VAE fit stopped after %d of %d steps (time_limit_s): used for this run, fitted again next "
                    "time; raise vae.fit_on_toy.time_limit_s on a slow machine",
                    stats["steps"],
                    steps,
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


# ------------------------------------------------------------------------------------------------ Hydra
def build_video_vae(
    pretrained_path: str | Path | None = None,
    subfolder: str | None = None,
    tiny: dict | None = None,
    fit_on_toy: dict | None = None,
    chunk_frames: int = 8,
    sample_posterior: bool = False,
    dtype: str = "float32",
    scaling_factor: float | None = None,
    seed: int = 0,
) -> VideoVAE:
    """Hydra entry point (``conf/vae/*.yaml``).

    - ``pretrained_path`` set: load it (``subfolder`` e.g. "vae").
    - ``fit_on_toy`` set (``{root, toy_root, height, width, steps, ...}``, see :func:`ensure_toy_vae`): the
      tiny VAE fitted on the toy clips, cached in ``root`` (fitted on first use).
    - neither: the tiny seeded random VAE (``tiny``: :func:`tiny_autoencoder` arguments). Its latents mean
      nothing; fine for tests and shape checks only.
    """
    kwargs = {
        "chunk_frames": chunk_frames,
        "sample_posterior": sample_posterior,
        "dtype": dtype,
        "scaling_factor": scaling_factor,
    }
    if pretrained_path is not None and fit_on_toy is not None:
        raise ValueError("set either vae.pretrained_path or vae.fit_on_toy, not both")
    if pretrained_path is not None:
        return VideoVAE.from_pretrained(pretrained_path, subfolder=subfolder, **kwargs)
    if fit_on_toy is not None:
        spec = dict(_plain(fit_on_toy))
        path = ensure_toy_vae(spec.pop("root"), spec.pop("toy_root"), tiny=tiny, seed=seed, **spec)
        return VideoVAE.from_pretrained(path, **kwargs)
    return VideoVAE(tiny_autoencoder(**dict(_plain(tiny) or {}), seed=seed), **kwargs)
