"""Precomputed VAE latents for the latent SR stage, in webdataset shards keyed like the video shards.

The latent SR stage encodes every training clip with the frozen VAE at every step (twice with
``residual``: the clip and its resized low-resolution input). The encoder does not change during
training, so the latents can be computed once: ``data/precompute_latents.py`` writes them here and
``data.latent_cache_dir`` makes the training stream read them instead of decoding and encoding video.

Layout of a cache folder::

    meta.json                      format, what made the cache (VAE identity, clip size, frame sampling, the
                                   stage's input size and resize mode, posterior storage), status, and per
                                   source shard: its cache file, size and mtime (a rewritten shard is refused)
    shards/<dir>/<stem>-<hash>.tar one webdataset shard per video shard (``<hash>``: sha256 of the shard's full
                                   path, as in the text cache), with the video shard's ``__key__`` per sample:
        KEY.latents.npy            K x C x T x h x w: scaled posterior mean of K clips of the video
        KEY.cond.npy               K x C x T x h x w: the same for the stage's low-resolution input (the clip
                                   resized to input size, then back to output size with ``resize_mode``): what
                                   ``residual`` subtracts
        KEY.latents_logvar.npy     (``posterior="mean_logvar"`` only) scaled posterior log-variances
        KEY.cond_logvar.npy
        KEY.txt                    the caption
        KEY.json                   source shard, stride, fps and the start frame of each of the K clips

What a cache fixes:

- **Frame sampling.** On the fly, every time a video is drawn its clip starts at a fresh random frame. A
  cache stores ``clips_per_video`` (K) clips per video, each at a seeded random start (the distribution the
  on-the-fly stream draws from); training picks one of the K at random each time the video is drawn. K = 1
  fixes one clip per video for the whole run; larger K brings back temporal augmentation at K times the
  storage. Spatially nothing is lost: the datamodule's resize + centre crop is deterministic.
- **Sizes and sampling settings.** ``num_frames``, ``height``/``width``, ``target_fps``/``frame_stride`` and
  the stage's ``input_height``/``input_width``/``resize_mode`` are recorded; training with other values is
  refused at start-up (:class:`LatentCacheMismatchError` naming every field that differs).
- **The VAE.** Its identity (:func:`vae_identity`: a hash of its config, weights, scaling factor and the
  dtype it runs in) is recorded and compared with the stage's VAE at start-up.

Posterior: the mean, not samples. The stage's VAE encodes to the posterior mean by default
(``vae.sample_posterior: false``, what Show-1's training target is for SD's VAE, whose posterior std is
tiny), so the mean cached once is exactly the on-the-fly target. Caching a *sample* would freeze one noise
draw per clip for the whole run, which is neither the mean nor posterior sampling. For a VAE configured to
sample (``sample_posterior: true``), ``posterior="mean_logvar"`` also stores the log-variance and the stage
draws ``mean + std * noise`` afresh every step, as it would on the fly (twice the storage); a mean-only cache
is refused for such a VAE.

Validation still reads the video shards (it needs pixels: PSNR against the baseline, sample videos).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from show1_lightning.data.datamodule import FatalDataError, SampleMaker, SampleSkipped, SkipCounter, _ClipMaker
from show1_lightning.data.shards import expand_shard_spec
from show1_lightning.data.text_cache import cache_file_name, normalize_shard_url
from show1_lightning.fileio import atomic_write_json
from show1_lightning.models.vae import VideoVAE
from show1_lightning.video_ops import resize_frames

log = logging.getLogger(__name__)

__all__ = [
    "LatentCache",
    "LatentCacheMismatchError",
    "precompute_latents",
    "vae_identity",
    "encode_posterior",
    "condition_video",
    "latent_shard_name",
    "open_for_training",
    "LATENT_BATCH_KEYS",
]

FORMAT_VERSION = 1
POSTERIORS = ("mean", "mean_logvar")
_DTYPES = {"float32": np.float32, "float16": np.float16}
#: Tensors a cached training batch carries (B x C x T x h x w each, when present).
LATENT_BATCH_KEYS = ("latents", "cond_latents", "latents_logvar", "cond_latents_logvar")
_MEMBERS = {"latents": "latents.npy", "cond_latents": "cond.npy"}
_LOGVAR_MEMBERS = {"latents_logvar": "latents_logvar.npy", "cond_latents_logvar": "cond_logvar.npy"}
#: Recorded fields that must equal the training configuration.
SPEC_FIELDS = (
    "vae_identity",
    "num_frames",
    "height",
    "width",
    "target_fps",
    "frame_stride",
    "input_height",
    "input_width",
    "resize_mode",
)


class LatentCacheMismatchError(ValueError):
    """The latent cache was made by another VAE, at other sizes or frame sampling, or from other shards."""


# ------------------------------------------------------------------------------------------------ encoding
def vae_identity(vae: VideoVAE) -> str:
    """``<class>-<16 hex>``: sha256 of the autoencoder's config, weights, scaling factor and run dtype.

    Two VAEs with this identity encode identically; any retrained, other or differently scaled VAE differs.
    """
    h = hashlib.sha256()
    # Private keys ("_use_default_values": a set's order, "_name_or_path", "_diffusers_version") vary by process.
    config = {k: v for k, v in dict(vae.vae.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"scale={vae.scaling_factor!r};dtype={vae.dtype}".encode())
    for name, tensor in sorted(vae.vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(vae.vae).__name__}-{h.hexdigest()[:16]}"


@torch.no_grad()
def encode_posterior(vae: VideoVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B x 3 x T x H x W in [-1, 1] -> (scaled posterior mean, scaled posterior log-variance), float32.

    The mean is what ``vae.encode`` returns without posterior sampling; ``mean + exp(logvar / 2) * noise``
    is what it returns with it (``std`` scales with the latents, so logvar gains ``2 log(scaling_factor)``).
    """
    b, c, t, hh, ww = video.shape
    vae.latent_size(hh, ww)
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, hh, ww).to(vae.device)
    means, logvars = [], []
    with torch.autocast(device_type=vae.device.type, enabled=False):
        for a in range(0, frames.shape[0], vae.chunk_frames):
            dist = vae.vae.encode(frames[a : a + vae.chunk_frames].to(vae.dtype)).latent_dist
            means.append(dist.mean.float() * vae.scaling_factor)
            logvars.append(dist.logvar.float() + 2.0 * float(np.log(vae.scaling_factor)))

    def unfold(x: list[torch.Tensor]) -> torch.Tensor:
        z = torch.cat(x)
        return z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    return unfold(means), unfold(logvars)


def condition_video(
    video: torch.Tensor, input_height: int, input_width: int, resize_mode: str = "bicubic"
) -> torch.Tensor:
    """The latent SR stage's low-resolution input of a clip, back at the clip's size (the residual base).

    ``LatentSRStage.resize_to_output(LatentSRStage.make_upstream(video))``: antialiased resize to the input size
    (what pixel SR hands on), then ``resize_mode`` back to the output size, clamped to [-1, 1].
    """
    low = resize_frames(video.float(), (input_height, input_width)).clamp(-1.0, 1.0)
    return resize_frames(low, tuple(video.shape[-2:]), resize_mode).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------ files
def latent_shard_name(shard_url: str) -> str:
    """Relative cache shard of a video shard: ``shards/<parent>/<stem>-<16 hex of sha256(full path)>.tar``."""
    return cache_file_name(shard_url)[: -len(".safetensors")] + ".tar"


def _npy(array: torch.Tensor, dtype: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.cpu().numpy().astype(dtype), allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


def _source_stat(url: str) -> dict[str, int] | None:
    """Size and mtime of a local shard (None for URLs): a shard rewritten after the precompute is noticed."""
    if "://" in url or url.startswith("pipe:"):
        return None
    st = os.stat(url)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _read_meta(cache_dir: Path) -> dict[str, Any]:
    return json.loads((cache_dir / "meta.json").read_text())


# ------------------------------------------------------------------------------------------------ precompute
def precompute_latents(
    shards: str | Iterable[str],
    vae: VideoVAE,
    cache_dir: str | Path,
    *,
    num_frames: int,
    height: int,
    width: int,
    target_fps: float | None,
    frame_stride: int = 1,
    input_height: int,
    input_width: int,
    resize_mode: str = "bicubic",
    clips_per_video: int = 1,
    posterior: str = "mean",
    dtype: str = "float32",
    seed: int = 0,
    min_side: int = 0,
    max_source_pixels: int | None = 3840 * 2160,
    max_source_frames: int | None = 36_000,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode ``clips_per_video`` clips of every video of ``shards`` with ``vae`` into ``cache_dir``.

    Clips are decoded and resized exactly as the training stream does (``num_frames`` at ``target_fps``
    or ``frame_stride``, resize + centre crop to ``height`` x ``width``), at seeded random starts. Samples
    the training stream would skip (too short, corrupt, ...) are left out and counted by reason. Resumable:
    shards already in the cache, unchanged since, are skipped unless ``overwrite``. A cache folder made
    with other settings is an error unless ``overwrite`` (then rebuilt from scratch).

    Returns:
        counts: {"shards", "computed_shards", "samples", "skipped": {reason: n}}.
    """
    if posterior not in POSTERIORS:
        raise ValueError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if clips_per_video < 1:
        raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
    vae.latent_size(height, width)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "format_version": FORMAT_VERSION,
        "vae_identity": vae_identity(vae),
        "latent_channels": int(vae.latent_channels),
        "num_frames": int(num_frames),
        "height": int(height),
        "width": int(width),
        "target_fps": None if target_fps is None else float(target_fps),
        "frame_stride": int(frame_stride),
        "input_height": int(input_height),
        "input_width": int(input_width),
        "resize_mode": resize_mode,
        "clips_per_video": int(clips_per_video),
        "posterior": posterior,
        "dtype": dtype,
        "seed": int(seed),
    }
    meta_path = cache_dir / "meta.json"
    done: dict[str, Any] = {}
    if meta_path.exists() and not overwrite:
        old = _read_meta(cache_dir)
        differ = [k for k in spec if old.get(k) != spec[k]]
        if differ:
            raise LatentCacheMismatchError(
                f"{cache_dir} holds latents made with other settings ("
                + ", ".join(f"{k}: {old.get(k)!r} there, {spec[k]!r} here" for k in differ)
                + "); use another folder or overwrite=True (--overwrite)"
            )
        done = dict(old.get("shards", {}))
    meta = {**spec, "status": "in_progress", "shards": done}
    atomic_write_json(meta_path, meta)

    maker = _ClipMaker(
        num_frames, height, width, target_fps, frame_stride, min_side, None, max_source_pixels, max_source_frames
    )
    np_dtype = _DTYPES[dtype]
    urls = expand_shard_spec(shards)
    counts: dict[str, Any] = {"shards": len(urls), "computed_shards": 0, "samples": 0, "skipped": Counter()}
    for n, url in enumerate(urls):
        source = normalize_shard_url(url)
        rel = latent_shard_name(url)
        stat = _source_stat(url)
        entry = done.get(source)
        if entry is not None and entry.get("stat") == stat and (cache_dir / rel).exists():
            counts["samples"] += int(entry["samples"])
            continue
        n_samples, skipped = _encode_shard(
            url, cache_dir / rel, vae, maker, spec, np_dtype, condition=(input_height, input_width, resize_mode)
        )
        done[source] = {"file": rel, "stat": stat, "samples": n_samples, "skipped": dict(skipped)}
        atomic_write_json(meta_path, meta)  # after each shard: an interrupted run resumes from here
        counts["samples"] += n_samples
        counts["computed_shards"] += 1
        counts["skipped"].update(skipped)
        if progress:
            print(f"[{n + 1}/{len(urls)}] {url}: {n_samples} videos ({dict(skipped)} skipped) -> {rel}", flush=True)
    meta["status"] = "complete"
    atomic_write_json(meta_path, meta)
    counts["skipped"] = dict(counts["skipped"])
    return counts


def _encode_shard(
    url: str,
    target: Path,
    vae: VideoVAE,
    maker: _ClipMaker,
    spec: dict[str, Any],
    np_dtype: Any,
    condition: tuple[int, int, str],
) -> tuple[int, Counter]:
    """Write the cache shard of one video shard (atomically); returns (samples written, skips by reason)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    counter = SkipCounter(max_consecutive=1 << 62)
    with_logvar = spec["posterior"] == "mean_logvar"
    n = 0
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with wds.TarWriter(tmp) as sink:
            pipe = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=counter.handler))
            for sample in pipe:
                key = sample["__key__"]
                clips = []
                for i in range(spec["clips_per_video"]):
                    # Seeded per video and clip: the same cache from the same settings, whatever the shard order.
                    rng = random.Random(f"{spec['seed']}/{key}/{i}")
                    item = maker.make(sample, rng, None, counter)
                    if item is None:
                        break
                    clips.append(item)
                if len(clips) < spec["clips_per_video"]:
                    continue
                video = torch.stack([c["video"] for c in clips])  # K x 3 x T x H x W
                mean, logvar = encode_posterior(vae, video)
                cmean, clogvar = encode_posterior(vae, condition_video(video, *condition))
                record = {
                    "__key__": key,
                    _MEMBERS["latents"]: _npy(mean, np_dtype),
                    _MEMBERS["cond_latents"]: _npy(cmean, np_dtype),
                    "txt": clips[0]["caption"].encode("utf-8"),
                    "json": json.dumps(
                        {
                            "shard": normalize_shard_url(url),
                            "stride": clips[0]["stride"],
                            "fps": clips[0]["fps"],
                            "starts": [c["start"] for c in clips],
                        }
                    ).encode(),
                }
                if with_logvar:
                    record[_LOGVAR_MEMBERS["latents_logvar"]] = _npy(logvar, np_dtype)
                    record[_LOGVAR_MEMBERS["cond_latents_logvar"]] = _npy(clogvar, np_dtype)
                sink.write(record)
                n += 1
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n, counter.reasons


# ------------------------------------------------------------------------------------------------ reading
class LatentCache:
    """A cache folder written by :func:`precompute_latents`, checked against the training configuration.

    Args:
        cache_dir: the folder.
        expected: the training configuration's values of :data:`SPEC_FIELDS` (those given are compared;
            any difference raises :class:`LatentCacheMismatchError` naming every differing field).
        sample_posterior: the stage's VAE samples its posterior: the cache must hold log-variances.
    """

    def __init__(
        self, cache_dir: str | Path, expected: dict[str, Any] | None = None, sample_posterior: bool = False
    ) -> None:
        self.cache_dir = Path(cache_dir)
        if not (self.cache_dir / "meta.json").exists():
            raise FileNotFoundError(
                f"no latent cache in {self.cache_dir} (missing meta.json); run data/precompute_latents.py first"
            )
        self.meta = _read_meta(self.cache_dir)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise LatentCacheMismatchError(
                f"latent cache {self.cache_dir} has format {self.meta.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}; recompute it with data/precompute_latents.py --overwrite"
            )
        if self.meta.get("status") != "complete":
            raise LatentCacheMismatchError(
                f"latent cache {self.cache_dir} is {self.meta.get('status')!r}: its precompute did not finish; "
                "rerun data/precompute_latents.py (it resumes)"
            )
        differ = {k: v for k, v in (expected or {}).items() if self.meta.get(k) != v}
        if differ:
            raise LatentCacheMismatchError(
                f"latent cache {self.cache_dir} does not match the training configuration: "
                + "; ".join(f"{k} is {self.meta.get(k)!r} in the cache but {v!r} here" for k, v in differ.items())
                + ". Recompute it (data/precompute_latents.py with the training overrides) or unset "
                "data.latent_cache_dir"
            )
        if sample_posterior and self.meta.get("posterior") != "mean_logvar":
            raise LatentCacheMismatchError(
                f"the stage's VAE samples its posterior (vae.sample_posterior=true) but latent cache "
                f"{self.cache_dir} holds only posterior means; recompute it with --posterior mean_logvar"
            )
        self.sample_posterior = bool(sample_posterior)

    def shard_urls(self, video_urls: Iterable[str]) -> list[str]:
        """The cache shards of ``video_urls`` (every one must be in the cache and unchanged since)."""
        out = []
        shards = self.meta.get("shards", {})
        for url in video_urls:
            source = normalize_shard_url(url)
            entry = shards.get(source)
            if entry is None:
                raise LatentCacheMismatchError(
                    f"video shard {source} is not in latent cache {self.cache_dir}; run data/precompute_latents.py "
                    "over the training shards (the cache is keyed by their full paths)"
                )
            if entry.get("stat") is not None and _source_stat(url) != entry["stat"]:
                raise LatentCacheMismatchError(
                    f"video shard {source} changed after its latents were cached (size/mtime differ); recompute "
                    "the cache for it"
                )
            path = self.cache_dir / entry["file"]
            if not path.exists():
                raise FileNotFoundError(f"latent cache shard {path} of {source} is missing; rerun the precompute")
            out.append(str(path))
        return out

    def maker(self, text_cache: Any | None = None) -> _LatentSampleMaker:
        """The training stream's sample maker over this cache's shards."""
        return _LatentSampleMaker(self.meta["height"], self.meta["width"], text_cache, self.sample_posterior)


class _LatentSampleMaker(SampleMaker):
    """Raw cache sample -> training item (one of its K clips drawn with the stream's rng).

    The same interface as the datamodule's clip maker (``make(sample, rng, start, counter)``). Items carry
    ``video`` as an empty B x 3 x 0 x H x W placeholder (no pixels are loaded; code that reads pixels of a
    training batch fails loudly) so batch-size bookkeeping keyed on ``video`` keeps working.
    """

    def __init__(self, height: int, width: int, text_cache: Any | None, with_logvar: bool) -> None:
        self.height, self.width = height, width
        self.text_cache, self.with_logvar = text_cache, with_logvar

    def __call__(self, sample: dict[str, Any], rng: random.Random | None, start: int | None) -> dict[str, Any]:
        key = sample.get("__key__", "?")
        if _MEMBERS["latents"] not in sample:
            raise SampleSkipped("no_video", f"cache sample {key} has no {_MEMBERS['latents']} member")
        info = json.loads(sample["json"])
        latents = _from_npy(sample[_MEMBERS["latents"]])
        k = rng.randrange(latents.shape[0]) if rng is not None else 0
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleSkipped("caption", f"caption is not valid UTF-8 ({exc})") from exc
        item: dict[str, Any] = {
            "video": torch.zeros(3, 0, self.height, self.width),
            "latents": latents[k],
            "cond_latents": _from_npy(sample[_MEMBERS["cond_latents"]])[k],
            "caption": caption,
            "key": key,
            "stride": int(info["stride"]),
            "fps": float(info["fps"]),
        }
        if self.with_logvar:
            for name, member in _LOGVAR_MEMBERS.items():
                item[name] = _from_npy(sample[member])[k]
        if self.text_cache is not None:
            try:  # keyed by the video shard the latents came from
                emb, mask = self.text_cache.lookup(info["shard"], key, caption)
            except (KeyError, ValueError) as exc:
                raise FatalDataError(exc.args[0] if exc.args else str(exc)) from exc
            item["text_emb"], item["text_mask"] = emb, mask
        return item


def open_for_training(datamodule: Any, cache_dir: str | Path) -> LatentCache:
    """Open ``cache_dir`` for ``datamodule``'s training stream, checked against the trainer's stage and the
    datamodule's clip settings (raises :class:`LatentCacheMismatchError` or ``FatalDataError``)."""
    trainer = getattr(datamodule, "trainer", None)
    stage = getattr(trainer, "lightning_module", None) if trainer is not None else None
    vae = getattr(stage, "vae", None)
    if not isinstance(vae, VideoVAE):
        raise FatalDataError(
            f"data.latent_cache_dir={cache_dir} is set, but the trained stage "
            f"({type(stage).__name__ if stage is not None else 'none attached'}) has no VAE to check it against: "
            "only the latent SR stage trains from cached latents (fit it with this datamodule)"
        )
    expected = {
        "vae_identity": vae_identity(vae),
        "num_frames": int(datamodule.num_frames),
        "height": int(datamodule.height),
        "width": int(datamodule.width),
        "target_fps": None if datamodule.target_fps is None else float(datamodule.target_fps),
        # The stride only matters without target_fps; with it, the cache's value is whatever was passed.
        **({"frame_stride": int(datamodule.frame_stride)} if datamodule.target_fps is None else {}),
        "input_height": int(stage.input_height),
        "input_width": int(stage.input_width),
        "resize_mode": stage.resize_mode,
    }
    return LatentCache(cache_dir, expected=expected, sample_posterior=vae.sample_posterior)
