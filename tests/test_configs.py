"""The Hydra configs compose as documented: every experiment alone and with the debug / callbacks variants, the
stage configs share one diffusion base and restate none of it, one Show-1 model node serves every released config,
and gradient checkpointing has one switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose_config
from omegaconf import DictConfig, OmegaConf

from show1_lightning.runtime import instantiate_group, validate_train_config

CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.endswith("_base"))
PAPER = [e for e in EXPERIMENTS if e.startswith("paper_")]
TOY = [e for e in EXPERIMENTS if e.startswith("toy")]
STAGES = ["keyframe", "interpolation", "pixel_sr", "latent_sr"]
# Callbacks that sample, measure or export: what a debug run must not spend its time on.
HEAVY_CALLBACKS = ("samples", "toy_adherence", "export", "fvd")
# The released config each paper experiment builds (model=show1 model.config=...).
RELEASED = {
    "paper_keyframe": "show-1-base",
    "paper_interpolation": "show-1-interpolation",
    "paper_pixel_sr": "show-1-sr1",
    "paper_latent_sr": "show-1-sr2",
}


def _compose(tmp_path: Path, *overrides: str) -> DictConfig:
    return compose_config(tmp_path / "data", tmp_path / "out", *overrides, tiny=False)


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf of a plain (YAML-loaded) mapping."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def test_the_experiment_list_is_what_the_readme_promises():
    assert set(PAPER) == set(RELEASED) and {"toy", "toy_interpolation", "toy_pixel_sr", "toy_latent_sr"} <= set(TOY)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_has_every_base_key_and_restates_none_of_its_values(tmp_path, stage):
    base = _leaves(yaml.safe_load((CONF / "stage" / "diffusion_base.yaml").read_text()))
    own = yaml.safe_load((CONF / "stage" / f"{stage}.yaml").read_text())
    assert own["defaults"][0] == "diffusion_base" and own["defaults"][-1] == "_self_"
    restated = {
        k: v for k, v in _leaves({k: v for k, v in own.items() if k != "defaults"}).items() if base.get(k, ...) == v
    }
    assert not restated, f"conf/stage/{stage}.yaml repeats diffusion_base.yaml: {restated}"
    cfg = _compose(tmp_path, f"stage={stage}")
    composed = _leaves(OmegaConf.to_container(cfg.stage, resolve=False))
    assert set(base) <= set(composed), sorted(set(base) - set(composed))
    assert cfg.stage._target_.startswith("show1_lightning.stages.")
    assert not OmegaConf.missing_keys(cfg.stage.sampling), "a stage must set its sampling steps and guidance"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds_its_callbacks_with_the_cadence_it_sets(tmp_path, experiment):
    cfg = _compose(tmp_path, f"experiment={experiment}")
    assert cfg.experiment_name == experiment
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == cfg.checkpoint_every_n_steps
    if cfg.callbacks.samples is not None:
        assert cfg.callbacks.samples.every_n_steps == cfg.sample_every_n_steps
        assert list(cfg.callbacks.samples.prompts) == list(cfg.sample_prompts)
        assert cfg.callbacks.samples.fps == cfg.data.target_fps
    if experiment in TOY:
        validate_train_config(cfg)
    # One gradient-checkpointing switch: the stage's.
    assert "gradient_checkpointing" in cfg.stage and "gradient_checkpointing" not in cfg.model


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_experiment_builds_its_released_config_through_the_one_show1_node(tmp_path, experiment):
    cfg = _compose(tmp_path, f"experiment={experiment}")
    assert cfg.model._target_.endswith("build_show1_unet") and cfg.model.config == RELEASED[experiment]
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.data._target_.endswith("VideoDataModule") and "paper" in cfg.tags


def test_model_nodes_have_no_gradient_checkpointing_key():
    for path in (CONF / "model").glob("*.yaml"):
        assert "gradient_checkpointing" not in yaml.safe_load(path.read_text()), path.name


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_callbacks_none_composes_with_every_experiment(tmp_path, experiment):
    cfg = _compose(tmp_path, f"experiment={experiment}", "callbacks=none")
    names = {k for k, v in cfg.callbacks.items() if v is not None}
    assert names <= {"toy_adherence"}, names  # only an experiment's own callback
    assert len(instantiate_group(cfg.callbacks)) == len(names)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("callbacks", ["default", "[default,fvd]", "none"])
def test_debug_fdr_is_one_batch_without_sampling_adherence_export_or_fvd(tmp_path, experiment, callbacks):
    cfg = _compose(tmp_path, f"experiment={experiment}", f"callbacks={callbacks}", "debug=fdr")
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.max_steps == 1
    assert all(cfg.callbacks.get(name) is None for name in HEAVY_CALLBACKS)
    if experiment in TOY:
        validate_train_config(cfg)
        built = instantiate_group(cfg.callbacks)
        assert not [cb for cb in built if "Sample" in type(cb).__name__ or "Export" in type(cb).__name__]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("debug", ["limit", "overfit"])
def test_debug_limit_and_overfit_compose_with_every_experiment(tmp_path, experiment, debug):
    cfg = _compose(tmp_path, f"experiment={experiment}", f"debug={debug}")
    assert cfg.data.num_workers == 0 and cfg.trainer.max_steps <= 200
    if experiment in TOY:
        validate_train_config(cfg)
