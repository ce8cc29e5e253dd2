"""Zero-shot evaluation entry point (UCF-101 IS / FVD, MSR-VTT CLIPSIM / FVD).

    python evaluate.py benchmark=ucf101 generator=folder generator.root=/path/to/videos
    torchrun --nproc_per_node 8 evaluate.py benchmark=msrvtt ...

See docs/evaluation.md; the loop itself is evaluation.runner.run_evaluation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from evaluation.runner import run_evaluation


# An absolute config path: the same configs when run as a script or as a console script (show1-*).
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="eval")
def main(cfg: DictConfig) -> None:
    """Run the evaluation; exit code 3 when it stopped early (``stop_after``) and must be resumed."""
    report = run_evaluation(cfg)
    if report is None:
        sys.exit(3)


if __name__ == "__main__":
    main()
