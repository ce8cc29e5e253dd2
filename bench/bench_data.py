"""Data pipeline throughput vs raw PyAV decoding of the same mp4 bytes, measured in one run.

    python bench/bench_data.py --root /tmp/show1_toy --clips 256

Rows:
  raw PyAV            read the tar members, decode every frame of every mp4 to RGB, nothing else
  datamodule (wN)     VideoDataModule training batches with N DataLoader workers: resampled shards,
                      shuffle, decode of the needed frames only, resize + crop, collation
Defaults are the keyframe stage's clips (8 frames at 4 fps, 64x40) from the bundled toy dataset
(128x80, 32 frames at 16 fps); --shards points it at real shards instead.
"""

from __future__ import annotations

import argparse
import time

import torch

from show1_lightning.data.datamodule import VideoDataModule
from show1_lightning.data.shards import expand_shard_spec, read_shard_samples
from show1_lightning.data.toy_data import ensure_toy_dataset
from show1_lightning.data.video_io import decode_video


def bench_raw(urls: list[str], clips: int) -> tuple[int, int, float]:
    """(clips, frames, seconds) for reading + fully decoding ``clips`` samples."""
    t0 = time.perf_counter()
    n = frames = 0
    while n < clips:
        for url in urls:
            for sample in read_shard_samples(url):
                frames += decode_video(sample["mp4"]).num_frames
                n += 1
                if n >= clips:
                    return n, frames, time.perf_counter() - t0
    return n, frames, time.perf_counter() - t0


def bench_datamodule(urls: list[str], clips: int, workers: int, args: argparse.Namespace) -> tuple[int, int, float]:
    """(clips, frames, seconds) for ``clips`` clips of training batches (after one warm-up batch)."""
    n_batches = max(1, clips // args.batch_size)
    dm = VideoDataModule(
        train_shards=urls,
        num_frames=args.num_frames,
        target_fps=args.target_fps,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        num_workers=workers,
        epoch_length=n_batches + 1,
        shuffle_buffer=args.shuffle_buffer,
        seed=0,
    )
    it = iter(dm.train_dataloader())
    next(it)  # warm-up: worker start-up and the first shard open are not throughput
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["video"].shape[0]
    return n, n * args.num_frames, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/show1_toy", help="toy dataset folder (generated if needed)")
    ap.add_argument("--shards", default=None, help="benchmark these shards instead of the toy data")
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--target-fps", type=float, default=4.0)
    ap.add_argument("--height", type=int, default=40)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shuffle-buffer", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    urls = expand_shard_spec(args.shards) if args.shards else ensure_toy_dataset(args.root)["train"]
    rows = [("raw PyAV (all frames)", *bench_raw(urls, args.clips))]
    for w in args.workers:
        rows.append((f"datamodule (workers={w})", *bench_datamodule(urls, args.clips, w, args)))
    print(
        f"shards: {len(urls)} ({urls[0]} ...); clip: {args.num_frames} frames @ {args.target_fps} fps, "
        f"{args.width}x{args.height}, batch {args.batch_size}; torch threads 1"
    )
    print(f"| {'pipeline':<26} | {'clips':>6} | {'seconds':>8} | {'clips/s':>8} | {'frames out/s':>12} |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 14}|")
    for name, n, frames, sec in rows:
        print(f"| {name:<26} | {n:>6} | {sec:>8.2f} | {n / sec:>8.1f} | {frames / sec:>12.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
