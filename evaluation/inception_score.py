"""Video Inception Score as a torchmetrics Metric (TGAN / TGANv2 recipe).

IS = exp(E_x KL(p(y|x) || p(y))), computed in float64 on class probabilities. The probabilities are
kept (cat states) together with each sample's global index, and sorted by that index before the
score is computed, so the result does not depend on how samples were spread over processes.

``repeats`` cuts the ordered samples into that many consecutive chunks (TGANv2: 10 repeats of
2048 samples, 1 split each); each chunk is cut into ``num_splits`` splits (StyleGAN-V: 10 splits of
2048 samples). One score per (repeat, split); the result is their mean and (population) std.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def inception_score_from_probs(
    probs: torch.Tensor, num_splits: int = 1, repeats: int = 1, eps: float = 1e-20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Inception Score over ``repeats x num_splits`` consecutive chunks.

    Args:
        probs: ``N x K`` class probabilities, in sample order.
        num_splits: splits per repeat.
        repeats: consecutive chunks of the samples, each scored on its own.
        eps: added to the probabilities before the logarithms (TGAN adds 1e-20).

    Returns:
        (mean, std) as float64 scalars; std is the population std (numpy's default, as TGAN).
    """
    if probs.ndim != 2:
        raise ValueError(f"expected N x K probabilities, got shape {tuple(probs.shape)}")
    n = probs.shape[0]
    if num_splits < 1 or repeats < 1:
        raise ValueError(f"num_splits and repeats must be >= 1, got {num_splits}, {repeats}")
    if n < num_splits * repeats:
        raise ValueError(f"{n} samples cannot fill {repeats} repeats x {num_splits} splits")
    p = probs.detach().to(torch.float64)
    scores = []
    for r in range(repeats):
        chunk = p[r * n // repeats : (r + 1) * n // repeats]
        m = chunk.shape[0]
        for s in range(num_splits):
            part = chunk[s * m // num_splits : (s + 1) * m // num_splits] + eps
            # xlogy: 0 * log 0 = 0, so eps = 0 is allowed.
            kl = (
                (torch.special.xlogy(part, part) - torch.special.xlogy(part, part.mean(0, keepdim=True))).sum(1).mean()
            )
            scores.append(kl.exp())
    scores_t = torch.stack(scores)
    return scores_t.mean(), scores_t.std(unbiased=False)


class InceptionScore(Metric):
    """Inception Score of videos (or of given class probabilities), exact under any sharding.

    Args:
        classifier: maps ``B x C x T x H x W`` videos in [-1, 1] to ``B x K`` logits (e.g.
            :func:`evaluation.c3d.load_c3d`). None: ``update`` takes probabilities directly.
        num_splits: splits per repeat.
        repeats: consecutive chunks scored separately (see module docstring).
        eps: added to probabilities before the logarithms.
        batch_size: videos per classifier forward pass.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        classifier: nn.Module | None = None,
        num_splits: int = 1,
        repeats: int = 1,
        eps: float = 1e-20,
        batch_size: int = 8,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.classifier = classifier.eval() if classifier is not None else None
        if self.classifier is not None:
            self.classifier.requires_grad_(False)
        self.num_splits = int(num_splits)
        self.repeats = int(repeats)
        self.eps = float(eps)
        self.batch_size = int(batch_size)
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")
        self._local_count = 0  # for updates without indices (not a synced state)

    @torch.no_grad()
    def _classify(self, videos: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, videos.shape[0], self.batch_size):
            logits = self.classifier(videos[i : i + self.batch_size].float())
            out.append(torch.softmax(logits.float(), dim=1))
        return torch.cat(out)

    def update(self, inputs: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            inputs: videos ``B x C x T x H x W`` in [-1, 1] when a classifier is set, else
                probabilities ``B x K`` (rows summing to 1).
            indices: the samples' global indices (``B``), which fix the order used by ``repeats`` and
                ``num_splits``. None: the order of ``update`` calls on this process.
        """
        if self.classifier is not None:
            if inputs.ndim != 5:
                raise ValueError(f"expected B x C x T x H x W videos, got shape {tuple(inputs.shape)}")
            with torch.autocast(device_type=inputs.device.type, enabled=False):
                probs = self._classify(inputs)
        else:
            if inputs.ndim != 2:
                raise ValueError(f"without a classifier, update takes B x K probabilities, got {tuple(inputs.shape)}")
            probs = inputs
            sums = probs.double().sum(1)
            if (probs < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                raise ValueError("probabilities must be non-negative with rows summing to 1")
        b = probs.shape[0]
        if indices is None:
            indices = torch.arange(b, device=probs.device) + self._local_count
        indices = torch.as_tensor(indices, dtype=torch.long, device=probs.device).reshape(-1)
        if indices.shape[0] != b:
            raise ValueError(f"{indices.shape[0]} indices for {b} samples")
        self._local_count += b
        self.probs.append(probs.to(torch.float64))
        self.indices.append(indices)

    def reset(self) -> None:
        """Clear the states and the local update counter."""
        super().reset()
        self._local_count = 0

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the score, float64, over samples sorted by global index."""
        if isinstance(self.probs, list) and not self.probs:
            raise RuntimeError("InceptionScore.compute() called before any update()")
        probs = dim_zero_cat(self.probs)
        idx = dim_zero_cat(self.indices)
        order = torch.argsort(idx)
        if torch.unique(idx).numel() != idx.numel():
            raise RuntimeError("duplicate sample indices in InceptionScore (a sample was counted twice)")
        return inception_score_from_probs(probs[order], self.num_splits, self.repeats, self.eps)
