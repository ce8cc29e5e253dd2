"""Precompute the text embeddings of every caption in a set of shards (one file per shard).

    # real T5-XXL (e.g. the text_encoder/ + tokenizer/ folders of DeepFloyd IF or show-1-base)
    python data/precompute_text_embeddings.py --shards "/data/webvid/shards/{00000..00999}.tar" \
        --out /data/webvid/t5xxl_cache --kind t5 --pretrained-path /models/show-1-base \
        --device cuda --torch-dtype bfloat16 --batch-size 64

    # the tiny offline default (tests, toy data)
    python data/precompute_text_embeddings.py --toy-root data/toy --out data/toy_text_cache

Then set ``data.text_cache_dir`` (and, with ``text_encoder=none``, ``data.text_encoder_identity`` to the
identity printed at the end: a cache is always checked against the encoder it must come from). Resumable:
shards already in the cache with the same sample keys, captions and encoder are skipped. ``--overwrite``
re-encodes a cache made by another encoder; until it finishes, the cache claims no encoder and is refused.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from show1_lightning.data.text_cache import precompute_text_embeddings
from show1_lightning.models.text_encoder import TextEncoder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", help="brace patterns, globs or paths of tar shards")
    src.add_argument("--toy-root", type=Path, help="use the toy dataset's train + val shards (generated if needed)")
    ap.add_argument("--out", type=Path, required=True, help="cache folder")
    ap.add_argument("--kind", choices=["t5", "clip"], default="t5")
    ap.add_argument("--pretrained-path", default=None, help="local model folder; omitted: the tiny seeded default")
    ap.add_argument("--max-length", type=int, default=77)
    ap.add_argument("--seed", type=int, default=0, help="seed of the tiny default encoder")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="storage dtype")
    ap.add_argument("--torch-dtype", default=None, help="dtype to run the encoder in, e.g. bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    if args.toy_root is not None:
        from show1_lightning.data.toy_data import ensure_toy_dataset

        toy = ensure_toy_dataset(args.toy_root)
        shards = toy["train"] + toy["val"]
    else:
        shards = args.shards
    encoder = TextEncoder(
        kind=args.kind,
        pretrained_path=args.pretrained_path,
        max_length=args.max_length,
        seed=args.seed,
        torch_dtype=args.torch_dtype,
    ).to(args.device)
    t0 = time.time()
    counts = precompute_text_embeddings(
        shards,
        encoder,
        args.out,
        batch_size=args.batch_size,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=True,
    )
    print(
        f"{counts['samples']} captions in {counts['shards']} shards ({counts['computed_shards']} computed) "
        f"in {time.time() - t0:.1f}s; encoder identity: {encoder.identity}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
