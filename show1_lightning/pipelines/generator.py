"""The cascade (or any prefix of it, e.g. the keyframe stage alone) as an evaluation generator.

Satisfies ``evaluation.generators.VideoGenerator`` (``name``, ``fps``, ``generate``), so
``evaluate.py generator=cascade`` scores trained stages without evaluation/ importing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from show1_lightning.pipelines.cascade import STAGE_ORDER, Show1Cascade


class CascadeGenerator:
    """Prompts and seeds in, B x 3 x T x H x W videos in [-1, 1] out.

    Args:
        keyframe, interpolation, pixel_sr, latent_sr: checkpoint or export paths (a prefix of the cascade).
        fps: frame rate written into the evaluation's mp4 files.
        name: identifier in reports (default: ``cascade:<stages>``).
        device, precision, sampling, behaviour, t5, if_ii_l, strict_sizes, baseline_stages: see ``Show1Cascade``
            (``baseline_stages=[interpolation, pixel_sr, latent_sr]``: the naive cascade, conf/generator/naive.yaml).
        lora: per stage, LoRA folders on top of its weights, ``{keyframe: [{path: ..., scale: 0.8}]}`` (``Show1Cascade``).
        baseline_branch: also make the naive cascade's video from the same keyframes (``Show1Cascade``); it is
            handed on with the intermediates as ``naive`` (evaluate.py ``save_intermediates``: ``intermediates/naive/``).
    """

    def __init__(
        self,
        keyframe: str | Path,
        interpolation: str | Path | None = None,
        pixel_sr: str | Path | None = None,
        latent_sr: str | Path | None = None,
        fps: float = 8.0,
        name: str | None = None,
        device: str = "auto",
        precision: str = "32",
        sampling: dict[str, dict[str, Any]] | None = None,
        behaviour: dict[str, Any] | None = None,
        t5: str | Path | None = None,
        if_ii_l: str | Path | None = None,
        strict_sizes: bool = False,
        baseline_stages: Sequence[str] = (),
        lora: dict[str, Sequence[Any]] | None = None,
        baseline_branch: bool = False,
    ) -> None:
        self.sources = {
            "keyframe": keyframe,
            "interpolation": interpolation,
            "pixel_sr": pixel_sr,
            "latent_sr": latent_sr,
        }
        self.cascade = Show1Cascade(
            keyframe,
            interpolation,
            pixel_sr,
            latent_sr,
            device=device,
            precision=precision,
            sampling=sampling,
            behaviour=behaviour,
            t5=t5,
            if_ii_l=if_ii_l,
            strict_sizes=strict_sizes,
            baseline_stages=baseline_stages,
            lora=lora,
            baseline_branch=baseline_branch,
        )
        self.fps = float(fps)
        #: output of every stage but the last in the last ``generate`` call (evaluate.py ``save_intermediates``)
        self.last_intermediates: dict[str, torch.Tensor] = {}
        self.name = name or "cascade:" + "+".join(
            n + ("(baseline)" if n in self.cascade.baseline_stages else "")
            for n in STAGE_ORDER
            if n in self.cascade.stages
        )

    def describe(self) -> dict[str, Any]:
        """What the report records about this generator."""
        return {
            "name": self.name,
            "type": "cascade",
            "fps": self.fps,
            "stages": {k: str(v) for k, v in self.sources.items() if v is not None},
            "precision": self.cascade.precision,
            "sampling": self.cascade.sampling,
            "behaviour": self.cascade.released.describe(),
            "size_notes": self.cascade.size_notes,
            "baseline_stages": list(self.cascade.baseline_stages),
            "baseline_branch": self.cascade.baseline_branch,
            "lora": {k: [e if isinstance(e, str) else dict(e) for e in v] for k, v in self.cascade.lora.items()},
        }

    @property
    def intermediate_names(self) -> list[str]:
        """What ``last_intermediates`` holds: the outputs of all stages but the last (a prefix of STAGE_ORDER), then
        ``naive`` with ``baseline_branch``."""
        names = [n for n in STAGE_ORDER if n in self.cascade.stages][:-1]
        return names + (["naive"] if self.cascade.baseline_branch else [])

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        result = self.cascade(list(prompts), list(seeds))
        outputs = {**result.intermediates, "naive": result.baseline_video}
        self.last_intermediates = {n: outputs[n] for n in self.intermediate_names}
        return result.video
