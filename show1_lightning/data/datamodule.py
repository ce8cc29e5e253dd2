"""``VideoDataModule``: captioned video clips from webdataset tar shards, multi-node safe.

Training stream (per rank and DataLoader worker): shard URLs resampled with a seed derived from
(seed, rank, worker, epoch, resume step) -> tar members grouped into samples -> seeded shuffle buffer
(bounded in samples and in bytes) -> size/length checks before decoding -> decode only the frames needed
(fps-aware stride, random start) -> antialiased resize + centre crop, one frame at a time -> batches of
exactly ``batch_size`` built inside the worker. The loader yields exactly ``epoch_length`` batches per
rank and epoch, so DDP ranks never wait on each other at epoch end. A run resumed from a checkpoint at
global step S > 0 seeds its stream with S as well, so it continues with samples the interrupted run had
not drawn instead of replaying the stream from the start (a fresh run, S = 0, keeps its seeds).

Validation stream: shards in sorted order, sample ``i`` belongs to rank ``i % world_size``, frames
taken from the start of the clip, chunks of ``batch_size`` samples dealt round-robin to workers (the
batch order does not depend on ``num_workers``); the rank's samples are cycled so every rank yields
exactly ``val_batches`` batches.

Every sample that cannot be used is skipped and counted with its reason (:data:`SKIP_REASONS`): corrupt,
truncated, too short, too small or too large, a frame size change mid-stream, an invalid UTF-8 caption,
an unreadable tar member, or any other exception while making the clip. Every batch carries
``n_skipped`` (samples its worker dropped while assembling it) and ``skip_reasons`` (the same count split
by reason, in :data:`SKIP_REASONS` order). Configuration problems (a stale or foreign text cache) are
raised, not skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import count
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from show1_lightning.data.frame_sampling import ClipTooShortError
from show1_lightning.data.shards import decode_sampled_clip, expand_shard_spec, resize_center_crop, sample_caption
from show1_lightning.data.video_io import VideoDecodeError, to_float_video
from show1_lightning.plain import plain
from show1_lightning.ranks import launcher_ranks

log = logging.getLogger(__name__)

__all__ = ["VideoDataModule", "SkipCounter", "SKIP_REASONS", "FatalDataError", "resolve_rank"]

ShardSpec = str | Path | Sequence[str | Path] | None
# Tensors of a training batch read from a latent cache (latent_cache.LATENT_BATCH_KEYS).
_LATENT_KEYS = ("latents", "cond_latents", "latents_logvar", "cond_latents_logvar")

#: Why a sample was skipped; batches carry ``skip_reasons`` counts in this order and the stage logs
#: ``data/skipped/<reason>``.
SKIP_REASONS: tuple[str, ...] = (
    "decode",  # not a decodable video / no video stream
    "truncated",  # fewer frames than the container states, or damage mid-stream
    "too_short",  # too few frames for num_frames at the fps-derived stride
    "too_small",  # smaller side below min_side
    "too_large",  # over max_source_pixels / max_source_frames / max_sample_mb (checked before decoding)
    "resolution_change",  # the frame size changes inside the stream
    "no_video",  # the sample has no mp4 member
    "caption",  # the caption is not valid UTF-8
    "tar",  # unreadable tar member or shard
    "error",  # any other exception while making the clip
)


class FatalDataError(RuntimeError):
    """A problem with the data configuration (not with one sample): raised, never skipped."""


class SampleSkipped(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SKIP_REASONS:
            reason = "error"
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (not Python's salted ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else torchrun's env ``RANK``/``WORLD_SIZE`` (``show1_lightning.ranks``),
    else torch.distributed, else (0, 1)."""
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        return int(rank), int(world_size)
    ranks = launcher_ranks(slurm=False)
    if ranks is not None and "RANK" in os.environ:
        return ranks.rank, ranks.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SkipCounter:
    """Counts skipped samples inside one worker; batches take (and reset) the running counts."""

    def __init__(self, max_consecutive: int = 1000) -> None:
        self.pending = 0
        self.pending_reasons = [0] * len(SKIP_REASONS)
        self.consecutive = 0
        self.max_consecutive = max_consecutive
        self.reasons: Counter[str] = Counter()

    def add(self, reason: str, key: str = "?", message: str = "") -> None:
        """Count one skipped sample; raises after ``max_consecutive`` skips in a row (unusable data)."""
        if reason not in SKIP_REASONS:
            reason = "error"
        self.pending += 1
        self.pending_reasons[SKIP_REASONS.index(reason)] += 1
        self.consecutive += 1
        self.reasons[reason] += 1
        total = sum(self.reasons.values())
        # Warn about the first few per worker only; the counts travel with the batches (n_skipped, skip_reasons).
        log.log(
            logging.WARNING if total <= 20 else logging.DEBUG,
            "skipping sample %s (%s): %s",
            key,
            reason,
            message or reason,
        )
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} samples in a row could not be used (reasons so far: {dict(self.reasons)}); "
                f"last: {key}: {message or reason}. Check the shards and the num_frames/target_fps/min_side/"
                "max_source_* settings."
            )

    def skipped(self, exc: SampleSkipped, key: str = "?") -> None:
        self.add(exc.reason, key, str(exc))

    def ok(self) -> None:
        """A sample was used: resets the consecutive-skip run."""
        self.consecutive = 0

    def take(self) -> tuple[int, list[int]]:
        """(skipped since the last call, the same split by reason in SKIP_REASONS order) and reset."""
        n, reasons = self.pending, self.pending_reasons
        self.pending, self.pending_reasons = 0, [0] * len(SKIP_REASONS)
        return n, reasons

    def handler(self, exn: Exception) -> bool:
        """webdataset exception handler (unreadable tar member or truncated shard): count it and continue."""
        self.add("tar", "?", f"{type(exn).__name__}: {exn}")
        return True


class _WorkerSeed:
    """``worker_seed`` for ``wds.ResampledShards``: distinct per rank, worker and resume step, picklable."""

    def __init__(self, rank: int, start_step: int = 0) -> None:
        self.rank, self.start_step = rank, start_step

    def __call__(self) -> int:
        if self.start_step == 0:
            return self.rank * 1000 + _worker()[0]
        return _seed("shards", self.rank, _worker()[0], "resumed", self.start_step)


def _sample_bytes(sample: dict[str, Any]) -> int:
    return sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray)))


def _bounded_shuffle(
    src: Iterator[dict[str, Any]], bufsize: int, max_bytes: int, initial: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """webdataset's shuffle buffer (the same draws while the byte cap does not bind), also capped in bytes:
    raw samples hold their encoded video, so ``bufsize`` samples of long clips can take gigabytes."""
    src = iter(src)
    initial = min(initial, bufsize)
    buf: list[tuple[dict[str, Any], int]] = []
    nbytes = 0

    def add(sample: dict[str, Any]) -> None:
        nonlocal nbytes
        size = _sample_bytes(sample)
        buf.append((sample, size))
        nbytes += size

    def pick() -> dict[str, Any]:
        nonlocal nbytes
        k = rng.randint(0, len(buf) - 1)
        item = buf[k]
        buf[k] = buf[-1]
        buf.pop()
        nbytes -= item[1]
        return item[0]

    for sample in src:
        add(sample)
        if len(buf) < bufsize and nbytes < max_bytes:
            try:
                add(next(src))
            except StopIteration:
                pass
        if len(buf) >= initial or nbytes >= max_bytes:
            yield pick()
        while nbytes > max_bytes and buf:
            yield pick()
    while buf:
        yield pick()


class SampleMaker:
    """Raw sample -> training item (``__call__``, raising :class:`SampleSkipped` for a bad sample); ``make`` is the
    one skip-and-count rule every maker (video clips, cached latents) shares."""

    def __call__(self, sample: dict[str, Any], rng: random.Random | None, start: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def make(
        self, sample: dict[str, Any], rng: random.Random | None, start: int | None, counter: SkipCounter
    ) -> dict[str, Any] | None:
        """The item, or None after counting why the sample was skipped (any exception but a fatal one)."""
        key = sample.get("__key__", "?")
        try:
            item = self(sample, rng, start)
        except SampleSkipped as exc:
            counter.skipped(exc, key)
            return None
        except (FatalDataError, MemoryError):
            raise
        except Exception as exc:  # an unforeseen failure on this one sample: counted with its reason
            counter.add("error", key, f"{type(exc).__name__}: {exc}")
            return None
        counter.ok()
        return item


class _ClipMaker(SampleMaker):
    """Raw webdataset sample -> dict with the clip tensor, caption, key, stride (and text embedding).

    Raises :class:`SampleSkipped` for anything wrong with the sample, :class:`FatalDataError` for a text
    cache that does not match the data.
    """

    def __init__(
        self,
        num_frames: int,
        height: int,
        width: int,
        target_fps: float | None,
        fixed_stride: int,
        min_side: int,
        text_cache: Any | None,
        max_source_pixels: int | None = None,
        max_source_frames: int | None = None,
        max_sample_bytes: int | None = None,
    ) -> None:
        self.num_frames, self.height, self.width = num_frames, height, width
        self.target_fps, self.fixed_stride, self.min_side = target_fps, fixed_stride, min_side
        self.text_cache = text_cache
        self.max_source_pixels, self.max_source_frames = max_source_pixels, max_source_frames
        self.max_sample_bytes = max_sample_bytes

    def to_video(self, frames: Any) -> torch.Tensor:
        """uint8 T x H x W x 3 -> float C x T x height x width in [-1, 1], one frame at a time: the float32
        copy at the source resolution is one frame, not the whole clip."""
        return torch.cat(
            [
                resize_center_crop(to_float_video(frames[t : t + 1]), self.height, self.width)
                for t in range(frames.shape[0])
            ],
            dim=1,
        )

    def __call__(self, sample: dict[str, Any], rng: random.Random | None, start: int | None) -> dict[str, Any]:
        key = sample.get("__key__", "?")
        data = sample.get("mp4")
        if not data:
            raise SampleSkipped("no_video", "sample has no mp4 member")
        if self.max_sample_bytes and len(data) > self.max_sample_bytes:
            raise SampleSkipped(
                "too_large", f"{len(data)} bytes of video > max_sample_mb ({self.max_sample_bytes} bytes)"
            )
        try:
            caption = sample_caption(sample)
        except UnicodeDecodeError as exc:
            raise SampleSkipped("caption", f"caption is not valid UTF-8 ({exc})") from exc
        try:
            clip = decode_sampled_clip(
                data,
                self.num_frames,
                self.target_fps,
                rng,
                start,
                self.fixed_stride,
                max_pixels=self.max_source_pixels,
                max_frames=self.max_source_frames,
                min_side=self.min_side,
            )
        except VideoDecodeError as exc:
            raise SampleSkipped(exc.reason, str(exc)) from exc
        except ClipTooShortError as exc:
            raise SampleSkipped("too_short", str(exc)) from exc
        item = {
            "video": self.to_video(clip.frames),
            "caption": caption,
            "key": key,
            "stride": clip.stride,
            "fps": clip.source_fps / clip.stride,
            "start": clip.indices[0],
        }
        if self.text_cache is not None:
            try:
                emb, mask = self.text_cache.lookup(sample.get("__url__", ""), key, caption)
            except (KeyError, ValueError) as exc:  # missing shard or sample, stale or foreign cache
                raise FatalDataError(exc.args[0] if exc.args else str(exc)) from exc
            item["text_emb"], item["text_mask"] = emb, mask
        return item


def _collate(items: list[dict[str, Any]], skipped: tuple[int, list[int]]) -> dict[str, Any]:
    n_skipped, reasons = skipped
    batch = {
        "video": torch.stack([it["video"] for it in items]),
        "caption": [it["caption"] for it in items],
        "key": [it["key"] for it in items],
        "stride": torch.tensor([it["stride"] for it in items], dtype=torch.long),
        "fps": torch.tensor([it["fps"] for it in items], dtype=torch.float32),
        "n_skipped": torch.tensor(n_skipped, dtype=torch.long),
        "skip_reasons": torch.tensor(reasons, dtype=torch.long),
    }
    if "text_emb" in items[0]:
        batch["text_emb"] = torch.stack([it["text_emb"] for it in items]).float()
        batch["text_mask"] = torch.stack([it["text_mask"] for it in items]).bool()
    for name in _LATENT_KEYS:  # batches of a latent cache (show1_lightning.data.latent_cache)
        if name in items[0]:
            batch[name] = torch.stack([it[name] for it in items]).float()
    return batch


class _ShuffleDecodeBatch:
    """Training pipeline stage: seeded shuffle buffer, clip decoding with skip counting, batching.

    Full batches only (``partial=False``): the stream is infinite (resampled shards). ``start_step`` (the
    global step the run resumed from; 0 for a fresh run) enters every seed, so a resumed run draws new
    samples rather than replaying the ones its first run already trained on.
    """

    def __init__(
        self,
        maker: _ClipMaker,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        counter: SkipCounter,
        start_step: int = 0,
        shuffle_buffer_bytes: int = 1 << 62,
    ) -> None:
        self.maker, self.batch_size, self.shuffle_buffer = maker, batch_size, shuffle_buffer
        self.seed, self.rank, self.counter = seed, rank, counter
        self.start_step, self.shuffle_buffer_bytes = start_step, shuffle_buffer_bytes
        self.epoch = -1

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        worker, _ = _worker()
        if self.start_step == 0:
            rng = random.Random(_seed("train", self.seed, self.rank, worker, self.epoch))
        else:
            rng = random.Random(_seed("train", self.seed, self.rank, worker, self.epoch, "resumed", self.start_step))
        samples = src
        if self.shuffle_buffer > 1:
            samples = _bounded_shuffle(
                src, self.shuffle_buffer, self.shuffle_buffer_bytes, min(100, self.shuffle_buffer), rng
            )
        items: list[dict[str, Any]] = []
        for sample in samples:
            item = self.maker.make(sample, rng, None, self.counter)
            if item is None:
                continue
            items.append(item)
            if len(items) == self.batch_size:
                yield _collate(items, self.counter.take())
                items = []


class _ValStream(IterableDataset):
    """Deterministic validation batches for one rank, cycled forever (the loader cuts the epoch)."""

    def __init__(
        self, urls: list[str], maker: _ClipMaker, batch_size: int, rank: int, world_size: int, counter: SkipCounter
    ) -> None:
        super().__init__()
        self.urls, self.maker, self.batch_size = urls, maker, batch_size
        self.rank, self.world_size = rank, world_size
        self.counter = counter

    def _rank_samples(self) -> Iterator[dict[str, Any]]:
        """This rank's samples, cycled; raises when the rank has none at all."""
        for n_pass in count():
            pipe = wds.DataPipeline(
                wds.SimpleShardList(self.urls), wds.tarfile_to_samples(handler=self.counter.handler)
            )
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
                items = [it for it in (self.maker.make(s, None, 0, self.counter) for s in chunk) if it is not None]
                if items:
                    yield _collate(items, self.counter.take())
            chunk = []


class _TrainLoader(wds.WebLoader):
    """The training loader, resumable for Lightning: ``state_dict`` (saved in checkpoints) is the stream
    position, the step its seeds were derived from plus the batches served since; ``load_state_dict`` (called
    on resume before the first batch) reseeds the stream at that position. A resumed run thus continues with
    new draws, and Lightning knows that resuming mid-epoch is safe."""

    def __init__(self, dataset: Any, stream_parts: Sequence[Any], start_step: int, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._stream_parts = list(stream_parts)  # objects with a ``start_step`` (worker seed, shuffle stage)
        self._start_step = int(start_step)
        self._served = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"stream_start": self._start_step, "batches_served": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        start = int(state.get("stream_start", 0)) + int(state.get("batches_served", 0))
        if start != self._start_step:
            log.info("training stream reseeded for a resume at stream position %d", start)
        self._start_step, self._served = start, 0
        for part in self._stream_parts:
            part.start_step = start


def _warn_unfinished_datasets(urls: list[str]) -> None:
    """Warn when a shard folder's ``stats.json`` (VideoShardWriter) says its conversion did not finish."""
    for folder in sorted({os.path.dirname(u) for u in urls if "://" not in u}):
        stats = Path(folder) / "stats.json"
        if not stats.exists():
            continue
        try:
            status = json.loads(stats.read_text()).get("status", "complete")
        except (OSError, ValueError):
            continue
        if status != "complete":
            log.warning(
                "the dataset in %s is %s (stats.json): its conversion did not finish; only the shards "
                "written so far are used",
                folder,
                status,
            )


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
        shuffle_buffer_mb: and at most this many MiB of raw samples (encoded video) in it, per worker.
        seed: base seed; shuffles differ per rank, worker, epoch and resume step, and repeat for the same
            seed (a run resumed at global step S > 0 continues with new samples, not the first run's).
        text_cache_dir: folder written by ``data/precompute_text_embeddings.py``; batches then
            carry ``text_emb`` (B x L x D float) and ``text_mask`` (B x L bool).
        text_encoder_identity: the identity (``TextEncoder.identity``, printed by the precompute) of the
            encoder the cache must come from. None: the trainer's stage's text encoder; with neither, a
            text cache is refused (the check is never off by default).
        latent_cache_dir: folder written by ``data/precompute_latents.py`` (latent SR stage only): the
            training stream reads VAE latents (``latents``, ``cond_latents``) from it instead of decoding and
            encoding video; validation still reads the video shards. Checked at setup against the stage's
            VAE, sizes and this module's frame sampling (``latent_cache.LatentCache``).
        toy_root: folder of the bundled toy dataset (generated on first use).
        min_side: samples whose smaller side is below this are skipped (0: keep all).
        max_source_pixels / max_source_frames / max_sample_mb: samples whose frames have more pixels,
            that hold more frames, or whose video is larger are skipped ("too_large") before anything is
            decoded: decode memory stays below num_frames x max_source_pixels x 3 bytes (None: no cap).
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
        shuffle_buffer_mb: float = 1024,
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
        max_source_pixels: int | None = 3840 * 2160,
        max_source_frames: int | None = 36_000,
        max_sample_mb: float | None = 1024,
        latent_cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        # Plain values (not ListConfig/DictConfig/Path): the hyper-parameters go into every checkpoint.
        train_shards, val_shards = plain(train_shards), plain(val_shards)
        text_cache_dir, toy_root = plain(text_cache_dir), plain(toy_root)
        latent_cache_dir = plain(latent_cache_dir)
        for name, value in (
            ("num_frames", num_frames),
            ("height", height),
            ("width", width),
            ("batch_size", batch_size),
            ("epoch_length", epoch_length),
            ("frame_stride", frame_stride),
        ):
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
        self.shuffle_buffer_bytes = int(float(shuffle_buffer_mb) * 2**20)
        if self.shuffle_buffer_bytes <= 0:
            raise ValueError(f"shuffle_buffer_mb must be > 0, got {shuffle_buffer_mb}")
        self.max_source_pixels = int(max_source_pixels) if max_source_pixels else None
        self.max_source_frames = int(max_source_frames) if max_source_frames else None
        self.max_sample_bytes = int(float(max_sample_mb) * 2**20) if max_sample_mb else None
        self.text_cache_dir = text_cache_dir
        self.text_encoder_identity = text_encoder_identity
        self.toy_root, self.min_side = toy_root, int(min_side)
        self._rank, self._world_size = rank, world_size
        self.pin_memory = pin_memory
        self.max_consecutive_skips = int(max_consecutive_skips)
        self._train_urls: list[str] | None = None
        self._val_urls: list[str] | None = None
        self._text_cache = None
        self.latent_cache_dir = latent_cache_dir
        self._latent_cache = None
        self._latent_train_urls: list[str] | None = None

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
        _warn_unfinished_datasets(self._train_urls + self._val_urls)
        if self.text_cache_dir is not None:
            from show1_lightning.data.text_cache import TextEmbeddingCache

            cache = TextEmbeddingCache(self.text_cache_dir)
            expected = self._expected_text_identity()
            if expected is None:
                raise FatalDataError(
                    f"text_cache_dir={self.text_cache_dir} is set, but nothing says which text encoder it must come "
                    "from: set data.text_encoder_identity (the cache says "
                    f"{cache.identity!r}; the precompute prints it), "
                    "or train with the text encoder that made it"
                )
            self._text_cache = TextEmbeddingCache(self.text_cache_dir, expected_identity=expected)
        if self.latent_cache_dir is not None:
            from show1_lightning.data.latent_cache import open_for_training

            self._latent_cache = open_for_training(self, self.latent_cache_dir)
            self._latent_train_urls = self._latent_cache.shard_urls(self._train_urls)

    def _expected_text_identity(self) -> str | None:
        """``text_encoder_identity``, else the identity of the trainer's stage's text encoder."""
        if self.text_encoder_identity is not None:
            return str(self.text_encoder_identity)
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        encoder = getattr(module, "text_encoder", None)
        return getattr(encoder, "identity", None)

    def _resolved_rank(self) -> tuple[int, int]:
        if self._rank is not None or self._world_size is not None:
            return resolve_rank(
                self._rank if self._rank is not None else 0, self._world_size if self._world_size is not None else 1
            )
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return resolve_rank()

    def _maker(self) -> _ClipMaker:
        return _ClipMaker(
            self.num_frames,
            self.height,
            self.width,
            self.target_fps,
            self.frame_stride,
            self.min_side,
            self._text_cache,
            self.max_source_pixels,
            self.max_source_frames,
            self.max_sample_bytes,
        )

    def _resume_step(self) -> int:
        """The global step the trainer starts from (restored from the checkpoint before the loaders are
        requested; 0 for a fresh run or without a trainer)."""
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "global_step", 0) or 0) if trainer is not None else 0

    def _loader(
        self, dataset: IterableDataset, n_batches: int, stream_parts: Sequence[Any] = (), start_step: int | None = None
    ) -> wds.WebLoader:
        cls, extra = (
            (wds.WebLoader, {})
            if start_step is None
            else (_TrainLoader, {"stream_parts": stream_parts, "start_step": start_step})
        )
        loader = cls(
            dataset,
            **extra,
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

    def train_dataset(self, start_step: int | None = None) -> wds.DataPipeline:
        """The per-rank infinite training pipeline (batches of ``batch_size``).

        ``start_step``: the global step the stream starts at (default: the trainer's, i.e. the resumed
        checkpoint's); it seeds the stream, so a resumed run does not replay what the first run saw.
        """
        self.setup()
        rank, world_size = self._resolved_rank()
        start = self._resume_step() if start_step is None else int(start_step)
        if start:
            log.info("training stream of rank %d seeded for a resume at global step %d", rank, start)
        counter = SkipCounter(self.max_consecutive_skips)
        worker_seed = _WorkerSeed(rank, start)
        maker = self._maker() if self._latent_cache is None else self._latent_cache.maker(self._text_cache)
        urls = self._train_urls if self._latent_cache is None else self._latent_train_urls
        stage = _ShuffleDecodeBatch(
            maker,
            self.batch_size,
            self.shuffle_buffer,
            self.seed,
            rank,
            counter,
            start_step=start,
            shuffle_buffer_bytes=self.shuffle_buffer_bytes,
        )
        pipeline = wds.DataPipeline(
            wds.ResampledShards(urls, seed=self.seed, worker_seed=worker_seed, deterministic=True),
            wds.tarfile_to_samples(handler=counter.handler),
            stage,
        )
        pipeline.stream_parts = (worker_seed, stage)
        pipeline.start_step = start
        return pipeline

    def val_dataset(self) -> _ValStream:
        """The per-rank deterministic validation stream (cycled)."""
        self.setup()
        if not self._val_urls:
            raise ValueError("no validation shards: set val_shards (or toy_root)")
        rank, world_size = self._resolved_rank()
        return _ValStream(
            self._val_urls, self._maker(), self.batch_size, rank, world_size, SkipCounter(self.max_consecutive_skips)
        )

    def train_dataloader(self) -> wds.WebLoader:
        dataset = self.train_dataset()
        return self._loader(dataset, self.epoch_length, dataset.stream_parts, dataset.start_step)

    def val_dataloader(self) -> wds.WebLoader | list:
        if self.val_batches == 0:
            return []
        return self._loader(self.val_dataset(), self.val_batches)

    def null_text_embedding(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached empty-caption embedding (L x D float, L bool) for CFG dropout, or None."""
        self.setup()
        return None if self._text_cache is None else self._text_cache.null_embedding()
