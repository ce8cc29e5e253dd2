"""Export trained Show-1 stages as one diffusers pipeline folder (``Show1Pipeline``), optionally pushed to the Hub.

    python scripts/export_pipeline.py --out show1-toy --keyframe runs/kf/export --interpolation runs/interp/export \
        --pixel-sr runs/sr1/last.ckpt --latent-sr runs/sr2/export --report eval/report.json [--push-to-hub me/show1-toy]

The same as the ``show1-export`` console script; see ``show1_lightning/pipelines/diffusers_pipeline.py`` and
docs/pipeline.md.
"""

from __future__ import annotations

from show1_lightning.pipelines.diffusers_pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
