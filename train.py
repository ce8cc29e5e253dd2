"""Train one Show-1 stage: `python train.py [experiment=NAME] [key=value ...]`.

The default experiment (`toy`) trains the keyframe stage on the bundled toy data on a CPU in a few
minutes and writes sample videos. See README.md for GPUs, DDP, SLURM, sweeps and resuming.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from show1_lightning.runtime import (
    ConfigError,
    find_resume_checkpoint,
    hydra_multirun_info,
    instantiate_group,
    register_resolvers,
    set_in,
    task_wrapper,
    validate_built_stage,
    validate_train_config,
    wandb_run_id,
)
from show1_lightning.stages.loading import build_stage, check_checkpoint_pickle
from show1_lightning.wandb_mode import wandb_mode

log = logging.getLogger("train")
register_resolvers()


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Build the datamodule, stage, loggers, callbacks and trainer from ``cfg`` and fit (resuming from
    the run's last.ckpt when there is one). Returns the final callback metrics."""
    validate_train_config(cfg)
    resume_from = find_resume_checkpoint(cfg)
    if resume_from:  # before anything starts: a checkpoint whose pickle would run code is refused unread
        check_checkpoint_pickle(resume_from)
    L.seed_everything(cfg.seed, workers=True)

    multirun, sweep, label = hydra_multirun_info()
    if cfg.get("logger") and cfg.logger.get("wandb"):
        if cfg.logger.wandb.get("group") is None:
            set_in(cfg, "logger.wandb.group", sweep or cfg.experiment_name)
        if multirun:
            set_in(cfg, "logger.wandb.name", f"{cfg.run_name}[{label}]")
        if cfg.logger.wandb.get("id") is None:  # continue the wandb run only when continuing its newest state
            set_in(cfg, "logger.wandb.id", wandb_run_id(cfg, resume_from))

    log.info("output dir: %s", cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    stage = build_stage(cfg.stage)  # keeps its resolved config: checkpoints and exports rebuild it from there
    validate_built_stage(stage)  # sizes against the UNet's downsampling, before any step
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = build_loggers(cfg)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    ckpt_path = find_resume_checkpoint(cfg)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    # weights_only: tensors and plain values only, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says.
    trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    for cb in callbacks:
        for when, value in getattr(cb, "results", {}).items():
            metrics[f"toy/color_adherence_{when}"] = value
    if trainer.is_global_zero:
        log.info("final metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
        log.info("outputs in %s", cfg.paths.output_dir)
    return metrics


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """The run's loggers (``cfg.logger``). wandb logs offline unless ``WANDB_MODE`` says otherwise, as in
    generate.py and evaluate.py (``show1_lightning.wandb_mode``)."""
    wandb_mode()
    return instantiate_group(cfg.get("logger"))


# An absolute config path: the same configs when run as a script or as a console script (show1-*).
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="train.yaml")
def main(cfg: DictConfig) -> float | dict[str, float] | None:
    metrics = train(cfg)
    # Returned for Hydra sweepers (e.g. optuna) that optimise a metric.
    return optimized_value(metrics, cfg.get("optimized_metric"))


def optimized_value(metrics: dict[str, float] | None, name: str | None) -> float | dict[str, float] | None:
    """What the task returns: ``metrics[name]`` as a float when ``optimized_metric`` is set (a sweeper optimises
    it), else the whole dict. None when training failed inside a multirun (the job is recorded as failed: a sweeper
    marks the trial failed). A metric that was never logged is an error naming the key and the logged ones."""
    if metrics is None or name is None:
        return metrics
    if name not in metrics:
        raise ConfigError(
            f"config error at 'optimized_metric': {name!r} was never logged in this run; logged metrics: "
            f"{sorted(metrics)} (val/fvd needs callbacks=[default,fvd])"
        )
    return float(metrics[name])


if __name__ == "__main__":
    main()
