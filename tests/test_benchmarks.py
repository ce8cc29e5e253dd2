"""UCF-101 / MSR-VTT adapters and the folder generator, on tiny fixture datasets in the official layouts."""

from __future__ import annotations

import json
from collections import Counter

import fixtures_eval as fx
import numpy as np
import pytest
import torch

from evaluation.benchmarks import ClipSpec, cut_clip
from evaluation.generators import FolderGenerator, VideoGenerator, video_filename
from evaluation.msrvtt_benchmark import MSRVTTBenchmark
from evaluation.ucf101_benchmark import UCF101Benchmark, camel_to_words, proportional_counts
from show1_lightning.data.video_io import decode_video


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory):
    return fx.make_ucf101(tmp_path_factory.mktemp("ucf"))


@pytest.fixture(scope="module")
def msr_root(tmp_path_factory):
    return fx.make_msrvtt(tmp_path_factory.mktemp("msrvtt"))


def test_camel_case_to_words():
    assert camel_to_words("ApplyEyeMakeup") == "apply eye makeup"
    assert camel_to_words("YoYo") == "yo yo"
    assert camel_to_words("HandstandPushups") == "handstand pushups"
    assert camel_to_words("Skijet") == "skijet"


def test_proportional_counts_sum_and_quotas():
    c = proportional_counts([3, 2, 1], 10)
    assert c.sum() == 10 and c.tolist() == [5, 3, 2]  # exact 5, 3.33, 1.67 -> remainder to the 0.67
    assert proportional_counts([1, 1, 1], 2).tolist() == [1, 1, 0]  # ties go to the lower index


def test_ucf_prompts_follow_train_distribution_and_are_deterministic(ucf_root):
    b = UCF101Benchmark(ucf_root, num_samples=60, template="a video of {words}", seed=3)
    items = b.prompts()
    assert [it.index for it in items] == list(range(60))
    counts = Counter(it.source for it in items)
    assert counts == {"ApplyEyeMakeup": 30, "YoYo": 20, "PlayingDaf": 10}
    assert {it.prompt for it in items if it.source == "YoYo"} == {"a video of yo yo"}
    again = UCF101Benchmark(ucf_root, num_samples=60, template="a video of {words}", seed=3).prompts()
    assert again == items
    other = UCF101Benchmark(ucf_root, num_samples=60, template="a video of {words}", seed=4).prompts()
    assert [i.source for i in other] != [i.source for i in items]  # seed changes the order
    multi = UCF101Benchmark(ucf_root, num_samples=600, sampling="multinomial", seed=0).prompts()
    frac = Counter(i.source for i in multi)["ApplyEyeMakeup"] / 600
    assert abs(frac - 0.5) < 0.08


def test_ucf_class_prompt_override_and_protocol(ucf_root):
    b = UCF101Benchmark(ucf_root, num_samples=6, class_prompts={"YoYo": "A kid plays with a yo-yo."})
    assert {i.prompt for i in b.prompts() if i.source == "YoYo"} == {"A kid plays with a yo-yo."}
    p = b.protocol()
    json.dumps(p)  # serialisable
    assert p["real"]["real_clips"] == 6 and p["real"]["clip"]["frames"] == 16 and p["split"] == 1
    with pytest.raises(ValueError, match="unknown classes"):
        UCF101Benchmark(ucf_root, class_prompts={"NoSuchClass": "x"})
    with pytest.raises(ValueError, match="template"):
        UCF101Benchmark(ucf_root, template="no placeholder")


def test_ucf_real_clips_split_and_cut(ucf_root):
    train = UCF101Benchmark(ucf_root, real_split="train")
    test = UCF101Benchmark(ucf_root, real_split="test")
    assert len(train.reference_videos()) == 6 and len(test.reference_videos()) == 3
    assert all(p.suffix == ".avi" and p.name.startswith("v_") for p in train.reference_videos())
    b = UCF101Benchmark(
        ucf_root, real_clips=10, clip={"frames": 8, "stride": 2, "start": "random", "resolution": [16, 16], "seed": 1}
    )
    assert b.num_real_clips() == 10
    c = b.real_clip(7)
    assert c.shape == (3, 8, 16, 16) and c.dtype == torch.float32 and c.min() >= -1 and c.max() <= 1
    assert torch.equal(c, b.real_clip(7))  # deterministic
    with pytest.raises(IndexError):
        b.real_clip(10)


def test_ucf_missing_layout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="UCF-101"):
        UCF101Benchmark(tmp_path)


def test_cut_clip_start_rules_and_short_videos():
    frames = np.arange(20, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    first = cut_clip(frames, ClipSpec(frames=4, stride=3, start="first"), 0)
    to_level = lambda v: ((v[0, :, 0, 0] + 1) * 127.5).round().long().tolist()  # noqa: E731
    assert to_level(first) == [0, 3, 6, 9]
    assert to_level(cut_clip(frames, ClipSpec(frames=4, stride=3, start="center"), 0)) == [5, 8, 11, 14]
    short = cut_clip(frames[:3], ClipSpec(frames=5, start="random"), 0)
    assert to_level(short) == [0, 1, 2, 2, 2]
    starts = {to_level(cut_clip(frames, ClipSpec(frames=4, start="random", seed=0), i))[0] for i in range(20)}
    assert len(starts) > 3 and max(starts) <= 16


def test_msrvtt_test_split_and_caption_rules(msr_root):
    b = MSRVTTBenchmark(msr_root, expected_videos=4, seed=0)
    items = b.prompts()
    assert [i.source for i in items] == fx.MSRVTT_TEST_IDS  # train video excluded, natural order
    for it in items:
        assert it.prompt == f"caption {b.chosen_caption(it.source)} of {it.source}"
    choices = {
        tuple(MSRVTTBenchmark(msr_root, expected_videos=4, seed=s).chosen_caption(v) for v in fx.MSRVTT_TEST_IDS)
        for s in range(6)
    }
    assert len(choices) > 1  # the seed matters
    all_caps = MSRVTTBenchmark(msr_root, expected_videos=4, captions="all").prompts()
    assert len(all_caps) == 12 and [i.index for i in all_caps] == list(range(12))
    assert all_caps[3].prompt == "caption 0 of video7011"
    assert len(b.reference_videos()) == 4 and b.real_clip(0).shape == (3, 16, 24, 32)
    assert b.protocol()["num_videos"] == 4


def test_msrvtt_errors(msr_root):
    with pytest.raises(ValueError, match="expected 2990"):
        MSRVTTBenchmark(msr_root)
    with pytest.raises(ValueError, match="captions"):
        MSRVTTBenchmark(msr_root, expected_videos=4, captions="some")
    with pytest.raises(FileNotFoundError, match="annotation"):
        MSRVTTBenchmark(msr_root, annotation="nope.json", expected_videos=4)


def test_folder_generator_serves_videos_and_fails_clearly(tmp_path):
    prompts, seeds = ["a cat", "a dog", "a cat"], [10, 11, 12]
    root = fx.make_generated_folder(tmp_path / "gen", prompts, seeds, num_frames=12)
    g = FolderGenerator(root)
    assert isinstance(g, VideoGenerator) and g.fps == pytest.approx(8.0)
    v = g.generate(["a cat", "a cat"], [12, 10])
    assert v.shape == (2, 3, 12, 40, 64)
    ref = decode_video(root / video_filename(2)).frames
    # The same uint8 bytes through the same x / 127.5 - 1 in [-1, 1]: allclose's defaults cover any rounding.
    assert torch.allclose(v[0], torch.from_numpy(ref).permute(3, 0, 1, 2).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="was made for prompt"):
        g.generate(["a dog"], [10])
    with pytest.raises(KeyError, match="no video with seed"):
        g.generate(["a cat"], [99])
    (root / video_filename(1)).unlink()
    with pytest.raises(FileNotFoundError, match="sample 1 missing"):
        g.generate(["a dog"], [11])
    with pytest.raises(FileNotFoundError, match="manifest"):
        FolderGenerator(tmp_path)
