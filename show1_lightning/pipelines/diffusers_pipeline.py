"""A trained Show-1 cascade as one ``diffusers`` pipeline folder: ``Show1Pipeline``.

``Show1Pipeline.from_stages(keyframe=..., interpolation=..., ...)`` takes the stages ``Show1Cascade`` takes (stage
objects, Lightning checkpoints or per-stage export folders) and ``save_pretrained(folder)`` writes::

    model_index.json                       components + each stage's config (``show1_stages``)
    keyframe_unet/ interpolation_unet/ pixel_sr_unet/ latent_sr_unet/       config.json + safetensors (EMA weights)
    keyframe_scheduler/ ... latent_sr_scheduler/     the training noise schedules (for reference: a stage runs the
                                                     schedule of its config node, see _COMPONENT_KEYS)
    text_encoder/ tokenizer/               the first text encoder (T5 for the pixel stages)
    text_encoder_2/ tokenizer_2/           a second one when a stage uses another (CLIP for the latent SR stage)
    latent_sr_vae/                         the latent SR stage's AutoencoderKL
    pipeline.py                            one import line, for ``DiffusionPipeline.from_pretrained(folder,
                                           custom_pipeline="pipeline", trust_remote_code=True)``
    README.md, report.json, training/      written by ``export_pipeline``: model card, evaluation report, the runs'
                                           Hydra training configs

``Show1Pipeline.from_pretrained(folder)`` rebuilds every stage from its stored config with the loaded components
(the stage configs are checked against the project's allow-list of targets first, as export folders are) and
``__call__`` runs them through ``Show1Cascade``, so a pipeline gives the cascade's video for the same seeds.
``export_pipeline`` (``show1-export`` / ``scripts/export_pipeline.py``) also writes a model card (``README.md``)
and can push the folder to the Hub.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import nn

from show1_lightning.diffusion.module import DiffusionStage
from show1_lightning.models.text_encoder import TextEncoder
from show1_lightning.models.vae import VideoVAE
from show1_lightning.models.word_tokenizer import WordHashTokenizer
from show1_lightning.pipelines.cascade import STAGE_ORDER, Show1Cascade
from show1_lightning.precision import to_dtype
from show1_lightning.stages.loading import check_stage_config

__all__ = [
    "Show1Pipeline",
    "Show1PipelineOutput",
    "export_pipeline",
    "find_train_config",
    "push_to_hub",
    "model_card",
    "main",
]

#: Component slots for distinct text encoders, in the order stages first use them.
TEXT_SLOTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
#: Stage config keys held as components (or rebuilt from them) rather than instantiated from the config. The noise
#: schedule is not one of them: the stage is built from its config node, as ``load_stage`` builds it, because the
#: DPM-Solver sampler made from it (``make_sampler``: ``from_config``) takes the solver's own defaults for every key
#: the node left out (e.g. ``timestep_spacing``), which a schedule saved with all its keys would override.
_COMPONENT_KEYS = ("unet", "text_encoder", "vae")
_PIPELINE_SHIM = (
    '"""Loads Show1Pipeline from the installed show1-lightning package (the Show-1 UNets and stages live there)."""\n\n'
    "from show1_lightning.pipelines.diffusers_pipeline import Show1Pipeline  # noqa: F401\n"
)


@dataclass
class Show1PipelineOutput(BaseOutput):
    """Output of :class:`Show1Pipeline` (as diffusers' ``TextToVideoSDPipelineOutput``).

    Attributes:
        frames: ``output_type="np"``: float32 ``B x T x H x W x 3`` in [0, 1]; ``"pt"``: float ``B x T x 3 x H x W``
            in [0, 1]; ``"pil"``: per video a list of PIL images; ``"raw"``: the cascade's ``B x 3 x T x H x W``
            in [-1, 1].
        fps: frame rate of the video (the last stage's).
        seeds: the seed of each video (every stage's sample i is seeded by ``seeds[i]``).
    """

    frames: Any
    fps: float
    seeds: list[int]


class _LoadedTextEncoder(TextEncoder):
    """A :class:`TextEncoder` around an already loaded transformers model and tokenizer (pipeline components)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        kind: str,
        max_length: int,
        use_attention_mask: bool,
        source: str,
        torch_dtype: str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.torch_dtype = torch_dtype  # kept so that a pipeline's stages export again as they were
        self.kind, self.max_length, self.use_attention_mask = kind, int(max_length), bool(use_attention_mask)
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.model.requires_grad_(False)
        self.model.eval()


def _load_source(name: str, src: DiffusionStage | str | Path) -> DiffusionStage:
    if isinstance(src, DiffusionStage):
        return src
    from show1_lightning.pipelines.cascade import load_stage

    return load_stage(src)


def _ema_unet(stage: DiffusionStage) -> nn.Module:
    """A CPU copy of the stage's UNet holding the weights it samples with (the EMA ones when it has an EMA)."""
    unet = copy.deepcopy(stage.unet).to("cpu")
    ema = getattr(stage, "ema", None)
    if ema is not None:
        ema = copy.deepcopy(ema)
        ema.to("cpu")
        ema.copy_to(unet.parameters())
    return unet.eval()


def _realign(module: nn.Module) -> None:
    """Copy the parameters and buffers of a loaded module into freshly allocated tensors.

    Weights loaded by ``from_pretrained`` can be views at unaligned offsets of the safetensors buffer, and CPU BLAS
    takes other code paths on unaligned memory: outputs then differ in the last bits from the same stage loaded by
    ``load_stage`` (measured 1.6e-6 on a toy UNet). Fresh tensors make the pipeline reproduce the cascade exactly."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()


def _text_key(te: TextEncoder) -> tuple:
    """Text encoders with the same kind and weights share one component."""
    return (te.kind, te.source, te.dim)


class Show1Pipeline(DiffusionPipeline):
    """Text -> video with a Show-1 cascade, loadable with ``from_pretrained`` and saved with ``save_pretrained``.

    Any prefix of keyframe -> interpolation -> pixel SR -> latent SR may be present. Components are the stages'
    UNets, noise schedules, text encoders (+ tokenizers) and the latent SR VAE; ``show1_stages`` holds each stage's
    config without those components (its sampling defaults, sizes, text encoder settings, VAE settings).
    Build one from trained stages with :meth:`from_stages`.
    """

    _optional_components = [
        *(f"{s}_{c}" for s in STAGE_ORDER for c in ("unet", "scheduler")),
        "latent_sr_vae",
        "keyframe_layout_planner",
        *(n for pair in TEXT_SLOTS for n in pair),
    ]

    def __init__(
        self,
        keyframe_unet: nn.Module | None = None,
        keyframe_scheduler: DDPMScheduler | None = None,
        interpolation_unet: nn.Module | None = None,
        interpolation_scheduler: DDPMScheduler | None = None,
        pixel_sr_unet: nn.Module | None = None,
        pixel_sr_scheduler: DDPMScheduler | None = None,
        latent_sr_unet: nn.Module | None = None,
        latent_sr_scheduler: DDPMScheduler | None = None,
        latent_sr_vae: AutoencoderKL | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any = None,
        show1_stages: dict[str, dict] | None = None,
        keyframe_layout_planner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            keyframe_layout_planner=keyframe_layout_planner,
            keyframe_unet=keyframe_unet,
            keyframe_scheduler=keyframe_scheduler,
            interpolation_unet=interpolation_unet,
            interpolation_scheduler=interpolation_scheduler,
            pixel_sr_unet=pixel_sr_unet,
            pixel_sr_scheduler=pixel_sr_scheduler,
            latent_sr_unet=latent_sr_unet,
            latent_sr_scheduler=latent_sr_scheduler,
            latent_sr_vae=latent_sr_vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        stages = dict(show1_stages or {})
        unknown = set(stages) - set(STAGE_ORDER)
        if unknown:
            raise ValueError(f"show1_stages names unknown stages {sorted(unknown)}")
        for name in stages:
            if getattr(self, f"{name}_unet") is None or getattr(self, f"{name}_scheduler") is None:
                raise ValueError(f"stage {name!r} has a config but no {name}_unet / {name}_scheduler component")
        self.register_to_config(show1_stages=stages)
        self._stages: dict[str, DiffusionStage] | None = None

    # ------------------------------------------------------------------ building from trained stages
    @classmethod
    def from_stages(
        cls,
        keyframe: DiffusionStage | str | Path,
        interpolation: DiffusionStage | str | Path | None = None,
        pixel_sr: DiffusionStage | str | Path | None = None,
        latent_sr: DiffusionStage | str | Path | None = None,
    ) -> Show1Pipeline:
        """The pipeline of trained stages: stage objects, ``train.py`` checkpoints or export folders (``stage.json``
        + ``unet/``), as ``Show1Cascade`` takes them. UNets get the EMA weights the cascade samples with.

        Raises:
            ValueError: a stage without its stored config (``stage_config``), one without a text encoder (trained on
                cached embeddings only: no encoder to put in the pipeline), more than two distinct text encoders,
                or stages that are not a prefix of the cascade.
        """
        given = {"keyframe": keyframe, "interpolation": interpolation, "pixel_sr": pixel_sr, "latent_sr": latent_sr}
        present = [n for n in STAGE_ORDER if given[n] is not None]
        if present != list(STAGE_ORDER[: len(present)]):
            raise ValueError(f"stages must form a prefix of {STAGE_ORDER}; got {present}")
        components: dict[str, Any] = {}
        configs: dict[str, dict] = {}
        slots: dict[tuple, tuple[str, str]] = {}
        for name in present:
            stage = _load_source(name, given[name])
            config = getattr(stage, "stage_config", None)
            if not config:
                raise ValueError(
                    f"{name}: the stage has no stored config (stage_config); released Hub folders are loaded by "
                    "Show1Cascade directly and cannot be exported here yet"
                )
            planner = getattr(stage, "planner", None)
            extras = [k for k in stage.state_dict() if not k.startswith(("unet.", "planner."))]
            if extras:
                raise ValueError(
                    f"{name}: the stage has trained parts besides its UNet that a pipeline cannot hold: {extras}"
                )
            if planner is not None:
                components[f"{name}_layout_planner"] = copy.deepcopy(planner).to("cpu").eval()
            te = stage.text_encoder
            if not isinstance(te, TextEncoder):
                raise ValueError(
                    f"{name}: the stage has no text encoder (trained with text_encoder=none on cached embeddings); "
                    "a pipeline needs one to encode prompts"
                )
            key = _text_key(te)
            # The word tokenizer of the tiny encoders has no files: the entry below rebuilds it (no component).
            word = isinstance(te.tokenizer, WordHashTokenizer)
            if key not in slots:
                if len(slots) == len(TEXT_SLOTS):
                    raise ValueError(f"{name}: more than {len(TEXT_SLOTS)} distinct text encoders in one cascade")
                slots[key] = TEXT_SLOTS[len(slots)]
                components[slots[key][0]] = te.model
                components[slots[key][1]] = None if word else te.tokenizer
            stored = {k: v for k, v in copy.deepcopy(config).items() if k not in _COMPONENT_KEYS}
            te_cfg = dict(config.get("text_encoder") or {})
            entry: dict[str, Any] = {
                "stage": stored,
                "text_encoder": {
                    "component": slots[key][0],
                    "kind": te.kind,
                    "max_length": te.max_length,
                    "use_attention_mask": te.use_attention_mask,
                    "source": te.source,
                    "torch_dtype": te_cfg.get("torch_dtype", getattr(te, "torch_dtype", None)),
                },
            }
            if word:
                entry["text_encoder"]["word_tokenizer_vocab_size"] = te.tokenizer.vocab_size
            components[f"{name}_unet"] = _ema_unet(stage)
            components[f"{name}_scheduler"] = stage.noise_scheduler  # saved for reference (see _COMPONENT_KEYS)
            if name == "latent_sr":
                vae: VideoVAE = stage.vae
                components["latent_sr_vae"] = copy.deepcopy(vae.vae).to("cpu")
                entry["vae"] = {
                    "chunk_frames": vae.chunk_frames,
                    "sample_posterior": vae.sample_posterior,
                    "dtype": str(vae.dtype).removeprefix("torch."),
                    "scaling_factor": vae.scaling_factor,
                }
            configs[name] = entry
        return cls(**components, show1_stages=configs)

    # ------------------------------------------------------------------ stages and cascade
    @property
    def stage_names(self) -> list[str]:
        """The stages of this pipeline, in cascade order."""
        return [n for n in STAGE_ORDER if n in (self.config.show1_stages or {})]

    def _build_stage(self, name: str, entry: Mapping[str, Any]) -> DiffusionStage:
        config = copy.deepcopy(dict(entry["stage"]))
        check_stage_config(config, f"model_index.json show1_stages.{name}")  # refuses foreign _target_s
        t = entry["text_encoder"]
        model = getattr(self, t["component"])
        tokenizer = getattr(self, t["component"].replace("text_encoder", "tokenizer"))
        if t.get("word_tokenizer_vocab_size"):
            tokenizer = WordHashTokenizer(int(t["word_tokenizer_vocab_size"]))
        if t.get("torch_dtype"):
            model = model.to(to_dtype(str(t["torch_dtype"]), what="text encoder torch_dtype"))
        te = _LoadedTextEncoder(
            model, tokenizer, t["kind"], t["max_length"], t["use_attention_mask"], t["source"], t.get("torch_dtype")
        )
        parts: dict[str, Any] = {
            "unet": getattr(self, f"{name}_unet"),
            "text_encoder": te,
        }
        if name == "latent_sr":
            parts["vae"] = VideoVAE(self.latent_sr_vae, **entry["vae"])
        stage = hydra.utils.instantiate(config, **parts, _convert_="all")
        if not isinstance(stage, DiffusionStage):
            raise TypeError(f"show1_stages.{name} built a {type(stage).__name__}, not a stage")
        if getattr(stage, "planner", None) is not None:  # the stage's layout planner: the component's weights
            planner = getattr(self, f"{name}_layout_planner", None)
            if planner is None:
                raise ValueError(f"show1_stages.{name} has a layout but the pipeline no {name}_layout_planner")
            stage.planner = planner
        stage.stage_config = {**config, **{k: None for k in parts}}
        stage.ema = None  # the components hold the EMA weights already
        return stage.eval()

    @property
    def stages(self) -> dict[str, DiffusionStage]:
        """The stage objects (built on first use from the components; they share the components' weights)."""
        if self._stages is None:
            seen: set[int] = set()
            for _, component in self.components.items():
                if isinstance(component, nn.Module) and id(component) not in seen:
                    seen.add(id(component))
                    _realign(component)
            self._stages = {n: self._build_stage(n, self.config.show1_stages[n]) for n in self.stage_names}
        return self._stages

    @property
    def fps(self) -> float:
        """Frame rate of the final video: the last stage's ``output_fps`` when it has one, else 8 (generate.py's)."""
        return float(getattr(self.stages[self.stage_names[-1]], "output_fps", 8.0))

    def cascade(
        self, sampling: dict[str, dict[str, Any]] | None = None, precision: str = "32", device: Any = None
    ) -> Show1Cascade:
        """The ``Show1Cascade`` over this pipeline's stages (on ``device``, default the pipeline's)."""
        device = device if device is not None else self._execution_device
        return Show1Cascade(**self.stages, device=str(device), precision=precision, sampling=sampling)

    def _seeds(self, n: int, seed: int | Sequence[int] | None, generator: Any) -> list[int]:
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        if seed is not None:
            seeds = [int(seed) + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
        elif generator is not None:
            gens = generator if isinstance(generator, (list, tuple)) else [generator] * n
            if len(gens) != n:
                raise ValueError(f"{len(gens)} generators for {n} prompts")
            # The cascade seeds every stage's sample i by an integer: draw it from the generator.
            seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device).item()) for g in gens]
        else:
            seeds = [int(s) for s in torch.randint(0, 2**31 - 1, (n,))]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        return seeds

    @staticmethod
    def _per_stage(value: Any, names: Sequence[str], what: str) -> dict[str, Any]:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            unknown = set(value) - set(names)
            if unknown:
                raise ValueError(f"{what} for stages not in this pipeline: {sorted(unknown)}")
            return dict(value)
        return dict.fromkeys(names, value)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | Mapping[str, int] | None = None,
        guidance_scale: float | Mapping[str, float] | None = None,
        negative_prompt: str | Mapping[str, str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        num_videos_per_prompt: int = 1,
        output_type: str = "np",
        return_dict: bool = True,
        sampling: Mapping[str, Mapping[str, Any]] | None = None,
        precision: str = "32",
    ) -> Show1PipelineOutput | tuple:
        """Generate one video per prompt (times ``num_videos_per_prompt``).

        Args:
            prompt: a prompt or a list of them.
            num_inference_steps, guidance_scale, negative_prompt: one value for every stage, or a mapping
                ``{stage: value}``; None: each stage's trained sampling defaults (``show1_stages.<stage>.stage.
                sampling``).
            generator: a ``torch.Generator`` (or one per video) the integer seeds are drawn from; ``seed``: the
                seeds themselves (an int: ``seed, seed+1, ...``; or one per video). Same seeds, same video as
                ``Show1Cascade`` / ``generate.py``. Neither: random seeds (returned in the output).
            output_type: "np", "pt", "pil" or "raw" (see :class:`Show1PipelineOutput`).
            sampling: further per-stage overrides, as ``Show1Cascade(sampling=...)`` (solver settings, ...).
            precision: "32" or "bf16" (autocast), as ``Show1Cascade``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
        if not prompts:
            raise ValueError("no prompt")
        if output_type not in ("np", "pt", "pil", "raw"):
            raise ValueError(f"output_type must be 'np', 'pt', 'pil' or 'raw', got {output_type!r}")
        names = self.stage_names
        overrides: dict[str, dict[str, Any]] = {n: {} for n in names}
        for key, value in (
            ("num_steps", num_inference_steps),
            ("guidance_scale", guidance_scale),
            ("negative_prompt", negative_prompt),
        ):
            for n, v in self._per_stage(value, names, key).items():
                overrides[n][key] = v
        for n, extra in self._per_stage(sampling, names, "sampling").items():
            overrides[n].update(extra)
        seeds = self._seeds(len(prompts), seed, generator)
        cascade = self.cascade({n: o for n, o in overrides.items() if o}, precision)
        video = cascade(prompts, seeds).video  # B x 3 x T x H x W in [-1, 1]
        frames = _postprocess(video, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return Show1PipelineOutput(frames=frames, fps=self.fps, seeds=seeds)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` plus ``pipeline.py`` (the one-line import that lets
        ``DiffusionPipeline.from_pretrained(..., custom_pipeline="pipeline", trust_remote_code=True)`` find this class)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / "pipeline.py").write_text(_PIPELINE_SHIM)


def _postprocess(video: torch.Tensor, output_type: str) -> Any:
    if output_type == "raw":
        return video
    x = ((video.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 1, 3, 4)  # B x T x 3 x H x W in [0, 1]
    if output_type == "pt":
        return x
    arr = x.permute(0, 1, 3, 4, 2).numpy().astype(np.float32)  # B x T x H x W x 3
    if output_type == "np":
        return arr
    from PIL import Image

    return [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in v] for v in arr]


# ------------------------------------------------------------------------------------------------------------------
# Export, model card, Hub
# ------------------------------------------------------------------------------------------------------------------


def _flat_numbers(node: Any, prefix: str = "", depth: int = 3) -> list[tuple[str, float]]:
    """(dotted key, number) of the numeric leaves of a report, a few levels deep."""
    out: list[tuple[str, float]] = []
    if isinstance(node, bool):
        return out
    if isinstance(node, (int, float)) and math.isfinite(float(node)):
        return [(prefix, float(node))]
    if isinstance(node, Mapping) and depth > 0:
        for k, v in node.items():
            out.extend(_flat_numbers(v, f"{prefix}.{k}" if prefix else str(k), depth - 1))
    return out


def model_card(
    pipe: Show1Pipeline,
    repo_id: str | None = None,
    sources: Mapping[str, str] | None = None,
    report: Mapping[str, Any] | None = None,
    report_name: str = "report.json",
    train_configs: Mapping[str, str] | None = None,
) -> str:
    """The README.md of an exported pipeline: metadata, usage, each stage's config (and, in ``train_configs``,
    ``{stage: path in the folder}`` of the full Hydra training config of its run), the evaluation report."""
    import yaml

    names = pipe.stage_names
    meta = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-video",
        "license": "apache-2.0",
        "tags": ["show-1", "text-to-video", "show1-lightning", *names],
    }
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    title = repo_id or "Show-1 cascade"
    lines += [
        f"# {title}",
        "",
        f"A Show-1 text-to-video cascade ({' -> '.join(names)}) trained with show1-lightning and exported as one "
        "diffusers pipeline folder (`Show1Pipeline`). UNet weights are the EMA weights the cascade samples with.",
        "",
        "## Usage",
        "",
        "```python",
        "from show1_lightning.pipelines.diffusers_pipeline import Show1Pipeline  # needs show1-lightning installed",
        "",
        f'pipe = Show1Pipeline.from_pretrained("{repo_id or "path/to/folder"}")',
        'video = pipe("a red circle moving left", seed=0).frames[0]  # T x H x W x 3 in [0, 1]',
        "```",
        "",
        'or, without importing the class: `DiffusionPipeline.from_pretrained(..., custom_pipeline="pipeline", '
        "trust_remote_code=True)` (the folder's `pipeline.py` imports it from the installed package).",
        "",
        "## Stages and training configs",
        "",
    ]
    for n in names:
        entry = pipe.config.show1_stages[n]
        stage = entry["stage"]
        # The source's last two path parts only: the card may be published, the local folders are not.
        src = f" (from `{'/'.join(Path(sources[n]).parts[-2:])}`)" if sources and sources.get(n) else ""
        unet = getattr(pipe, f"{n}_unet")
        n_params = sum(p.numel() for p in unet.parameters())
        lines += [
            f"### {n}{src}",
            "",
            f"- target: `{stage.get('_target_')}`; UNet `{type(unet).__name__}`, {n_params / 1e6:.2f} M parameters",
            f"- text encoder: {entry['text_encoder']['kind']} (`{entry['text_encoder']['source']}`), "
            f"{entry['text_encoder']['max_length']} tokens",
            f"- sampling defaults: `{json.dumps(stage.get('sampling', {}))}`",
            *(
                [f"- full training config of the run: [`{train_configs[n]}`]({train_configs[n]})"]
                if train_configs and n in train_configs
                else []
            ),
            "",
            "<details><summary>stage config</summary>",
            "",
            "```yaml",
            yaml.safe_dump(stage, sort_keys=False).strip(),
            "```",
            "",
            "</details>",
            "",
        ]
    lines += ["## Evaluation", ""]
    numbers = _flat_numbers(report) if report else []
    if numbers:
        lines += [f"From `{report_name}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in numbers]
    else:
        lines += ["No evaluation report was given at export (`--report report.json` adds it)."]
    return "\n".join(lines) + "\n"


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> Any:
    """Create the model repo (if needed) and upload the exported folder with ``huggingface_hub``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message or "Upload Show-1 pipeline (show1-lightning export)",
    )


def find_train_config(source: str | Path, levels: int = 3) -> Path | None:
    """The Hydra ``.hydra/config.yaml`` of the training run a stage export or checkpoint came from (``<run>/export``,
    ``<run>/checkpoints/last.ckpt``): searched in the source's folder and up to ``levels`` parents."""
    here = Path(source).resolve()
    here = here if here.is_dir() else here.parent
    for folder in [here, *here.parents][: levels + 1]:
        candidate = folder / ".hydra" / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def export_pipeline(
    out: str | Path,
    keyframe: DiffusionStage | str | Path,
    interpolation: DiffusionStage | str | Path | None = None,
    pixel_sr: DiffusionStage | str | Path | None = None,
    latent_sr: DiffusionStage | str | Path | None = None,
    report: str | Path | None = None,
    push_to_hub_repo: str | None = None,
    private: bool = False,
    train_configs: bool = True,
) -> Path:
    """Write the pipeline folder (``save_pretrained`` + ``pipeline.py`` + ``README.md`` model card, with the
    evaluation ``report`` JSON copied in when given) and optionally push it to the Hub repo ``push_to_hub_repo``.

    With ``train_configs``, each stage's full Hydra training config (``.hydra/config.yaml`` of the run its export or
    checkpoint sits in, when found) is copied to ``training/<stage>.yaml`` and linked from the model card; it holds
    the run's local paths, so pass ``train_configs=False`` (``--no-train-configs``) to keep them out of a public repo."""
    out = Path(out)
    given = {"keyframe": keyframe, "interpolation": interpolation, "pixel_sr": pixel_sr, "latent_sr": latent_sr}
    pipe = Show1Pipeline.from_stages(**given)
    pipe.save_pretrained(out)
    report_data = None
    if report is not None:
        report_data = json.loads(Path(report).read_text())
        (out / "report.json").write_text(json.dumps(report_data, indent=2))
    sources = {k: str(v) for k, v in given.items() if isinstance(v, (str, Path))}
    copied: dict[str, str] = {}
    for name, src in sources.items() if train_configs else ():
        found = find_train_config(src)
        if found is not None:
            (out / "training").mkdir(exist_ok=True)
            (out / "training" / f"{name}.yaml").write_text(found.read_text())
            copied[name] = f"training/{name}.yaml"
    (out / "README.md").write_text(model_card(pipe, push_to_hub_repo, sources, report_data, train_configs=copied))
    if push_to_hub_repo:
        push_to_hub(out, push_to_hub_repo, private=private)
    return out


def main(argv: list[str] | None = None) -> int:
    """``show1-export --out DIR --keyframe PATH [--interpolation PATH ...] [--report report.json] [--push-to-hub REPO]``."""
    ap = argparse.ArgumentParser(
        prog="show1-export",
        description="Export trained Show-1 stages (checkpoints or export folders) as one diffusers pipeline folder.",
    )
    ap.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    for name in STAGE_ORDER:
        ap.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            required=name == "keyframe",
            help=f"{name} stage: a train.py checkpoint (*.ckpt) or an export folder (stage.json + unet/)",
        )
    ap.add_argument("--report", type=Path, default=None, help="an evaluate.py report.json for the model card")
    ap.add_argument("--push-to-hub", dest="push_to_hub", default=None, metavar="REPO", help="upload to this Hub repo")
    ap.add_argument("--private", action="store_true", help="create the Hub repo private")
    ap.add_argument(
        "--no-train-configs",
        dest="train_configs",
        action="store_false",
        help="do not copy the runs' .hydra/config.yaml into training/ (they hold local paths)",
    )
    args = ap.parse_args(argv)
    out = export_pipeline(
        args.out,
        args.keyframe,
        args.interpolation,
        args.pixel_sr,
        args.latent_sr,
        report=args.report,
        push_to_hub_repo=args.push_to_hub,
        private=args.private,
        train_configs=args.train_configs,
    )
    print(
        f"wrote the Show1Pipeline folder {out}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
