"""Nothing silently wrong on the data side: a resumed run continues the stream, the text cache cannot mix
folders or encoders, every bad sample is a counted skip with its reason (summed correctly over DDP ranks),
decode memory is bounded, and shard lists from the command line work."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds

from show1_lightning.data.datamodule import SKIP_REASONS, FatalDataError, VideoDataModule, _bounded_shuffle
from show1_lightning.data.shards import VideoShardWriter, decode_sampled_clip, expand_shard_spec
from show1_lightning.data.text_cache import TextCacheMismatchError, TextEmbeddingCache, precompute_text_embeddings
from show1_lightning.data.toy_data import make_toy_clip, toy_caption
from show1_lightning.data.video_io import VideoDecodeError, encode_mp4
from show1_lightning.diffusion.module import DiffusionStage
from show1_lightning.models.text_encoder import TextEncoder

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
COLORS = ["red", "green", "blue", "yellow", "cyan", "magenta"]


def _encode(frames: np.ndarray, fmt: str = "mp4", fps: int = 16) -> bytes:
    if fmt == "mp4":
        return encode_mp4(frames, fps=fps)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _clip(i: int, frames: int = 32, height: int = 40, width: int = 64) -> np.ndarray:
    return make_toy_clip(COLORS[i % 6], "square", "right", seed=i, height=height, width=width, num_frames=frames)


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """4 shards x 10 good clips (64x40, 32 frames at 16 fps)."""
    root = tmp_path_factory.mktemp("good")
    with VideoShardWriter(root, samples_per_shard=10) as w:
        for i in range(40):
            w.write(_encode(_clip(i)), toy_caption(COLORS[i % 6], "square", "right"))
    return [str(root / f"{k:05d}.tar") for k in range(4)]


def _dm(train, val=None, **kw) -> VideoDataModule:
    args = dict(
        train_shards=train,
        val_shards=val,
        num_frames=8,
        target_fps=4,
        height=40,
        width=64,
        batch_size=2,
        epoch_length=3,
        val_batches=1,
        shuffle_buffer=8,
        seed=0,
    )
    args.update(kw)
    return VideoDataModule(**args)


# ------------------------------------------------------------------------------------------------ resume


class _KeyRecorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[list[str]] = []

    def training_step(self, batch, _):
        self.keys.append(list(batch["key"]))
        return (batch["video"].mean() - self.w) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm: VideoDataModule, root: Path, max_steps: int, ckpt_path: str | None = None) -> list[list[str]]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = _KeyRecorder()
    ckpt = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1, filename="s{step}"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    assert not [w for w in caught if "not resumable" in str(w.message)]  # the train loader declares its state
    return model.keys


def test_resumed_run_continues_the_data_stream(good_shards, tmp_path):
    """Stopped at step 4 (mid-epoch: 3 batches per epoch), resumed to step 8: the resumed batches are new draws,
    not a replay of the first run's; resuming twice from one checkpoint gives the same stream (deterministic)."""
    import shutil

    first = _fit(_dm(good_shards), tmp_path, max_steps=4)
    step4 = shutil.copy(tmp_path / "ckpt" / "last.ckpt", tmp_path / "step4.ckpt")
    state = torch.load(step4, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["stream_start"] == 0 and state[0]["batches_served"] >= 4  # the stream position is saved
    uninterrupted = _fit(_dm(good_shards), tmp_path / "u", max_steps=8)
    assert uninterrupted[:4] == first  # a fresh run is deterministic given the seed
    resumed = _fit(_dm(good_shards), tmp_path, max_steps=8, ckpt_path=str(step4))
    assert len(resumed) == 4
    assert resumed != first[: len(resumed)]  # before the fix: the resumed run replayed the first run's batches
    seen = {k for b in first for k in b}
    assert {k for b in resumed for k in b} - seen  # it trains on samples the first run had not seen
    again = _fit(_dm(good_shards), tmp_path / "again", max_steps=8, ckpt_path=str(step4))
    assert again == resumed


class KeyLog(L.Callback):
    """Appends ``{"step", "keys"}`` per training batch to ``path``; with env ``KILL_AT_STEP=n`` it SIGKILLs its own
    process at the end of step n (the checkpoint of step n-1 is the last one written)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": list(batch["key"])}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get("KILL_AT_STEP") and trainer.global_step >= int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow  # whole train.py / DDP processes (tens of seconds): run with -m slow
def test_kill_9_then_the_same_command_continues_with_unseen_data(tmp_path):
    from tests.conftest import TINY_TRAIN

    log = tmp_path / "keys.jsonl"
    skip = ("logger=", "trainer.max_steps", "data.epoch_length")
    cmd = [
        sys.executable,
        "train.py",
        *[a for a in TINY_TRAIN if not a.startswith(skip)],
        "logger=csv",
        "trainer.max_steps=8",
        "callbacks.toy_adherence=null",
        "callbacks.export=null",
        "callbacks.samples=null",
        "data.epoch_length=100",
        "run_name=killed",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "+callbacks.keylog._target_=test_data_reliability.KeyLog",
        f"+callbacks.keylog.path={log}",
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    killed = subprocess.run(
        cmd, cwd=ROOT, env={**env, "KILL_AT_STEP": "5"}, capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    log.unlink()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    second = [json.loads(line) for line in log.read_text().splitlines()]
    # It resumed from the last checkpoint (step 4) and ran to step 8 ...
    assert [r["step"] for r in second] == [5, 6, 7, 8]
    # ... on new draws: not the first run's batches from the start of the stream, and with unseen samples.
    assert [r["keys"] for r in second] != [r["keys"] for r in first[:4]]
    assert {k for r in second for k in r["keys"]} - {k for r in first for k in r["keys"]}


# ------------------------------------------------------------------------------------------------ text cache


def _caption_shard(folder: Path, captions: list[str]) -> str:
    with VideoShardWriter(folder, samples_per_shard=len(captions)) as w:
        for i, c in enumerate(captions):
            w.write(_encode(_clip(i)), c)
    return str(folder / "00000.tar")


def test_text_cache_keys_cannot_collide_across_folders(tmp_path):
    """Two conversion folders both start at 00000.tar with the same sample keys but other captions: before the
    fix both mapped to shards/<folder name>/00000.safetensors and the second folder got the first's embeddings."""
    a = _caption_shard(tmp_path / "part_a" / "train", ["a red square moving right", "a green square moving right"])
    b = _caption_shard(tmp_path / "part_b" / "train", ["a blue circle moving up", "a cyan triangle moving down"])
    enc = TextEncoder(kind="t5", seed=0)
    counts = precompute_text_embeddings([a, b], enc, tmp_path / "cache")
    assert counts["computed_shards"] == 2
    cache = TextEmbeddingCache(tmp_path / "cache", expected_identity=enc.identity)
    for shard, captions in (
        (a, ["a red square moving right", "a green square moving right"]),
        (b, ["a blue circle moving up", "a cyan triangle moving down"]),
    ):
        ref, _ = enc.encode(captions)
        for i, key in enumerate(["000000000", "000000001"]):
            emb, _ = cache.lookup(shard, key, captions[i])
            assert torch.allclose(emb, ref[i], rtol=2e-3, atol=2e-3), (shard, key)


def test_a_shard_rewritten_after_the_precompute_is_an_error(tmp_path):
    shard = _caption_shard(tmp_path / "d", ["a red square moving right", "a green square moving right"])
    enc = TextEncoder(kind="t5", seed=0)
    precompute_text_embeddings(shard, enc, tmp_path / "cache")
    os.unlink(shard)
    for p in (tmp_path / "d").iterdir():
        p.unlink()
    _caption_shard(tmp_path / "d", ["a blue circle moving up", "a green square moving right"])
    dm = _dm(shard, text_cache_dir=tmp_path / "cache", text_encoder_identity=enc.identity, shuffle_buffer=1)
    with pytest.raises(FatalDataError, match="computed from another caption"):
        next(iter(dm.train_dataloader()))


def test_text_cache_identity_is_checked_by_default(compose_train, tmp_path, toy_data_dir):
    """No config sets data.text_encoder_identity: the stage's encoder is the reference; a cache of another
    encoder is refused at setup (before the fix: trained silently on the wrong embeddings)."""
    from show1_lightning.data.toy_data import ensure_toy_dataset

    toy = ensure_toy_dataset(toy_data_dir / "toy")
    other = TextEncoder(kind="t5", seed=1)  # the configured tiny_t5 has seed 0
    precompute_text_embeddings(toy["train"][:1] + toy["val"], other, tmp_path / "cache")
    import hydra

    import train

    cfg = compose_train(
        tmp_path / "run",
        f"data.text_cache_dir={tmp_path / 'cache'}",
        f"data.train_shards=[{toy['train'][0]}]",
        "callbacks.toy_adherence=null",
        "callbacks.samples=null",
        "callbacks.export=null",
    )
    with pytest.raises(TextCacheMismatchError, match="made with encoder"):
        train.train(cfg)
    # Without any encoder to compare with, a cache is refused rather than used unchecked.
    dm = hydra.utils.instantiate(cfg.data)
    with pytest.raises(FatalDataError, match="text_encoder_identity"):
        dm.setup()
    # Named explicitly (text_encoder=none runs), it is accepted.
    ok = hydra.utils.instantiate(cfg.data, text_encoder_identity=other.identity)
    batch = next(iter(ok.train_dataloader()))
    assert batch["text_emb"].shape[-1] == other.dim


def test_interrupted_reencode_never_claims_the_new_encoder(good_shards, tmp_path):
    old, new = TextEncoder(kind="t5", seed=0), TextEncoder(kind="t5", seed=1)
    cache = tmp_path / "cache"
    precompute_text_embeddings(good_shards, old, cache)
    assert json.loads((cache / "meta.json").read_text())["status"] == "complete"

    calls = {"n": 0}
    real = new.encode

    def dying_encode(captions):
        calls["n"] += 1
        if calls["n"] > 3:  # the null caption and two shards, then "killed"
            raise KeyboardInterrupt
        return real(captions)

    new.encode = dying_encode
    with pytest.raises(KeyboardInterrupt):
        precompute_text_embeddings(good_shards, new, cache, overwrite=True)
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["identity"] is None and meta["status"] == "in_progress"  # before the fix: the new identity
    for identity in (new.identity, old.identity, None):
        with pytest.raises(TextCacheMismatchError, match="re-encode"):
            TextEmbeddingCache(cache, expected_identity=identity)
    new.encode = real
    counts = precompute_text_embeddings(good_shards, new, cache)  # resumes: the finished shards are kept
    assert counts["computed_shards"] == 2
    assert json.loads((cache / "meta.json").read_text())["identity"] == new.identity
    TextEmbeddingCache(cache, expected_identity=new.identity).lookup(good_shards[3], "000030000")


# ------------------------------------------------------------------------------------------------ bad samples


def _write_raw_tar(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def _ts(frames: np.ndarray) -> bytes:
    return _encode(frames, "mpegts")


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory) -> dict:
    """One shard: good clips and one of every kind of bad sample, each with the reason it must be counted under."""
    root = tmp_path_factory.mktemp("bad")
    good = [{"__key__": f"good{i}", "mp4": _encode(_clip(i)), "txt": f"good clip {i}"} for i in range(6)]
    mkv = _encode(_clip(20), "matroska")
    big = _encode(_clip(21, height=160, width=256), "matroska")
    bad = {
        "utf8": ({"mp4": _encode(_clip(10)), "txt": b"caption \xff\xfe broken"}, "caption"),
        # 1 frame at 64x40 then 31 at 96x64 in one MPEG-TS stream (no frame count in the container)
        "reschange": (
            {"mp4": _ts(_clip(11, frames=1)) + _ts(_clip(12, frames=31, height=64, width=96)), "txt": "x"},
            "resolution_change",
        ),
        # Matroska states no frame count; cut at 60 %: decodes cleanly, but shorter than the header's duration
        "truncmkv": ({"mp4": mkv[: len(mkv) * 6 // 10], "txt": "x"}, "truncated"),
        "garbage": ({"mp4": b"\x00garbage" * 200, "txt": "x"}, "decode"),
        "short": ({"mp4": _encode(_clip(13, frames=8)), "txt": "x"}, "too_short"),
        # header only: too large is known before any frame is decoded (the body is not even there)
        "huge": ({"mp4": big[:1200], "txt": "x"}, "too_large"),
        "novideo": ({"txt": "no video here"}, "no_video"),
        "boom": ({"mp4": _encode(_clip(14)), "txt": "explodes"}, "error"),
    }
    samples = good[:3] + [{"__key__": k, **s} for k, (s, _) in bad.items()] + good[3:]
    path = _write_raw_tar(root / "00000.tar", samples)
    return {"path": path, "reasons": {k: r for k, (_, r) in bad.items()}, "good": [g["__key__"] for g in good]}


def test_every_bad_sample_is_a_counted_skip_with_its_reason(bad_shard, monkeypatch):
    import show1_lightning.data.datamodule as dmod

    real = dmod.decode_sampled_clip

    def sometimes_broken(data, *a, **kw):  # "any other exception" on one sample
        if data == bad_shard_boom[0]:
            raise ZeroDivisionError("a bug on this sample")
        return real(data, *a, **kw)

    bad_shard_boom = [
        next(
            s["mp4"]
            for s in wds.DataPipeline(wds.SimpleShardList([bad_shard["path"]]), wds.tarfile_to_samples())
            if s["__key__"] == "boom"
        )
    ]
    monkeypatch.setattr(dmod, "decode_sampled_clip", sometimes_broken)
    dm = _dm(bad_shard["path"], bad_shard["path"], batch_size=14, val_batches=1, max_source_pixels=128 * 80)
    batch = next(iter(dm.val_dataloader()))  # one chunk holds the whole shard: all 6 good clips, every bad one
    assert sorted(batch["key"]) == sorted(bad_shard["good"])
    expected = [0] * len(SKIP_REASONS)
    for reason in bad_shard["reasons"].values():
        expected[SKIP_REASONS.index(reason)] += 1
    assert dict(zip(SKIP_REASONS, batch["skip_reasons"].tolist())) == dict(zip(SKIP_REASONS, expected))
    assert int(batch["n_skipped"]) == len(bad_shard["reasons"])
    # The training stream skips (and counts) them too instead of dying.
    batches = list(_dm(bad_shard["path"], epoch_length=4, max_source_pixels=128 * 80).train_dataloader())
    assert len(batches) == 4 and sum(int(b["n_skipped"]) for b in batches) > 0
    assert not {k for b in batches for k in b["key"]} - set(bad_shard["good"])


def test_a_truncated_shard_is_counted_and_logged(good_shards, tmp_path, caplog):
    data = Path(good_shards[0]).read_bytes()
    cut = tmp_path / "00000.tar"
    cut.write_bytes(data[: len(data) // 2])
    dm = _dm(str(cut), str(cut), batch_size=2, val_batches=6)  # the stream cycles past the damage
    with caplog.at_level("WARNING", logger="show1_lightning.data.datamodule"):
        batches = list(dm.val_dataloader())
    tar = sum(int(b["skip_reasons"][SKIP_REASONS.index("tar")]) for b in batches)
    assert tar >= 1 and all(len(b["key"]) >= 1 for b in batches)
    assert any("(tar)" in r.message and str(cut) in r.message for r in caplog.records)


def test_size_and_length_caps_apply_before_decoding():
    big = _encode(_clip(0, height=160, width=256), "matroska")
    with pytest.raises(VideoDecodeError) as info:
        decode_sampled_clip(big[:1200], 4, None, max_pixels=128 * 80)  # no decodable frame in these bytes
    assert info.value.reason == "too_large" and "256x160" in str(info.value)
    with pytest.raises(VideoDecodeError) as info:
        decode_sampled_clip(big[:1200], 4, None)  # without the cap the same bytes are a truncated file
    assert info.value.reason == "truncated"
    mp4 = _encode(_clip(1, frames=32))
    with pytest.raises(VideoDecodeError, match="max_source_frames") as info:
        decode_sampled_clip(mp4, 4, None, max_frames=20)
    assert info.value.reason == "too_large"
    assert decode_sampled_clip(mp4, 4, None, max_frames=32, max_pixels=128 * 80).frames.shape == (4, 40, 64, 3)


def test_shuffle_buffer_is_bounded_in_bytes():
    samples = [{"__key__": str(i), "mp4": bytes(1000 + (i % 7) * 100)} for i in range(300)]
    # While the byte cap does not bind, the draws are webdataset's own.
    ours = [s["__key__"] for s in _bounded_shuffle(iter(samples), 50, 1 << 40, 20, random.Random(3))]
    theirs = [s["__key__"] for s in wds.filters._shuffle(iter(samples), 50, 20, rng=random.Random(3))]
    assert ours == theirs
    # With a 10 kB cap the buffer never holds more than the cap plus one sample.
    held, peak = {}, 0

    def tracked():
        for s in samples:
            held[s["__key__"]] = len(s["mp4"])
            yield s

    out = []
    for s in _bounded_shuffle(tracked(), 50, 10_000, 20, random.Random(3)):
        peak = max(peak, sum(held.values()))
        del held[s["__key__"]]
        out.append(s["__key__"])
    assert sorted(out, key=int) == [s["__key__"] for s in samples] and out != [s["__key__"] for s in samples]
    assert peak <= 10_000 + 1600


# ------------------------------------------------------------------------------------------------ DDP skip counts


class _ScalarUnet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, encoder_hidden_states=None):
        return x * self.w


def _skip_stage():
    """A DiffusionStage with a trivial loss, to exercise its skip accounting under DDP."""
    from functools import partial

    from diffusers import DDPMScheduler

    return _TrivialStage(_ScalarUnet(), DDPMScheduler(), partial(torch.optim.SGD, lr=0.1), ema={"enabled": False})


class _TrivialStage(DiffusionStage):
    def diffusion_step(self, batch, generator=None, timesteps=None):
        return (batch["video"].mean() - self.unet.w) ** 2, None


class _RankSkips(torch.utils.data.IterableDataset):
    """Rank r skips r + 1 samples per training batch (one "decode", r "truncated") and 2 r + 1 per validation batch."""

    def __init__(self, val: bool) -> None:
        self.val = val

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        while True:
            reasons = [0] * len(SKIP_REASONS)
            reasons[SKIP_REASONS.index("decode")] = 1
            reasons[SKIP_REASONS.index("truncated")] = 2 * rank if self.val else rank
            yield {
                "video": torch.zeros(1, 3, 2, 4, 4),
                "caption": ["x"],
                "key": ["k"],
                "n_skipped": torch.tensor(sum(reasons)),
                "skip_reasons": torch.tensor(reasons),
            }


class _SkipData(L.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(_RankSkips(False), batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(_RankSkips(True), batch_size=None)


def _ddp_worker(out: str) -> None:
    from lightning.pytorch.loggers import CSVLogger

    torch.set_num_threads(1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=5,
        limit_train_batches=5,
        limit_val_batches=3,
        val_check_interval=5,
        num_sanity_val_steps=0,
        logger=CSVLogger(out, name="", version=""),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_skip_stage(), datamodule=_SkipData())


@pytest.mark.slow  # whole train.py / DDP processes (tens of seconds): run with -m slow
def test_skip_counts_are_summed_over_ddp_ranks(tmp_path):
    """2 ranks: rank 0 skips 1 and rank 1 skips 2 samples per training batch. Before the fix the count lived in a
    registered buffer that DDP re-broadcast from rank 0 before every forward, and the logged sum was wrong."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    res = subprocess.run(
        [sys.executable, "-c", f"import test_data_reliability as t; t._ddp_worker({str(tmp_path)!r})"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    train = [r for r in rows if r.get("data/skipped_samples")]
    assert [float(r["data/skipped_samples"]) for r in train] == [3.0, 6.0, 9.0, 12.0, 15.0]  # (1 + 2) per step
    last = train[-1]
    assert float(last["data/skipped/decode"]) == 10 and float(last["data/skipped/truncated"]) == 5
    val = [r for r in rows if r.get("val/skipped_samples")]
    # one validation run of 3 batches: rank 0 skips 1, rank 1 skips 3 per batch
    assert len(val) == 1 and float(val[0]["val/skipped_samples"]) == 12.0
    assert float(val[0]["val/skipped/truncated"]) == 6.0 and float(val[0]["val/skipped/decode"]) == 6.0


# ------------------------------------------------------------------------------------------------ config lists


def test_shard_list_from_the_command_line(compose_train, tmp_path, toy_data_dir):
    """``data.train_shards=[a,b]`` arrives as a ListConfig: before the fix it was read as the glob "['a', 'b']"."""
    import hydra
    from omegaconf import ListConfig

    import train
    from show1_lightning.data.toy_data import ensure_toy_dataset

    toy = ensure_toy_dataset(toy_data_dir / "toy")
    a, b = toy["train"][:2]
    lean = ("callbacks.samples=null", "callbacks.toy_adherence=null", "callbacks.export=null")
    cfg = compose_train(tmp_path, f"data.train_shards=[{a},{b}]", f"data.val_shards=[{toy['val'][0]}]", *lean)
    assert isinstance(cfg.data.train_shards, ListConfig)
    assert expand_shard_spec(cfg.data.train_shards) == [a, b]
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.train_urls == [a, b] and dm.val_urls == [toy["val"][0]]
    assert dm.hparams["train_shards"] == [a, b] and type(dm.hparams["train_shards"]) is list
    # A run with it checkpoints plain values: resuming (weights_only) works.
    train.train(cfg)
    resumed = train.train(
        compose_train(
            tmp_path,
            f"data.train_shards=[{a},{b}]",
            f"data.val_shards=[{toy['val'][0]}]",
            *lean,
            "trainer.max_steps=4",
        )
    )
    assert torch.isfinite(torch.tensor(resumed["train/loss"]))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["datamodule_hyper_parameters"]["train_shards"] == [a, b]
    with pytest.raises(TypeError, match="shard spec"):
        expand_shard_spec({"a": 1})
