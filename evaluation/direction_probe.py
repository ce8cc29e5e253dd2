"""Does the direction word move the shape? The toy motion probe with the noise held fixed.

:func:`~show1_lightning.data.toy_data.motion_adherence` over a prompt list scores each prompt with its own seed, so a
generator whose motion is set by its noise alone scores chance (0.25) and a lucky seed list can score above it. This
probe asks the question directly: every seed is sampled four times, with the four captions that differ only in the
direction word (``"a red circle moving left"``, ``... right``, ``up``, ``down``). A generator that follows the word
moves the shape four ways for one seed (``word_sensitivity`` 1, ``adherence`` 1, the mean displacement of each word
pointing its way); one that ignores it moves the shape the same way four times (``word_sensitivity`` 0, adherence
exactly 0.25, the four mean displacements equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from show1_lightning.data.toy_data import (
    TOY_COLORS,
    TOY_MOTIONS,
    TOY_SHAPES,
    displacement_direction,
    motion_displacement,
    toy_caption,
)

__all__ = ["DirectionSwapReport", "direction_swap", "stage_generator"]


@dataclass
class DirectionSwapReport:
    """What :func:`direction_swap` measured.

    Attributes:
        adherence: fraction of the ``4 x seeds`` videos that move the way their caption says.
        word_sensitivity: fraction of seeds whose measured direction is not the same for all four words.
        mean_displacement: per direction word, the mean ``(dx, dy)`` of its videos as fractions of the frame side
            (x to the right, y down; videos without a measurable shape left out).
        measured: per seed, the direction measured for each word (in ``TOY_MOTIONS`` order; None: no clear motion).
    """

    adherence: float
    word_sensitivity: float
    mean_displacement: dict[str, tuple[float, float]]
    measured: list[list[str | None]]

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    def table(self) -> str:
        """The per-word rows as a markdown table, then the two summary figures."""
        rows = ["| word | mean dx | mean dy | moved its way |", "|---|---|---|---|"]
        for j, word in enumerate(TOY_MOTIONS):
            dx, dy = self.mean_displacement[word]
            hits = sum(m[j] == word for m in self.measured)
            rows.append(f"| {word} | {dx:+.3f} | {dy:+.3f} | {hits}/{len(self.measured)} |")
        rows.append("")
        rows.append(
            f"adherence {self.adherence:.3f} (chance 0.25); the direction changed with the word for "
            f"{self.word_sensitivity:.2f} of the seeds"
        )
        return "\n".join(rows)


def direction_swap(
    generate: Callable[[list[str], list[int]], torch.Tensor],
    num_seeds: int = 12,
    first_seed: int = 7000,
    batch_words: bool = True,
) -> DirectionSwapReport:
    """Sample every seed with the four direction words and measure how the shape moves.

    Args:
        generate: ``(prompts, seeds) -> B x 3 x T x H x W`` videos in [-1, 1] (a stage's or an evaluation
            generator's ``generate``).
        num_seeds: seeds ``first_seed .. first_seed + num_seeds - 1``; seed ``i`` uses colour ``i mod 6`` and
            shape ``(i // 6) mod 3``, so twelve seeds cover every colour twice.
        batch_words: the four captions of a seed in one call (else one call per video).
    """
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
    colors = list(TOY_COLORS)
    measured: list[list[str | None]] = []
    moves: dict[str, list[tuple[float, float]]] = {w: [] for w in TOY_MOTIONS}
    for i in range(num_seeds):
        color, shape = colors[i % len(colors)], TOY_SHAPES[(i // len(colors)) % len(TOY_SHAPES)]
        prompts = [toy_caption(color, shape, word) for word in TOY_MOTIONS]
        seeds = [first_seed + i] * len(prompts)
        if batch_words:
            videos = generate(prompts, seeds)
        else:
            videos = torch.cat([generate([p], [s]) for p, s in zip(prompts, seeds)])
        if videos.ndim != 5 or videos.shape[0] != len(prompts):
            raise ValueError(f"generate returned shape {tuple(videos.shape)} for {len(prompts)} prompts")
        row = []
        for word, video in zip(TOY_MOTIONS, videos):
            moved = motion_displacement(video)  # once per video: the direction follows from it
            if moved is not None:
                moves[word].append(moved)
            row.append(displacement_direction(moved))
        measured.append(row)
    hits = sum(m == w for row in measured for m, w in zip(row, TOY_MOTIONS))
    mean = {
        w: tuple(float(v) for v in torch.tensor(d).mean(0)) if d else (float("nan"), float("nan"))
        for w, d in moves.items()
    }
    return DirectionSwapReport(
        adherence=hits / (len(TOY_MOTIONS) * num_seeds),
        word_sensitivity=sum(len(set(row)) > 1 for row in measured) / num_seeds,
        mean_displacement=mean,
        measured=measured,
    )


def stage_generator(stage: Any, **sampling: Any) -> Callable[[list[str], list[int]], torch.Tensor]:
    """A keyframe stage's ``generate`` with fixed sampling options, under ``torch.no_grad``."""

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return stage.generate(prompts, seeds, **sampling).clamp(-1, 1).cpu()

    return generate
