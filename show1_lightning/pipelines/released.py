"""The released Show-1 weights as they were published, sampled as the authors' code samples them.

Two parts:

1. **Released folders in.** :func:`load_released_stage` turns a folder laid out as the Hugging Face repos
   (``showlab/show-1-base``, ``-interpolation``, ``-sr1``, ``-sr2``: ``model_index.json``, ``unet/``,
   ``scheduler/``, ``text_encoder/`` + ``tokenizer/``, ``image_noising_scheduler/`` for sr1, ``vae/`` for sr2)
   into this project's stage classes, with no conversion step. The folder's own ``unet/config.json`` and
   ``scheduler/scheduler_config.json`` (class and every option) are used. What a folder lacks is reported at
   start-up, naming the folder and the missing files (:func:`check_released_folder`).

2. **Released behaviour.** :class:`ReleasedBehaviour` holds one switch per way the official ``showone``
   pipelines (https://github.com/showlab/Show-1, ``showone/pipelines/*.py`` and ``run_inference.py``; line numbers
   below refer to its commit 35a71b6) sample differently from this project's training-time defaults, and
   :func:`run_released_stage` samples a stage that way. The official code runs one video at a time and seeds
   every pipeline call with ``generator=torch.manual_seed(seed)`` (the global generator: initial noise, the
   noise augmentation, the VAE posterior, stochastic scheduler steps and the train-mode dropout all draw from
   it, in that order); so does this runner, per video, inside ``torch.random.fork_rng`` (the caller's global RNG
   state is restored afterwards). With the same seed and weights it therefore gives the official videos.

The switches (``conf/behaviour/released.yaml``; the issue's items 1-7):

====================================  =================================================================
switch                                 official code it follows
====================================  =================================================================
``text_attention_mask: false``         the pixel pipelines call the UNet without ``encoder_attention_mask``
                                       (pipeline_t2v_base_pixel.py:724, interp_pixel.py:748,
                                       sr_pixel_cond.py:838): cross-attention sees all 77 T5 states
``prompt_preprocessing: lower_strip``  ``encode_prompt`` -> ``_text_preprocessing`` (base_pixel.py:249, 491-507):
                                       ``text.lower().strip()`` (run_inference.py:73 leaves ``clean_caption``
                                       False); the embeddings are shared by every pixel stage (run_inference.py)
``train_mode_dropout: true``           ``enable_model_cpu_offload`` calls ``self.unet.train()``
                                       (base_pixel.py:130), so show-1-base samples with dropout on
``interp_model_keyframes: true``       the whole 5-frame window is written back, keyframe positions included
                                       (run_inference.py:118); the next window then overwrites its first frame
``interp_shared_noise: true``          one ``init_noise`` drawn once from the seed for all windows
                                       (run_inference.py:96, interp_pixel.py:700)
``sr1_overlapping_windows: true``      8-frame windows, stride 7 (run_inference.py:125-127)
``sr1_first_frame: image_sr``          window 0's frame 0 is the IF-II-L image SR of the first keyframe (70
                                       steps, CFG 4, noise level 150; run_inference.py:135-146), later windows'
                                       frame 0 the previous window's output (run_inference.py:149); the clean
                                       frame replaces frame 0 of the noise-augmented condition
                                       (sr_pixel_cond.py:817-819). ``noisy``: our behaviour, frame 0 of window 0
                                       is noise-augmented like the others (the fallback when no IF-II-L folder is
                                       configured, announced on stdout).
``sr1_overwrite_shared_frame: true``   a window's output overwrites the frame it shares with the previous window
                                       (run_inference.py:164)
``sr2_uint8_pil_resize: true``         frames go through ``tensor2vid`` (uint8, truncating) and
                                       ``PIL.Image.resize((576, 320))`` (bicubic) before SR2 (run_inference.py:170)
``sr2_sample_posterior: true``         ``vae.encode(video).latent_dist.sample(generator)`` (diffusers 0.19.3
                                       pipeline_text_to_video_synth_img2img.py:506)
``folder_scheduler: true``             each folder's ``scheduler/scheduler_config.json``: class and options
``per_frame_scheduler_step: true``     ``scheduler.step`` sees the video as B*F images (base_pixel.py:743-753):
                                       matters for dynamic thresholding (per-frame quantiles) and noise layout
``clamp_between_stages: false``        the official stages hand on ``output_type="pt"`` tensors unclamped
====================================  =================================================================
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from show1_lightning.diffusion.module import DiffusionStage

log = logging.getLogger(__name__)

STAGE_FOLDERS = {
    "keyframe": "show-1-base",
    "interpolation": "show-1-interpolation",
    "pixel_sr": "show-1-sr1",
    "latent_sr": "show-1-sr2",
}
_WEIGHTS = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------------------------------- behaviour
@dataclass
class ReleasedBehaviour:
    """The official pipelines' sampling behaviour, one switch per difference (module docstring).

    ``schedules`` maps stage name (and ``image_sr``) to its sampling numbers (num_steps, guidance_scale,
    noise_level, strength, negative_prompt, sizes); ``name`` is the preset's name.
    """

    name: str = "released"
    text_attention_mask: bool = False
    prompt_preprocessing: str = "lower_strip"
    train_mode_dropout: bool = True
    interp_model_keyframes: bool = True
    interp_shared_noise: bool = True
    sr1_overlapping_windows: bool = True
    sr1_first_frame: str = "image_sr"
    sr1_overwrite_shared_frame: bool = True
    sr2_uint8_pil_resize: bool = True
    sr2_sample_posterior: bool = True
    folder_scheduler: bool = True
    per_frame_scheduler_step: bool = True
    clamp_between_stages: bool = False
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_preprocessing not in ("lower_strip", "none"):
            raise ValueError(
                f"prompt_preprocessing must be 'lower_strip' or 'none', got {self.prompt_preprocessing!r}"
            )
        if self.sr1_first_frame not in ("image_sr", "noisy"):
            raise ValueError(f"sr1_first_frame must be 'image_sr' or 'noisy', got {self.sr1_first_frame!r}")
        self.schedules = {k: dict(v) for k, v in (self.schedules or {}).items()}

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> ReleasedBehaviour:
        """From a ``conf/behaviour/*.yaml`` node (``apply_to`` and unknown keys are rejected by name)."""
        cfg = {k: v for k, v in dict(cfg or {}).items() if k != "apply_to"}
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown released-behaviour switches {sorted(unknown)}; known: {sorted(known)}")
        return cls(**cfg)

    def schedule(self, stage: str) -> dict[str, Any]:
        """The sampling numbers of one stage (a copy)."""
        return dict(self.schedules.get(stage, {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preprocess_prompt(prompt: str, mode: str) -> str:
    """The official ``_text_preprocessing`` without ``clean_caption``: lower-case and strip (mode 'lower_strip')."""
    return prompt.lower().strip() if mode == "lower_strip" else prompt


# ---------------------------------------------------------------------------------------------------- folders
def is_released_folder(path: str | Path) -> bool:
    """A folder laid out as a released Hub repo (``model_index.json`` or ``unet/`` + ``scheduler/``), not an
    export of this project (``stage.json``)."""
    p = Path(path)
    if not p.is_dir() or (p / "stage.json").exists():
        return False
    return (p / "model_index.json").is_file() or (
        (p / "unet" / "config.json").is_file() and (p / "scheduler" / "scheduler_config.json").is_file()
    )


def _has_text_encoder(folder: Path) -> bool:
    return (folder / "text_encoder" / "config.json").is_file() and (folder / "tokenizer").is_dir()


def required_files(kind: str) -> list[str]:
    """Files a released folder of stage ``kind`` must hold (text encoders are checked separately)."""
    req = ["unet/config.json", f"unet/{_WEIGHTS}", "scheduler/scheduler_config.json"]
    if kind == "pixel_sr":
        req.append("image_noising_scheduler/scheduler_config.json")
    if kind == "latent_sr":
        req += ["vae/config.json", f"vae/{_WEIGHTS}", "text_encoder/config.json", "tokenizer"]
    return req


def check_released_folder(folder: str | Path, kind: str) -> None:
    """Raise ``FileNotFoundError`` naming ``folder`` and every component it lacks for stage ``kind``."""
    folder = Path(folder)
    if kind not in STAGE_FOLDERS:
        raise ValueError(f"unknown stage {kind!r}; one of {sorted(STAGE_FOLDERS)}")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{kind}: released folder {folder} does not exist (expected a download of showlab/{STAGE_FOLDERS[kind]})"
        )
    missing = [r for r in required_files(kind) if not (folder / r).exists()]
    if missing:
        hint = ""
        if f"unet/{_WEIGHTS}" in missing and list((folder / "unet").glob("*.fp16.safetensors")):
            hint = " (only the fp16 variant is present: download the default diffusion_pytorch_model.safetensors)"
        raise FileNotFoundError(f"{kind}: released folder {folder} lacks {', '.join(missing)}{hint}")


def load_folder_scheduler(folder: str | Path, subfolder: str = "scheduler"):
    """The scheduler a released folder names: its ``_class_name`` from diffusers with every option of its config.

    Version quirk handled here: DPM-Solver configs written by diffusers < 0.22 have no ``final_sigmas_type``;
    the diffusers they were written with ended the last step at the smallest training sigma, which newer
    diffusers call ``final_sigmas_type="sigma_min"`` (its default became ``"zero"``). A config that does not
    say is read with the old meaning.
    """
    import diffusers

    path = Path(folder) / subfolder / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    name = cfg.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{path}: unknown scheduler class {name!r}")
    if "final_sigmas_type" in cls._get_init_keys(cls) and "final_sigmas_type" not in cfg:
        cfg["final_sigmas_type"] = "sigma_min"
    return cls.from_config(cfg)


@dataclass
class ReleasedSource:
    """Where a released stage came from, and its folder's schedulers."""

    folder: Path
    scheduler: Any
    image_noising_scheduler: Any = None


@functools.lru_cache(maxsize=4)
def _shared_text_encoder(kind: str, path: str):
    from show1_lightning.models.text_encoder import TextEncoder

    return TextEncoder(kind, pretrained_path=path, max_length=77)


def resolve_t5(folders: dict[str, str | Path | None], t5: str | Path | None) -> Path | None:
    """The one T5 the pixel stages share (run_inference.py encodes the prompt once with show-1-base's encoder):
    ``t5`` when set, else the first pixel folder holding ``text_encoder/`` + ``tokenizer/``.

    Also checks every released folder of the cascade first, so a missing component fails at start-up, before
    any model is loaded.
    """
    pixel = []
    for kind, f in folders.items():
        if f is not None and not isinstance(f, (str, Path)):
            continue  # a stage object
        if f and is_released_folder(f):
            check_released_folder(f, kind)
            if kind != "latent_sr":
                pixel.append(Path(f))
    if pixel and not t5 and not any(_has_text_encoder(p) for p in pixel):
        raise FileNotFoundError(
            f"released folders {', '.join(map(str, pixel))} lack text_encoder/ and tokenizer/ "
            "(T5-XXL); download them or set t5=<folder with the T5-XXL encoder>"
        )
    if t5:
        p = Path(t5)
        if not (p / "config.json").is_file() and not _has_text_encoder(p):
            raise FileNotFoundError(
                f"t5={p}: neither a T5 folder (config.json) nor one with text_encoder/ and tokenizer/"
            )
        return p
    for kind in ("keyframe", "interpolation", "pixel_sr"):
        f = folders.get(kind)
        if f and is_released_folder(f) and _has_text_encoder(Path(f)):
            return Path(f)
    return None


def load_released_stage(folder: str | Path, kind: str, t5: str | Path | None = None) -> DiffusionStage:
    """Build stage ``kind`` from a released folder, as downloaded (no conversion).

    Args:
        folder: the downloaded repo (``show-1-base``, ``show-1-interpolation``, ``show-1-sr1`` or ``show-1-sr2``).
        kind: "keyframe", "interpolation", "pixel_sr" or "latent_sr".
        t5: T5-XXL folder for the pixel stages when ``folder`` has no ``text_encoder/`` (e.g. a download of
            ``DeepFloyd/t5-v1_1-xxl`` or of ``DeepFloyd/IF-I-XL-v1.0``'s ``text_encoder``/``tokenizer``).
    Returns:
        the stage (eval mode, no EMA) with ``stage.released`` (:class:`ReleasedSource`) set.
    """
    from diffusers import DDPMScheduler

    from show1_lightning.models.show1_unet import build_show1_unet
    from show1_lightning.models.text_encoder import TextEncoder
    from show1_lightning.models.vae import VideoVAE
    from show1_lightning.stages.interpolation import InterpolationStage
    from show1_lightning.stages.keyframe import KeyframeStage
    from show1_lightning.stages.latent_sr import LatentSRStage
    from show1_lightning.stages.pixel_sr import PixelSRStage

    folder = Path(folder)
    check_released_folder(folder, kind)
    if kind != "latent_sr":
        source = Path(t5) if t5 else (folder if _has_text_encoder(folder) else None)
        if source is None:
            raise FileNotFoundError(
                f"{kind}: released folder {folder} lacks text_encoder/ and tokenizer/ (T5-XXL); "
                "download them or set t5=<folder with the T5-XXL encoder>"
            )
        text_encoder = _shared_text_encoder("t5", str(source))
    else:
        text_encoder = TextEncoder("clip", pretrained_path=folder, max_length=77)
    unet = build_show1_unet(str(folder), pretrained_path=folder).eval()
    scheduler = load_folder_scheduler(folder)
    noise_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    noising = None
    if kind == "pixel_sr":
        noising = load_folder_scheduler(folder, "image_noising_scheduler")
        noise_cfg = json.loads((folder / "image_noising_scheduler" / "scheduler_config.json").read_text())
    # The stage's own (training) schedule: the folder's betas; sampling goes through `scheduler` above.
    train_sched = DDPMScheduler.from_config(
        {
            k: v
            for k, v in noise_cfg.items()
            if k in DDPMScheduler._get_init_keys(DDPMScheduler) and k not in ("variance_type", "thresholding")
        }
    )
    common: dict[str, Any] = dict(
        unet=unet,
        noise_scheduler=train_sched,
        optimizer=functools.partial(torch.optim.AdamW),
        text_encoder=text_encoder,
        ema={"enabled": False},
        caption_dropout=0.0,
        sampling=_training_sampling(kind),
    )
    if kind == "keyframe":
        stage: DiffusionStage = KeyframeStage(num_frames=8, height=40, width=64, **common)
    elif kind == "interpolation":
        stage = InterpolationStage(num_frames=5, insert_frames=3, height=40, width=64, **common)
    elif kind == "pixel_sr":
        stage = PixelSRStage(
            height=160,
            width=256,
            scale_factor=4,
            noise_level=250,
            window_frames=8,
            window_overlap=True,
            align_corners=True,
            **common,
        )
    else:
        vae = VideoVAE.from_pretrained(folder, subfolder="vae")
        stage = LatentSRStage(vae=vae, sample_channels=4, height=320, width=576, strength=0.8, **common)
    stage.released = ReleasedSource(folder, scheduler, noising)  # type: ignore[attr-defined]
    return stage.eval()


def _training_sampling(kind: str) -> dict[str, Any]:
    """This project's sampling defaults of a stage (``conf/stage/<kind>.yaml``: ``sampling``), used for released
    folders when no released behaviour applies (``behaviour=none``)."""
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[2] / "conf" / "stage" / f"{kind}.yaml"
    if not path.is_file():
        return {}
    node = OmegaConf.load(path).get("sampling")
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


# ---------------------------------------------------------------------------------------------------- sampling
def _official_generator(seed: int) -> torch.Generator:
    """What the official code passes as ``generator``: ``torch.manual_seed(seed)``, the global CPU generator
    (also seeding every CUDA device)."""
    return torch.manual_seed(int(seed))


def _randn(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """diffusers' ``randn_tensor`` for a CPU generator: drawn on the CPU, then moved."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """``prepare_extra_step_kwargs`` of the official pipelines: eta 0 and the generator when accepted."""
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = 0.0
    if "generator" in params:
        out["generator"] = generator
    return out


def _sampler_for(stage: DiffusionStage, beh: ReleasedBehaviour) -> Any:
    """The folder's scheduler (released stage with ``folder_scheduler``), else the stage's DPM-Solver++."""
    from copy import deepcopy

    from show1_lightning.diffusion.sampling import make_sampler

    src = getattr(stage, "released", None)
    if src is not None and beh.folder_scheduler:
        return deepcopy(src.scheduler)
    solver = {
        k: v
        for k, v in stage.sampling_cfg.items()
        if k not in ("num_steps", "guidance_scale", "negative_prompt", "train_mode_dropout")
    }
    return make_sampler(stage.noise_scheduler, **solver)


def official_denoise(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: Any,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    guidance_scale: float,
    step_kwargs: dict[str, Any],
    per_frame: bool = True,
    concat: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official pixel/latent denoising loop.

    ``model(model_input, t)`` returns the UNet output for the (guided: uncond + cond) batch. Guidance on the
    first C channels, the learned-variance half of the text branch kept when the scheduler's ``variance_type`` is
    learned (base_pixel.py:731-740); ``scheduler.step`` on B*F frames when ``per_frame`` (base_pixel.py:743-753).
    """
    guided = guidance_scale > 1.0
    c = x.shape[1]
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    for t in timesteps:
        inp = x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1)
        inp = torch.cat([inp] * 2) if guided else inp
        inp = scheduler.scale_model_input(inp, t)
        out = model(inp, t).float()
        if guided:
            uncond, cond = out.chunk(2)
            eps = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
            out = torch.cat([eps, cond[:, c:]], dim=1)
        if not learned:
            out = out[:, :c]
        if per_frame:
            b, _, f, h, w = x.shape
            xf = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
            of = out.permute(0, 2, 1, 3, 4).reshape(b * f, -1, h, w)
            xf = scheduler.step(of, t, xf, **step_kwargs).prev_sample
            x = xf.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        else:
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


class _Ctx:
    """Per-stage sampling context: text, UNet call, scheduler, for one video."""

    def __init__(
        self, stage: DiffusionStage, beh: ReleasedBehaviour, prompt: str, negative: str, preprocess: bool
    ) -> None:
        self.stage, self.beh = stage, beh
        mode = beh.prompt_preprocessing if preprocess else "none"
        emb, mask = stage.encode_text([preprocess_prompt(prompt, mode)])
        nemb, nmask = stage.encode_text([preprocess_prompt(negative, mode)])
        self.emb, self.mask = torch.cat([nemb, emb]), torch.cat([nmask, mask])
        self.pos = (emb, mask)

    def model(
        self, class_labels: torch.Tensor | None = None, guided: bool = True
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        emb, mask = (self.emb, self.mask) if guided else self.pos
        unet = self.stage.unet
        kwargs: dict[str, Any] = {"encoder_hidden_states": emb}
        if class_labels is not None:
            kwargs["class_labels"] = class_labels.repeat(emb.shape[0] // class_labels.shape[0])
        if self.beh.text_attention_mask and getattr(self.stage, "_unet_takes_mask", False):
            kwargs["encoder_attention_mask"] = mask

        def call(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return unet(inp, t, **kwargs).sample

        return call


def _timesteps(scheduler: Any, num_steps: int, device: torch.device) -> torch.Tensor:
    scheduler.set_timesteps(int(num_steps), device=device)
    return scheduler.timesteps


def _keyframe(stage: Any, beh: ReleasedBehaviour, prompt: str, seed: int, s: dict) -> torch.Tensor:
    from show1_lightning.models.show1_unet import released_train_mode_dropout

    dev = stage.device
    shape = (
        1,
        stage.sample_channels,
        int(s.get("num_frames", stage.num_frames)),
        int(s.get("height", stage.height)),
        int(s.get("width", stage.width)),
    )
    guidance = float(s.get("guidance_scale", 9.0))
    ctx = _Ctx(stage, beh, prompt, s.get("negative_prompt", ""), preprocess=True)
    sched = _sampler_for(stage, beh)
    ts = _timesteps(sched, s.get("num_steps", 75), dev)
    g = _official_generator(seed)
    x = _randn(shape, g, dev) * sched.init_noise_sigma
    with released_train_mode_dropout(stage.unet, beh.train_mode_dropout):
        return official_denoise(
            ctx.model(guided=guidance > 1),
            sched,
            x,
            ts,
            guidance,
            _step_kwargs(sched, g),
            beh.per_frame_scheduler_step,
        )


def _interpolation(
    stage: Any, beh: ReleasedBehaviour, keyframes: torch.Tensor, prompt: str, seed: int, s: dict
) -> torch.Tensor:
    from show1_lightning.diffusion.sampling import window_seeds

    dev = stage.device
    _, c, n, h, w = keyframes.shape
    k = stage.num_frames
    step = k - 1
    guidance = float(s.get("guidance_scale", 4.0))
    ctx = _Ctx(stage, beh, prompt, s.get("negative_prompt", ""), preprocess=True)
    shape = (1, c, k, h, w)
    shared = _randn(shape, _official_generator(seed), dev)
    own = window_seeds(seed, n - 1)
    out = keyframes.new_zeros(1, c, (n - 1) * step + 1, h, w)
    for i in range(n - 1):
        sched = _sampler_for(stage, beh)
        ts = _timesteps(sched, s.get("num_steps", 75), dev)
        g = _official_generator(seed if beh.interp_shared_noise else own[i])
        x = shared.clone() if beh.interp_shared_noise else _randn(shape, g, dev)
        cond = stage.window_condition(keyframes[:, :, i], keyframes[:, :, i + 1]).concat
        win = official_denoise(
            ctx.model(guided=guidance > 1),
            sched,
            x,
            ts,
            guidance,
            _step_kwargs(sched, g),
            beh.per_frame_scheduler_step,
            concat=cond,
        )
        out[:, :, i * step : i * step + k] = win
    if not beh.interp_model_keyframes:
        out[:, :, ::step] = keyframes
    return out


class ImageSR:
    """DeepFloyd IF-II-L through diffusers' own ``IFSuperResolutionPipeline``, loaded from a local folder
    (run_inference.py:35-43: ``text_encoder=None``; the T5 embeddings come from the pixel stages' encoder)."""

    def __init__(self, path: str | Path) -> None:
        from diffusers import IFSuperResolutionPipeline

        path = Path(path)
        for req in (
            "unet/config.json",
            "scheduler/scheduler_config.json",
            "image_noising_scheduler/scheduler_config.json",
        ):
            if not (path / req).exists():
                raise FileNotFoundError(
                    f"if_ii_l: folder {path} lacks {req} (expected a download of DeepFloyd/IF-II-L-v1.0)"
                )
        self.path = path
        self.pipe = IFSuperResolutionPipeline.from_pretrained(
            str(path),
            text_encoder=None,
            tokenizer=None,
            safety_checker=None,
            feature_extractor=None,
            watermarker=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(
        self,
        image: torch.Tensor,
        emb: torch.Tensor,
        neg: torch.Tensor,
        height: int,
        width: int,
        seed: int,
        num_steps: int = 70,
        guidance_scale: float = 4.0,
        noise_level: int = 150,
    ) -> torch.Tensor:
        """One image (1 x 3 x h x w in [-1, 1]) -> 1 x 3 x height x width, unclamped (``output_type="pt"``)."""
        dev = image.device
        self.pipe.to(dev)
        try:
            return self.pipe(
                image=image,
                prompt_embeds=emb,
                negative_prompt_embeds=neg,
                height=height,
                width=width,
                num_inference_steps=int(num_steps),
                guidance_scale=float(guidance_scale),
                noise_level=int(noise_level),
                generator=_official_generator(seed),
                output_type="pt",
            ).images
        finally:
            self.pipe.to("cpu")


def _pixel_sr(
    stage: Any, beh: ReleasedBehaviour, video: torch.Tensor, prompt: str, seed: int, s: dict, image_sr: ImageSR | None
) -> torch.Tensor:
    from show1_lightning.diffusion.sampling import window_seeds

    dev = stage.device
    _, c, t, h, w = video.shape
    sf = stage.scale_factor
    size = (h * sf, w * sf)
    level = int(s.get("noise_level", 250))
    guidance = float(s.get("guidance_scale", 7.0))
    wf = int(s.get("window_frames", stage.window_frames))
    ctx = _Ctx(stage, beh, prompt, s.get("negative_prompt", ""), preprocess=True)
    if beh.sr1_overlapping_windows:
        spans = [(0, min(wf, t))]
        while spans[-1][1] < t:
            st = spans[-1][1] - 1
            spans.append((st, min(st + wf, t)))
    else:
        spans = [(st, min(st + wf, t)) for st in range(0, t, wf)]
    own = window_seeds(seed, len(spans))
    levels = torch.full((1,), level, dtype=torch.long, device=dev)
    out = video.new_zeros(1, c, t, *size)
    for k, (st, en) in enumerate(spans):
        first: torch.Tensor | None = None
        if k == 0 and beh.sr1_first_frame == "image_sr" and image_sr is not None:
            isr = beh.schedule("image_sr")
            emb, neg = ctx.emb[1:], ctx.emb[:1]
            first = image_sr(
                video[:, :, 0],
                emb,
                neg,
                size[0],
                size[1],
                seed,
                isr.get("num_steps", 70),
                isr.get("guidance_scale", 4.0),
                isr.get("noise_level", 150),
            ).to(dev)[:, :, None]
        elif k > 0 and beh.sr1_overlapping_windows:
            first = out[:, :, st : st + 1]
        seed_k = seed if beh.sr1_overlapping_windows else own[k]
        g = _official_generator(seed_k)
        sched = _sampler_for(stage, beh)
        ts = _timesteps(sched, s.get("num_steps", 125), dev)
        x = _randn((1, c, en - st, *size), g, dev) * sched.init_noise_sigma
        up = stage.upsample_condition(video[:, :, st:en].to(dev), size)
        aug = stage.augment(up, levels, _randn(up.shape, g, dev))
        if first is not None:
            aug[:, :, :1] = first.to(aug.dtype)
        res = official_denoise(
            ctx.model(levels, guided=guidance > 1),
            sched,
            x,
            ts,
            guidance,
            _step_kwargs(sched, g),
            beh.per_frame_scheduler_step,
            concat=aug,
        )
        lo = 1 if (k > 0 and beh.sr1_overlapping_windows and not beh.sr1_overwrite_shared_frame) else 0
        out[:, :, st + lo : en] = res[:, :, lo:]
    return out


def uint8_pil_resize(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """1 x 3 x T x h x w in [-1, 1] -> the official SR2 input: ``tensor2vid`` to uint8 (clamped, truncated),
    ``PIL.Image.resize((width, height))`` bicubic, back to [-1, 1] (diffusers' ``preprocess_video``)."""
    from PIL import Image

    x = (video.float() * 0.5 + 0.5).clamp(0, 1)
    frames = (x[0].permute(1, 2, 3, 0).cpu().numpy() * 255).astype("uint8")  # T x h x w x 3
    resized = [np.array(Image.fromarray(f).resize((width, height), resample=Image.BICUBIC)) for f in frames]
    arr = np.stack(resized).astype(np.float32) / 255.0
    return (torch.from_numpy(arr).permute(3, 0, 1, 2)[None] * 2.0 - 1.0).to(video.device)


def _latent_sr(
    stage: Any, beh: ReleasedBehaviour, video: torch.Tensor, prompt: str, seed: int, s: dict
) -> torch.Tensor:
    dev = stage.device
    height, width = int(s.get("height", stage.height)), int(s.get("width", stage.width))
    guidance = float(s.get("guidance_scale", 15.0))
    ctx = _Ctx(stage, beh, prompt, s.get("negative_prompt", "low resolution, blur"), preprocess=False)
    if beh.sr2_uint8_pil_resize:
        init = uint8_pil_resize(video, height, width)
    else:
        init = stage.resize_to_output(video, height, width)
    g = _official_generator(seed)
    vae = stage.vae
    previous = vae.sample_posterior
    vae.sample_posterior = beh.sr2_sample_posterior
    try:
        lat = vae.encode(init.to(dev), generator=g)  # 1 x 4 x T x h x w, posterior noise drawn as (T, 4, h, w)
    finally:
        vae.sample_posterior = previous
    b, lc, t, lh, lw = lat.shape
    noise = _randn((b * t, lc, lh, lw), g, dev).reshape(b, t, lc, lh, lw).permute(0, 2, 1, 3, 4)
    sched = _sampler_for(stage, beh)
    n = int(s.get("num_steps", 50))
    sched.set_timesteps(n, device=dev)
    strength = float(s.get("strength", stage.strength))
    t_start = max(n - min(int(n * strength), n), 0)
    ts = sched.timesteps[t_start * sched.order :]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    lf = lat.permute(0, 2, 1, 3, 4).reshape(b * t, lc, lh, lw)
    nf = noise.permute(0, 2, 1, 3, 4).reshape(b * t, lc, lh, lw)
    x = sched.add_noise(lf, nf, ts[:1].repeat(b)).reshape(b, t, lc, lh, lw).permute(0, 2, 1, 3, 4)
    x = official_denoise(
        ctx.model(guided=guidance > 1), sched, x, ts, guidance, _step_kwargs(sched, g), beh.per_frame_scheduler_step
    )
    return vae.decode(x)


@torch.no_grad()
def run_released_stage(
    name: str,
    stage: DiffusionStage,
    x: torch.Tensor | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    beh: ReleasedBehaviour,
    overrides: dict[str, Any] | None = None,
    image_sr: ImageSR | None = None,
) -> torch.Tensor:
    """Run cascade stage ``name`` the official way, one video at a time (module docstring).

    ``overrides`` update the preset's schedule of the stage (num_steps, guidance_scale, sizes, ...).
    Returns B x C x T x H x W (unclamped unless ``clamp_between_stages``).
    """
    s = beh.schedule(name)
    if getattr(stage, "released", None) is None:  # a trained stage keeps its own frame count and size
        s = {k: v for k, v in s.items() if k not in ("num_frames", "height", "width")}
    s.update(overrides or {})
    outs = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    was_training = stage.unet.training
    stage.unet.eval()
    try:
        with stage.ema_weights(True):
            for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
                with torch.random.fork_rng(devices=devices):
                    if name == "keyframe":
                        y = _keyframe(stage, beh, prompt, seed, s)
                    elif name == "interpolation":
                        y = _interpolation(stage, beh, x[i : i + 1].to(stage.device), prompt, seed, s)
                    elif name == "pixel_sr":
                        y = _pixel_sr(stage, beh, x[i : i + 1].to(stage.device), prompt, seed, s, image_sr)
                    elif name == "latent_sr":
                        y = _latent_sr(stage, beh, x[i : i + 1].to(stage.device), prompt, seed, s)
                    else:
                        raise ValueError(f"unknown stage {name!r}")
                outs.append(y.float())
    finally:
        stage.unet.train(was_training)
    y = torch.cat(outs)
    return y.clamp(-1, 1) if beh.clamp_between_stages else y


# ---------------------------------------------------------------------------------------------------- cascade glue
def load_cascade_stage(name: str, source: str | Path, t5: str | Path | None = None) -> DiffusionStage:
    """A cascade stage from a released folder (:func:`load_released_stage`), else from a checkpoint or export."""
    if is_released_folder(source):
        return load_released_stage(source, name, t5=t5)
    from show1_lightning.stages.loading import load_stage

    return load_stage(source)


class ReleasedCascade:
    """What the cascade needs to know about released behaviour: which stages sample the official way, the
    shared IF-II-L image SR, and whether stage outputs are clamped when handed on.

    Args:
        stages: the cascade's stages by name.
        behaviour: a ``conf/behaviour/*.yaml`` node (None or ``{}``: no released behaviour anywhere). Its
            ``apply_to`` is ``released_folders`` (default: stages loaded from released folders) or ``all``.
        if_ii_l: folder of ``DeepFloyd/IF-II-L-v1.0`` for SR1's first frame (None: the documented fallback).
    """

    def __init__(
        self,
        stages: dict[str, DiffusionStage],
        behaviour: dict[str, Any] | None = None,
        if_ii_l: str | Path | None = None,
    ) -> None:
        behaviour = dict(behaviour or {})
        self.apply_to = behaviour.get("apply_to", "released_folders")
        if self.apply_to not in ("released_folders", "all", "none"):
            raise ValueError(f"behaviour.apply_to must be released_folders, all or none; got {self.apply_to!r}")
        self.behaviour = ReleasedBehaviour.from_dict(behaviour) if behaviour else None
        self.active = {n: self._applies(s) for n, s in stages.items()}
        self.if_ii_l = Path(if_ii_l) if if_ii_l else None
        if self.if_ii_l is not None:  # loaded lazily; its folder is checked now
            for req in ("unet/config.json", "scheduler/scheduler_config.json"):
                if not (self.if_ii_l / req).exists():
                    raise FileNotFoundError(
                        f"if_ii_l: folder {self.if_ii_l} lacks {req} (expected a download of DeepFloyd/IF-II-L-v1.0)"
                    )
        self._image_sr: ImageSR | None = None
        self._announced = False

    def _applies(self, stage: DiffusionStage) -> bool:
        if self.behaviour is None or self.apply_to == "none":
            return False
        return self.apply_to == "all" or getattr(stage, "released", None) is not None

    def describe(self) -> dict[str, Any]:
        """For reports: the preset's name, where it applies and the image-SR folder."""
        if self.behaviour is None:
            return {"name": None}
        return {
            "name": self.behaviour.name,
            "apply_to": self.apply_to,
            "stages": [n for n, a in self.active.items() if a],
            "if_ii_l": str(self.if_ii_l) if self.if_ii_l else None,
        }

    def image_sr(self) -> ImageSR | None:
        """The IF-II-L pipeline (loaded on first use), or None with a printed notice of the fallback."""
        beh = self.behaviour
        if beh is None or beh.sr1_first_frame != "image_sr":
            return None
        if self.if_ii_l is None:
            if not self._announced:
                print(
                    "pixel_sr: no IF-II-L folder configured (if_ii_l=PATH to a download of DeepFloyd/IF-II-L-v1.0);"
                    " fallback: the first window's frame 0 is noise-augmented like the other frames "
                    "(sr1_first_frame=noisy), so the first frames differ from the official videos",
                    flush=True,
                )
                self._announced = True
            return None
        if self._image_sr is None:
            self._image_sr = ImageSR(self.if_ii_l)
        return self._image_sr

    def runs(self, name: str) -> bool:
        """True when stage ``name`` samples the official way."""
        return bool(self.active.get(name))

    def run(
        self,
        name: str,
        stage: DiffusionStage,
        x: torch.Tensor | None,
        prompts: Sequence[str],
        seeds: Sequence[int],
        overrides: dict[str, Any],
    ) -> torch.Tensor:
        assert self.behaviour is not None
        isr = self.image_sr() if name == "pixel_sr" else None
        return run_released_stage(name, stage, x, prompts, seeds, self.behaviour, overrides, isr)

    def hand_on(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A stage's output as the next stage gets it: clamped to [-1, 1] unless the official way keeps it."""
        x = x.float()
        if self.runs(name) and self.behaviour is not None and not self.behaviour.clamp_between_stages:
            return x
        return x.clamp(-1, 1)
