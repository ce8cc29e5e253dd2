"""``benchmark=toy``: held-out toy clips as FVD reference, their captions as prompts, and the toy adherences.

Held-out seeds. The training shards render clip ``i`` with ``seed=(GENERATOR_VERSION, 0, i)`` and the
validation shards with ``(GENERATOR_VERSION, 1, i)`` (``show1_lightning.data.toy_data._encode_clips``).
The benchmark renders with a split id of its own, :data:`TOY_SPLIT_IDS`: ``(GENERATOR_VERSION, 1000, i)``
for ``split="test"`` (the benchmark's real clips and prompts) and ``(GENERATOR_VERSION, 1001, i)`` for
``split="real2"`` (a second real set: held-out real vs real is the floor any generator is compared with).
numpy seeds a generator from the whole tuple, so the three families never share a clip.

Metrics (``benchmark.metrics``): ``fvd`` (the evaluation's I3D FVD against the held-out test clips),
``color_adherence`` and ``motion_adherence`` (:class:`ToyAdherence`, from ``show1_lightning.data.toy_data``).
:class:`ToyRealGenerator` (``generator=toy_real``) serves ``real2`` clips of the prompted captions: the floor.

Prompts form a balanced design over colours x shapes x motions (:func:`toy_spec`): every block of 12
consecutive samples holds each (shape, motion) pair once and each colour twice, and 72 samples hold every
combination once; so ``num_samples=48`` has each colour 8 times, each shape 16 times, each motion 12 times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from evaluation.benchmarks import Benchmark, ClipSpec, PromptItem, cut_clip
from show1_lightning.data.shards import resize_center_crop
from show1_lightning.data.toy_data import (
    GENERATOR_VERSION,
    TOY_COLORS,
    TOY_FPS,
    TOY_FRAMES,
    TOY_MOTIONS,
    TOY_SHAPES,
    color_adherence,
    make_toy_clip,
    motion_adherence,
    parse_toy_prompt,
    toy_caption,
)
from show1_lightning.data.video_io import decode_video, encode_mp4, to_float_video, to_uint8_frames

# Split ids of the held-out seed families (training uses 0, validation 1).
TOY_SPLIT_IDS: dict[str, int] = {"test": 1000, "real2": 1001}
# The toy cascade's output (scripts/toy_loop.py: keyframes -> interpolation -> super-resolution): 29 frames, 64 x 96, 16 fps.
TOY_EVAL_FRAMES, TOY_EVAL_HEIGHT, TOY_EVAL_WIDTH, TOY_EVAL_FPS = 29, 64, 96, TOY_FPS
_BLOCK = len(TOY_SHAPES) * len(TOY_MOTIONS)  # 12 (shape, motion) pairs per block


def toy_spec(index: int) -> tuple[str, str, str]:
    """(colour, shape, motion) of held-out sample ``index`` (balanced design, period 72; see module doc)."""
    colors = list(TOY_COLORS)
    block, j = divmod(index % (len(colors) * _BLOCK), _BLOCK)
    return colors[(block + j) % len(colors)], TOY_SHAPES[j // len(TOY_MOTIONS)], TOY_MOTIONS[j % len(TOY_MOTIONS)]


def toy_seed(split: str, index: int) -> tuple[int, int, int]:
    """The ``make_toy_clip`` seed of held-out clip ``index`` of ``split`` (``"test"`` or ``"real2"``)."""
    if split not in TOY_SPLIT_IDS:
        raise ValueError(f"toy split must be one of {list(TOY_SPLIT_IDS)}, got {split!r}")
    return (GENERATOR_VERSION, TOY_SPLIT_IDS[split], int(index))


def toy_heldout_frames(
    index: int,
    num_frames: int,
    height: int,
    width: int,
    split: str = "test",
    spec: Sequence[str] | None = None,
    fps: float = TOY_EVAL_FPS,
) -> np.ndarray:
    """Held-out clip ``index`` of ``split`` as uint8 ``T x H x W x 3`` (``spec``: another (colour, shape, motion)).

    Made the way training sees toy clips, so that held-out and training clips differ only in their seeds: rendered
    at the toy size (128x80, 32 frames at 16 fps), through the same mp4 encoding as the shards, ``num_frames``
    frames from the first at ``fps`` (16: consecutive frames; 4: every 4th, as keyframes), then resized to cover
    ``height x width`` and centre-cropped (the datamodule's ``resize_center_crop``).
    """
    stride = TOY_FPS / float(fps)
    if stride < 1 or stride != int(stride):
        raise ValueError(f"fps must divide the toy clips' {TOY_FPS} fps, got {fps}")
    stride = int(stride)
    if (num_frames - 1) * stride + 1 > TOY_FRAMES:
        raise ValueError(
            f"{num_frames} frames at {fps} fps need {(num_frames - 1) * stride + 1} of the toy clips' {TOY_FRAMES}"
        )
    color, shape, motion = spec if spec is not None else toy_spec(index)
    native = make_toy_clip(color, shape, motion, seed=toy_seed(split, index))
    frames = decode_video(encode_mp4(native, fps=TOY_FPS)).frames[: (num_frames - 1) * stride + 1 : stride]
    video = resize_center_crop(to_float_video(frames), height, width)
    return to_uint8_frames(video)


def _to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``T x H x W x 3`` -> float ``3 x T x H x W`` in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def toy_heldout_clips(
    num_samples: int, num_frames: int, height: int, width: int, split: str = "test", fps: float = TOY_EVAL_FPS
) -> tuple[torch.Tensor, list[str]]:
    """The first ``num_samples`` held-out toy clips of ``split`` and their captions.

    Args:
        num_samples: number of clips (balanced over colours x shapes x motions, see :func:`toy_spec`).
        num_frames, height, width: the clips' size (made as training sees clips: :func:`toy_heldout_frames`).
        split: ``"test"`` (the benchmark set) or ``"real2"`` (a disjoint second real set, same captions
            at the same indices).

    Returns:
        (videos, prompts): float ``B x 3 x T x H x W`` in [-1, 1] and the ``B`` captions.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    videos = torch.stack(
        [_to_float(toy_heldout_frames(i, num_frames, height, width, split, fps=fps)) for i in range(num_samples)]
    )
    return videos, [toy_caption(*toy_spec(i)) for i in range(num_samples)]


class ToyBenchmark(Benchmark):
    """The toy benchmark: prompts = captions of held-out ``test`` clips, FVD reference = those clips.

    Args:
        num_samples: number of prompts (balanced design, :func:`toy_spec`).
        num_frames, height, width: size the held-out clips are rendered at (the toy cascade's output).
        fps: their frame rate (reported; the generator's own fps is used to write its videos).
        real_clips: number of FVD reference clips (test clips ``0..real_clips-1``); None: ``num_samples``.
        clip: how FVD clips are cut from the rendered clips (:class:`ClipSpec` or its fields).
        seed: kept for the config interface; the held-out set does not depend on it.
    """

    name = "toy"

    def __init__(
        self,
        num_samples: int = 48,
        num_frames: int = TOY_EVAL_FRAMES,
        height: int = TOY_EVAL_HEIGHT,
        width: int = TOY_EVAL_WIDTH,
        fps: float = TOY_EVAL_FPS,
        real_clips: int | None = None,
        clip: ClipSpec | Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(clip=clip, real_clips=real_clips, seed=seed)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.num_frames, self.height, self.width, self.fps = int(num_frames), int(height), int(width), float(fps)

    def prompts(self) -> list[PromptItem]:
        return [PromptItem(i, toy_caption(*toy_spec(i)), f"toy:test/{i}") for i in range(self.num_samples)]

    def reference_videos(self) -> list[Path]:
        return []  # rendered, not read from files

    def num_real_clips(self) -> int:
        return self.num_samples if self.real_clips is None else self.real_clips

    def real_clip(self, clip_index: int) -> torch.Tensor:
        """Held-out test clip ``clip_index`` cut by ``clip``: float ``3 x T x H x W`` in [-1, 1]."""
        if not 0 <= clip_index < self.num_real_clips():
            raise IndexError(f"real clip {clip_index} out of range (0..{self.num_real_clips() - 1})")
        frames = toy_heldout_frames(clip_index, self.num_frames, self.height, self.width, "test", fps=self.fps)
        return cut_clip(frames, self.clip, clip_index)

    def _reference_description(self) -> str:
        return "held-out toy clips, split test"

    def _rendering(self) -> dict[str, Any]:
        return {
            "generator_version": GENERATOR_VERSION,
            "num_frames": self.num_frames,
            "height": self.height,
            "width": self.width,
            "fps": self.fps,
            "seeds": f"make_toy_clip seed (GENERATOR_VERSION, split id, i); split ids {TOY_SPLIT_IDS} "
            "(training shards 0, validation 1)",
        }

    def real_protocol(self) -> dict[str, Any]:
        """The choices that define the real statistics (the FVD cache key)."""
        return {
            "benchmark": self.name,
            "reference": self._reference_description(),
            "rendering": self._rendering(),
            "real_clips": self.num_real_clips(),
            "clip_selection": "held-out test clips 0..real_clips-1 (balanced captions, toy_spec)",
            "clip": self.clip.describe(),
        }

    def protocol(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "num_samples": self.num_samples,
            "prompts": "captions of held-out test clips 0..num_samples-1; colour/shape/motion by toy_spec: "
            "each block of 12 has every (shape, motion) once and every colour twice",
            **self._rendering(),
            "real": self.real_protocol(),
        }


class ToyRealGenerator:
    """``generator=toy_real``: for each prompt, a ``real2`` held-out clip with that caption (the real floor).

    Sample seed ``s`` renders ``make_toy_clip(<prompt's colour, shape, motion>, seed=toy_seed("real2", s))``:
    with the evaluation's seed rule (``seed + i``, default seed 0) sample ``i`` is exactly
    ``toy_heldout_clips(..., split="real2")[i]``, a different clip of the same caption as test clip ``i``.

    Args:
        num_frames, height, width: size of the clips (those of the benchmark).
        fps: frame rate reported to the runner.
        name: name in reports.
    """

    def __init__(
        self,
        num_frames: int = TOY_EVAL_FRAMES,
        height: int = TOY_EVAL_HEIGHT,
        width: int = TOY_EVAL_WIDTH,
        fps: float = TOY_EVAL_FPS,
        name: str = "toy_real",
    ) -> None:
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.fps, self.name = float(fps), name

    def describe(self) -> dict[str, Any]:
        """Report entry."""
        return {"type": "toy_real", "split": "real2", "size": [self.num_frames, self.height, self.width]}

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """``real2`` clips of the prompts' captions: float ``B x 3 x T x H x W`` in [-1, 1]."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        out = []
        for prompt, seed in zip(prompts, seeds):
            spec = parse_toy_prompt(prompt)
            if None in spec.values():
                raise ValueError(f"toy_real: {prompt!r} is not a toy caption (colour, shape and motion needed)")
            frames = toy_heldout_frames(
                int(seed),
                self.num_frames,
                self.height,
                self.width,
                "real2",
                (spec["color"], spec["shape"], spec["motion"]),
                fps=self.fps,
            )
            out.append(_to_float(frames))
        return torch.stack(out)


ADHERENCE_KINDS = ("color", "motion")


class ToyAdherence(Metric):
    """Toy prompt adherence as a torchmetrics metric (hits / videos, summed over processes).

    Args:
        kind: ``"color"`` (:func:`~show1_lightning.data.toy_data.color_adherence`) or ``"motion"``
            (:func:`~show1_lightning.data.toy_data.motion_adherence`).
        min_displacement: the motion rule's smallest displacement, as a fraction of the frame side.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, kind: str, min_displacement: float = 0.02, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kind not in ADHERENCE_KINDS:
            raise ValueError(f"kind must be one of {ADHERENCE_KINDS}, got {kind!r}")
        self.kind, self.min_displacement = kind, float(min_displacement)
        self.add_state("hits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, prompts: Sequence[str]) -> None:
        """Score ``B x 3 x T x H x W`` videos in [-1, 1] against their prompts."""
        if self.kind == "color":
            rate = color_adherence(videos, list(prompts))
        else:
            rate = motion_adherence(videos, list(prompts), self.min_displacement)
        self.hits += round(rate * len(prompts))
        self.total += len(prompts)

    def compute(self) -> torch.Tensor:
        """Fraction of videos that follow their prompt."""
        if self.total == 0:
            raise RuntimeError("ToyAdherence: no videos scored")
        return self.hits / self.total

    def describe(self) -> dict[str, Any]:
        """Report entry: the rule of this adherence."""
        if self.kind == "color":
            rule = (
                "dominant palette colour of the saturated pixels (HSV saturation > 0.45, value > 0.25; nearest "
                "palette hue votes) equals the prompt's colour; chance 1/6"
            )
        else:
            rule = (
                "centroid of the saturated pixels over the first vs the last quarter of the frames: axis of the "
                f"larger displacement and its sign equal the prompt's motion, displacement >= {self.min_displacement} "
                "of the frame side; no saturated pixels: miss; chance 1/4"
            )
        return {"kind": self.kind, "rule": rule, "frames": "every frame of each video as generated"}
