"""Prompt adherence (colour and motion) on the bundled toy data, measured before and after training."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from show1_lightning.data.toy_data import (
    TOY_COLORS,
    TOY_MOTIONS,
    TOY_SHAPES,
    color_adherence,
    motion_adherence,
    toy_caption,
)


def toy_eval_prompts(per_color: int = 2) -> list[str]:
    """``per_color`` prompts for every palette colour, cycling through shapes and motions."""
    prompts = []
    for i, color in enumerate(TOY_COLORS):
        for j in range(per_color):
            k = i * per_color + j
            prompts.append(toy_caption(color, TOY_SHAPES[k % len(TOY_SHAPES)], TOY_MOTIONS[k % len(TOY_MOTIONS)]))
    return prompts


class ToyColorAdherence(L.Callback):
    """At fit start and fit end, sample prompts naming every toy colour (shapes and motions cycled) and score
    whether each sample's dominant colour is the prompted one (chance level: 1 / number of colours) and whether
    its shape moves the prompted way (``motion_adherence``, chance 0.25). Prints and logs
    ``toy/color_adherence_<when>`` and ``toy/motion_adherence_<when>`` (``when``: before, after); the colour values
    are also kept in ``self.results`` for the entry point to report, both in ``trainer.callback_metrics``.

    Runs planned shorter than ``min_steps`` optimizer steps (``trainer.max_steps``, e.g. a ``trainer.max_steps=2``
    debug run) are not scored: a few steps leave the network at its initialisation, so both scores would be the
    untrained model's (chance) while sampling every prompt twice costs most of such a run's time. A line says so;
    ``callbacks.toy_adherence.min_steps=0`` scores them anyway. The default toy run (600 steps) is always scored.
    """

    def __init__(
        self,
        per_color: int = 2,
        seed: int = 1234,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        prompts: Sequence[str] | None = None,
        min_steps: int = 100,
    ) -> None:
        self.prompts = list(prompts) if prompts else toy_eval_prompts(per_color)
        self.seeds = [seed + i for i in range(len(self.prompts))]
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.min_steps = int(min_steps)
        self.results: dict[str, float] = {}

    def skipped(self, trainer: L.Trainer) -> bool:
        """Whether this run is too short to score (``trainer.max_steps`` < ``min_steps``; -1: no step limit)."""
        return 0 <= trainer.max_steps < self.min_steps

    @staticmethod
    def steps_note(trainer: L.Trainer, when: str) -> str:
        """After training: how many optimizer steps the score is for, and why fewer than planned (a time budget)."""
        if when != "after":
            return ""
        done, planned = trainer.global_step, trainer.max_steps
        if 0 <= planned and done < planned:
            return f" ({done} of {planned} steps: stopped early, e.g. by trainer.max_time)"
        return f" ({done} steps)"

    @rank_zero_only
    def score(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> float:
        """Generate the prompts, compute the adherence and report it under ``toy/color_adherence_<when>``."""
        videos = pl_module.generate(
            self.prompts, self.seeds, num_steps=self.num_steps, guidance_scale=self.guidance_scale
        )
        value = color_adherence(videos.float().cpu(), self.prompts)
        motion = motion_adherence(videos.float().cpu(), self.prompts)
        self.results[when] = value
        chance = 1.0 / len(TOY_COLORS)
        print(
            f"[toy] colour adherence {when} training{self.steps_note(trainer, when)}: {value:.3f} "
            f"({len(self.prompts)} prompts, chance {chance:.3f}); "
            f"motion adherence {motion:.3f} (chance {1.0 / len(TOY_MOTIONS):.3f})",
            flush=True,
        )
        metrics = {f"toy/color_adherence_{when}": value, f"toy/motion_adherence_{when}": motion}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        return value

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.skipped(trainer):
            if trainer.is_global_zero:
                print(
                    f"[toy] adherence not scored: a {trainer.max_steps}-step run is shorter than "
                    f"min_steps={self.min_steps} (its samples would be the untrained model's); "
                    "callbacks.toy_adherence.min_steps=0 scores it",
                    flush=True,
                )
            return
        self.score(trainer, pl_module, "before")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.skipped(trainer):
            self.score(trainer, pl_module, "after")
