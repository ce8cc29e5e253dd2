"""The keyframe stage's layout grounding (``stage.layout``): centres measured in toy clips, the layout channel, the
learned text-to-layout planner, and the stage trained, exported and reloaded through train.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from show1_lightning.data.toy_data import frame_centroids, make_toy_clip
from show1_lightning.models.layout_planner import LayoutPlanner, render_layout
from show1_lightning.stages.loading import load_stage, load_stage_from_checkpoint

torch.set_num_threads(1)

# The default experiment (conf/experiment/toy.yaml) has the layout on; as released: no layout, 3 input channels.
RELEASED = ["stage.layout=null", "model.in_channels=3"]


def _video(frames: np.ndarray) -> torch.Tensor:
    """uint8 T x H x W x 3 -> 1 x 3 x T x H x W in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def test_frame_centroids_follow_the_rendered_shape_and_mark_empty_frames() -> None:
    v = _video(make_toy_clip("red", "circle", "right", seed=3, num_frames=8, height=16, width=24))
    centres, valid = frame_centroids(v)
    assert centres.shape == (1, 8, 2) and bool(valid.all())
    dx = centres[0, 1:, 0] - centres[0, :-1, 0]
    assert bool((dx > 0).all()), dx  # moves right every frame
    assert float((centres[0, :, 1] - centres[0, 0, 1]).abs().max()) < 0.02  # and not up or down
    up = frame_centroids(_video(make_toy_clip("blue", "square", "up", seed=4, num_frames=8, height=16, width=24)))[0]
    assert float(up[0, -1, 1] - up[0, 0, 1]) < -0.05
    grey = torch.zeros(2, 3, 4, 16, 24)  # no saturated pixel: no object, centre reported
    c, ok = frame_centroids(grey)
    assert not bool(ok.any()) and torch.equal(c, torch.full_like(c, 0.5))
    with pytest.raises(ValueError, match="B x 3 x T x H x W"):
        frame_centroids(grey[0])


def test_render_layout_puts_the_peak_at_the_centre_and_nothing_where_there_is_no_object() -> None:
    centres = torch.tensor([[[0.0, 0.0], [1.0, 0.5]]])
    valid = torch.tensor([[True, False]])
    lay = render_layout(centres, valid, 16, 24, sigma=0.1)
    assert lay.shape == (1, 1, 2, 16, 24)
    assert float(lay[0, 0, 0, 0, 0]) == pytest.approx(1.0) and float(lay[0, 0, 0, -1, -1]) == pytest.approx(-1.0)
    assert bool((lay[0, 0, 1] == -1).all())
    peak = render_layout(torch.tensor([[[1.0, 0.5]]]), torch.tensor([[True]]), 17, 24, 0.1)[0, 0, 0]
    assert divmod(int(peak.argmax()), 24) == (8, 23)


def test_planner_learns_each_captions_direction_and_the_spread_of_its_start() -> None:
    """Two "captions" (token states of two words), trajectories moving right or left from a start spread 0.1; after
    training the planned trajectories move each caption's way from seed-dependent starts."""
    g = torch.Generator().manual_seed(0)
    words = torch.randn(2, 3, 16, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    planner = LayoutPlanner(16, 8, hidden=32)
    opt = torch.optim.Adam(planner.parameters(), lr=3e-3)
    ramp = torch.linspace(-0.15, 0.15, 8)
    for _ in range(600):
        which = torch.randint(0, 2, (32,), generator=g)
        start = 0.5 + 0.1 * torch.randn(32, 1, generator=g)
        x = start + torch.where(which[:, None] == 0, ramp, -ramp)
        centres = torch.stack([x, torch.full_like(x, 0.4)], dim=-1)
        loss = planner.loss(words[which], mask[which], centres, torch.ones(32, 8, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mean, log_std = planner(words, mask)
    assert float(mean[0, -1, 0] - mean[0, 0, 0]) == pytest.approx(0.3, abs=0.05)
    assert float(mean[1, -1, 0] - mean[1, 0, 0]) == pytest.approx(-0.3, abs=0.05)
    assert float(log_std[:, 0].exp().mean()) == pytest.approx(0.1, abs=0.04)  # the start's spread along x
    planned = planner.sample(words[[0] * 6], mask[[0] * 6], seeds=list(range(6)))
    assert bool((planned[:, -1, 0] > planned[:, 0, 0]).all())
    assert float(planned[:, 0, 0].std()) > 0.03  # different seeds, different starts
    assert torch.equal(planned, planner.sample(words[[0] * 6], mask[[0] * 6], seeds=list(range(6))))


def test_layout_stage_trains_its_planner_exports_and_reloads_it(compose_train, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path)
    assert cfg.stage.layout.sigma == 0.15 and cfg.model.in_channels == 4
    metrics = train.train(cfg)
    assert "train/aux_loss" in metrics and "val/aux_loss" in metrics
    stage = load_stage_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert stage.planner is not None and stage.unet.config.in_channels == 4
    fresh = LayoutPlanner(stage.planner.net[0].in_features, 8, hidden=128)
    assert any(not torch.equal(p, q) for p, q in zip(stage.planner.parameters(), fresh.parameters()))
    exported = load_stage(tmp_path / "export")
    for (name, p), q in zip(stage.planner.state_dict().items(), exported.planner.state_dict().values()):
        assert torch.equal(p, q), name
    video = exported.run(None, ["a red circle moving left"], [0], num_steps=2)
    assert video.shape == (1, 3, cfg.stage.num_frames, cfg.stage.height, cfg.stage.width)
    (tmp_path / "export" / "stage_extras.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="stage_extras"):
        load_stage(tmp_path / "export")
    from show1_lightning.pipelines.diffusers_pipeline import Show1Pipeline

    pipe = Show1Pipeline.from_stages(stage)
    pipe.save_pretrained(tmp_path / "pipe")
    again = Show1Pipeline.from_pretrained(tmp_path / "pipe")
    for (name, p), q in zip(
        stage.planner.state_dict().items(), again.stages["keyframe"].planner.state_dict().values()
    ):
        assert torch.equal(p, q), name
    want = stage.run(None, ["a red circle moving left"], [3], num_steps=2)
    got = again.stages["keyframe"].run(None, ["a red circle moving left"], [3], num_steps=2)
    assert torch.allclose(want, got, atol=1e-5)


def test_layout_config_errors_name_the_key_and_the_released_structure_still_trains(
    compose_train, tmp_path: Path
) -> None:
    import hydra
    import hydra.errors

    cfg = compose_train(tmp_path, "model.in_channels=3")  # a layout but a UNet taking 3 channels
    with pytest.raises((ValueError, hydra.errors.InstantiationException), match="in_channels=3"):
        hydra.utils.instantiate(cfg.stage)
    cfg = compose_train(tmp_path, "+stage.layout.sigmaa=1")
    with pytest.raises((ValueError, hydra.errors.InstantiationException), match="sigmaa"):
        hydra.utils.instantiate(cfg.stage)
    cfg = compose_train(tmp_path, "stage.lora.rank=4")
    with pytest.raises((ValueError, hydra.errors.InstantiationException), match="stage.lora with stage.layout"):
        hydra.utils.instantiate(cfg.stage)
    cfg = compose_train(tmp_path, *RELEASED)
    metrics = train.train(cfg)
    assert "train/aux_loss" not in metrics and math.isfinite(metrics["train/loss"])
    stage = load_stage_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert stage.planner is None and stage.unet.config.in_channels == 3
    assert not (tmp_path / "export" / "stage_extras.safetensors").exists()
