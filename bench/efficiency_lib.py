"""Inference FLOPs and memory of the Show-1 cascade, estimated on the meta device (no GPU needed).

Pieces:

- :class:`LiveBytesTracker`: a ``TorchDispatchMode`` that follows every tensor storage created while it is active
  (a storage is "allocated" when an op returns a tensor whose storage is none of its inputs' storages and "freed"
  when its ``StorageWeakRef`` expires) and records the peak of the live bytes. It works the same on meta tensors
  (no memory at all) and on real ones.
- :func:`attention_policy`: how ``F.scaled_dot_product_attention`` is costed. ``"efficient"`` routes it to
  ``aten._scaled_dot_product_efficient_attention`` (a fused kernel: only the output is allocated, as with the
  memory-efficient / flash kernels on a GPU); ``"materialised"`` uses torch's math decomposition (the
  ``(batch, heads, Lq, Lk)`` score and probability matrices are allocated and coexist at the softmax).
- :func:`measure_forward`: FLOPs (``torch.utils.flop_counter``) and peak activation bytes of one forward pass
  without grad.
- :func:`paper_schedule`: sizes, frame counts and step counts of the cascade, read from the paper experiments'
  composed configs (``conf/experiment/paper_*.yaml``: the released sampling settings).
- :func:`paper_stages`: every stage of the hybrid cascade and of an all-pixel cascade at those sizes, step counts
  and windowing (the official ``run_inference.py``), and :func:`estimate_stage` to cost one.
- :func:`real_peak_subprocess`: real tensors on the CPU in a fresh process (peak-RSS delta + the tracker on real
  tensors), used to validate the meta estimate at reduced widths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from show1_lightning.models.show1_unet import build_show1_unet, load_released_config

POLICIES = ("efficient", "materialised", "materialised_fp32")
ROOT = Path(__file__).resolve().parents[1]

GiB = 1024**3
MiB = 1024**2


# ----------------------------------------------------------------------------- live-bytes tracking
class LiveBytesTracker(TorchDispatchMode):
    """Peak of the bytes held by tensor storages allocated while the mode is active.

    Tensors that exist before entering (weights, inputs) are not counted. An op's output counts as a new
    allocation unless its storage is one of the op's input storages (views, in-place and ``out=`` ops). A storage
    is freed when no tensor refers to it any more (checked through ``StorageWeakRef`` before every op), so the
    peak is taken with an op's inputs and outputs alive together, as in eager PyTorch. Not seen: workspace a
    kernel allocates internally and frees before returning, and caching-allocator rounding/fragmentation.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.allocations = 0

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self._sweep()
        out = func(*args, **(kwargs or {}))
        inputs = {
            StorageWeakRef(t.untyped_storage()).cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and not t.is_sparse
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_sparse:
                continue
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata in inputs:
                continue
            known = self._live.get(ref.cdata)
            if known is not None:
                if not known[0].expired():
                    continue
                self.current -= known[1]
            nbytes = storage.nbytes()
            self._live[ref.cdata] = (ref, nbytes)
            self.current += nbytes
            self.allocations += 1
        self.peak = max(self.peak, self.current)
        return out


# ----------------------------------------------------------------------------- attention costing
def _efficient_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Stand-in for ``F.scaled_dot_product_attention`` that always runs the fused memory-efficient kernel."""
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        attn_mask = attn_mask.to(query.dtype).expand(*query.shape[:-1], key.shape[-2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale
    )
    return out[0]


@contextlib.contextmanager
def attention_policy(policy: str) -> Iterator[None]:
    """Cost attention as ``"efficient"`` (fused kernel, no score matrix) or materialised (math path).

    On the meta device torch decomposes SDPA into the math path (``bmm`` + ``_safe_softmax`` + ``bmm``), which is
    what the materialised policies keep: ``"materialised"`` in the input's precision (bf16 scores and
    probabilities, ``allow_fp16_bf16_reduction_math_sdp``), ``"materialised_fp32"`` with torch's default upcast
    of half-precision inputs to float32 in the math path. ``"efficient"`` swaps ``torch.nn.functional.scaled_dot_product_attention`` for
    the fused ``aten._scaled_dot_product_efficient_attention`` (allocates only the output).
    """
    if policy == "native":  # whatever kernel torch picks for these tensors (real-tensor runs)
        yield
        return
    if policy not in POLICIES:
        raise ValueError(f"unknown attention policy {policy!r}; choose from {POLICIES} or 'native'")
    if policy.startswith("materialised"):
        allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(policy == "materialised")
        try:
            yield
        finally:
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)
        return
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _efficient_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


# ----------------------------------------------------------------------------- one forward
@dataclasses.dataclass
class ForwardStats:
    """Cost of one forward pass without grad."""

    flops: int
    peak_activation_bytes: int  # peak of the storages allocated during the forward
    input_bytes: int  # the inputs given to the forward (already on the device)
    weight_bytes: int  # parameters + buffers

    @property
    def peak_bytes(self) -> int:
        """Weights + inputs + peak activations: the device memory this forward needs."""
        return self.weight_bytes + self.input_bytes + self.peak_activation_bytes


def tensor_bytes(tree: Any) -> int:
    """Bytes of the distinct storages of the tensors in a pytree."""
    seen: dict[int, int] = {}
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            seen[StorageWeakRef(t.untyped_storage()).cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def model_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def measure_forward(
    model: nn.Module, args: tuple, kwargs: dict | None = None, policy: str = "efficient", count_flops: bool = True
) -> ForwardStats:
    """FLOPs and peak activation bytes of ``model(*args, **kwargs)`` under ``torch.no_grad`` (meta or real)."""
    kwargs = kwargs or {}
    tracker = LiveBytesTracker()
    flop_mode = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    with torch.no_grad(), attention_policy(policy), flop_mode, tracker:
        out = model(*args, **kwargs)
    del out
    flops = flop_mode.get_total_flops() if count_flops else 0
    return ForwardStats(flops, tracker.peak, tensor_bytes((args, kwargs)), model_bytes(model))


# ----------------------------------------------------------------------------- models of the cascade
class VAEEncode(nn.Module):
    """``AutoencoderKL`` encoder: images ``(N, 3, H, W)`` -> latent means ``(N, 4, H/8, W/8)``."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode (the posterior mean; sampling adds one latent-sized tensor)."""
        return self.vae.encode(images).latent_dist.mean


class VAEDecode(nn.Module):
    """``AutoencoderKL`` decoder: latents -> images."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode."""
        return self.vae.decode(latents).sample


class TextEncode(nn.Module):
    """A transformers text encoder returning its last hidden states."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encode token ids."""
        return self.encoder(input_ids=input_ids).last_hidden_state


def build_vae() -> nn.Module:
    """Stable Diffusion ``AutoencoderKL`` (f=8, 4 latent channels), as used by zeroscope / show-1-sr2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )


def build_t5_xxl_encoder() -> nn.Module:
    """T5-XXL encoder (DeepFloyd IF's / Show-1's text encoder): d_model 4096, 24 layers, d_ff 10240, 64 heads."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return TextEncode(T5EncoderModel(cfg))


def build_openclip_h_text() -> nn.Module:
    """OpenCLIP ViT-H/14 text tower as ``CLIPTextModel`` (zeroscope / show-1-sr2): 1024 wide, 23 layers."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1024,
    )
    return TextEncode(CLIPTextModel(cfg))


def reduced_unet_config(name: str, divisor: int) -> dict:
    """A released UNet config with every width divided by ``divisor`` (``divisor`` 1 = the released config).

    Widths: ``block_out_channels``, ``attention_head_dim`` (so both classes keep their number of spatial heads and
    sr2's input temporal transformer, 8 heads x ``attention_head_dim``, shrinks too) and sr1's
    ``time_embedding_dim``. ``norm_num_groups`` becomes the largest of 4/2/1 dividing every width (32 groups need
    >= 32 channels). Text widths (T5 4096, CLIP 1024) are kept: they are inputs. Build it with
    :func:`build_unet` (the temporal convs take the same ``norm_num_groups``).
    """
    cfg = load_released_config(name)
    if divisor == 1:
        return cfg
    cfg["block_out_channels"] = [c // divisor for c in cfg["block_out_channels"]]
    cfg["norm_num_groups"] = next(g for g in (4, 2, 1) if all(c % g == 0 for c in cfg["block_out_channels"]))
    cfg["attention_head_dim"] = max(1, cfg["attention_head_dim"] // divisor)
    if cfg.get("time_embedding_dim"):
        cfg["time_embedding_dim"] = cfg["time_embedding_dim"] // divisor
    return cfg


def build_unet(config: dict) -> nn.Module:
    """``build_show1_unet`` on a (possibly reduced) config (its temporal convs use the config's
    ``norm_num_groups``, so reduced widths need no patching)."""
    return build_show1_unet(config)


# ----------------------------------------------------------------------------- stages
@dataclasses.dataclass
class StageSpec:
    """One model of a cascade and how often the cascade runs it.

    ``forwards`` = forward passes per generation (steps x windows, or frames for the frame-by-frame VAE); each
    forward has the batch given by ``inputs`` (x2 with classifier-free guidance).
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.device, torch.dtype], tuple[tuple, dict]]
    forwards: int
    schedule: str  # human-readable: steps, CFG, windows


def _unet_inputs(
    batch: int, channels: int, frames: int, height: int, width: int, text: tuple[int, int], noise_level: bool = False
) -> Callable[[torch.device, torch.dtype], tuple[tuple, dict]]:
    def make(device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
        sample = torch.randn(batch, channels, frames, height, width, device=device, dtype=dtype)
        states = torch.randn(batch, *text, device=device, dtype=dtype)
        timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
        kwargs: dict[str, Any] = {"encoder_hidden_states": states}
        if noise_level:
            kwargs["class_labels"] = torch.full((batch,), 250, device=device, dtype=torch.long)
        return (sample, timestep), kwargs

    return make


def _image_inputs(*shape: int) -> Callable[[torch.device, torch.dtype], tuple[tuple, dict]]:
    return lambda device, dtype: ((torch.randn(*shape, device=device, dtype=dtype),), {})


def _token_inputs(batch: int, length: int = 77) -> Callable[[torch.device, torch.dtype], tuple[tuple, dict]]:
    return lambda device, dtype: ((torch.zeros(batch, length, device=device, dtype=torch.long),), {})


#: The paper experiments whose composed configs give the cascade's sizes and sampling (one per stage).
PAPER_EXPERIMENTS = {
    "keyframe": "paper_keyframe",
    "interpolation": "paper_interpolation",
    "pixel_sr": "paper_pixel_sr",
    "latent_sr": "paper_latent_sr",
}
#: The SD VAE's spatial downsampling (latent_sr's latents: output size / 8).
VAE_FACTOR = 8


def paper_config(experiment: str, overrides: tuple[str, ...] = ()) -> Any:
    """The composed training config of ``experiment`` (``python train.py experiment=<name> [overrides]``),
    unresolved: only the keys read are resolved, so the data / weight paths it leaves to the environment are not
    needed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=[f"experiment={experiment}", *overrides])
    finally:
        GlobalHydra.instance().clear()


@dataclasses.dataclass(frozen=True)
class PaperSchedule:
    """Sizes, frame counts and sampling of the released cascade, as the paper experiments configure them."""

    keyframes: int  # keyframes generated (stage 1 num_frames)
    key_height: int
    key_width: int
    keyframe_steps: int
    insert_frames: int  # new frames between each pair of keyframes (stage 2)
    interp_steps: int
    sr1_height: int
    sr1_width: int
    sr1_steps: int
    sr_window: int  # frames per pixel-SR window (released: stride window - 1, frame 0 from the previous window)
    sr2_height: int
    sr2_width: int
    sr2_steps: int
    sr2_strength: float
    t5: tuple[int, int]  # (tokens, width) of the T5-XXL text states
    clip: tuple[int, int]  # (tokens, width) of the OpenCLIP-H text states

    @property
    def frames(self) -> int:
        """Frames of the final video: the keyframes with ``insert_frames`` new ones between each pair (8 -> 29)."""
        return (self.keyframes - 1) * (self.insert_frames + 1) + 1

    @property
    def interp_windows(self) -> int:
        """One window per pair of keyframes, run one after the other."""
        return self.keyframes - 1

    @property
    def interp_window(self) -> int:
        return self.insert_frames + 2

    @property
    def sr_windows(self) -> int:
        """Overlapping windows of the released pixel SR (stride window - 1): 29 frames -> starts 0, 7, 14, 21."""
        return len(range(0, self.frames - self.sr_window + 1, self.sr_window - 1))

    @property
    def sr2_executed(self) -> int:
        """Denoising steps the latent expert runs from its strength start (50 x 0.8 = 40)."""
        return int(self.sr2_steps * self.sr2_strength)


@functools.cache
def paper_schedule(overrides: tuple[tuple[str, str], ...] = ()) -> PaperSchedule:
    """:class:`PaperSchedule` read from ``conf/experiment/paper_*.yaml`` (composed with their stage configs);
    ``overrides``: (stage, Hydra override) pairs applied to that stage's experiment."""
    cfg = {
        stage: paper_config(name, tuple(o for s, o in overrides if s == stage))
        for stage, name in PAPER_EXPERIMENTS.items()
    }
    key, interp, sr1, sr2 = (cfg[s].stage for s in ("keyframe", "interpolation", "pixel_sr", "latent_sr"))
    return PaperSchedule(
        keyframes=int(key.num_frames),
        key_height=int(key.height),
        key_width=int(key.width),
        keyframe_steps=int(key.sampling.num_steps),
        insert_frames=int(interp.insert_frames),
        interp_steps=int(interp.sampling.num_steps),
        sr1_height=int(sr1.height),
        sr1_width=int(sr1.width),
        sr1_steps=int(sr1.sampling.num_steps),
        sr_window=int(sr1.window_frames),
        sr2_height=int(sr2.height),
        sr2_width=int(sr2.width),
        sr2_steps=int(sr2.sampling.num_steps),
        sr2_strength=float(sr2.strength),
        t5=(int(cfg["keyframe"].text_encoder.max_length), int(cfg["keyframe"].text_dim)),
        clip=(int(cfg["latent_sr"].text_encoder.max_length), int(cfg["latent_sr"].text_dim)),
    )


def paper_stages(divisor: int = 1, overrides: tuple[tuple[str, str], ...] = ()) -> dict[str, list[StageSpec]]:
    """The two cascades at the paper's sizes (``divisor`` > 1 shrinks every UNet width, for tests).

    ``"hybrid"`` = Show-1; ``"all_pixel"`` = the same first three stages followed by a pixel SR UNet (the
    show-1-sr1 config, 6-channel input) from 256x160 to 576x320 directly, windowed like SR1. Sizes, frames and
    step counts: :func:`paper_schedule` (``overrides``: its per-stage config overrides); classifier-free guidance
    doubles the batch of every UNet call.
    """
    s = paper_schedule(overrides)
    t5, frames = s.t5, s.frames
    lat_h, lat_w = s.sr2_height // VAE_FACTOR, s.sr2_width // VAE_FACTOR
    unet = lambda name: lambda: build_unet(reduced_unet_config(name, divisor))  # noqa: E731
    text_t5 = StageSpec(
        "T5-XXL text encoder", build_t5_xxl_encoder, _token_inputs(2, t5[0]), 1, "prompt + negative, once"
    )
    keyframes = StageSpec(
        "keyframes (show-1-base)",
        unet("show-1-base"),
        _unet_inputs(2, 3, s.keyframes, s.key_height, s.key_width, t5),
        s.keyframe_steps,
        f"{s.keyframe_steps} steps CFG, {s.keyframes}x{s.key_width}x{s.key_height}",
    )
    interp = StageSpec(
        "interpolation",
        unet("show-1-interpolation"),
        _unet_inputs(2, 7, s.interp_window, s.key_height, s.key_width, t5),
        s.interp_steps * s.interp_windows,
        f"{s.interp_steps} steps CFG x {s.interp_windows} windows of {s.interp_window} frames",
    )
    sr1 = StageSpec(
        "pixel SR1 (show-1-sr1)",
        unet("show-1-sr1"),
        _unet_inputs(2, 6, s.sr_window, s.sr1_height, s.sr1_width, t5, noise_level=True),
        s.sr1_steps * s.sr_windows,
        f"{s.sr1_steps} steps CFG x {s.sr_windows} windows of {s.sr_window} frames, {s.sr1_width}x{s.sr1_height}",
    )
    clip = StageSpec(
        "OpenCLIP-H text encoder", build_openclip_h_text, _token_inputs(2, s.clip[0]), 1, "prompt + negative"
    )
    vae_enc = StageSpec(
        "VAE encode",
        lambda: VAEEncode(build_vae()),
        _image_inputs(1, 3, s.sr2_height, s.sr2_width),
        frames,
        f"{frames} frames one at a time, {s.sr2_width}x{s.sr2_height}",
    )
    sr2 = StageSpec(
        "latent SR2 (show-1-sr2)",
        unet("show-1-sr2"),
        _unet_inputs(2, 4, frames, lat_h, lat_w, s.clip),
        s.sr2_executed,
        f"{s.sr2_steps} steps x strength {s.sr2_strength} = {s.sr2_executed} CFG, {frames}x{lat_w}x{lat_h} latents",
    )
    vae_dec = StageSpec(
        "VAE decode",
        lambda: VAEDecode(build_vae()),
        _image_inputs(1, 4, lat_h, lat_w),
        frames,
        f"{frames} frames one at a time",
    )
    pixel_sr2 = StageSpec(
        "pixel SR2 (sr1 config)",
        unet("show-1-sr1"),
        _unet_inputs(2, 6, s.sr_window, s.sr2_height, s.sr2_width, t5, noise_level=True),
        s.sr1_steps * s.sr_windows,
        f"{s.sr1_steps} steps CFG x {s.sr_windows} windows of {s.sr_window} frames, {s.sr2_width}x{s.sr2_height}",
    )
    return {
        "hybrid": [text_t5, keyframes, interp, sr1, clip, vae_enc, sr2, vae_dec],
        "all_pixel": [text_t5, keyframes, interp, sr1, pixel_sr2],
    }


@dataclasses.dataclass
class StageEstimate:
    """Estimated cost of one stage."""

    name: str
    schedule: str
    forwards: int
    flops_per_forward: int
    weight_bytes: int
    input_bytes: int
    activation_bytes: dict[str, int]  # policy -> peak activation bytes of one forward

    @property
    def flops_per_generation(self) -> int:
        """FLOPs of all forwards of this stage in one generation."""
        return self.flops_per_forward * self.forwards

    def peak_bytes(self, policy: str) -> int:
        """Device memory while this stage runs (its weights alone on the device)."""
        return self.weight_bytes + self.input_bytes + self.activation_bytes[policy]


def estimate_stage(
    spec: StageSpec, dtype: torch.dtype = torch.bfloat16, policies: tuple[str, ...] = POLICIES
) -> StageEstimate:
    """Build the stage's model on the meta device and cost one forward under each attention policy."""
    meta = torch.device("meta")
    with meta:
        model = spec.build().to(dtype).eval()
    activation: dict[str, int] = {}
    flops = 0
    for i, policy in enumerate(policies):
        args, kwargs = spec.inputs(meta, dtype)
        stats = measure_forward(model, args, kwargs, policy=policy, count_flops=i == 0)
        activation[policy] = stats.peak_activation_bytes
        if i == 0:
            flops, weights, inputs = stats.flops, stats.weight_bytes, stats.input_bytes
    return StageEstimate(spec.name, spec.schedule, spec.forwards, flops, weights, inputs, activation)


# ----------------------------------------------------------------------------- real-tensor validation
def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def real_peak(config: dict, input_spec: dict, dtype: str = "float32") -> dict:
    """In this process: real tensors on the CPU, one forward without grad.

    Returns the peak-RSS delta of the forward (``VmHWM`` reset through ``/proc/self/clear_refs`` just before it)
    and the :class:`LiveBytesTracker` count of a second forward on the same real tensors. Run in a fresh process
    (:func:`real_peak_subprocess`) with ``MALLOC_MMAP_THRESHOLD_`` low, so freed buffers go back to the OS.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    model = build_unet(config).to(dt).eval()
    make = _unet_inputs(**input_spec)
    args, kwargs = make(torch.device("cpu"), dt)
    with torch.no_grad():  # warm up kernels/libraries on a tiny input so their one-off allocations are not counted
        small = dict(input_spec, frames=1, height=16, width=16)
        wa, wk = _unet_inputs(**small)(torch.device("cpu"), dt)
        model(*wa, **wk)
        del wa, wk
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _read_status("VmRSS")
    with torch.no_grad():  # real CPU tensors: torch picks its own SDPA kernel (a fused one on CPU)
        out = model(*args, **kwargs)
    rss_delta = _read_status("VmHWM") - before
    del out
    gc.collect()
    tracked = measure_forward(model, args, kwargs, policy="native", count_flops=False)
    return {"rss_delta": rss_delta, "tracked": tracked.peak_activation_bytes}


def real_peak_subprocess(config: dict, input_spec: dict, dtype: str = "float32", timeout: float = 300) -> dict:
    """:func:`real_peak` in a fresh Python process (isolated heap, one thread)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    payload = json.dumps({"config": config, "input_spec": input_spec, "dtype": dtype})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), payload],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"real-tensor measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict_peak(config: dict, input_spec: dict, dtype: str = "float32", policy: str = "efficient") -> ForwardStats:
    """Meta-device estimate for the same model and inputs as :func:`real_peak`."""
    dt = getattr(torch, dtype)
    with torch.device("meta"):
        model = build_unet(config).to(dt).eval()
    args, kwargs = _unet_inputs(**input_spec)(torch.device("meta"), dt)
    return measure_forward(model, args, kwargs, policy=policy)


if __name__ == "__main__":  # child process of real_peak_subprocess
    request = json.loads(sys.argv[1])
    print(json.dumps(real_peak(request["config"], request["input_spec"], request["dtype"])))
