"""Fixture builders for the evaluation tests: tiny UCF-101 / MSR-VTT datasets in their official
layouts (real video files written with PyAV), tiny test-only metric networks, a folder of
generated videos, and a procedural generator. Importable as ``fixtures_eval`` (tests/ on sys.path).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from torch import nn

from evaluation.clipsim import ClipBundle, load_clip
from evaluation.generators import video_filename, write_manifest
from show1_lightning.data.video_io import write_mp4

UCF_CLASSES = ["ApplyEyeMakeup", "YoYo", "PlayingDaf"]
UCF_TRAIN_COUNTS = {"ApplyEyeMakeup": 3, "YoYo": 2, "PlayingDaf": 1}

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def pattern_frames(key: int, num_frames: int = 20, height: int = 24, width: int = 32) -> np.ndarray:
    """Deterministic moving colour pattern, uint8 ``T x H x W x 3``, different for every ``key``."""
    rng = np.random.default_rng(key)
    base = rng.integers(30, 226, size=3)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(num_frames):
        shift = (xx + yy * (key % 3 + 1) + 3 * t) % 32
        f = np.stack([np.clip(base[c] + (shift * (c + 1)) % 40 - 20, 0, 255) for c in range(3)], -1)
        frames.append(f.astype(np.uint8))
    return np.stack(frames)


def write_avi(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """Write uint8 ``T x H x W x 3`` frames as an MPEG-4 part 2 .avi (UCF-101's container)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_ucf101(root: Path, num_frames: int = 20) -> Path:
    """Tiny UCF-101 in the official layout: 3 classes, split 1, train counts 3/2/1, one test video each."""
    videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(UCF_CLASSES, 1)))
    train, test, key = [], [], 0
    for ci, cls in enumerate(UCF_CLASSES, 1):
        for g in range(UCF_TRAIN_COUNTS[cls] + 1):
            rel = f"{cls}/v_{cls}_g{g + 8:02d}_c01.avi" if g < UCF_TRAIN_COUNTS[cls] else f"{cls}/v_{cls}_g01_c01.avi"
            write_avi(videos / rel, pattern_frames(key, num_frames))
            key += 1
            (train.append(f"{rel} {ci}") if g < UCF_TRAIN_COUNTS[cls] else test.append(rel))
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    return root


MSRVTT_TEST_IDS = ["video7010", "video7011", "video7012", "video9999"]


def make_msrvtt(root: Path, num_frames: int = 20) -> Path:
    """Tiny MSR-VTT: 4 test videos (3 captions each) + 1 train video, MSRVTT_data.json layout."""
    videos = [{"category": 0, "video_id": "video0", "split": "train", "id": 0}]
    sentences = [{"caption": "a train caption", "video_id": "video0", "sen_id": 0}]
    write_mp4(root / "videos/all/video0.mp4", pattern_frames(100, num_frames), fps=25)
    sen = 1
    for k, vid in enumerate(MSRVTT_TEST_IDS):
        videos.append({"category": k, "video_id": vid, "split": "test", "id": int(vid[5:])})
        for j in range(3):
            sentences.append({"caption": f"caption {j} of {vid}", "video_id": vid, "sen_id": sen})
            sen += 1
        write_mp4(root / f"videos/all/{vid}.mp4", pattern_frames(200 + k, num_frames), fps=25)
    (root / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    return root


def make_generated_folder(root: Path, prompts: Sequence[str], seeds: Sequence[int], num_frames: int = 16) -> Path:
    """A folder of 'generated' videos (``000123.mp4`` + ``manifest.jsonl``) for the given prompts."""
    for i, seed in enumerate(seeds):
        write_mp4(root / video_filename(i), pattern_frames(1000 + seed, num_frames, 40, 64), fps=8)
    write_manifest(root, ({"index": i, "prompt": p, "seed": s} for i, (p, s) in enumerate(zip(prompts, seeds))))
    return root


class PatternGenerator:
    """Test generator: a deterministic video per (prompt, seed); counts the videos it made."""

    def __init__(
        self, num_frames: int = 16, height: int = 40, width: int = 64, name: str = "pattern", fps: float = 8.0
    ):
        self.num_frames, self.height, self.width = num_frames, height, width
        self.name, self.fps = name, fps
        self.calls = 0

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        out = []
        for p, s in zip(prompts, seeds):
            key = s * 7919 + sum(map(ord, p))
            f = pattern_frames(key, self.num_frames, self.height, self.width)
            out.append(torch.from_numpy(f).permute(3, 0, 1, 2).float() / 127.5 - 1)
        self.calls += len(prompts)
        return torch.stack(out)


class TwoStagePatternGenerator(PatternGenerator):
    """Like a two-stage cascade: its "first stage" made every second frame of the pattern (``last_intermediates``)."""

    intermediate_names = ("first",)

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        videos = super().generate(prompts, seeds)
        self.last_intermediates = {"first": videos[:, :, ::2].clone()}
        return videos


def _seeded(module: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
    """Deterministic init: weights N(0, scale^2 / fan_in), biases N(0, 0.01)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * scale / p[0].numel() ** 0.5 if p.ndim > 1 else noise * 0.1)
    return module


class TinyVideoFeatures(nn.Module):
    """Test-only FVD feature net: ``(B, 3, T, 224, 224)`` -> ``(B, 400)``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=(3, 8, 8), stride=(2, 8, 8))
        self.fc = nn.Linear(8 * 4, 400)
        _seeded(self, seed, scale=3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = nn.functional.adaptive_avg_pool3d(h, (1, 2, 2)).flatten(1)
        return self.fc(h)


class TinyClassifier(nn.Module):
    """Test-only IS classifier: ``(B, 3, 16, H, W)`` -> ``(B, 101)`` logits."""

    def __init__(self, seed: int = 0, num_classes: int = 101) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4 * 4, num_classes)
        _seeded(self, seed, scale=40.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.adaptive_avg_pool3d(x, (4, 4, 4)).flatten(1))


def tiny_clip(seed: int = 0) -> ClipBundle:
    """Test-only small random open_clip model (32 px images, 77-token text)."""
    return load_clip(model_cfg=TINY_CLIP_CFG, seed=seed)


TINY_METRICS_YAML = """\
is:
  _target_: evaluation.inception_score.InceptionScore
  classifier: {_target_: fixtures_eval.TinyClassifier, seed: 0}
  num_splits: 2
  repeats: 1
  batch_size: 4
fvd:
  _target_: evaluation.fvd.FVD
  feature_extractor: {_target_: fixtures_eval.TinyVideoFeatures, seed: 0}
  clip_length: 8
  resize: tf1_bilinear
  covariance: unbiased
  feature_batch_size: 4
clipsim:
  _target_: evaluation.clipsim.CLIPSim
  clip: {_target_: fixtures_eval.tiny_clip, seed: 0}
  scale: raw
  frame_batch_size: 16
"""


def write_tiny_metrics_conf(conf_dir: Path) -> Path:
    """Write ``<conf_dir>/eval_metrics/tiny.yaml`` (select with ``--config-dir conf_dir eval_metrics=tiny``)."""
    p = conf_dir / "eval_metrics" / "tiny.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(TINY_METRICS_YAML)
    return p


def compose_eval(env: dict, out: Path, *extra: str):
    """The `eval` config for the fixture datasets in ``env`` (root, ucf, conf) with tiny metrics and the pattern
    generator, writing to ``out``; ``extra`` overrides come last."""
    from hydra import compose, initialize_config_dir

    overrides = [
        f"hydra.searchpath=[file://{env['conf']}]",
        "eval_metrics=tiny",
        "generator=pattern",
        f"assets.ucf101_root={env['ucf']}",
        "benchmark.adapter.num_samples=6",
        "benchmark.adapter.real_clips=3",
        "benchmark.adapter.clip.frames=8",
        "generated_clip.frames=8",
        f"output_dir={out}",
        f"fvd_cache_dir={env['root'] / 'cache'}",
        "logger.wandb=false",
        "batch_size=3",
        "score_batch_size=3",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)
