"""``benchmark=toy``: held-out toy clips as FVD reference, their captions as prompts, and the toy adherences.

Held-out seeds. The training shards render clip ``i`` with ``seed=(GENERATOR_VERSION, 0, i)`` and the
validation shards with ``(GENERATOR_VERSION, 1, i)`` (``show1_lightning.data.toy_data._encode_clips``).
The benchmark renders with a split id of its own, :data:`TOY_SPLIT_IDS`: ``(GENERATOR_VERSION, 1000, i)``
for ``split="test"`` (the benchmark's real clips and prompts) and ``(GENERATOR_VERSION, 1001, i)`` for
``split="real2"`` (a second real set: held-out real vs real is the floor any generator is compared with).
numpy seeds a generator from the whole tuple, so the three families never share a clip.

Prompts form a balanced design over colours x shapes x motions (:func:`toy_spec`): every block of 12
consecutive samples holds each (shape, motion) pair once and each colour twice, and 72 samples hold every
combination once; so ``num_samples=48`` has each colour 8 times, each shape 16 times, each motion 12 times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from show1_lightning.data.toy_data import (
    GENERATOR_VERSION,
    TOY_COLORS,
    TOY_FPS,
    TOY_MOTIONS,
    TOY_SHAPES,
    make_toy_clip,
    toy_caption,
)

# Split ids of the held-out seed families (training uses 0, validation 1).
TOY_SPLIT_IDS: dict[str, int] = {"test": 1000, "real2": 1001}
# The toy cascade's output (keyframes -> interpolation -> super-resolution): 29 frames, 128 x 192, 16 fps.
TOY_EVAL_FRAMES, TOY_EVAL_HEIGHT, TOY_EVAL_WIDTH, TOY_EVAL_FPS = 29, 128, 192, TOY_FPS
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
    index: int, num_frames: int, height: int, width: int, split: str = "test", spec: Sequence[str] | None = None
) -> np.ndarray:
    """Held-out clip ``index`` of ``split`` as uint8 ``T x H x W x 3`` (``spec``: another (colour, shape, motion))."""
    color, shape, motion = spec if spec is not None else toy_spec(index)
    return make_toy_clip(
        color, shape, motion, seed=toy_seed(split, index), num_frames=num_frames, height=height, width=width
    )


def _to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``T x H x W x 3`` -> float ``3 x T x H x W`` in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def toy_heldout_clips(
    num_samples: int, num_frames: int, height: int, width: int, split: str = "test"
) -> tuple[torch.Tensor, list[str]]:
    """The first ``num_samples`` held-out toy clips of ``split`` and their captions.

    Args:
        num_samples: number of clips (balanced over colours x shapes x motions, see :func:`toy_spec`).
        num_frames, height, width: the clips' size (rendered at that size, not resized).
        split: ``"test"`` (the benchmark set) or ``"real2"`` (a disjoint second real set, same captions
            at the same indices).

    Returns:
        (videos, prompts): float ``B x 3 x T x H x W`` in [-1, 1] and the ``B`` captions.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    videos = torch.stack(
        [_to_float(toy_heldout_frames(i, num_frames, height, width, split)) for i in range(num_samples)]
    )
    return videos, [toy_caption(*toy_spec(i)) for i in range(num_samples)]
