"""VideoDataModule: batches, skipping and counting bad samples, ranks, determinism, workers, text cache."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from numerics import assert_differ_rel

from show1_lightning.data.datamodule import VideoDataModule, resolve_rank
from show1_lightning.data.shards import VideoShardWriter
from show1_lightning.data.text_cache import TextCacheMismatchError, TextEmbeddingCache, precompute_text_embeddings
from show1_lightning.data.toy_data import make_toy_clip, toy_caption
from show1_lightning.data.video_io import encode_mp4
from show1_lightning.models.text_encoder import TextEncoder

GOOD_PER_SHARD = 8
BAD = {"garbage", "short", "truncated"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two shards of 11 samples: 8 good 32-frame 16-fps clips (64x40) and 3 bad ones each."""
    root = tmp_path_factory.mktemp("shards")
    colors = ["red", "green", "blue", "yellow", "cyan", "magenta"]
    bad_keys: dict[str, str] = {}
    good_keys: list[str] = []
    with VideoShardWriter(root, samples_per_shard=11) as w:
        n = 0
        for shard in range(2):
            for i in range(11):
                slot = {2: "garbage", 5: "short", 8: "truncated"}.get(i)
                c = colors[n % 6]
                frames = make_toy_clip(
                    c, "square", "right", seed=(shard, i), height=40, width=64, num_frames=8 if slot == "short" else 32
                )
                mp4 = encode_mp4(frames, fps=16)
                if slot == "garbage":
                    mp4 = b"\x00\x01garbage" * 200
                elif slot == "truncated":
                    mp4 = mp4[: len(mp4) // 2]
                key = w.write(mp4, toy_caption(c, "square", "right"))
                if slot:
                    bad_keys[key] = slot
                else:
                    good_keys.append(key)
                n += 1
    return {
        "train": [str(root / "00000.tar"), str(root / "00001.tar")],
        "val": str(root / "00000.tar"),
        "bad": bad_keys,
        "good": good_keys,
    }


def _dm(shards: dict, **kw) -> VideoDataModule:
    args = dict(
        train_shards=shards["train"],
        val_shards=shards["val"],
        num_frames=8,
        target_fps=4,
        height=40,
        width=64,
        batch_size=2,
        epoch_length=4,
        val_batches=3,
        shuffle_buffer=8,
        seed=0,
    )
    args.update(kw)
    return VideoDataModule(**args)


def _keys(loader) -> list[list[str]]:
    return [b["key"] for b in loader]


def test_batch_contents(shards: dict) -> None:
    dm = _dm(shards, height=32, width=32)
    loader = dm.train_dataloader()
    assert len(loader) == 4
    batches = list(loader)
    assert len(batches) == 4
    for b in batches:
        assert b["video"].shape == (2, 3, 8, 32, 32) and b["video"].dtype == torch.float32
        assert b["video"].min() >= -1 and b["video"].max() <= 1
        assert b["video"].std() > 0.05  # real content, not a constant
        assert b["stride"].dtype == torch.long and b["stride"].tolist() == [4, 4]  # 16 fps -> 4 fps
        assert b["fps"].tolist() == [4.0, 4.0]
        assert b["n_skipped"].dtype == torch.long and b["n_skipped"].ndim == 0
        assert all(c.startswith("a ") and c.endswith("square moving right") for c in b["caption"])
        assert not set(b["key"]) & set(shards["bad"])
        assert "text_emb" not in b
    fixed = list(_dm(shards, target_fps=None, frame_stride=3, epoch_length=1).train_dataloader())
    assert fixed[0]["stride"].tolist() == [3, 3]


def test_validation_skips_and_counts_bad_samples(shards: dict) -> None:
    dm = _dm(shards, batch_size=3, val_batches=3)
    batches = list(dm.val_dataloader())
    # chunks of 3 in shard order: each holds exactly one bad sample (slots 2, 5, 8)
    assert len(batches) == 3
    assert [int(b["n_skipped"]) for b in batches] == [1, 1, 1]
    assert [len(b["key"]) for b in batches] == [2, 2, 2]
    keys = [k for b in batches for k in b["key"]]
    assert keys == [k for k in shards["good"] if k.startswith("00000")][:6]
    # fixed start for validation: the same clips every time
    again = list(dm.val_dataloader())
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(batches, again))


def test_training_skips_and_counts_bad_samples(shards: dict) -> None:
    dm = _dm(shards, epoch_length=12, shuffle_buffer=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 12 and all(b["video"].shape[0] == 2 for b in batches)  # partial=False
    skipped = sum(int(b["n_skipped"]) for b in batches)
    # 24 good samples were used; 3 of every 11 samples are bad, so some were met and counted
    assert skipped > 0
    assert not {k for b in batches for k in b["key"]} & set(shards["bad"])


def test_unusable_data_raises_instead_of_hanging(shards: dict) -> None:
    dm = _dm(shards, min_side=100, max_consecutive_skips=30)  # every 40-pixel clip is too small
    with pytest.raises(RuntimeError, match="in a row"):
        next(iter(dm.train_dataloader()))


def test_two_ranks_differ_but_yield_equal_batches(shards: dict) -> None:
    r0 = _keys(_dm(shards, rank=0, world_size=2, epoch_length=5).train_dataloader())
    r1 = _keys(_dm(shards, rank=1, world_size=2, epoch_length=5).train_dataloader())
    assert len(r0) == len(r1) == 5
    assert r0 != r1
    v0 = _keys(_dm(shards, rank=0, world_size=2, val_batches=2).val_dataloader())
    v1 = _keys(_dm(shards, rank=1, world_size=2, val_batches=2).val_dataloader())
    assert len(v0) == len(v1) == 2
    assert not {k for b in v0 for k in b} & {k for b in v1 for k in b}  # disjoint validation samples


def test_rank_from_environment(shards: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_rank() == (1, 2)
    env = _keys(_dm(shards, epoch_length=3).train_dataloader())
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    explicit = _keys(_dm(shards, rank=1, world_size=2, epoch_length=3).train_dataloader())
    assert env == explicit
    with pytest.raises(ValueError):
        resolve_rank(2, 2)


def test_deterministic_given_seed(shards: dict) -> None:
    a_loader = _dm(shards, seed=3).train_dataloader()
    a1, a2 = _keys(a_loader), _keys(a_loader)  # two epochs
    b_loader = _dm(shards, seed=3).train_dataloader()
    b1, b2 = _keys(b_loader), _keys(b_loader)
    assert (a1, a2) == (b1, b2)
    assert a1 != a2  # a new epoch draws new samples
    assert _keys(_dm(shards, seed=4).train_dataloader()) != a1


def test_worker_processes(shards: dict) -> None:
    dm = _dm(shards, num_workers=2, epoch_length=5, batch_size=3, val_batches=3)
    train = list(dm.train_dataloader())
    assert len(train) == 5 and all(b["video"].shape == (3, 3, 8, 40, 64) for b in train)
    # workers use different seeds: their batches are not copies of each other
    assert train[0]["key"] != train[1]["key"]
    val_workers = _keys(dm.val_dataloader())
    val_main = _keys(_dm(shards, batch_size=3, val_batches=3).val_dataloader())
    assert val_workers == val_main  # validation order does not depend on num_workers


def test_text_cache_matches_encoder(shards: dict, tmp_path: Path) -> None:
    encoder = TextEncoder(kind="t5", seed=0)
    counts = precompute_text_embeddings(shards["train"], encoder, tmp_path / "cache", batch_size=8)
    assert counts == {"shards": 2, "computed_shards": 2, "samples": 22}
    again = precompute_text_embeddings(shards["train"], encoder, tmp_path / "cache")
    assert again["computed_shards"] == 0  # resumable: nothing to recompute
    dm = _dm(shards, text_cache_dir=tmp_path / "cache", text_encoder_identity=encoder.identity, epoch_length=2)
    for b in dm.train_dataloader():
        emb, mask = encoder.encode(b["caption"])
        assert b["text_emb"].shape == (2, 77, encoder.dim) and b["text_emb"].dtype == torch.float32
        assert b["text_mask"].dtype == torch.bool and torch.equal(b["text_mask"], mask)
        # fp16 storage rounds each value to 2^-11 of itself (rtol); atol covers values near zero (O(1) states).
        assert torch.allclose(b["text_emb"], emb, rtol=2e-3, atol=2e-3)
        assert_differ_rel(b["text_emb"][0], b["text_emb"][1])  # different captions
    null_emb, null_mask = dm.null_text_embedding()
    ref_emb, ref_mask = encoder.encode([""])
    assert torch.allclose(null_emb, ref_emb[0], rtol=2e-3, atol=2e-3)  # fp16 storage, as above
    assert torch.equal(null_mask, ref_mask[0])
    assert int(null_mask.sum()) == 1  # only the end-of-sequence token
    other = TextEncoder(kind="t5", seed=1)
    with pytest.raises(TextCacheMismatchError, match="made with encoder"):
        _dm(shards, text_cache_dir=tmp_path / "cache", text_encoder_identity=other.identity).setup()
    with pytest.raises(TextCacheMismatchError):
        precompute_text_embeddings(shards["train"], other, tmp_path / "cache")
    with pytest.raises(KeyError, match="precompute"):
        TextEmbeddingCache(tmp_path / "cache").lookup("/elsewhere/00005.tar", "000050000")


def test_bad_configuration_errors(shards: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="toy_root"):
        VideoDataModule()
    with pytest.raises(ValueError):
        _dm(shards, num_frames=0)
    with pytest.raises(FileNotFoundError):
        _dm(shards, train_shards=str(tmp_path / "missing.tar")).setup()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        _dm(shards, text_cache_dir=tmp_path).setup()


class _TinyModule(L.LightningModule):
    """Fits a scalar to the mean pixel value; records what the loaders delivered."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.skipped = 0
        self.val_seen = 0

    def training_step(self, batch, _):
        self.skipped += int(batch["n_skipped"])
        return (batch["video"].mean() - self.w) ** 2

    def validation_step(self, batch, _):
        self.val_seen += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit(shards: dict, tmp_path: Path) -> None:
    dm = _dm(shards, epoch_length=3, val_batches=2)
    model = _TinyModule()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 6 and trainer.current_epoch == 2  # two epochs of exactly 3 batches
    assert model.val_seen == 2 * 2  # 2 validation runs (one per epoch) x 2 batches
    assert model.w.item() != 0.0


def test_toy_root(toy_data_dir: Path) -> None:
    # The session's toy dataset (the one every composed training test uses): generated once per session.
    dm = VideoDataModule(
        toy_root=toy_data_dir / "toy",
        num_frames=8,
        target_fps=4,
        height=40,
        width=64,
        batch_size=4,
        epoch_length=1,
        val_batches=1,
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_urls) == 8 and len(dm.val_urls) == 1
    b = next(iter(dm.train_dataloader()))
    assert b["video"].shape == (4, 3, 8, 40, 64) and b["stride"].tolist() == [4] * 4
    v = next(iter(dm.val_dataloader()))
    assert v["key"] == ["000080000", "000080001", "000080002", "000080003"]


class _KeyRecorder(L.LightningModule):
    """Writes the keys each rank trained on to ``out/rank{r}.json``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[list[str]] = []

    def training_step(self, batch, _):
        self.keys.append(batch["key"])
        return (batch["video"].mean() - self.w) ** 2

    def on_train_end(self) -> None:
        import json

        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.keys))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_ddp_spawn_two_processes(shards: dict, tmp_path: Path) -> None:
    import json

    dm = _dm(shards, epoch_length=3, val_batches=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_KeyRecorder(str(tmp_path)), datamodule=dm)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(r0) == len(r1) == 6  # 2 epochs x 3 batches on both ranks: no hang, equal counts
    assert r0 != r1  # the ranks drew different samples
