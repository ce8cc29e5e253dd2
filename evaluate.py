"""Evaluation entry point (UCF-101 IS / FVD, MSR-VTT CLIPSIM / FVD, toy FVD / adherences).

    python evaluate.py benchmark=ucf101 generator=folder generator.root=/path/to/videos
    torchrun --nproc_per_node 8 evaluate.py benchmark=msrvtt ...
    python evaluate.py -m benchmark=toy generator=toy_real benchmark.adapter.num_samples=24,48   # a sweep

A sweep (-m) evaluates each job into <sweep dir>/<job number> and ends with <sweep dir>/summary.{md,json}.

See docs/evaluation.md; the loop itself is evaluation.runner.run_evaluation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from evaluation.runner import run_evaluation
from evaluation.sweep import hydra_job
from show1_lightning.fileio import atomic_write_text


# An absolute config path: the same configs when run as a script or as a console script (show1-*).
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="eval")
def main(cfg: DictConfig) -> None:
    """Run the evaluation; exit code 3 when it stopped early (``stop_after``) and must be resumed."""
    job = hydra_job()
    if job is not None and not any(o.split("=", 1)[0].lstrip("+~") == "output_dir" for o in job["overrides"]):
        with open_dict(cfg):  # a sweep: one folder per job (<sweep dir>/<job number>), never a shared one
            cfg.output_dir = job["output_dir"]
    report = run_evaluation(cfg)
    if report is None:
        sys.exit(3)
    if job is not None and report and Path(cfg.output_dir).resolve() != Path(job["output_dir"]).resolve():
        # output_dir set on the command line: the sweep summary still finds the report in the job's folder
        atomic_write_text(Path(job["output_dir"]) / "report.json", json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
