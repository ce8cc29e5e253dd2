"""Shared fixtures: tiny composed training configs on the bundled toy data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
# One thread: much faster for the tiny networks of the tests on a shared 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Overrides that make the default experiment take seconds: 2 steps, tiny batches, 2 sampling steps.
TINY_TRAIN = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.epoch_length=2",
    "data.val_batches=1",
    "stage.sampling.num_steps=2",
    "callbacks.samples.every_n_steps=0",
    "callbacks.toy_adherence.per_color=1",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "logger=csv",
]


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir shared by the session's tests (the toy dataset is generated once into it)."""
    return tmp_path_factory.mktemp("data")


def compose_config(data_dir: Path, output_dir: Path, *overrides: str, tiny: bool = True) -> DictConfig:
    """The composed `train` config as `python train.py [overrides]` would see it, with the toy data under
    ``data_dir`` and outputs under ``output_dir`` (``tiny``: prepend TINY_TRAIN)."""
    import train  # noqa: F401  (registers the OmegaConf resolvers)

    GlobalHydra.instance().clear()
    args = (TINY_TRAIN if tiny else []) + [f"paths.data_dir={data_dir}"] + list(overrides)
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=args)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.work_dir = str(ROOT)
    return cfg


@pytest.fixture
def compose_train(toy_data_dir: Path) -> Callable[..., DictConfig]:
    """compose_train(output_dir, *overrides, tiny=True) -> the composed `train` config."""

    def _compose(output_dir: Path, *overrides: str, tiny: bool = True) -> DictConfig:
        return compose_config(toy_data_dir, output_dir, *overrides, tiny=tiny)

    return _compose
