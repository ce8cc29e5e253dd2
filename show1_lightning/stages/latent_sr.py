"""Stage 4: latent expert super-resolution ("expert translation", zeroscope / ModelScope lineage).

Inference (``upscale``): the 256x160 output of pixel SR is resized to 576x320, encoded by a frozen SD
``AutoencoderKL`` (f=8: 4 x 40 x 72 latents per frame), noised to strength 0.8 (t = 799 of 1000 with 50
DPM-Solver++ steps) and denoised by a text-to-video latent UNet with classifier-free guidance (paper:
CFG 15 against the negative prompt "low resolution, blur"), then decoded. There is no channel
concatenation: the low-resolution video enters only as the SDEdit starting point.

Training: the clip at the output resolution is the target; it is encoded to latents and the UNet is
trained with the usual DDPM objective, but **only on timesteps 0..900** (``t_max: 900``; the show-1-sr2
model card: "finetuned using diffusion timesteps 0-900"). That specialises the model in turning an already
laid-out video into a detailed one, the only regime ``upscale`` uses (it starts at t <= 799).

Why clean targets and no degradation: the noised latent of the clean clip at t in [0, 900] is what the
sampler meets at inference (the upsampled video's latent noised to t=799 looks, to the UNet, like a noisy
clean video: the high-t noise drowns the difference between blurry and sharp). Degrading the *target*
would teach the model to produce blur, and feeding a degraded latent as a condition would be a different
model (concat conditioning, like pixel SR) than the released one. So Show-1's recipe is used as is.

The VAE is frozen and kept out of the module tree (like the text encoder): it is not trained, not in the
optimizer, not in checkpoints, and is rebuilt from its own config (``vae`` node) when a checkpoint loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from show1_lightning.diffusion.module import DiffusionStage, StageCondition
from show1_lightning.models.vae import VideoVAE
from show1_lightning.video_ops import RESIZE_MODES, random_crops, resize_frames


class LatentSRStage(DiffusionStage):
    """Low-resolution video + text -> 576x320 video through a latent text-to-video UNet.

    Args:
        vae: the frozen :class:`~show1_lightning.models.vae.VideoVAE` (scaled SD ``AutoencoderKL``).
        num_frames, height, width: training clip size at the output resolution (paper: 576x320, W x H);
            height and width must be multiples of the VAE factor (8).
        strength: default SDEdit strength of ``upscale`` (paper: 0.8, i.e. start at t=799 with 50 steps).
        resize_mode: interpolation that brings the input video to the output size (the released code
            resizes with PIL's default, bicubic).
        text_attention_mask: pass the text padding mask to the UNet's cross-attention when it accepts one.
            Default False: the released zeroscope / show-1-sr2 pipeline attends to every CLIP token.
        input_height, input_width: the size of the video this stage gets in the cascade (paper: the pixel SR
            output, 160 x 256); validation makes that input from the ground truth (``make_upstream``).
        residual: learn, in latent space, the clip's latents minus those of its resized input (the baseline:
            ``make_upstream`` then ``resize_to_output``), added back before decoding, instead of the latents
            themselves. Our option, not Show-1's (False); training then encodes both (docs/toy_loop.md).
        condition_on_input: concatenate the latents of the resized input to the noisy latents (the UNet then takes
            twice ``sample_channels``), as the pixel SR stage concatenates its upsampled input. Our option, not
            Show-1's (False: its sr2 UNet sees the input only through the SDEdit start). Without it a ``residual``
            stage sees nothing of its input (it starts from a zero residual), so the two go together.
        train_crop: optional (h, w) random crop, in output pixels (multiples of the VAE factor), of what training
            encodes: the clip and, cut at the same place, the resized input (a cached batch: its latents, cut at the
            matching place). Validation and sampling see whole frames (the UNet is convolutional).
        **kwargs: the shared diffusion settings (``DiffusionStage``); ``sample_channels`` must equal the
            VAE's latent channels (4).
    """

    upstream_name = "a video to upscale"

    def __init__(
        self,
        vae: VideoVAE,
        num_frames: int = 8,
        height: int = 320,
        width: int = 576,
        strength: float = 0.8,
        resize_mode: str = "bicubic",
        text_attention_mask: bool = False,
        input_height: int = 160,
        input_width: int = 256,
        residual: bool = False,
        condition_on_input: bool = False,
        train_crop: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        self.condition_on_input = bool(condition_on_input)
        # The base class checks the UNet's in_channels against sample + condition channels.
        self.condition_channels = int(kwargs.get("sample_channels", 3)) if self.condition_on_input else 0
        super().__init__(**kwargs)
        if not isinstance(vae, VideoVAE):
            raise TypeError(f"vae must be a VideoVAE (show1_lightning.models.vae), got {type(vae).__name__}")
        if vae.latent_channels != self.sample_channels:
            raise ValueError(
                f"the VAE has {vae.latent_channels} latent channels but sample_channels="
                f"{self.sample_channels}; set stage.sample_channels: {vae.latent_channels}"
            )
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.latent_height, self.latent_width = vae.latent_size(self.height, self.width)
        if train_crop is not None:
            train_crop = tuple(int(v) for v in train_crop)
            f = vae.downsample_factor
            fits = len(train_crop) == 2 and train_crop[0] <= height and train_crop[1] <= width
            if not fits or any(v <= 0 or v % f for v in train_crop):
                raise ValueError(
                    f"train_crop must be (h, w), positive multiples of the VAE factor {f} within {height} x {width}; "
                    f"got {train_crop}"
                )
        self.train_crop: tuple[int, int] | None = train_crop  # type: ignore[assignment]
        self.strength = float(strength)
        self.resize_mode = resize_mode
        self.input_height, self.input_width = int(input_height), int(input_width)
        self.residual = bool(residual)
        self._unet_takes_mask = self._unet_takes_mask and bool(text_attention_mask)
        # Kept out of the module tree: frozen, loaded from its own path, never in checkpoints or DDP.
        self._frozen["vae"] = vae

    # ------------------------------------------------------------------ VAE
    @property
    def vae(self) -> VideoVAE:
        """The frozen VAE, moved to this module's device on first use."""
        vae: VideoVAE = self._frozen["vae"]
        if vae.device != self.device:
            vae.to(self.device)
        return vae

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """B x 3 x T x H x W in [-1, 1] -> scaled latents B x 4 x T x H/8 x W/8 (float32, no gradient)."""
        return self.vae.encode(video.to(self.device))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> video in [-1, 1] (clamped), float32."""
        return self.vae.decode(latents.to(self.device)).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ stage hooks
    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, StageCondition]:
        """Target = the latents of the clip at the output resolution (minus those of its resized input for
        ``residual``); those of the resized input concatenated for ``condition_on_input``.

        A batch from a latent cache (``data.latent_cache_dir``, :mod:`show1_lightning.data.latent_cache`) brings
        those latents (and those of the resized input, for ``residual``) instead of pixels: nothing is encoded.
        """
        needs_input = self.residual or self.condition_on_input
        crop = self.train_crop if self.training else None
        if "latents" in batch:
            latents = self._cached_latents(batch, "latents")
            base = self._cached_latents(batch, "cond_latents") if needs_input else None
            if crop is not None:
                f = self.vae.downsample_factor
                latents, *rest = random_crops(
                    [latents, *([base] if needs_input else [])], (crop[0] // f, crop[1] // f)
                )
                base = rest[0] if needs_input else None
        else:
            video = batch["video"]
            if video.shape[-2:] != (self.height, self.width):
                raise ValueError(
                    f"training clips are {video.shape[-1]}x{video.shape[-2]} (W x H) but the stage "
                    f"trains at {self.width}x{self.height}: set data.height/width from stage.*"
                )
            resized = self.resize_to_output(self.make_upstream(video)) if needs_input else None
            if crop is not None:
                video, *rest = random_crops(
                    [video, *([resized] if needs_input else [])], crop, self.vae.downsample_factor
                )
                resized = rest[0] if needs_input else None
            latents = self.encode_video(video)
            base = self.encode_video(resized) if needs_input else None
        if self.residual:
            latents = self.to_residual(latents, base)
        return latents, StageCondition(concat=base if self.condition_on_input else None)

    def _cached_latents(self, batch: dict, name: str) -> torch.Tensor:
        """Cached posterior means (B x C x T x h x w); with a VAE that samples its posterior, a fresh draw
        ``mean + exp(logvar / 2) * noise`` per step, as encoding on the fly would give."""
        latents = batch[name].to(self.device, torch.float32)
        if latents.shape[-2:] != (self.latent_height, self.latent_width):
            raise ValueError(
                f"cached latents are {latents.shape[-1]}x{latents.shape[-2]} (w x h) but the stage's are "
                f"{self.latent_width}x{self.latent_height}: the latent cache was made for another size"
            )
        if self.vae.sample_posterior:
            if f"{name}_logvar" not in batch:
                raise ValueError("the VAE samples its posterior but the cached batch has no log-variances")
            std = torch.exp(0.5 * batch[f"{name}_logvar"].to(self.device, torch.float32))
            latents = latents + std * torch.randn_like(latents)
        return latents

    def sample_shape(self) -> tuple[int, int, int, int]:
        """Latent C x T x h x w of one sample."""
        return (self.sample_channels, self.num_frames, self.latent_height, self.latent_width)

    # ------------------------------------------------------------------ sampling
    def resize_to_output(
        self, video: torch.Tensor, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Resize every frame of B x 3 x T x h x w to the output size (default: the stage's), clamped to [-1, 1]."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be B x 3 x T x H x W, got {tuple(video.shape)}")
        height, width = height or self.height, width or self.width
        return resize_frames(video.float(), (height, width), self.resize_mode).clamp(-1.0, 1.0)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        init: torch.Tensor | None = None,
        shape: Sequence[int] | None = None,
        return_latents: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Sample videos in **pixel** space (B x 3 x T x H x W in [-1, 1]), the generator interface.

        Unlike the base method, ``init`` is a pixel video at the output size (encoded here); the latent
        shape follows it (else ``shape`` / ``sample_shape()``). ``return_latents`` skips decoding. Other
        keyword arguments (strength, num_steps, guidance_scale, negative_prompt, ...) go to
        ``DiffusionStage.generate``. Without ``init`` this is plain text-to-video from noise (strength 1).
        """
        latents_init = None
        if init is not None:
            latents_init = self.encode_video(init)
            shape = tuple(latents_init.shape[1:])
        if self.condition_on_input:
            if latents_init is None:
                raise ValueError("a latent SR stage conditioned on its input needs one: pass init (use upscale)")
            kwargs["cond"] = StageCondition(concat=latents_init)
        if self.residual:
            if latents_init is None:
                raise ValueError("a residual latent SR stage refines a given video: pass init (use upscale)")
            # Start from the input itself (a zero residual) and add its latents back before decoding.
            residual = super().generate(prompts, seeds, init=torch.zeros_like(latents_init), shape=shape, **kwargs)
            latents = self.from_residual(residual, latents_init)
        else:
            latents = super().generate(prompts, seeds, init=latents_init, shape=shape, **kwargs)
        return latents if return_latents else self.decode_latents(latents)

    @torch.no_grad()
    def upscale(
        self,
        video: torch.Tensor,
        prompts: Sequence[str],
        seeds: Sequence[int],
        strength: float | None = None,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        use_ema: bool = True,
        progress: bool = False,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Expert translation: B x 3 x T x h x w (e.g. 256x160) -> B x 3 x T x H x W (576x320) in [-1, 1].

        Resize to the output size, encode, noise to ``strength`` (default the stage's, 0.8), denoise with
        guidance (defaults: ``sampling`` config: 50 steps, CFG 15, negative prompt "low resolution, blur"),
        decode. ``seeds[i]`` seeds the noise of video i. ``height``/``width`` override the output size
        (multiples of 8; the UNet is convolutional).
        """
        if video.shape[0] != len(prompts):
            raise ValueError(f"{video.shape[0]} videos but {len(prompts)} prompts")
        init = self.resize_to_output(video, height, width)
        return self.generate(
            prompts,
            seeds,
            init=init,
            strength=self.strength if strength is None else strength,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            use_ema=use_ema,
            progress=progress,
            text=text,
        )

    # ------------------------------------------------------------------ the stage interface
    def _run(self, upstream: torch.Tensor | None, prompts: list[str], seeds: list[int], **kwargs: Any) -> torch.Tensor:
        return self.upscale(upstream, prompts, seeds, **kwargs)

    def make_upstream(self, video: torch.Tensor) -> torch.Tensor:
        """The clip at the stage's input size (antialiased resize), as the pixel SR stage would hand it on."""
        return resize_frames(video.float(), (self.input_height, self.input_width)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def baseline(self, upstream: torch.Tensor) -> torch.Tensor:
        """The VAE round trip of the resized (``resize_mode``) input: what the stage starts from, without the UNet."""
        return self.decode_latents(self.encode_video(self.resize_to_output(upstream)))

    @torch.no_grad()
    def reference_outputs(self, upstream: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Plain resizing of the input (no VAE) and the VAE round trip of the ground truth (the VAE's ceiling)."""
        return {
            self.resize_mode: self.resize_to_output(upstream),
            "vae_ground_truth": self.decode_latents(self.encode_video(target)),
        }
