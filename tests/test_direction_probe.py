"""The direction-swap probe: same seed, four direction words; real rendered toy clips as the generators."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evaluation.direction_probe import direction_swap
from show1_lightning.data.toy_data import TOY_MOTIONS, make_toy_clip, motion_displacement, parse_toy_prompt

SIZE = {"num_frames": 8, "height": 40, "width": 64}


def _render(color: str, shape: str, motion: str, seed: int) -> torch.Tensor:
    frames = make_toy_clip(color, shape, motion, seed=seed, **SIZE)
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def following(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Moves the shape the way each prompt says (the seed picks only where it starts)."""
    parts = [parse_toy_prompt(p) for p in prompts]
    return torch.stack([_render(q["color"], q["shape"], q["motion"], s) for q, s in zip(parts, seeds)])


def word_blind(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Right colour and shape, but the motion is the seed's, whatever the word says."""
    parts = [parse_toy_prompt(p) for p in prompts]
    return torch.stack(
        [_render(q["color"], q["shape"], TOY_MOTIONS[s % len(TOY_MOTIONS)], s) for q, s in zip(parts, seeds)]
    )


def test_a_generator_that_follows_the_word_scores_one_everywhere():
    report = direction_swap(following, num_seeds=4)
    assert report.adherence == 1.0 and report.word_sensitivity == 1.0
    dx = {w: report.mean_displacement[w][0] for w in TOY_MOTIONS}
    dy = {w: report.mean_displacement[w][1] for w in TOY_MOTIONS}
    assert dx["left"] < -0.1 < 0.1 < dx["right"] and dy["up"] < -0.05 < 0.05 < dy["down"]
    assert report.measured == [list(TOY_MOTIONS)] * 4


def test_a_word_blind_generator_scores_chance_and_zero_sensitivity():
    report = direction_swap(word_blind, num_seeds=4, batch_words=False)
    assert report.word_sensitivity == 0.0
    assert report.adherence == pytest.approx(0.25)  # each seed's one motion matches exactly one of the four words
    moves = np.array([report.mean_displacement[w] for w in TOY_MOTIONS])
    assert np.allclose(moves, moves[0], atol=0.02)  # the word changes nothing beyond the colour's pixels
    assert all(len(set(row)) == 1 for row in report.measured)


def test_displacement_signs_and_the_report_table():
    clip = _render("red", "circle", "left", 3)
    dx, dy = motion_displacement(clip)
    assert dx < -0.1 and abs(dy) < 0.01
    assert motion_displacement(torch.zeros(3, 8, 16, 24)) is None  # no saturated shape
    assert motion_displacement(clip[:, :1]) is None  # one frame
    report = direction_swap(following, num_seeds=1)
    table = report.table()
    assert "| left |" in table and "1/1" in table and "adherence 1.000" in table
    json.dumps(report.as_dict())
    assert not any(math.isnan(v) for d in report.mean_displacement.values() for v in d)


def test_wrong_batch_from_the_generator_is_an_error():
    with pytest.raises(ValueError, match="returned shape"):
        direction_swap(lambda p, s: following(p[:1], s[:1]), num_seeds=1)
    with pytest.raises(ValueError, match="num_seeds"):
        direction_swap(following, num_seeds=0)


def test_the_script_runs_on_a_train_py_checkpoint(compose_train, tmp_path, capsys):
    import direction_probe

    import train

    lean = ("callbacks.samples=null", "callbacks.toy_adherence=null", "callbacks.export=null")
    train.train(compose_train(tmp_path, *lean))
    out = tmp_path / "probe.json"
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert direction_probe.main([str(ckpt), "--seeds", "1", "--num-steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["mean_displacement"]) == set(TOY_MOTIONS) and len(report["measured"]) == 1
    assert "direction changed with the word" in capsys.readouterr().out
