"""Stage 3: pixel super-resolution (Show-1 SR1: 64x40 -> 256x160, 4x), DeepFloyd IF stage II inflated to video.

The UNet sees ``noisy high-res frames (3) + noise-augmented upsampled low-res frames (3)`` = 6 channels. The low-res
video is bilinearly upsampled to the output size and noised with the DDPM forward step q(x_s | x_0) of the stage's
own schedule at an augmentation level s; s enters the UNet as its class label (timestep-style class embedding, so
the UNet must have one: ``Show1UNet3DConditionModel`` with ``class_embed_type: timestep``). Training draws s
uniformly from [0, max_aug_level] per clip; inference uses a fixed ``noise_level`` (released: 250).

Training pairs are made on the fly: the datamodule delivers the high-res clip, the stage makes its antialiased
``scale_factor``-times-smaller copy. Long videos (Show-1: 29 frames) are processed in windows of ``window_frames``:

- ``window_overlap: false`` (default): non-overlapping windows (29 frames, window 8 -> 8+8+8+5), each window
  conditioned only on its own low-res frames, all windows of all videos batched. Simple; nothing ties the windows
  together but the shared low-res condition, so a seam between windows is possible.
- ``window_overlap: true`` (the official pipeline's scheme): windows of ``window_frames`` with stride
  ``window_frames - 1``; frame 0 of each later window's condition is replaced by the previous window's clean
  high-res output of that frame, which is also kept in the output (windows run one after another, the videos of
  the batch together). The official pipeline conditions the first window's frame 0 on an image SR model's
  output; we have none, so the first window uses the plain noise-augmented condition. The released pipeline still
  passes the window's noise level as class label although frame 0 is clean; so do we. ``clean_first_frame_prob``
  trains for this case (frame 0 of the condition replaced by the clean target frame in that fraction of clips).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from show1_lightning.diffusion.module import DiffusionStage, StageCondition
from show1_lightning.diffusion.sampling import seeded_noise, window_seeds
from show1_lightning.video_ops import random_crops, resize_frames


class PixelSRStage(DiffusionStage):
    """Low-res video -> ``scale_factor`` x high-res video, conditioned on the noise-augmented upsampled input.

    Args:
        num_frames: frames of a training clip (one window; Show-1: 8).
        height, width: the high-res (output) frame size (Show-1: 160 x 256).
        scale_factor: output / input size ratio (Show-1: 4; input 40 x 64).
        max_aug_level: training augmentation levels are uniform integers in [0, max_aug_level].
        noise_level: the fixed augmentation level at inference (released: 250) and in validation.
        window_frames: frames per window at inference (Show-1: 8).
        window_overlap: False: non-overlapping windows; True: the official stride ``window_frames - 1`` scheme
            with each window's first condition frame taken from the previous window's output (module docstring).
        clean_first_frame_prob: fraction of training clips whose first condition frame is the clean high-res
            frame (trains the ``window_overlap`` case; 0 disables).
        align_corners: ``align_corners`` of the bilinear upsampling of the condition (IF / Show-1: True).
        window_batch_size: most windows per ``generate`` call (None: all windows of a call at once).
        train_crop: optional (h, w) random crop of the high-res clip in training (multiples of ``scale_factor``;
            the low-res condition is made from the crop). The UNet is convolutional with text-only cross-attention
            in Show-1's SR1, so training on crops and sampling at full size works (Imagen trains its last SR stage
            this way); it makes CPU / small-GPU training much cheaper. None: full frames. Validation uses full frames.
        **kwargs: the shared diffusion settings (see ``DiffusionStage``).
    """

    upstream_name = "a low-res video"
    condition_channels = 3  # noise-augmented upsampled low-res frames

    def __init__(
        self,
        num_frames: int = 8,
        height: int = 160,
        width: int = 256,
        scale_factor: int = 4,
        max_aug_level: int = 999,
        noise_level: int = 250,
        window_frames: int = 8,
        window_overlap: bool = False,
        clean_first_frame_prob: float = 0.0,
        align_corners: bool = True,
        window_batch_size: int | None = None,
        train_crop: Sequence[int] | None = None,
        residual: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if train_crop is not None:
            train_crop = tuple(int(v) for v in train_crop)
            if (
                len(train_crop) != 2
                or any(v % scale_factor or v <= 0 for v in train_crop)
                or train_crop[0] > height
                or train_crop[1] > width
            ):
                raise ValueError(
                    f"train_crop must be (h, w), positive multiples of scale_factor {scale_factor} "
                    f"within {height} x {width}; got {train_crop}"
                )
        n_train = self.noise_scheduler.config.num_train_timesteps
        if scale_factor < 1 or height % scale_factor or width % scale_factor:
            raise ValueError(f"height {height} and width {width} must be multiples of scale_factor {scale_factor}")
        for name, level in (("max_aug_level", max_aug_level), ("noise_level", noise_level)):
            if not 0 <= level < n_train:
                raise ValueError(f"{name} must lie in [0, {n_train - 1}], got {level}")
        if window_frames < (2 if window_overlap else 1):
            raise ValueError(f"window_frames must be >= {2 if window_overlap else 1}, got {window_frames}")
        if not 0.0 <= clean_first_frame_prob <= 1.0:
            raise ValueError(f"clean_first_frame_prob must be in [0, 1], got {clean_first_frame_prob}")
        if window_batch_size is not None and window_batch_size < 1:
            raise ValueError(f"window_batch_size must be >= 1 or null, got {window_batch_size}")
        unet_cfg = getattr(self.unet, "config", None)
        if unet_cfg is not None and getattr(unet_cfg, "class_embed_type", None) is None:
            raise ValueError(
                f"PixelSRStage passes the augmentation level as class labels, but {type(self.unet).__name__} has no "
                "class embedding: use a Show-1 UNet with class_embed_type 'timestep' (model=show1 "
                "model.config=show-1-sr1, or unet3d_tiny_sr)"
            )
        self.num_frames, self.height, self.width = num_frames, height, width
        self.scale_factor = scale_factor
        self.max_aug_level, self.noise_level = max_aug_level, noise_level
        self.window_frames, self.window_overlap = window_frames, window_overlap
        self.clean_first_frame_prob = clean_first_frame_prob
        self.align_corners = align_corners
        self.window_batch_size = window_batch_size
        self.train_crop: tuple[int, int] | None = train_crop  # type: ignore[assignment]
        self.residual = bool(residual)

    @property
    def low_res_size(self) -> tuple[int, int]:
        """(h, w) of the input video."""
        return self.height // self.scale_factor, self.width // self.scale_factor

    # ------------------------------------------------------------------ conditioning
    def downsample(self, video: torch.Tensor) -> torch.Tensor:
        """The antialiased (bilinear) ``scale_factor``-times-smaller copy of a B x C x T x H x W clip, in [-1, 1]."""
        h, w = video.shape[-2:]
        if h % self.scale_factor or w % self.scale_factor:
            raise ValueError(f"{h} x {w} frames are not divisible by scale_factor {self.scale_factor}")
        size = (h // self.scale_factor, w // self.scale_factor)
        return resize_frames(video, size).clamp(-1.0, 1.0)

    def upsample_condition(self, low_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear upsampling of the low-res frames to the output size (before noise augmentation)."""
        return resize_frames(low_res, size, align_corners=self.align_corners)

    def augment(self, upsampled: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DDPM forward step q(x_s | x_0) of the stage's schedule at per-sample levels s (B integers)."""
        return self.noise_scheduler.add_noise(upsampled, noise.to(upsampled), levels.to(upsampled.device))

    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, StageCondition]:
        """High-res clip -> (target, condition): its downsampled, re-upsampled, noise-augmented copy.

        Training draws a uniform level in [0, max_aug_level] per clip; in eval mode (validation) the inference
        ``noise_level`` and fixed augmentation noise are used, so the validation loss is comparable across runs.
        """
        hr = batch["video"]
        if hr.ndim != 5 or tuple(hr.shape[-2:]) != (self.height, self.width):
            raise ValueError(
                f"pixel SR trains on high-res clips B x C x T x {self.height} x {self.width}; got {tuple(hr.shape)} "
                "(data.height/width must be stage.height/width)"
            )
        if self.training and self.train_crop is not None:
            (hr,) = random_crops([hr], self.train_crop, align=self.scale_factor)
        b, size = hr.shape[0], tuple(hr.shape[-2:])
        up = self.upsample_condition(self.downsample(hr), size)
        target = self.to_residual(hr, self.baseline(self.downsample(hr))) if self.residual else hr
        if self.training:
            levels = torch.randint(0, self.max_aug_level + 1, (b,), device=hr.device)
            noise = torch.randn_like(up)
        else:
            levels = torch.full((b,), self.noise_level, dtype=torch.long, device=hr.device)
            noise = torch.randn(up.shape, generator=torch.Generator("cpu").manual_seed(0)).to(up)
        cond = self.augment(up, levels, noise)
        if self.training and self.clean_first_frame_prob > 0:
            clean = (torch.rand(b, device=hr.device) < self.clean_first_frame_prob)[:, None, None, None]
            cond[:, :, 0] = torch.where(clean, hr[:, :, 0], cond[:, :, 0])
        return target, StageCondition(concat=cond, class_labels=levels)

    def sample_shape(self) -> tuple[int, int, int, int]:
        return (self.sample_channels, self.num_frames, self.height, self.width)

    # ------------------------------------------------------------------ sampling
    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], cond: StageCondition | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Denoise windows under an explicit condition (see ``DiffusionStage.generate``); use :meth:`upsample`
        to go from a low-res video to its high-res version."""
        if cond is None or cond.concat is None or cond.class_labels is None:
            raise ValueError(
                "PixelSRStage needs the low-res video: call upsample(low_res, prompts, seeds) or pass "
                "cond=StageCondition(concat=augmented upsampled frames, class_labels=noise levels)"
            )
        return super().generate(prompts, seeds, cond=cond, **kwargs)

    def windows(self, num_frames: int) -> list[tuple[int, int]]:
        """[start, end) frame ranges of the windows covering ``num_frames`` frames.

        Non-overlapping: consecutive ``window_frames`` chunks (the last may be shorter). Overlapping: stride
        ``window_frames - 1``, consecutive windows share one frame, the last ends at the last frame.
        """
        wf = self.window_frames
        if not self.window_overlap:
            return [(s, min(s + wf, num_frames)) for s in range(0, num_frames, wf)]
        out = [(0, min(wf, num_frames))]
        while out[-1][1] < num_frames:
            s = out[-1][1] - 1
            out.append((s, min(s + wf, num_frames)))
        return out

    @torch.no_grad()
    def upsample(
        self,
        low_res: torch.Tensor,
        prompts: Sequence[str],
        seeds: Sequence[int],
        noise_level: int | None = None,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Super-resolve a low-res video window by window.

        Args:
            low_res: B x C x T x h x w in [-1, 1] (Show-1: 29 frames at 64x40); any T, h and w with the output
                size ``scale_factor`` x (h, w) acceptable to the UNet.
            prompts, seeds: one per video. Video i's augmentation noise and window noises come from seeds derived
                from ``seeds[i]`` (``window_seeds``), so results do not depend on the batch.
            noise_level: augmentation level of the condition (None: the configured ``noise_level``).
            text: optional precomputed (emb, mask) for the B prompts.
            **sampling: ``generate`` options (num_steps, guidance_scale, negative_prompt, use_ema, progress).
        Returns:
            B x C x T x (scale_factor h) x (scale_factor w).
        """
        if low_res.ndim != 5:
            raise ValueError(f"low_res must be B x C x T x h x w; got {tuple(low_res.shape)}")
        b, c, t, h, w = low_res.shape
        if len(prompts) != b or len(seeds) != b:
            raise ValueError(f"{b} videos need {b} prompts and seeds; got {len(prompts)} and {len(seeds)}")
        if c != self.sample_channels:
            raise ValueError(f"low_res has {c} channels; this stage generates {self.sample_channels}")
        level = self.noise_level if noise_level is None else int(noise_level)
        n_train = self.noise_scheduler.config.num_train_timesteps
        if not 0 <= level < n_train:
            raise ValueError(f"noise_level must lie in [0, {n_train - 1}], got {level}")
        size = (h * self.scale_factor, w * self.scale_factor)
        spans = self.windows(t)
        derived = [window_seeds(s, 1 + len(spans)) for s in seeds]
        up = self.upsample_condition(low_res.to(self.device), size)
        # Where sampling starts from (strength < 1) and, with ``residual``, what is added back: the baseline.
        base = self.baseline(low_res.to(self.device)) if self.residual else up
        aug_noise = seeded_noise(up.shape[1:], [d[0] for d in derived], self.device)
        levels = torch.full((b,), level, dtype=torch.long, device=self.device)
        cond = self.augment(up, levels, aug_noise)
        emb, mask = text if text is not None else self.encode_text(prompts)
        emb, mask = emb.to(self.device), mask.to(self.device)
        out = up.new_empty(b, c, t, *size)
        if self.window_overlap:
            for k, (s, e) in enumerate(spans):
                window_cond = cond[:, :, s:e].clone()
                if k > 0:
                    window_cond[:, :, 0] = out[:, :, s]  # the previous window's clean output of the shared frame
                res = self._generate_windows(
                    prompts, [d[1 + k] for d in derived], window_cond, levels, emb, mask, sampling, base[:, :, s:e]
                )
                if self.residual:
                    res = self.from_residual(res, base[:, :, s:e])
                lo = 0 if k == 0 else 1  # the shared frame keeps the previous window's output
                out[:, :, s + lo : e] = res[:, :, lo:]
            return out
        # Non-overlapping windows: every window of every video is independent; batch the windows of equal length.
        by_len: dict[int, list[tuple[int, int, int]]] = {}
        for k, (s, e) in enumerate(spans):
            by_len.setdefault(e - s, []).append((k, s, e))
        for group in by_len.values():
            items = [(i, k, s, e) for i in range(b) for k, s, e in group]
            idx = torch.tensor([i for i, *_ in items], device=self.device)
            res = self._generate_windows(
                [prompts[i] for i, *_ in items],
                [derived[i][1 + k] for i, k, *_ in items],
                torch.stack([cond[i, :, s:e] for i, _, s, e in items]),
                levels[idx],
                emb[idx],
                mask[idx],
                sampling,
                torch.stack([base[i, :, s:e] for i, _, s, e in items]),
            )
            for (i, _, s, e), r in zip(items, res):
                out[i, :, s:e] = r
        return self.from_residual(out, base) if self.residual else out

    def _generate_windows(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        cond: torch.Tensor,
        levels: torch.Tensor,
        emb: torch.Tensor,
        mask: torch.Tensor,
        sampling: dict,
        base: torch.Tensor,
    ) -> torch.Tensor:
        """Denoise a batch of windows (conditions W x C x t x H x W), ``window_batch_size`` at a time; with a
        sampling strength < 1 each starts from ``base`` (its upsampled low-res; with ``residual``: zero)."""
        return self.generate_windows(
            prompts,
            seeds,
            StageCondition(concat=cond, class_labels=levels),
            (self.sample_channels, *cond.shape[2:]),
            (emb, mask),
            self.window_batch_size,
            init=torch.zeros_like(base) if self.residual else base,
            **dict(sampling),
        )

    # ------------------------------------------------------------------ the stage interface
    def _run(self, upstream: torch.Tensor | None, prompts: list[str], seeds: list[int], **kwargs: Any) -> torch.Tensor:
        return self.upsample(upstream, prompts, seeds, **kwargs)

    def make_upstream(self, video: torch.Tensor) -> torch.Tensor:
        """The antialiased ``scale_factor``-times-smaller copy (what the stage is trained to invert)."""
        return self.downsample(video)

    def baseline(self, upstream: torch.Tensor) -> torch.Tensor:
        """Bicubic upsampling of the low-res video by ``scale_factor``, clamped to [-1, 1]."""
        h, w = upstream.shape[-2:]
        return resize_frames(upstream, (h * self.scale_factor, w * self.scale_factor), "bicubic").clamp(-1.0, 1.0)
