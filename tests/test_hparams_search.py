"""`train.py -m hparams_search=toy_optuna`: Hydra's Optuna sweeper over the toy keyframe stage, optimising val/fvd."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_TRAIN
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf


def test_toy_optuna_config_composes_the_search():
    """The search config: the FVD callback on, val/fvd minimised, the Optuna sweeper with its search space."""
    import train  # noqa: F401  (registers the OmegaConf resolvers)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=["hparams_search=toy_optuna"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    assert cfg.optimized_metric == "val/fvd"
    assert cfg.callbacks.fvd._target_ == "evaluation.train_callbacks.TrainingFVD"
    assert cfg.callbacks.toy_adherence is not None  # the toy experiment's callbacks stay
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == {"stage.optimizer.lr", "stage.sampling.guidance_scale"}
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


@pytest.mark.slow
def test_optuna_sweep_two_trials_writes_best_value(tmp_path: Path):
    """Two trials at the tiniest sizes as a user runs them (a subprocess: Hydra's sweeper and launcher); the sweeper
    writes optimization_results.yaml with the best trial's lr / guidance and its val/fvd, and each trial's job dir
    has its checkpoint."""
    args = [a for a in TINY_TRAIN if a != "callbacks.toy_adherence.per_color=1"] + [
        "hparams_search=toy_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "callbacks.toy_adherence=null",
        "callbacks.samples.at_fit_end=false",
        "callbacks.fvd.num_clips=2",
        "callbacks.fvd.num_steps=2",
        "callbacks.fvd.clip_length=9",
        f"callbacks.fvd.cache_dir={tmp_path / 'cache'}",
    ]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.name == "optuna"
    assert math.isfinite(float(results.best_value)) and float(results.best_value) > 0
    assert 5e-4 <= float(results.best_params["stage.optimizer.lr"]) <= 5e-3
    assert float(results.best_params["stage.sampling.guidance_scale"]) in (2.0, 4.0, 7.0)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").exists()
    # The best value is one of the trials' val/fvd (each trial logged it to its CSV metrics).
    logged = []
    for job in jobs:
        (csv,) = list(job.rglob("metrics.csv"))
        header, *rows = csv.read_text().splitlines()
        col = header.split(",").index("val/fvd")
        logged += [float(r.split(",")[col]) for r in rows if r.split(",")[col]]
    assert float(results.best_value) == pytest.approx(min(logged), rel=1e-6)
