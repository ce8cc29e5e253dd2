"""UCF-101 zero-shot text-to-video benchmark: class-name prompts, test-split real clips.

Layout read (official): ``<root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` and
``<root>/ucfTrainTestlist/{classInd.txt, trainlist0N.txt, testlist0N.txt}``. Shared machinery (prompts by
global index, real clips cut by a :class:`~evaluation.benchmarks.ClipSpec`): :mod:`evaluation.benchmarks`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.benchmarks import Benchmark, ClipSpec, PromptItem, existing_videos


def camel_to_words(name: str) -> str:
    """``ApplyEyeMakeup`` -> ``apply eye makeup``; ``YoYo`` -> ``yo yo``."""
    parts = re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", name)
    return " ".join(p.lower() for p in parts) if parts else name.lower()


def proportional_counts(weights: Sequence[int], total: int) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights`` (largest remainder; ties -> lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    if total < 0 or w.sum() <= 0:
        raise ValueError("need a non-negative total and positive weights")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts


class UCF101Benchmark(Benchmark):
    """UCF-101 zero-shot: class-name prompts drawn with the train split's class distribution.

    Args:
        root: folder holding ``UCF-101/`` and ``ucfTrainTestlist/``.
        num_samples: number of generated samples (Make-A-Video: 10,000; TGANv2: 2,048).
        split: official split number 1, 2 or 3 (``trainlist0N.txt`` / ``testlist0N.txt``).
        template: prompt template; ``{words}`` is the class name in lower-case words, ``{name}`` the
            raw class name.
        class_prompts: optional per-class sentences ``{ClassName: sentence}`` overriding the template.
        sampling: ``"proportional"`` (exact quotas by largest remainder, then a seeded shuffle),
            ``"multinomial"`` (seeded i.i.d. draws) or ``"uniform"`` (equal quotas per class, largest
            remainder, seeded shuffle: TATS's class-conditional sampling gives every class the same
            number of samples, ``scripts/sample_vqgan_transformer_short_videos.py:69-81``).
        real_split: ``"train"``, ``"test"`` or ``"all"``: which videos the FVD reference clips come from.
        real_clips: number of reference clips (None: one per video of ``real_split``).
        clip: how clips are cut (:class:`ClipSpec` or its fields).
        seed: seed of the prompt draw and of the reference clip choice.
        real_sampling: which real clips, one of :data:`REAL_SAMPLINGS`.
    """

    name = "ucf101"

    def __init__(
        self,
        root: str | Path,
        num_samples: int = 10000,
        split: int = 1,
        template: str = "{words}",
        class_prompts: Mapping[str, str] | None = None,
        sampling: str = "proportional",
        real_split: str = "train",
        real_clips: int | None = None,
        clip: ClipSpec | Mapping[str, Any] | None = None,
        seed: int = 0,
        real_sampling: str = "permutation",
    ) -> None:
        super().__init__(clip=clip, real_clips=real_clips, seed=seed, real_sampling=real_sampling)
        self.root = Path(root)
        self.video_root = self.root / "UCF-101"
        self.list_root = self.root / "ucfTrainTestlist"
        for p in (self.video_root, self.list_root):
            if not p.is_dir():
                raise FileNotFoundError(f"UCF-101: expected folder {p} (official layout, see docs/evaluation.md)")
        if split not in (1, 2, 3):
            raise ValueError(f"UCF-101 split must be 1, 2 or 3, got {split}")
        if sampling not in ("proportional", "multinomial", "uniform"):
            raise ValueError(f"sampling must be 'proportional', 'multinomial' or 'uniform', got {sampling!r}")
        if real_split not in ("train", "test", "all"):
            raise ValueError(f"real_split must be 'train', 'test' or 'all', got {real_split!r}")
        if "{words}" not in template and "{name}" not in template:
            raise ValueError(f"template must contain {{words}} or {{name}}: {template!r}")
        self.num_samples = int(num_samples)
        self.split = int(split)
        self.template = template
        self.class_prompts = dict(class_prompts or {})
        self.sampling = sampling
        self.real_split = real_split
        self.classes = self._read_classes()
        unknown = set(self.class_prompts) - set(self.classes)
        if unknown:
            raise ValueError(f"class_prompts names unknown classes: {sorted(unknown)}")
        self.train_list = self._read_list(f"trainlist{self.split:02d}.txt")
        self.test_list = self._read_list(f"testlist{self.split:02d}.txt")
        self._prompts: list[PromptItem] | None = None
        self._reference: list[Path] | None = None

    def _read_classes(self) -> list[str]:
        path = self.list_root / "classInd.txt"
        if not path.is_file():
            raise FileNotFoundError(f"UCF-101: {path} not found")
        entries = []
        for line in path.read_text().splitlines():
            if line.strip():
                idx, name = line.split()
                entries.append((int(idx), name))
        entries.sort()
        if [i for i, _ in entries] != list(range(1, len(entries) + 1)):
            raise ValueError(f"{path}: class indices must be 1..K")
        return [n for _, n in entries]

    def _read_list(self, filename: str) -> list[str]:
        """Relative video paths (``Class/v_Class_gXX_cYY.avi``) of a split list."""
        path = self.list_root / filename
        if not path.is_file():
            raise FileNotFoundError(f"UCF-101: {path} not found")
        out = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rel = line.split()[0]
            cls = rel.split("/")[0]
            if cls not in self.classes:
                raise ValueError(f"{path}: unknown class {cls!r} in line {line!r}")
            out.append(rel)
        return out

    def class_prompt(self, cls: str) -> str:
        """The prompt sentence of one class."""
        if cls in self.class_prompts:
            return self.class_prompts[cls]
        return self.template.format(words=camel_to_words(cls), name=cls)

    def class_counts(self) -> dict[str, int]:
        """Number of train-split videos per class."""
        counts = {c: 0 for c in self.classes}
        for rel in self.train_list:
            counts[rel.split("/")[0]] += 1
        return counts

    def prompts(self) -> list[PromptItem]:
        """``num_samples`` class prompts following the train split's class distribution."""
        if self._prompts is None:
            counts = np.array([self.class_counts()[c] for c in self.classes])
            rng = np.random.default_rng([self.seed, 0])
            if self.sampling in ("proportional", "uniform"):
                weights = counts if self.sampling == "proportional" else np.ones_like(counts)
                labels = np.repeat(np.arange(len(self.classes)), proportional_counts(weights, self.num_samples))
                labels = rng.permutation(labels)
            else:
                labels = rng.choice(len(self.classes), size=self.num_samples, p=counts / counts.sum())
            self._prompts = [
                PromptItem(i, self.class_prompt(self.classes[k]), self.classes[k])
                for i, k in enumerate(labels.tolist())
            ]
        return self._prompts

    def reference_videos(self) -> list[Path]:
        if self._reference is None:
            rels = {"train": self.train_list, "test": self.test_list, "all": self.train_list + self.test_list}[
                self.real_split
            ]
            paths = [self.video_root / r for r in rels]
            self._reference = existing_videos(paths, f"UCF-101 split {self.split} {self.real_split} list")
        return self._reference

    def _reference_description(self) -> str:
        return f"UCF-101 split {self.split} {self.real_split} list"

    def protocol(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "num_samples": self.num_samples,
            "num_classes": len(self.classes),
            "split": self.split,
            "prompt_distribution": (
                f"class frequencies of trainlist{self.split:02d}.txt ({len(self.train_list)} videos)"
                if self.sampling != "uniform"
                else "every class equally (TATS)"
            ),
            "sampling": self.sampling,
            "template": self.template,
            "class_prompt_overrides": self.class_prompts,
            "seed": self.seed,
            "real": self.real_protocol(),
        }
