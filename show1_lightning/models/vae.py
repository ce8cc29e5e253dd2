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
  A random VAE encodes and decodes, but its latents mean nothing;
  :func:`show1_lightning.models.toy_vae.ensure_toy_vae` fits it on the toy clips for reconstruction (a couple
  of CPU minutes) and caches it, for the toy experiment.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn

from show1_lightning.plain import plain
from show1_lightning.precision import to_dtype

__all__ = ["VideoVAE", "PixelSkipAutoencoderKL", "tiny_autoencoder", "build_video_vae"]

log = logging.getLogger(__name__)


class PixelSkipAutoencoderKL(AutoencoderKL):
    """``AutoencoderKL`` with a fixed pixel path beside the learned one (our toy design, not SD's).

    The first three latent means carry the frame average-pooled by the downsampling factor ``f`` on top of what
    the encoder adds, and the decoder adds the bilinear upsampling of those three channels to its output. So
    the networks only learn the detail a low-res copy lacks: a tiny model fitted for a few CPU minutes
    reconstructs toy frames far better than bicubic upsampling from the latent size, which a plain tiny
    ``AutoencoderKL`` does not reach (docs/toy_loop.md). Saved and loaded like any diffusers model
    (``_class_name`` in ``config.json``; :meth:`VideoVAE.from_pretrained` picks this class from it).
    Tiled encoding/decoding is not supported (it would bypass the pixel path).
    """

    @property
    def pixel_factor(self) -> int:
        """The downsampling factor of the pixel path (that of the encoder: 2^(blocks - 1))."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def zero_learned_paths(self) -> None:
        """Zero the encoder's last 1x1 conv and the decoder's output conv: the model then encodes to the pooled
        frame (other latents 0) and decodes to its bilinear upsampling, a good start for a short fit."""
        with torch.no_grad():
            for conv in (self.quant_conv, self.decoder.conv_out):
                conv.weight.zero_()
                conv.bias.zero_()

    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("PixelSkipAutoencoderKL does not support tiling (it would bypass the pixel path)")

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        moments = super()._encode(x)
        pooled = F.avg_pool2d(x, self.pixel_factor)
        return torch.cat([moments[:, :3] + pooled.to(moments.dtype), moments[:, 3:]], dim=1)

    def _decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        (dec,) = super()._decode(z, return_dict=False)
        up = F.interpolate(z[:, :3], scale_factor=self.pixel_factor, mode="bilinear", align_corners=False)
        dec = dec + up.to(dec.dtype)
        return DecoderOutput(sample=dec) if return_dict else (dec,)


def tiny_autoencoder(
    block_out_channels: Sequence[int] = (16, 32, 32, 32),
    layers_per_block: int = 1,
    latent_channels: int = 4,
    norm_num_groups: int = 8,
    mid_block_add_attention: bool = False,
    scaling_factor: float = 1.0,
    pixel_skip: bool = False,
    seed: int = 0,
) -> AutoencoderKL:
    """A small randomly initialised ``AutoencoderKL`` (downsampling factor 2^(blocks-1): 8 for 4 blocks).

    ``pixel_skip``: a :class:`PixelSkipAutoencoderKL` (needs ``latent_channels >= 3``) whose learned paths start
    at zero. Weights come from ``seed`` (the global RNG is left untouched), so every process builds the same model.
    """
    n = len(block_out_channels)
    if n < 1:
        raise ValueError("block_out_channels must have at least one entry")
    if pixel_skip and latent_channels < 3:
        raise ValueError(f"pixel_skip needs latent_channels >= 3 (the pooled RGB frame), got {latent_channels}")
    cls = PixelSkipAutoencoderKL if pixel_skip else AutoencoderKL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = cls(
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
    if pixel_skip:
        vae.zero_learned_paths()
    return vae


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
        self.dtype = to_dtype(dtype, what="VAE dtype")
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
        class_name = json.loads((target / "config.json").read_text()).get("_class_name")
        model_cls = PixelSkipAutoencoderKL if class_name == PixelSkipAutoencoderKL.__name__ else AutoencoderKL
        vae = model_cls.from_pretrained(str(path), subfolder=subfolder, low_cpu_mem_usage=False)
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
    - ``fit_on_toy`` set (``{root, toy_root, height, width, steps, ...}``, see
      :func:`show1_lightning.models.toy_vae.ensure_toy_vae`): the
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
        from show1_lightning.models.toy_vae import ensure_toy_vae  # lazy: it imports this module and the data

        spec = dict(plain(fit_on_toy))
        path = ensure_toy_vae(spec.pop("root"), spec.pop("toy_root"), tiny=tiny, seed=seed, **spec)
        return VideoVAE.from_pretrained(path, **kwargs)
    return VideoVAE(tiny_autoencoder(**dict(plain(tiny) or {}), seed=seed), **kwargs)
