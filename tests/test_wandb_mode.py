"""One switch takes wandb online for every entry point: the WANDB_MODE environment variable (offline when unset).

"online" needs a network, so the tests use the two modes that run here: unset (offline run files) and "disabled"
(no files): a config that forced offline (Lightning's ``WandbLogger(offline=True)`` rewrites WANDB_MODE) would give
an offline run for "disabled" too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from lightning.pytorch.loggers import WandbLogger

import generate
import train
from show1_lightning.runtime import finish_wandb
from show1_lightning.wandb_mode import wandb_mode

ROOT = Path(__file__).resolve().parents[1]
MODES = [(None, "offline"), ("disabled", "disabled")]


def _set_mode(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    """Set WANDB_MODE for a fresh wandb setup (wandb reads the environment once per process, at its setup: each
    entry point is its own process, the tests are one)."""
    import wandb

    wandb.teardown()
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)


@pytest.mark.parametrize("env, expected", MODES + [("online", "online")])
def test_wandb_mode_is_the_environment_variable_else_offline(monkeypatch, env, expected):
    import os

    _set_mode(monkeypatch, env)
    assert wandb_mode() == expected
    assert os.environ["WANDB_MODE"] == expected  # child processes (DDP ranks, jobs) see the same mode


@pytest.mark.parametrize("env, expected", MODES)
def test_train_logger_runs_in_the_wandb_mode(compose_train, tmp_path, monkeypatch, env, expected):
    _set_mode(monkeypatch, env)
    cfg = compose_train(tmp_path, "logger=wandb")
    assert "offline" not in cfg.logger.wandb  # no second switch in the config
    (wb,) = [lg for lg in train.build_loggers(cfg) if isinstance(lg, WandbLogger)]
    try:
        assert wb.experiment.settings.mode == expected
    finally:
        finish_wandb()
    assert any((tmp_path / "wandb").glob("offline-run-*")) == (expected == "offline")


def test_the_old_training_switch_fails_loudly(compose_train, tmp_path):
    with pytest.raises(ConfigCompositionException, match="offline"):
        compose_train(tmp_path, "logger=wandb", "logger.wandb.offline=false")


@pytest.mark.parametrize("env, expected", MODES)
def test_generate_run_in_the_wandb_mode(tmp_path, monkeypatch, env, expected):
    _set_mode(monkeypatch, env)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "generate", overrides=[f"paths.{k}={tmp_path}" for k in ("log_dir", "output_dir", "work_dir")]
            )
    finally:
        GlobalHydra.instance().clear()
    run = generate.start_wandb_run(cfg, tmp_path)
    try:
        assert run.settings.mode == expected
    finally:
        finish_wandb()
    assert any((tmp_path / "wandb").glob("offline-run-*")) == (expected == "offline")
