"""The Show-1 cascade: text -> keyframes -> interpolation -> pixel SR -> latent expert SR.

Only one stage's networks sit on the accelerator at a time: a stage is moved there, run on the
batch, and moved back to the CPU before the next stage starts. Each stage's wall time and peak
memory are recorded (:func:`peak_memory_window`: what the peak covers depends on the device).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from show1_lightning.diffusion.module import DiffusionStage
from show1_lightning.precision import inference_precision
from show1_lightning.stages.loading import load_stage

__all__ = ["STAGE_ORDER", "Show1Cascade", "load_stage", "check_cascade", "format_reports"]

STAGE_ORDER = ("keyframe", "interpolation", "pixel_sr", "latent_sr")


# What a StageReport's peak_bytes measures (``peak_kind``).
PEAK_CUDA = "cuda allocated"  # torch's CUDA allocator, peak since the stage started
PEAK_RSS_STAGE = "process RSS"  # the process's resident set, peak since the stage started (Linux)
PEAK_RSS_SO_FAR = "process RSS, peak so far"  # the process's resident-set high-water mark since it started

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory_window(device: torch.device) -> str:
    """Start a new peak-memory window for ``device`` and return what the next :func:`peak_memory_bytes` covers.

    CUDA: the allocator's peak is reset (:data:`PEAK_CUDA`). CPU: ``getrusage``'s ``ru_maxrss`` only ever grows,
    so it cannot give a later stage's peak; on Linux writing ``5`` to ``/proc/self/clear_refs`` resets the process's
    resident-set high-water mark (``VmHWM``) to its current size (:data:`PEAK_RSS_STAGE`). Where that is not
    possible, the reading is the process's peak so far and says so (:data:`PEAK_RSS_SO_FAR`).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return PEAK_CUDA
    try:
        _CLEAR_REFS.write_text("5")
        if _vm_hwm_bytes() is not None:
            return PEAK_RSS_STAGE
    except OSError:  # not Linux, or /proc read-only
        pass
    return PEAK_RSS_SO_FAR


def _vm_hwm_bytes() -> int | None:
    """``VmHWM`` of /proc/self/status in bytes (the resident-set high-water mark), None where unavailable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device, kind: str) -> int:
    """The peak memory of the window :func:`peak_memory_window` opened (``kind``: what it returned)."""
    if kind == PEAK_CUDA:
        return int(torch.cuda.max_memory_allocated(device))
    if kind == PEAK_RSS_STAGE:
        hwm = _vm_hwm_bytes()
        if hwm is not None:
            return hwm
    # ru_maxrss: kilobytes on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


@dataclass
class StageReport:
    """Time and peak memory of one stage over one batch; ``peak_kind`` says what ``peak_bytes`` measures
    (:data:`PEAK_CUDA`, :data:`PEAK_RSS_STAGE` or :data:`PEAK_RSS_SO_FAR`)."""

    name: str
    seconds: float
    peak_bytes: int
    output_shape: tuple[int, ...]
    peak_kind: str = PEAK_CUDA


@dataclass
class CascadeResult:
    """The final video (B x 3 x T x H x W in [-1, 1]), every stage's output and the stage reports."""

    video: torch.Tensor
    intermediates: dict[str, torch.Tensor] = field(default_factory=dict)
    reports: list[StageReport] = field(default_factory=list)
    #: with ``baseline_branch``: the naive cascade's video from the same keyframes (B x 3 x T x H x W in [-1, 1])
    baseline_video: torch.Tensor | None = None


class Show1Cascade:
    """Runs the configured stages in Show-1's order; any suffix may be left out (None).

    Args:
        keyframe / interpolation / pixel_sr / latent_sr: a stage, or a path to a checkpoint or export.
        device: where each stage runs ("auto": CUDA when available).
        precision: "32" or "bf16" (autocast around the stages; the VAE and text encoders follow it).
        sampling: per-stage overrides for the stage's sampling call, e.g.
            ``{"keyframe": {"num_steps": 75, "guidance_scale": 9.0}}``.
        behaviour: released-behaviour preset (``conf/behaviour/*.yaml``); stages from released Hub folders
            (``show1_lightning.pipelines.released``) sample the official way, trained ones too with ``apply_to: all``.
        t5, if_ii_l: folders of T5-XXL (when the released folders lack ``text_encoder/``) and IF-II-L.
        strict_sizes: refuse (instead of warn about) a stage fed another frame size than it was trained at;
            what cannot run (channels, frame counts, sizes the UNets cannot downsample) is always refused.
        baseline_stages: stages that hand on their non-learned baseline (``stage.baseline``: linear blend,
            bicubic) instead of sampling: e.g. all but the keyframe stage give the naive cascade of the toy loop.
        lora: per stage, LoRA folders added to its UNet with a scale, e.g.
            ``{"keyframe": [{"path": "logs/.../export", "scale": 0.8}]}`` (``diffusion.lora.apply_loras``).
        baseline_branch: also hand the keyframes through every later stage's baseline (the naive cascade) and return
            that video as ``baseline_video``: the naive cascade of the same keyframes without sampling them again.
    """

    def __init__(
        self,
        keyframe: DiffusionStage | str | Path,
        interpolation: DiffusionStage | str | Path | None = None,
        pixel_sr: DiffusionStage | str | Path | None = None,
        latent_sr: DiffusionStage | str | Path | None = None,
        device: str = "auto",
        precision: str = "32",
        sampling: dict[str, dict[str, Any]] | None = None,
        behaviour: dict[str, Any] | None = None,
        t5: str | Path | None = None,
        if_ii_l: str | Path | None = None,
        strict_sizes: bool = False,
        baseline_stages: Sequence[str] = (),
        lora: dict[str, Sequence[Any]] | None = None,
        baseline_branch: bool = False,
    ) -> None:
        from show1_lightning.diffusion.lora import apply_loras
        from show1_lightning.pipelines.released import ReleasedCascade, load_cascade_stage, resolve_t5

        if OmegaConf.is_config(lora):
            lora = OmegaConf.to_container(lora, resolve=True)
        self.lora = {k: list(v) for k, v in (lora or {}).items() if v}
        if set(self.lora) - set(STAGE_ORDER):
            raise ValueError(f"LoRA for unknown stages: {sorted(set(self.lora) - set(STAGE_ORDER))}")

        given = {"keyframe": keyframe, "interpolation": interpolation, "pixel_sr": pixel_sr, "latent_sr": latent_sr}
        self.stages: dict[str, DiffusionStage] = {}
        for name in STAGE_ORDER:
            src = given[name]
            if src is None:
                continue
            stage = src if isinstance(src, DiffusionStage) else load_cascade_stage(name, src, resolve_t5(given, t5))
            apply_loras(stage.unet, self.lora.get(name))
            self.stages[name] = stage.to("cpu").eval()
        if OmegaConf.is_config(behaviour):
            behaviour = OmegaConf.to_container(behaviour, resolve=True)
        self.released = ReleasedCascade(self.stages, behaviour, if_ii_l)
        missing = [n for n in STAGE_ORDER if n not in self.stages]
        present = [n for n in STAGE_ORDER if n in self.stages]
        if present != list(STAGE_ORDER[: len(present)]):
            raise ValueError(f"stages must form a prefix of {STAGE_ORDER}; got {present} (missing {missing})")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.precision = inference_precision(precision)  # any spelling of float32 / bf16; others refused
        if OmegaConf.is_config(sampling):  # straight from Hydra (instantiate without _convert_)
            sampling = OmegaConf.to_container(sampling, resolve=True)
        self.sampling = {k: dict(v) for k, v in (sampling or {}).items()}
        unknown = set(self.sampling) - set(STAGE_ORDER)
        if unknown:
            raise ValueError(f"sampling overrides for unknown stages: {sorted(unknown)}")
        self.baseline_stages = tuple(baseline_stages)
        bad = [n for n in self.baseline_stages if n not in self.stages or n == "keyframe"]
        if bad:
            raise ValueError(f"baseline_stages must name stages of this cascade after the keyframe stage; got {bad}")
        self.baseline_branch = bool(baseline_branch)
        if self.baseline_branch and len(self.stages) < 2:
            raise ValueError("baseline_branch needs stages after the keyframe stage")
        # Stage-to-stage sizes and sampling values, now rather than minutes into the first batch.
        self.size_notes = check_cascade(self.stages, self.effective_sampling, strict_sizes)

    def effective_sampling(self, name: str) -> dict[str, Any]:
        """The sampling values stage ``name`` runs with: its released schedule (when it samples the official
        way) updated by the ``sampling`` overrides."""
        out: dict[str, Any] = {}
        beh = getattr(self.released, "behaviour", None)
        if self.released.runs(name) and beh is not None:
            out.update(beh.schedule(name))
        out.update(self.sampling.get(name, {}))
        return out

    def _run(
        self, name: str, prompts: Sequence[str], seeds: Sequence[int], x: torch.Tensor | None, baseline: bool = False
    ) -> torch.Tensor:
        stage = self.stages[name]
        if baseline or name in self.baseline_stages:
            assert x is not None
            return stage.baseline(x.to(self.device))
        kw = self.sampling.get(name, {})
        if self.released.runs(name):
            return self.released.run(name, stage, x, prompts, seeds, kw)
        return stage.run(None if x is None else x.to(self.device), list(prompts), list(seeds), **kw)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> CascadeResult:
        """Generate one video per prompt; sample i of every stage is seeded by ``seeds[i]``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        result = CascadeResult(video=torch.empty(0))
        x: torch.Tensor | None = None
        for name, stage in self.stages.items():
            stage.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            peak_kind = peak_memory_window(self.device)
            t0 = time.perf_counter()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                x = self._run(name, prompts, seeds, x)
            x = self.released.hand_on(name, x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            peak = peak_memory_bytes(self.device, peak_kind)
            result.reports.append(StageReport(name, seconds, peak, tuple(x.shape), peak_kind))
            result.intermediates[name] = x.cpu()
            stage.to("cpu")  # one stage on the accelerator at a time
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        assert x is not None
        result.video = x.clamp(-1, 1).cpu()
        if self.baseline_branch:
            y = result.intermediates["keyframe"]
            for name, stage in list(self.stages.items())[1:]:  # as a cascade with every later stage as baseline
                stage.to(self.device)  # the latent SR baseline is a VAE round trip
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    y = self._run(name, prompts, seeds, y, baseline=True)
                y = self.released.hand_on(name, y)
                stage.to("cpu")
            result.baseline_video = y.clamp(-1, 1).cpu()
        return result


def check_cascade(stages: dict[str, DiffusionStage], sampling_of: Any, strict_sizes: bool = False) -> list[str]:
    """Check what each stage hands the next, when the cascade is built.

    Refused (ValueError naming the stage and key): sampling values that cannot work (``num_steps`` < 1,
    ``guidance_scale`` <= 0, ``strength`` outside (0, 1]), a channel count the next stage does not take, fewer
    than 2 keyframes for interpolation, and a frame size a stage's UNet cannot downsample (a Show-1 UNet raises
    on it at its first forward, after every earlier stage has run). A stage fed another frame size than it was
    trained at is refused with ``strict_sizes``, else reported (logged, and returned as notes for reports).
    """
    import logging

    from show1_lightning.diffusion.sampling import check_sampling_args
    from show1_lightning.runtime import unet_size_multiple

    log = logging.getLogger(__name__)
    notes: list[str] = []
    for name, stage in stages.items():
        s = {**getattr(stage, "sampling_cfg", {}), **sampling_of(name)}  # the stage's defaults, then overrides
        strength = s.get("strength", getattr(stage, "strength", 1.0)) if name == "latent_sr" else 1.0
        check_sampling_args(
            s.get("num_steps", 50),
            s.get("guidance_scale", 1.0),
            strength,
            with_init=name == "latent_sr",
            where=f"sampling.{name}",
        )

    def fits(name: str, stage: DiffusionStage, hw: tuple[int, int], what: str) -> None:
        m = unet_size_multiple(stage.unet)
        if hw[0] % m or hw[1] % m:
            raise ValueError(
                f"cascade: the {name} UNet downsamples {m}x, so {what} must be multiples of {m}; "
                f"got {hw[0]}x{hw[1]} (H x W)"
            )

    def trained(name: str, got: tuple[int, int], want: tuple[int, int], source: str) -> None:
        if got == want:
            return
        msg = (
            f"cascade: {name} was trained on {want[0]}x{want[1]} (H x W) frames but gets {got[0]}x{got[1]} from "
            f"{source}; a convolutional UNet runs, but not at the size it learned"
        )
        if strict_sizes:
            raise ValueError(msg + " (strict_sizes: refused)")
        log.warning(msg)
        notes.append(msg)

    # What flows between the stages: channels, frames, height, width.
    kf = stages["keyframe"]
    s = sampling_of("keyframe")
    shape = (
        int(kf.sample_channels),
        int(s.get("num_frames", getattr(kf, "num_frames", 0))),
        int(s.get("height", getattr(kf, "height", 0))),
        int(s.get("width", getattr(kf, "width", 0))),
    )
    fits("keyframe", kf, shape[2:], "the keyframe size")
    source = "keyframe"
    for name in STAGE_ORDER[1:]:
        if name not in stages:
            break
        st = stages[name]
        c, t, h, w = shape
        if name in ("interpolation", "pixel_sr") and c != st.sample_channels:
            raise ValueError(
                f"cascade: {source} hands on {c}-channel frames but {name} generates {st.sample_channels}"
            )
        if name == "latent_sr" and c != 3:
            raise ValueError(f"cascade: {source} hands on {c}-channel frames; latent_sr takes RGB video (3)")
        if name == "interpolation":
            if t < 2:
                raise ValueError(f"cascade: interpolation needs at least 2 keyframes, {source} makes {t}")
            trained(name, (h, w), (int(st.height), int(st.width)), source)
            fits(name, st, (h, w), "the frames it gets")
            shape = (c, st.output_frames(t), h, w)
        elif name == "pixel_sr":
            trained(name, (h, w), tuple(int(v) for v in st.low_res_size), source)
            sf = int(st.scale_factor)
            fits(name, st, (h * sf, w * sf), f"the {sf}x frames it makes")
            shape = (c, t, h * sf, w * sf)
        else:
            s = sampling_of(name)
            oh, ow = int(s.get("height", st.height)), int(s.get("width", st.width))
            factor = int(st.height) // int(st.latent_height) if getattr(st, "latent_height", None) else 8
            if oh % factor or ow % factor:
                raise ValueError(f"cascade: latent_sr output {oh}x{ow} must be multiples of the VAE factor {factor}")
            fits(name, st, (oh // factor, ow // factor), f"its latents ({oh}x{ow} / {factor})")
            shape = (c, t, oh, ow)
        source = name
    return notes


def format_reports(reports: Sequence[StageReport]) -> str:
    """A small text table of per-stage time and peak memory, with what the peak measures."""
    lines = [f"{'stage':<14} {'seconds':>9} {'peak memory':>12}  {'output (B, C, T, H, W)':<24} peak of"]
    for r in reports:
        shape = str(r.output_shape)
        lines.append(f"{r.name:<14} {r.seconds:>9.2f} {r.peak_bytes / 2**30:>8.2f} GiB  {shape:<24} {r.peak_kind}")
    return "\n".join(lines)
