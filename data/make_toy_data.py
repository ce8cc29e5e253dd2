"""Generate the bundled toy dataset (coloured shapes moving over grey textures) into a folder.

    python data/make_toy_data.py --root data/toy

Prints the shard lists to put in a data config (``train_shards`` / ``val_shards``), or simply set
``toy_root`` in the datamodule config and it is generated on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from show1_lightning.data.toy_data import ensure_toy_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--num-train", type=int, default=512)
    ap.add_argument("--num-val", type=int, default=64)
    ap.add_argument("--samples-per-shard", type=int, default=64)
    args = ap.parse_args(argv)
    t0 = time.time()
    shards = ensure_toy_dataset(args.root, args.num_train, args.num_val, args.samples_per_shard)
    print(json.dumps(shards, indent=1))
    print(f"ready in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
