"""Precomputed text embeddings, one safetensors file per shard, read by the datamodule.

Layout of a cache folder::

    meta.json                      encoder identity, dim, max_length, storage dtype
    null.safetensors               the empty-caption embedding (for classifier-free guidance dropout)
    shards/<dir>/<stem>.safetensors  per shard: "emb" N x L x D, "mask" N x L (uint8), sample keys
                                   in the metadata (``<dir>`` = the shard's parent folder name)

Running T5-XXL once per caption instead of once per training step is what the mature video
frameworks do; the cache is keyed by shard and sample key, so it serves every run over those shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Union

import torch
import webdataset as wds
from safetensors import safe_open
from safetensors.torch import save_file

from show1_lightning.data.shards import expand_shard_spec, sample_caption

__all__ = ["TextEmbeddingCache", "TextCacheMismatchError", "precompute_text_embeddings", "cache_file_name"]

FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TextCacheMismatchError(ValueError):
    """The cache was made by another text encoder (or max_length) than the configured one."""


def cache_file_name(shard_url: str) -> str:
    """Relative cache file of a shard: ``shards/<parent folder>/<stem>.safetensors``."""
    p = Path(str(shard_url).split("::")[-1])
    stem = p.name[: -len(".tar")] if p.name.endswith(".tar") else p.stem
    return f"shards/{p.parent.name or '_'}/{stem}.safetensors"


class TextEmbeddingCache:
    """Read access to a cache folder; ``lookup(shard_url, key) -> (emb L x D float, mask L bool)``.

    Args:
        cache_dir: the folder written by :func:`precompute_text_embeddings`.
        expected_identity: the configured encoder's ``TextEncoder.identity``; a different one in
            ``meta.json`` raises :class:`TextCacheMismatchError`.
    """

    def __init__(self, cache_dir: Union[str, Path], expected_identity: str | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        meta_path = self.cache_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no text-embedding cache in {self.cache_dir} (missing meta.json); "
                "run data/precompute_text_embeddings.py first"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if expected_identity is not None and self.meta.get("identity") != expected_identity:
            raise TextCacheMismatchError(
                f"text cache {self.cache_dir} was made with encoder {self.meta.get('identity')!r}, "
                f"but the configured encoder is {expected_identity!r}; recompute it or point text_cache_dir elsewhere"
            )
        self.dim = int(self.meta["dim"])
        self.max_length = int(self.meta["max_length"])
        self._files: dict[str, tuple[Any, dict[str, int]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # open file handles stay in their process
        return state

    @property
    def identity(self) -> str:
        return str(self.meta["identity"])

    def _open(self, shard_url: str) -> tuple[Any, dict[str, int]]:
        name = cache_file_name(shard_url)
        entry = self._files.get(name)
        if entry is None:
            path = self.cache_dir / name
            if not path.exists():
                raise KeyError(
                    f"no cached text embeddings for shard {shard_url} ({path}); "
                    "run data/precompute_text_embeddings.py over these shards"
                )
            handle = safe_open(str(path), framework="pt")
            keys = json.loads(handle.metadata()["keys"])
            entry = (handle, {k: i for i, k in enumerate(keys)})
            self._files[name] = entry
        return entry

    def lookup(self, shard_url: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding (float32 ``L x D``) and mask (bool ``L``) of sample ``key`` of ``shard_url``."""
        handle, index = self._open(shard_url)
        if key not in index:
            raise KeyError(f"sample {key} of shard {shard_url} is not in the text cache; recompute it")
        i = index[key]
        emb = handle.get_slice("emb")[i : i + 1][0].float()
        mask = handle.get_slice("mask")[i : i + 1][0].bool()
        return emb, mask

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-caption embedding (float32 ``L x D``, bool ``L``) for CFG caption dropout."""
        with safe_open(str(self.cache_dir / "null.safetensors"), framework="pt") as f:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def precompute_text_embeddings(
    shards: Union[str, Iterable[str]],
    encoder: Any,
    cache_dir: Union[str, Path],
    batch_size: int = 32,
    dtype: str = "float16",
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Embed every caption of ``shards`` with ``encoder`` (a ``TextEncoder``) into ``cache_dir``.

    Shards whose cache file already exists with the same keys are skipped (resumable), unless
    ``overwrite``. A cache folder made by another encoder is an error unless ``overwrite``.

    Returns:
        counts: {"shards", "computed_shards", "samples"}.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "identity": encoder.identity, "dim": int(encoder.dim),
            "max_length": int(encoder.max_length), "dtype": dtype}
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("identity") != meta["identity"] or old.get("dtype") != dtype:
            if not overwrite:
                raise TextCacheMismatchError(
                    f"{cache_dir} holds embeddings of {old.get('identity')!r} ({old.get('dtype')}), "
                    f"not {meta['identity']!r} ({dtype}); use another folder or overwrite=True"
                )
            overwrite = True  # everything in it is stale
    meta_path.write_text(json.dumps(meta, indent=1))
    torch_dtype = _DTYPES[dtype]

    emb, mask = encoder.encode([""])
    _save_atomic({"emb": emb[0].to(torch_dtype).cpu(), "mask": mask[0].to(torch.uint8).cpu()},
                 cache_dir / "null.safetensors")

    urls = expand_shard_spec(shards if isinstance(shards, str) else list(shards))
    n_samples = n_computed = 0
    for n, url in enumerate(urls):
        keys, captions = _shard_captions(url)
        target = cache_dir / cache_file_name(url)
        if target.exists() and not overwrite:
            try:
                with safe_open(str(target), framework="pt") as f:
                    if json.loads(f.metadata()["keys"]) == keys:
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
            tensors = {"emb": torch.zeros(0, encoder.max_length, encoder.dim, dtype=torch_dtype),
                       "mask": torch.zeros(0, encoder.max_length, dtype=torch.uint8)}
        _save_atomic(tensors, target, metadata={"keys": json.dumps(keys), "shard": str(url)})
        n_samples += len(keys)
        n_computed += 1
        if progress:
            print(f"[{n + 1}/{len(urls)}] {url}: {len(keys)} captions -> {target}", flush=True)
    return {"shards": len(urls), "computed_shards": n_computed, "samples": n_samples}
