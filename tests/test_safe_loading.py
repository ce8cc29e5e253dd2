"""Checkpoints and exports are untrusted input: a pickle that would run code, or a stored config naming a
``_target_`` outside the project's stage targets, is refused by every entry point without running anything.

Each crafted file's payload would create a marker file; every test asserts the refusal message and that the
marker does not exist afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from show1_lightning.pipelines.cascade import Show1Cascade, load_stage
from show1_lightning.stages.loading import (
    ALLOWED_TARGETS,
    UnsafeCheckpointError,
    check_stage_config,
    load_stage_from_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class _Payload:
    """Pickles as ``exec(<code that creates the marker>)``: runs on any unrestricted unpickling."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like a train.py checkpoint but whose pickle runs code when loaded."""
    torch.save(
        {
            "state_dict": {"w": torch.zeros(2)},
            "stage_config": {"_target_": "x"},
            "global_step": 1,
            "pytorch-lightning_version": "2.6.6",
            "loops": {},
            "hyper_parameters": _Payload(marker),
        },
        path,
    )
    return path


def _env() -> dict[str, str]:
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD would switch torch.load's default to unsafe unpickling: the entry points
    # must refuse anyway (they pass weights_only=True explicitly and check the pickle before loading).
    return dict(
        os.environ,
        PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        HYDRA_FULL_ERROR="1",
        TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
    )


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def test_the_crafted_pickle_really_runs_code_when_loaded_unsafely(tmp_path):
    # The control: the crafted file is live, so the refusals below are meaningful.
    marker = tmp_path / "control_marker"
    ckpt = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(ckpt, weights_only=False)
    assert marker.read_text() == "pwned"


def test_load_stage_from_checkpoint_refuses_a_code_running_pickle(tmp_path):
    marker = tmp_path / "marker"
    ckpt = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil\.ckpt.*builtins\.exec"):
        load_stage_from_checkpoint(ckpt)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_stage(ckpt)  # the cascade's loader
    assert not marker.exists()


# The entry point's subprocess (~15 s): load_stage's refusal, which it calls, is tested in-process above.
@pytest.mark.slow
def test_generate_py_refuses_a_code_running_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    ckpt = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    res = _run(
        [
            "generate.py",
            f"stages.keyframe={ckpt}",
            "stages.interpolation=null",
            "stages.pixel_sr=null",
            "stages.latent_sr=null",
            "logger.wandb=false",
            f"output_dir={tmp_path / 'out'}",
            "device=cpu",
        ]
    )
    assert res.returncode != 0
    assert "UnsafeCheckpointError" in res.stderr and "refusing to load" in res.stderr, res.stderr[-3000:]
    assert not marker.exists()


# The entry point's subprocess (~15 s): load_stage's refusal, which it calls, is tested in-process above.
@pytest.mark.slow
def test_evaluate_py_cascade_generator_refuses_a_code_running_checkpoint(tmp_path):
    import fixtures_eval as fx

    msr = fx.make_msrvtt(tmp_path / "msr", num_frames=12)
    conf = tmp_path / "conf"
    fx.write_tiny_metrics_conf(conf)
    marker = tmp_path / "marker"
    ckpt = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    res = _run(
        [
            "evaluate.py",
            "--config-dir",
            str(conf),
            "benchmark=msrvtt",
            "eval_metrics=tiny",
            f"assets.msrvtt_root={msr}",
            "benchmark.adapter.expected_videos=4",
            "generator=cascade",
            f"generator.keyframe={ckpt}",
            f"output_dir={tmp_path / 'out'}",
            "fvd_cache_dir=null",
            "logger.wandb=false",
            "device=cpu",
        ]
    )
    assert res.returncode != 0
    assert "UnsafeCheckpointError" in res.stderr and "refusing to load" in res.stderr, res.stderr[-3000:]
    assert not marker.exists()


def test_train_py_ckpt_path_refuses_a_code_running_checkpoint(tmp_path):
    from tests.conftest import TINY_TRAIN

    marker = tmp_path / "marker"
    ckpt = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    res = _run(
        [
            "train.py",
            *[a for a in TINY_TRAIN if not a.startswith("logger=")],
            "logger=csv",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"ckpt_path={ckpt}",
        ]
    )
    assert res.returncode != 0
    assert "UnsafeCheckpointError" in res.stderr and "refusing to load" in res.stderr, res.stderr[-3000:]
    assert "builtins.exec" in res.stderr
    assert not marker.exists()


def _plain_checkpoint(path: Path, stage_config: dict) -> Path:
    """A weights_only-safe pickle whose stored stage config is the attack."""
    torch.save({"state_dict": {}, "stage_config": stage_config}, path)
    return path


def _write_marker(marker: Path) -> dict:
    # A project helper that writes any file: Hydra's own blocklist lets it through; a prefix allow-list
    # ("show1_lightning.") would too. Writing a file of the attacker's choice (~/.bashrc) is code execution.
    return {"_target_": "show1_lightning.fileio.atomic_write_text", "path": str(marker), "text": "pwned"}


@pytest.mark.parametrize(
    "name, make_config",
    [
        ("project helper", lambda marker: _write_marker(marker)),
        (
            "nested project helper",
            lambda marker: {
                "_target_": "show1_lightning.stages.keyframe.KeyframeStage",
                "unet": _write_marker(marker),
            },
        ),
        ("top-level", lambda code: {"_target_": "builtins.exec", "_args_": [code]}),
        (
            "nested",
            lambda code: {
                "_target_": "show1_lightning.stages.keyframe.KeyframeStage",
                "unet": {"_target_": "builtins.exec", "_args_": [code]},
            },
        ),
        # A prefix of the project's package is not enough: attribute paths reach any module it imports.
        ("prefix", lambda code: {"_target_": "show1_lightning.runtime.os.system", "_args_": [f'python3 -c "{code}"']}),
        (
            "in a list",
            lambda code: {
                "_target_": "show1_lightning.stages.keyframe.KeyframeStage",
                "x": [{"_target_": "builtins.exec", "_args_": [code]}],
            },
        ),
    ],
)
def test_stored_stage_config_with_a_foreign_target_is_refused(tmp_path, name, make_config):
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    ckpt = _plain_checkpoint(tmp_path / "config_attack.ckpt", make_config(marker if "helper" in name else code))
    with pytest.raises(UnsafeCheckpointError, match=r"not one of the project's stage targets"):
        load_stage_from_checkpoint(ckpt)
    assert not marker.exists()


def test_stored_stage_config_with_an_interpolation_is_refused(tmp_path):
    cfg = {
        "_target_": "show1_lightning.stages.keyframe.KeyframeStage",
        "sampling": {"negative_prompt": "${oc.env:HOME}"},
    }
    with pytest.raises(UnsafeCheckpointError, match="interpolation"):
        check_stage_config(cfg, "x")


def test_export_folder_with_a_foreign_target_is_refused_by_the_cascade(tmp_path):
    marker = tmp_path / "marker"
    export = tmp_path / "export"
    (export / "unet").mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(export / "unet" / "diffusion_pytorch_model.safetensors"))
    (export / "stage.json").write_text(json.dumps(_write_marker(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"stage\.json.*'_target_' names 'show1_lightning\.fileio"):
        Show1Cascade(keyframe=export, device="cpu")
    assert not marker.exists()


def test_every_stage_target_in_conf_is_allowed():
    """The allow-list covers every target a stage config can name (add new ones to ALLOWED_TARGETS)."""
    found = set()
    for group in ("stage", "model", "text_encoder", "vae"):
        for path in (ROOT / "conf" / group).glob("*.yaml"):
            found |= set(re.findall(r"_target_:\s*([\w.]+)", path.read_text()))
    assert found, "no targets found"
    assert found <= ALLOWED_TARGETS, sorted(found - ALLOWED_TARGETS)


def test_a_real_checkpoint_loads_with_weights_only_and_legacy_skip_buffer(compose_train, tmp_path):
    """train.py checkpoints hold only weights_only-safe values (also with a shard list from the command line),
    and a checkpoint from before the skip-accounting fix (a ``skipped_samples`` buffer) still loads."""
    import train

    lean = ("callbacks.samples=null", "callbacks.toy_adherence=null", "callbacks.export=null")
    train.train(compose_train(tmp_path, *lean))
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(last)) == []
    assert "skipped_samples" not in ckpt["state_dict"] and "skip_totals" in ckpt
    ckpt["state_dict"]["skipped_samples"] = torch.tensor(7)
    ckpt.pop("skip_totals")
    legacy = tmp_path / "legacy.ckpt"
    torch.save(ckpt, legacy)
    stage = load_stage_from_checkpoint(legacy)
    assert stage.skip_totals == {"total": 7}
