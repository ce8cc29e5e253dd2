"""Validation samples for every stage, written as mp4 and logged to wandb.

Text-to-video stages (keyframe) sample fixed prompts with fixed seeds. Stages that take an upstream video
(interpolation, pixel SR, latent SR) run on the first validation clips (their keyframes, their low-res copy),
write ``input | output | ground truth`` side by side and log ``val/psnr`` beside ``val/psnr_baseline`` (linear
blend, bicubic) and the stage's reference outputs (``show1_lightning.stages.validation``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from show1_lightning.data.video_io import to_uint8_frames, write_mp4


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:max_len] or "empty"


def log_videos_to_wandb(trainer: L.Trainer, key: str, paths: Sequence[Path], captions: Sequence[str]) -> None:
    """Log mp4 files to every WandbLogger of the trainer (passing paths avoids moviepy)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            videos = [wandb.Video(str(p), caption=c, format="mp4") for p, c in zip(paths, captions)]
            logger.experiment.log({key: videos, "trainer/global_step": trainer.global_step})


class VideoSampleCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of fit), sample with fixed seeds using the EMA
    weights, write ``<dirpath>/step_XXXXXXX/NN_<prompt>.mp4`` and log them.

    Text-to-video stages sample ``prompts``; stages that take an upstream video run on the first
    ``num_val_clips`` validation clips (their captions as prompts) and also log their PSNR and their baseline's.
    Runs on global rank 0 only; sampling uses no collective operations, so other ranks go on.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        every_n_steps: int = 500,
        dirpath: str = "samples",
        fps: float = 4.0,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        at_fit_end: bool = True,
        num_val_clips: int = 4,
    ) -> None:
        self.prompts = list(prompts)
        self.seeds = list(seeds) if seeds is not None else list(range(len(self.prompts)))
        if len(self.seeds) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} sample prompts but {len(self.seeds)} seeds")
        self.every_n_steps = every_n_steps
        self.dirpath = Path(dirpath)
        self.fps = fps
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.at_fit_end = at_fit_end
        self.num_val_clips = num_val_clips
        self._last_step = -1
        self._val_clips: tuple[torch.Tensor, list[str]] | None = None
        self.scores: dict[str, float] = {}  # the latest val/psnr* values

    def val_clips(self, trainer: L.Trainer) -> tuple[torch.Tensor, list[str]]:
        """The first ``num_val_clips`` validation clips and captions (read once, then reused: the same clips
        at every step, so the PSNR curve compares like with like)."""
        if self._val_clips is None:
            dm = trainer.datamodule
            if dm is None:
                raise RuntimeError(
                    "VideoSampleCallback: a stage with an upstream video samples validation clips; fit with a datamodule"
                )
            videos, captions = [], []
            for batch in dm.val_dataloader():
                videos.append(batch["video"])
                captions.extend(batch["caption"])
                if len(captions) >= self.num_val_clips:
                    break
            if not captions:
                raise RuntimeError("VideoSampleCallback: the validation set is empty (data.val_batches > 0 needed)")
            self._val_clips = (torch.cat(videos)[: self.num_val_clips], captions[: self.num_val_clips])
        return self._val_clips

    @rank_zero_only
    def write_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Generate, write and log the samples for the current step; returns the mp4 paths."""
        step = trainer.global_step
        if step == self._last_step:
            return []
        self._last_step = step
        out_dir = self.dirpath / f"step_{step:07d}"
        sampling = {"num_steps": self.num_steps, "guidance_scale": self.guidance_scale}
        if not getattr(pl_module, "takes_upstream", False):
            videos = pl_module.generate(self.prompts, self.seeds, **sampling)
            paths = [
                write_mp4(out_dir / f"{i:02d}_{slug(p)}.mp4", to_uint8_frames(v), fps=self.fps)
                for i, (p, v) in enumerate(zip(self.prompts, videos))
            ]
            log_videos_to_wandb(trainer, "samples", paths, self.prompts)
            return paths
        from show1_lightning.stages.validation import compare_to_baseline

        clips, captions = self.val_clips(trainer)
        seeds = list(range(len(captions)))
        result = compare_to_baseline(pl_module, clips, captions, seeds, **sampling)
        panels = result.side_by_side()
        paths = [
            write_mp4(out_dir / f"{i:02d}_{slug(p)}.mp4", to_uint8_frames(v), fps=self.fps)
            for i, (p, v) in enumerate(zip(captions, panels))
        ]
        log_videos_to_wandb(trainer, "samples", paths, [f"input | output | ground truth: {c}" for c in captions])
        metrics = {"val/psnr" if k == "output" else f"val/psnr_{k}": v for k, v in result.psnr.items()}
        self.scores = dict(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for k, v in metrics.items():  # visible to ModelCheckpoint(monitor=...) and train.py's returned metrics
            trainer.callback_metrics[k] = torch.tensor(v)
        print(
            f"[samples] step {step}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in metrics.items()),
            flush=True,
        )
        return paths

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.write_samples(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_fit_end:
            self.write_samples(trainer, pl_module)
