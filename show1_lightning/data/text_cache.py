"""Precomputed text embeddings, one safetensors file per shard, read by the datamodule.

Layout of a cache folder::

    meta.json                      format version, encoder identity, dim, max_length, storage dtype, status
    null.safetensors               the empty-caption embedding (for classifier-free guidance dropout)
    shards/<dir>/<stem>-<hash>.safetensors
                                   per shard: "emb" N x L x D, "mask" N x L (uint8); in the metadata the
                                   sample keys, a digest of each caption, the shard's path and the encoder
                                   identity. ``<hash>`` is a hash of the shard's full (absolute) path or
                                   URL, so two folders that both start at 00000.tar never share a file.

Running T5-XXL once per caption instead of once per training step is what the mature video
frameworks do; the cache is keyed by shard path and sample key, so it serves every run over those shards.
Every lookup is checked: the file's encoder identity against ``meta.json``'s, and the sample's caption
against the digest of the caption its embedding was computed from (a shard rewritten in place or a moved
cache is an error, never a wrong embedding). While a precompute runs, ``meta.json`` says
``"status": "in_progress"``; a re-encode with another encoder first withdraws the old identity
(``identity: null``), so an interrupted one can never leave ``meta.json`` claiming the new encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from safetensors import safe_open
from safetensors.torch import save

from show1_lightning.data.shards import expand_shard_spec, sample_caption
from show1_lightning.fileio import atomic_write_bytes, atomic_write_json

__all__ = [
    "TextEmbeddingCache",
    "TextCacheMismatchError",
    "precompute_text_embeddings",
    "cache_file_name",
    "caption_digest",
]

FORMAT_VERSION = 2
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TextCacheMismatchError(ValueError):
    """The cache was made by another text encoder (or max_length), by an older format, or from other captions."""


def normalize_shard_url(shard_url: str) -> str:
    """The identity of a shard: its absolute, normalised path (local files) or the URL as given."""
    url = str(shard_url)
    if "://" in url or url.startswith("pipe:"):
        return url
    return os.path.normpath(os.path.abspath(url))


def cache_file_name(shard_url: str) -> str:
    """Relative cache file of a shard: ``shards/<parent folder>/<stem>-<16 hex of sha256(full path)>.safetensors``."""
    url = normalize_shard_url(shard_url)
    p = Path(url.split("::")[-1])
    stem = p.name[: -len(".tar")] if p.name.endswith(".tar") else p.stem
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return f"shards/{p.parent.name or '_'}/{stem}-{digest}.safetensors"


def caption_digest(caption: str) -> str:
    """Short digest of a caption, stored per sample to notice stale entries."""
    return hashlib.sha256(caption.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _read_meta(cache_dir: Path) -> dict[str, Any]:
    return json.loads((cache_dir / "meta.json").read_text())


class TextEmbeddingCache:
    """Read access to a cache folder; ``lookup(shard_url, key, caption) -> (emb L x D float, mask L bool)``.

    Args:
        cache_dir: the folder written by :func:`precompute_text_embeddings`.
        expected_identity: the configured encoder's ``TextEncoder.identity``; a different one in
            ``meta.json`` (or in a shard's file) raises :class:`TextCacheMismatchError`. None: no
            comparison with a configured encoder (the files must still agree with ``meta.json``).
    """

    def __init__(self, cache_dir: str | Path, expected_identity: str | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no text-embedding cache in {self.cache_dir} (missing meta.json); "
                "run data/precompute_text_embeddings.py first"
            )
        self.meta: dict[str, Any] = _read_meta(self.cache_dir)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise TextCacheMismatchError(
                f"text cache {self.cache_dir} has format {self.meta.get('format_version')}, this code reads format "
                f"{FORMAT_VERSION} (shards keyed by their full path, captions checked); recompute it with "
                "data/precompute_text_embeddings.py --overwrite"
            )
        if self.meta.get("identity") is None:
            raise TextCacheMismatchError(
                f"text cache {self.cache_dir} is being re-encoded or its re-encode was interrupted "
                f"(meta.json has no encoder identity, status {self.meta.get('status')!r}); finish the precompute first"
            )
        if expected_identity is not None and self.meta.get("identity") != expected_identity:
            raise TextCacheMismatchError(
                f"text cache {self.cache_dir} was made with encoder {self.meta.get('identity')!r}, "
                f"but the configured encoder is {expected_identity!r}; recompute it or point text_cache_dir elsewhere"
            )
        self.dim = int(self.meta["dim"])
        self.max_length = int(self.meta["max_length"])
        self._files: dict[str, tuple[Any, dict[str, int], list[str]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # open file handles stay in their process
        return state

    @property
    def identity(self) -> str:
        return str(self.meta["identity"])

    def _open(self, shard_url: str) -> tuple[Any, dict[str, int], list[str]]:
        name = cache_file_name(shard_url)
        entry = self._files.get(name)
        if entry is None:
            path = self.cache_dir / name
            if not path.exists():
                raise KeyError(
                    f"no cached text embeddings for shard {normalize_shard_url(shard_url)} ({path}); "
                    "run data/precompute_text_embeddings.py over these shards (the cache is keyed by the "
                    "shards' full paths: moved shards need a new precompute)"
                )
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            if "keys" not in meta or "captions" not in meta:
                raise TextCacheMismatchError(
                    f"{path} is not a text cache file of format {FORMAT_VERSION}; rerun the precompute"
                )
            if meta.get("identity") != self.identity:
                raise TextCacheMismatchError(
                    f"{path} holds embeddings of {meta.get('identity')!r}, but {self.cache_dir}/meta.json says "
                    f"{self.identity!r}; rerun the precompute"
                )
            keys = json.loads(meta["keys"])
            entry = (handle, {k: i for i, k in enumerate(keys)}, json.loads(meta["captions"]))
            self._files[name] = entry
        return entry

    def lookup(self, shard_url: str, key: str, caption: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding (float32 ``L x D``) and mask (bool ``L``) of sample ``key`` of ``shard_url``.

        With ``caption``, the entry must have been computed from that caption (else
        :class:`TextCacheMismatchError`: the shard changed after the precompute).
        """
        handle, index, digests = self._open(shard_url)
        if key not in index:
            raise KeyError(f"sample {key} of shard {shard_url} is not in the text cache; recompute it")
        i = index[key]
        if caption is not None and digests[i] != caption_digest(caption):
            raise TextCacheMismatchError(
                f"the text cache entry of sample {key} of shard {shard_url} was computed from another caption "
                "(the shard changed after the precompute); recompute the cache for it"
            )
        emb = handle.get_slice("emb")[i : i + 1][0].float()
        mask = handle.get_slice("mask")[i : i + 1][0].bool()
        return emb, mask

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-caption embedding (float32 ``L x D``, bool ``L``) for CFG caption dropout."""
        path = self.cache_dir / "null.safetensors"
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("identity") != self.identity:
                raise TextCacheMismatchError(f"{path} was not made by {self.identity!r}; rerun the precompute")
            return f.get_tensor("emb").float(), f.get_tensor("mask").bool()


def _shard_captions(url: str) -> tuple[list[str], list[str]]:
    """(keys, captions) of a shard in file order, reading only the caption members."""
    pipe = wds.DataPipeline(
        wds.SimpleShardList([url]),
        wds.tarfile_to_samples(select_files=lambda fname: fname.endswith((".txt", ".json"))),
    )
    keys, captions = [], []
    for sample in pipe:
        keys.append(sample["__key__"])
        captions.append(sample_caption(sample))
    return keys, captions


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def precompute_text_embeddings(
    shards: str | Iterable[str],
    encoder: Any,
    cache_dir: str | Path,
    batch_size: int = 32,
    dtype: str = "float16",
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Embed every caption of ``shards`` with ``encoder`` (a ``TextEncoder``) into ``cache_dir``.

    Shards whose cache file already exists with the same keys, captions and encoder are skipped
    (resumable), unless ``overwrite``. A cache folder made by another encoder, dtype or format is an
    error unless ``overwrite``; then ``meta.json`` first loses its identity (status "in_progress") and
    gets the new one only after every shard was written, so an interrupted re-encode never claims it.

    Returns:
        counts: {"shards", "computed_shards", "samples"}.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "identity": encoder.identity,
        "dim": int(encoder.dim),
        "max_length": int(encoder.max_length),
        "dtype": dtype,
    }
    meta_path = cache_dir / "meta.json"
    same = False
    if meta_path.exists():
        old = _read_meta(cache_dir)
        same = all(old.get(k) == meta[k] for k in ("format_version", "identity", "dtype"))
        if not same and old.get("identity") is not None:
            if not overwrite:
                raise TextCacheMismatchError(
                    f"{cache_dir} holds embeddings of {old.get('identity')!r} ({old.get('dtype')}, format "
                    f"{old.get('format_version')}), not {meta['identity']!r} ({dtype}, format {FORMAT_VERSION}); "
                    "use another folder or overwrite=True (--overwrite)"
                )
        # identity None: an interrupted re-encode; its finished files carry their identity and are checked below.
    # While this runs, meta.json says "in_progress" and claims the encoder only when it already did (a resume of
    # the same encoder): a re-encode that is killed leaves no identity, never the new one.
    keep_identity = same and not overwrite
    atomic_write_json(
        meta_path, {**meta, "identity": meta["identity"] if keep_identity else None, "status": "in_progress"}
    )
    torch_dtype = _DTYPES[dtype]

    emb, mask = encoder.encode([""])
    _save_atomic(
        {"emb": emb[0].to(torch_dtype).cpu(), "mask": mask[0].to(torch.uint8).cpu()},
        cache_dir / "null.safetensors",
        metadata={"identity": encoder.identity},
    )

    urls = expand_shard_spec(shards)
    n_samples = n_computed = 0
    for n, url in enumerate(urls):
        keys, captions = _shard_captions(url)
        digests = [caption_digest(c) for c in captions]
        target = cache_dir / cache_file_name(url)
        if target.exists() and not overwrite:
            try:
                with safe_open(str(target), framework="pt") as f:
                    m = f.metadata()
                    if (
                        m.get("identity") == encoder.identity
                        and m.get("dtype") == dtype
                        and json.loads(m["keys"]) == keys
                        and json.loads(m["captions"]) == digests
                    ):
                        n_samples += len(keys)
                        continue
            except Exception:  # unreadable leftover: recompute it
                pass
        embs, masks = [], []
        for a in range(0, len(captions), batch_size):
            e, m = encoder.encode(captions[a : a + batch_size])
            embs.append(e.to(torch_dtype).cpu())
            masks.append(m.to(torch.uint8).cpu())
        if keys:
            tensors = {"emb": torch.cat(embs), "mask": torch.cat(masks)}
        else:
            tensors = {
                "emb": torch.zeros(0, encoder.max_length, encoder.dim, dtype=torch_dtype),
                "mask": torch.zeros(0, encoder.max_length, dtype=torch.uint8),
            }
        _save_atomic(
            tensors,
            target,
            metadata={
                "keys": json.dumps(keys),
                "captions": json.dumps(digests),
                "shard": normalize_shard_url(url),
                "identity": encoder.identity,
                "dtype": dtype,
            },
        )
        n_samples += len(keys)
        n_computed += 1
        if progress:
            print(f"[{n + 1}/{len(urls)}] {url}: {len(keys)} captions -> {target}", flush=True)
    atomic_write_json(meta_path, {**meta, "status": "complete"})
    return {"shards": len(urls), "computed_shards": n_computed, "samples": n_samples}
