"""Stage 2: frame interpolation. Pixel VDM that fills ``insert_frames`` new frames between two given frames.

Show-1 (Show-1 paper, arXiv:2309.15818): windows of 5 frames whose frames 0 and 4 are given keyframes. The UNet sees
``noisy frames (3) + blend (3) + mask (1)`` = 7 channels, where the blend is the linear (trilinear,
align_corners) interpolation of the two given frames over the window and the mask is 1 at the given frames.
Guidance applies to the text only. At inference every adjacent pair of keyframes is one window (all windows
are batched) and the windows are stitched, each shared keyframe once: N keyframes -> (N-1) * (k+1) + 1 frames
(Show-1: 8 -> 29), with the given keyframes copied unchanged to output indices 0, k+1, 2(k+1), ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from show1_lightning.diffusion.module import DiffusionStage, StageCondition
from show1_lightning.diffusion.sampling import window_seeds


class InterpolationStage(DiffusionStage):
    """Two given frames -> the window between them (the ends are kept), text-guided.

    Args:
        num_frames: window length in frames, the given frames at indices 0 and ``num_frames - 1``
            (Show-1: 5). Must equal ``insert_frames + 2``; it is also the training clip length.
        insert_frames: new frames generated between each pair of given frames (Show-1: 3).
        height, width: frame size (Show-1: 40 x 64).
        window_batch_size: most windows denoised in one ``generate`` call by :meth:`interpolate`
            (None: all windows of the call at once).
        residual: learn the window minus the linear blend of its given frames (the blend is added back after
            sampling) instead of the window itself. Our option, not Show-1's (False): a small model then only has
            to learn what the blend gets wrong (motion instead of cross-fading), which it does within a few hundred
            CPU steps where the plain target stays noisy (docs/toy_loop.md).
        **kwargs: the shared diffusion settings (see ``DiffusionStage``).
    """

    upstream_name = "keyframes"
    condition_channels = 4  # blend of the two given frames (3) + mask (1)

    def __init__(
        self,
        num_frames: int = 5,
        insert_frames: int = 3,
        height: int = 40,
        width: int = 64,
        window_batch_size: int | None = None,
        residual: bool = False,
        **kwargs: Any,
    ) -> None:
        if insert_frames < 1:
            raise ValueError(f"insert_frames must be >= 1, got {insert_frames}")
        if num_frames != insert_frames + 2:
            raise ValueError(
                f"num_frames (window length) must be insert_frames + 2 = {insert_frames + 2}: the two given "
                f"frames plus {insert_frames} new ones; got num_frames={num_frames}"
            )
        if window_batch_size is not None and window_batch_size < 1:
            raise ValueError(f"window_batch_size must be >= 1 or null, got {window_batch_size}")
        super().__init__(**kwargs)
        self.num_frames, self.insert_frames = num_frames, insert_frames
        self.height, self.width = height, width
        self.window_batch_size = window_batch_size
        self.residual = bool(residual)

    # ------------------------------------------------------------------ conditioning
    def window_condition(self, first: torch.Tensor, last: torch.Tensor) -> StageCondition:
        """Concat condition of windows given their end frames (each B x C x H x W).

        Returns B x (C + 1) x num_frames x H x W: the trilinear (align_corners) blend of the two frames over
        the window, frame i = (1 - i/(n-1)) first + (i/(n-1)) last, and a mask channel that is 1 at the
        given frames (0 and n-1) and 0 elsewhere.
        """
        if first.shape != last.shape or first.ndim != 4:
            raise ValueError(f"end frames must both be B x C x H x W; got {tuple(first.shape)}, {tuple(last.shape)}")
        b, c, h, w = first.shape
        pair = torch.stack([first, last], dim=2)  # B x C x 2 x H x W
        blend = F.interpolate(pair.float(), size=(self.num_frames, h, w), mode="trilinear", align_corners=True)
        mask = torch.zeros(b, 1, self.num_frames, h, w, device=first.device, dtype=blend.dtype)
        mask[:, :, 0] = 1.0
        mask[:, :, -1] = 1.0
        return StageCondition(concat=torch.cat([blend.to(first.dtype), mask.to(first.dtype)], dim=1))

    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, StageCondition]:
        """The clip is the target window; its first and last frames are the given frames."""
        video = batch["video"]
        if video.ndim != 5 or video.shape[2] != self.num_frames:
            raise ValueError(
                f"interpolation trains on {self.num_frames}-frame windows (B x C x {self.num_frames} x H x W) of "
                f"consecutive frames at the output frame rate; got {tuple(video.shape)}. Set data.num_frames to "
                f"stage.num_frames and data.target_fps to the output rate."
            )
        cond = self.window_condition(video[:, :, 0], video[:, :, -1])
        if self.residual:
            return self.to_residual(video, cond.concat[:, : video.shape[1]]), cond
        return video, cond

    def sample_shape(self) -> tuple[int, int, int, int]:
        return (self.sample_channels, self.num_frames, self.height, self.width)

    # ------------------------------------------------------------------ sampling
    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], cond: StageCondition | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Denoise windows under an explicit condition (see ``DiffusionStage.generate``); use
        :meth:`interpolate` to go from keyframes to a stitched video."""
        if cond is None or cond.concat is None:
            raise ValueError(
                "InterpolationStage needs the given frames: call interpolate(keyframes, prompts, seeds) or pass "
                "cond=stage.window_condition(first, last)"
            )
        return super().generate(prompts, seeds, cond=cond, **kwargs)

    def output_frames(self, num_keyframes: int) -> int:
        """Length of the stitched video for ``num_keyframes`` keyframes: (N-1)(k+1) + 1."""
        return (num_keyframes - 1) * (self.insert_frames + 1) + 1

    @torch.no_grad()
    def interpolate(
        self,
        keyframes: torch.Tensor,
        prompts: Sequence[str],
        seeds: Sequence[int],
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Fill ``insert_frames`` frames between every adjacent pair of keyframes.

        Args:
            keyframes: B x C x N x H x W in [-1, 1], N >= 2 (Show-1: 8 keyframes at 64x40).
            prompts, seeds: one per sample. Window j of sample i uses the seed ``window_seeds(seeds[i], N-1)[j]``.
            text: optional precomputed (emb, mask) for the B prompts.
            **sampling: ``generate`` options (num_steps, guidance_scale, negative_prompt, use_ema, progress).
        Returns:
            B x C x ((N-1)(k+1)+1) x H x W; frame j(k+1) is keyframe j exactly (Show-1: 8 -> 29 frames).
        """
        if keyframes.ndim != 5 or keyframes.shape[2] < 2:
            raise ValueError(f"keyframes must be B x C x N x H x W with N >= 2; got {tuple(keyframes.shape)}")
        b, c, n, h, w = keyframes.shape
        if len(prompts) != b or len(seeds) != b:
            raise ValueError(f"{b} videos need {b} prompts and seeds; got {len(prompts)} and {len(seeds)}")
        if c != self.sample_channels:
            raise ValueError(f"keyframes have {c} channels; this stage generates {self.sample_channels}")
        keyframes = keyframes.to(self.device)
        pairs = n - 1
        # Windows in sample-major order: window (i, j) covers keyframes j and j+1 of sample i.
        first = keyframes[:, :, :-1].permute(0, 2, 1, 3, 4).reshape(b * pairs, c, h, w)
        last = keyframes[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(b * pairs, c, h, w)
        emb, mask = text if text is not None else self.encode_text(prompts)
        emb = emb.to(self.device).repeat_interleave(pairs, dim=0)
        mask = mask.to(self.device).repeat_interleave(pairs, dim=0)
        w_prompts = [p for p in prompts for _ in range(pairs)]
        w_seeds = [s for seed in seeds for s in window_seeds(seed, pairs)]
        cond = self.window_condition(first, last)
        blend = cond.concat[:, :c]
        windows = self.generate_windows(
            w_prompts,
            w_seeds,
            cond,
            (c, self.num_frames, h, w),
            (emb, mask),
            self.window_batch_size,
            init=torch.zeros_like(blend) if self.residual else blend,  # the blend, in the sample's space
            **sampling,
        )
        if self.residual:
            windows = self.from_residual(windows, blend)
        windows = windows.reshape(b, pairs, c, self.num_frames, h, w)
        return self.stitch(keyframes, windows)

    # ------------------------------------------------------------------ the stage interface
    def _run(self, upstream: torch.Tensor | None, prompts: list[str], seeds: list[int], **kwargs: Any) -> torch.Tensor:
        return self.interpolate(upstream, prompts, seeds, **kwargs)

    def make_upstream(self, video: torch.Tensor) -> torch.Tensor:
        """Every (insert_frames + 1)-th frame of a clip of (N-1)(k+1)+1 frames: the keyframes it was made from."""
        step = self.insert_frames + 1
        if video.ndim != 5 or (video.shape[2] - 1) % step or video.shape[2] < step + 1:
            raise ValueError(
                f"a clip for the interpolation stage has (N-1)*{step}+1 frames (N >= 2); got {tuple(video.shape)}"
            )
        return video[:, :, ::step]

    def baseline(self, upstream: torch.Tensor) -> torch.Tensor:
        """The linear blend of each pair of keyframes, stitched like :meth:`interpolate` (keyframes kept)."""
        b, c, n, h, w = upstream.shape
        first = upstream[:, :, :-1].permute(0, 2, 1, 3, 4).reshape(b * (n - 1), c, h, w)
        last = upstream[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(b * (n - 1), c, h, w)
        blend = self.window_condition(first, last).concat[:, :c]
        return self.stitch(upstream, blend.reshape(b, n - 1, c, self.num_frames, h, w))

    def stitch(self, keyframes: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Assemble B x P x C x n x H x W windows (P = N-1) into B x C x (P(k+1)+1) x H x W.

        Each window contributes its ``insert_frames`` interior frames; the positions of the given frames take
        the keyframes themselves (shared end frames once, exact values).
        """
        b, c, n, h, w = keyframes.shape
        step = self.insert_frames + 1
        if windows.shape != (b, n - 1, c, self.num_frames, h, w):
            raise ValueError(f"windows {tuple(windows.shape)} do not match keyframes {tuple(keyframes.shape)}")
        out = keyframes.new_empty(b, c, self.output_frames(n), h, w)
        out[:, :, ::step] = keyframes
        for j in range(n - 1):
            out[:, :, j * step + 1 : (j + 1) * step] = windows[:, j, :, 1:-1].to(out.dtype)
        return out
