"""``VideoDataModule``: captioned video clips from webdataset tar shards, multi-node safe.

Training stream (per rank and DataLoader worker): shard URLs resampled with a seed derived from
(seed, rank, worker, epoch) -> tar members grouped into samples -> seeded shuffle buffer -> decode
only the frames needed (fps-aware stride, random start) -> antialiased resize + centre crop ->
batches of exactly ``batch_size`` built inside the worker. The loader yields exactly
``epoch_length`` batches per rank and epoch, so DDP ranks never wait on each other at epoch end.

Validation stream: shards in sorted order, sample ``i`` belongs to rank ``i % world_size``, frames
taken from the start of the clip, chunks of ``batch_size`` samples dealt round-robin to workers (the
batch order does not depend on ``num_workers``); the rank's samples are cycled so every rank yields
exactly ``val_batches`` batches.

Corrupt, truncated, too-short or too-small samples are skipped and counted: every batch carries
``n_skipped``, the number of samples its worker dropped while assembling it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from itertools import count
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from show1_lightning.data.frame_sampling import ClipTooShortError
from show1_lightning.data.shards import decode_sampled_clip, expand_shard_spec, resize_center_crop, sample_caption
from show1_lightning.data.video_io import VideoDecodeError, to_float_video

log = logging.getLogger(__name__)

__all__ = ["VideoDataModule", "SkipCounter", "resolve_rank"]

ShardSpec = Union[str, Path, Sequence[Union[str, Path]], None]


class SampleSkipped(Exception):
    """A sample that cannot be used (its reason is the message); it is skipped and counted."""


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (not Python's salted ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else env ``RANK``/``WORLD_SIZE``, else torch.distributed."""
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        return int(rank), int(world_size)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SkipCounter:
    """Counts skipped samples inside one worker; batches take (and reset) the running count."""

    def __init__(self, max_consecutive: int = 1000) -> None:
        self.pending = 0
        self.consecutive = 0
        self.max_consecutive = max_consecutive
        self.reasons: Counter[str] = Counter()

    def add(self, reason: str, key: str = "?") -> None:
        """Count one skipped sample; raises after ``max_consecutive`` skips in a row (unusable data)."""
        self.pending += 1
        self.consecutive += 1
        category = reason.split(":", 1)[0]
        self.reasons[category] += 1
        total = sum(self.reasons.values())
        # Warn about the first few per worker only; the counts travel with the batches (n_skipped).
        log.log(logging.WARNING if total <= 20 else logging.DEBUG, "skipping sample %s: %s", key, reason)
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} samples in a row could not be used (reasons so far: {dict(self.reasons)}); "
                f"last: {key}: {reason}. Check the shards and the num_frames/target_fps/min_side settings."
            )

    def ok(self) -> None:
        """A sample was used: resets the consecutive-skip run."""
        self.consecutive = 0

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler (unreadable tar member or shard): count it and continue."""
        self.add(f"tar error: {type(exn).__name__}: {exn}")
        return True


class _WorkerSeed:
    """``worker_seed`` for ``wds.ResampledShards``: distinct per rank and worker, picklable."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 1000 + _worker()[0]


class _ClipMaker:
    """Raw webdataset sample -> dict with the clip tensor, caption, key, stride (and text embedding)."""

    def __init__(
        self,
        num_frames: int,
        height: int,
        width: int,
        target_fps: float | None,
        fixed_stride: int,
        min_side: int,
        text_cache: Any | None,
    ) -> None:
        self.num_frames, self.height, self.width = num_frames, height, width
        self.target_fps, self.fixed_stride, self.min_side = target_fps, fixed_stride, min_side
        self.text_cache = text_cache

    def __call__(self, sample: dict[str, Any], rng: random.Random | None, start: int | None) -> dict[str, Any]:
        key = sample.get("__key__", "?")
        data = sample.get("mp4")
        if not data:
            raise SampleSkipped("no video: sample has no mp4 member")
        try:
            clip = decode_sampled_clip(data, self.num_frames, self.target_fps, rng, start, self.fixed_stride)
        except VideoDecodeError as exc:
            raise SampleSkipped(f"decode error: {exc}") from exc
        except ClipTooShortError as exc:
            raise SampleSkipped(f"too short: {exc}") from exc
        h, w = clip.frames.shape[1:3]
        if min(h, w) < self.min_side:
            raise SampleSkipped(f"too small: {w}x{h} < min_side {self.min_side}")
        video = resize_center_crop(to_float_video(clip.frames), self.height, self.width)
        item = {
            "video": video,
            "caption": sample_caption(sample),
            "key": key,
            "stride": clip.stride,
            "fps": clip.source_fps / clip.stride,
        }
        if self.text_cache is not None:
            emb, mask = self.text_cache.lookup(sample.get("__url__", ""), key)
            item["text_emb"], item["text_mask"] = emb, mask
        return item


def _collate(items: list[dict[str, Any]], n_skipped: int) -> dict[str, Any]:
    batch = {
        "video": torch.stack([it["video"] for it in items]),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "stride": torch.tensor([it["stride"] for it in items], dtype=torch.long),
        "fps": torch.tensor([it["fps"] for it in items], dtype=torch.float32),
        "n_skipped": torch.tensor(n_skipped, dtype=torch.long),
    }
    if "text_emb" in items[0]:
        batch["text_emb"] = torch.stack([it["text_emb"] for it in items]).float()
        batch["text_mask"] = torch.stack([it["text_mask"] for it in items]).bool()
    return batch


class _ShuffleDecodeBatch:
    """Training pipeline stage: seeded shuffle buffer, clip decoding with skip counting, batching.

    Full batches only (``partial=False``): the stream is infinite (resampled shards).
    """

    def __init__(self, maker: _ClipMaker, batch_size: int, shuffle_buffer: int, seed: int, rank: int,
                 counter: SkipCounter) -> None:
        self.maker, self.batch_size, self.shuffle_buffer = maker, batch_size, shuffle_buffer
        self.seed, self.rank, self.counter = seed, rank, counter
        self.epoch = -1

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        worker, _ = _worker()
        rng = random.Random(_seed("train", self.seed, self.rank, worker, self.epoch))
        samples = src
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(src)
        items: list[dict[str, Any]] = []
        for sample in samples:
            try:
                items.append(self.maker(sample, rng, None))
            except SampleSkipped as exc:
                self.counter.add(str(exc), sample.get("__key__", "?"))
                continue
            self.counter.ok()
            if len(items) == self.batch_size:
                yield _collate(items, self.counter.take())
                items = []


class _ValStream(IterableDataset):
    """Deterministic validation batches for one rank, cycled forever (the loader cuts the epoch)."""

    def __init__(self, urls: list[str], maker: _ClipMaker, batch_size: int, rank: int, world_size: int,
                 counter: SkipCounter) -> None:
        super().__init__()
        self.urls, self.maker, self.batch_size = urls, maker, batch_size
        self.rank, self.world_size = rank, world_size
        self.counter = counter

    def _rank_samples(self) -> Iterator[dict[str, Any]]:
        """This rank's samples, cycled; raises when the rank has none at all."""
        for n_pass in count():
            pipe = wds.DataPipeline(wds.SimpleShardList(self.urls), wds.tarfile_to_samples(handler=self.counter.handler))
            n = 0
            for i, sample in enumerate(pipe):
                if i % self.world_size == self.rank:
                    n += 1
                    yield sample
            if n == 0:
                raise ValueError(
                    f"validation rank {self.rank}/{self.world_size} has no samples in {len(self.urls)} shard(s)"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        chunk: list[dict[str, Any]] = []
        chunk_index = 0
        for sample in self._rank_samples():
            chunk.append(sample)
            if len(chunk) < self.batch_size:
                continue
            mine = chunk_index % num_workers == worker
            chunk_index += 1
            if mine:
                items = []
                for s in chunk:
                    try:
                        items.append(self.maker(s, None, 0))
                        self.counter.ok()
                    except SampleSkipped as exc:
                        self.counter.add(str(exc), s.get("__key__", "?"))
                if items:
                    yield _collate(items, self.counter.take())
            chunk = []


class VideoDataModule(L.LightningDataModule):
    """Captioned video clips from tar shards (video2dataset layout) for every stage of the cascade.

    Args:
        train_shards / val_shards: brace pattern (``dir/{00000..00099}.tar``), glob, path or list;
            None: use the toy dataset's (``toy_root`` must then be set).
        num_frames: frames per clip.
        target_fps: frame rate of the sampled clips (stride = round(source_fps / target_fps));
            None: a fixed ``frame_stride`` (default 1).
        height / width: output size (resize so the clip covers it, then centre crop).
        batch_size: clips per batch (per rank).
        num_workers: DataLoader workers per rank (0: decode in the main process).
        epoch_length: training batches per epoch and rank (exact, on every rank).
        val_batches: validation batches per rank (exact, on every rank).
        shuffle_buffer: samples in the training shuffle buffer (<= 1: no shuffling).
        seed: base seed; shuffles differ per rank, worker and epoch, and repeat for the same seed.
        text_cache_dir: folder written by ``data/precompute_text_embeddings.py``; batches then
            carry ``text_emb`` (B x L x D float) and ``text_mask`` (B x L bool).
        text_encoder_identity: the configured encoder's ``TextEncoder.identity``; when given, a cache
            made by another encoder is an error.
        toy_root: folder of the bundled toy dataset (generated on first use).
        min_side: samples whose smaller side is below this are skipped (0: keep all).
        frame_stride: the stride used when ``target_fps`` is None.
        rank / world_size: override the distributed rank (default: the trainer's, else env
            RANK/WORLD_SIZE, else torch.distributed, else 0/1).
        pin_memory: DataLoader ``pin_memory``.
        max_consecutive_skips: a worker that skips this many samples in a row raises (the data or
            the clip settings are unusable) instead of looping forever.
    """

    def __init__(
        self,
        train_shards: ShardSpec = None,
        val_shards: ShardSpec = None,
        num_frames: int = 8,
        target_fps: float | None = None,
        height: int = 40,
        width: int = 64,
        batch_size: int = 4,
        num_workers: int = 0,
        epoch_length: int = 100,
        val_batches: int = 2,
        shuffle_buffer: int = 256,
        seed: int = 0,
        text_cache_dir: str | Path | None = None,
        text_encoder_identity: str | None = None,
        toy_root: str | Path | None = None,
        min_side: int = 0,
        frame_stride: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
        max_consecutive_skips: int = 1000,
    ) -> None:
        super().__init__()
        for name, value in (("num_frames", num_frames), ("height", height), ("width", width),
                            ("batch_size", batch_size), ("epoch_length", epoch_length), ("frame_stride", frame_stride)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0 or val_batches < 0:
            raise ValueError("num_workers and val_batches must be >= 0")
        if target_fps is not None and target_fps <= 0:
            raise ValueError(f"target_fps must be > 0 or None, got {target_fps}")
        if train_shards is None and toy_root is None:
            raise ValueError("give train_shards, or toy_root to use the bundled toy dataset")
        self.save_hyperparameters(logger=False)
        self.train_shards, self.val_shards = train_shards, val_shards
        self.num_frames, self.target_fps, self.frame_stride = int(num_frames), target_fps, int(frame_stride)
        self.height, self.width = int(height), int(width)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.epoch_length, self.val_batches = int(epoch_length), int(val_batches)
        self.shuffle_buffer, self.seed = int(shuffle_buffer), int(seed)
        self.text_cache_dir = text_cache_dir
        self.text_encoder_identity = text_encoder_identity
        self.toy_root, self.min_side = toy_root, int(min_side)
        self._rank, self._world_size = rank, world_size
        self.pin_memory = pin_memory
        self.max_consecutive_skips = int(max_consecutive_skips)
        self._train_urls: list[str] | None = None
        self._val_urls: list[str] | None = None
        self._text_cache = None

    # -- setup -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the toy dataset (once per node; concurrent calls are safe)."""
        if self.toy_root is not None:
            from show1_lightning.data.toy_data import ensure_toy_dataset

            ensure_toy_dataset(self.toy_root)

    def setup(self, stage: str | None = None) -> None:
        """Resolve shard lists (toy data when none is given) and open the text cache."""
        if self._train_urls is not None:
            return
        toy = None
        if self.toy_root is not None and (self.train_shards is None or self.val_shards is None):
            from show1_lightning.data.toy_data import ensure_toy_dataset

            toy = ensure_toy_dataset(self.toy_root)
        train = self.train_shards if self.train_shards is not None else toy["train"]
        val = self.val_shards if self.val_shards is not None else (toy["val"] if toy else None)
        self._train_urls = expand_shard_spec(train)
        self._val_urls = sorted(expand_shard_spec(val)) if val is not None else []
        for url in self._train_urls + self._val_urls:
            if "://" not in url and not Path(url).exists():
                raise FileNotFoundError(f"shard not found: {url}")
        if self.text_cache_dir is not None:
            from show1_lightning.data.text_cache import TextEmbeddingCache

            self._text_cache = TextEmbeddingCache(self.text_cache_dir, expected_identity=self.text_encoder_identity)

    def _resolved_rank(self) -> tuple[int, int]:
        if self._rank is not None or self._world_size is not None:
            return resolve_rank(self._rank if self._rank is not None else 0,
                                self._world_size if self._world_size is not None else 1)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return resolve_rank()

    def _maker(self) -> _ClipMaker:
        return _ClipMaker(self.num_frames, self.height, self.width, self.target_fps, self.frame_stride,
                          self.min_side, self._text_cache)

    def _loader(self, dataset: IterableDataset, n_batches: int) -> wds.WebLoader:
        loader = wds.WebLoader(
            dataset,
            batch_size=None,  # batches are built inside the workers
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )
        # Exactly n_batches per epoch on every rank; __len__ lets Lightning size the epoch.
        return loader.with_epoch(n_batches).with_length(n_batches, silent=True)

    # -- loaders ---------------------------------------------------------------------------------
    @property
    def train_urls(self) -> list[str]:
        self.setup()
        return list(self._train_urls)

    @property
    def val_urls(self) -> list[str]:
        self.setup()
        return list(self._val_urls)

    def train_dataset(self) -> wds.DataPipeline:
        """The per-rank infinite training pipeline (batches of ``batch_size``)."""
        self.setup()
        rank, world_size = self._resolved_rank()
        counter = SkipCounter(self.max_consecutive_skips)
        return wds.DataPipeline(
            wds.ResampledShards(self._train_urls, seed=self.seed, worker_seed=_WorkerSeed(rank), deterministic=True),
            wds.tarfile_to_samples(handler=counter.handler),
            _ShuffleDecodeBatch(self._maker(), self.batch_size, self.shuffle_buffer, self.seed, rank, counter),
        )

    def val_dataset(self) -> _ValStream:
        """The per-rank deterministic validation stream (cycled)."""
        self.setup()
        if not self._val_urls:
            raise ValueError("no validation shards: set val_shards (or toy_root)")
        rank, world_size = self._resolved_rank()
        return _ValStream(self._val_urls, self._maker(), self.batch_size, rank, world_size,
                          SkipCounter(self.max_consecutive_skips))

    def train_dataloader(self) -> wds.WebLoader:
        return self._loader(self.train_dataset(), self.epoch_length)

    def val_dataloader(self) -> wds.WebLoader | list:
        if self.val_batches == 0:
            return []
        return self._loader(self.val_dataset(), self.val_batches)

    def null_text_embedding(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached empty-caption embedding (L x D float, L bool) for CFG dropout, or None."""
        self.setup()
        return None if self._text_cache is None else self._text_cache.null_embedding()
