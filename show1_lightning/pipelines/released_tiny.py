"""Tiny random models saved exactly as the released Hugging Face folders are laid out (for tests and parity).

``build_tiny_released_folders(root)`` writes five folders, each as the Hub repo of the same name is laid out:

- ``show-1-base``, ``show-1-interpolation``: ``model_index.json``, ``unet/`` (``config.json`` with the released
  ``_class_name`` ``UNet3DConditionModel`` + ``diffusion_pytorch_model.safetensors``), ``scheduler/``,
  ``text_encoder/``, ``tokenizer/``;
- ``show-1-sr1``: the same plus ``image_noising_scheduler/``;
- ``show-1-sr2``: ``unet/`` (zeroscope / ModelScope schema), ``vae/``, CLIP ``text_encoder/`` + ``tokenizer/``,
  ``scheduler/``;
- ``IF-II-L-v1.0``: DeepFloyd's image SR (``UNet2DConditionModel``), ``scheduler/``, ``image_noising_scheduler/``,
  no text encoder (the official demo loads it with ``text_encoder=None``).

The UNet configs are the released schemas at toy widths (the same block types and keys as the released
``config.json`` files); the scheduler configs are written as diffusers 0.19.3 (the version the official code pins)
writes them, i.e. without the options added to diffusers later, so loading them with a newer diffusers shows the
same version quirks as the real folders. The T5 and CLIP text encoders are the project's tiny seeded models
(``TextEncoder``) with the byte-level ``ByT5Tokenizer`` (no vocabulary file needed); the real folders carry
``T5Tokenizer`` / ``CLIPTokenizer``. Sizes: keyframes 8 x 8 x 12 (H x W), 4x pixel SR, latent SR output 64 x 96.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_TEXT_DIM = 48  # T5 width (encoder_hid_dim of the pixel UNets)
TINY_CLIP_DIM = 32  # CLIP width (cross_attention_dim of the latent UNet)

#: Tiny configs in the released UNet schemas (keys of the released ``unet/config.json`` files).
TINY_UNET_CONFIGS: dict[str, dict[str, Any]] = {}
TINY_UNET_CONFIGS["show-1-base"] = {
    "_class_name": "UNet3DConditionModel",
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 6,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
    "up_block_types": ["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    "mid_block_type": "UNetMidBlock3DSimpleCrossAttn",
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "encoder_hid_dim": TINY_TEXT_DIM,
    "encoder_hid_dim_type": "text_proj",
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 2,
    "act_fn": "gelu",
    "resnet_time_scale_shift": "scale_shift",
    "cross_attention_norm": "group_norm",
    "only_cross_attention": False,
}
TINY_UNET_CONFIGS["show-1-interpolation"] = {**TINY_UNET_CONFIGS["show-1-base"], "in_channels": 7}
TINY_UNET_CONFIGS["show-1-sr1"] = {
    **TINY_UNET_CONFIGS["show-1-base"],
    "in_channels": 6,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": [1, 2, 1],
    "down_block_types": ["ResnetDownsampleBlock3D", "ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
    "up_block_types": ["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D", "ResnetUpsampleBlock3D"],
    "class_embed_type": "timestep",
    "only_cross_attention": True,
    "resnet_skip_time_act": True,
    "resnet_out_scale_factor": 1.4142135623730951,
    "mid_block_scale_factor": 1.4142135623730951,
    "time_embedding_act_fn": "gelu",
    "time_embedding_dim": 64,
}
TINY_UNET_CONFIGS["show-1-sr2"] = {
    "_class_name": "UNet3DConditionModel",
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
    "attention_head_dim": 8,
    "cross_attention_dim": TINY_CLIP_DIM,
    "norm_num_groups": 32,
}
#: DeepFloyd IF-II (image SR) schema at toy widths (diffusers' ``UNet2DConditionModel``).
TINY_IF_II_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 16,
    "in_channels": 6,
    "out_channels": 6,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": [1, 1, 1],
    "down_block_types": ["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "encoder_hid_dim": TINY_TEXT_DIM,
    "encoder_hid_dim_type": "text_proj",
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 2,
    "class_embed_type": "timestep",
    "act_fn": "gelu",
    "resnet_time_scale_shift": "scale_shift",
    "resnet_skip_time_act": True,
    "resnet_out_scale_factor": 1.4142135623730951,
    "mid_block_scale_factor": 1.4142135623730951,
    "only_cross_attention": True,
    "cross_attention_norm": "group_norm",
    "time_embedding_act_fn": "gelu",
    "time_embedding_dim": 64,
}

# Scheduler configs as diffusers 0.19.3 saves them (every option of that version, none added later).
_DPM_0193 = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.19.3",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.95,
    "sample_max_value": 1.5,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "use_karras_sigmas": False,
    "lambda_min_clipped": float("-inf"),
    "variance_type": "learned_range",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
_DDPM_0193 = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.19.3",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
}
_DDIM_0193 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.19.3",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}
TINY_SCHEDULERS: dict[str, dict[str, dict[str, Any]]] = {
    "show-1-base": {"scheduler": _DPM_0193},
    "show-1-interpolation": {"scheduler": _DPM_0193},
    # sr1: v-prediction with fixed variance (the pipelines then drop the variance half before the step) keeps the
    # tiny random SR model well-conditioned (see OUTPUT_SCALE); the learned-variance path is exercised by base,
    # interpolation and IF-II-L.
    "show-1-sr1": {
        "scheduler": {
            **_DPM_0193,
            "dynamic_thresholding_ratio": 0.995,
            "prediction_type": "v_prediction",
            "variance_type": None,
        },
        "image_noising_scheduler": _DDPM_0193,
    },
    "show-1-sr2": {"scheduler": _DDIM_0193},
    "IF-II-L-v1.0": {
        "scheduler": {
            **_DDPM_0193,
            "variance_type": "learned_range",
            "thresholding": True,
            "dynamic_thresholding_ratio": 0.95,
        },
        "image_noising_scheduler": _DDPM_0193,
    },
}
_PIPELINES = {
    "show-1-base": "TextToVideoIFPipeline",
    "show-1-interpolation": "TextToVideoIFInterpPipeline",
    "show-1-sr1": "TextToVideoIFSuperResolutionPipeline_Cond",
    "show-1-sr2": "VideoToVideoSDPipeline",
    "IF-II-L-v1.0": "IFSuperResolutionPipeline",
}
RELEASED_NAMES = tuple(_PIPELINES)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _wake_zero_parameters(model: torch.nn.Module, std: float = 0.05) -> None:
    """Fill the parameters diffusers initialises to zero (temporal conv outputs, zero-init projections) with small
    random values: as in trained weights, every layer then reaches the output, so the dropout of the temporal
    convolutions and every other path are seen by tests and parity checks."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.abs().max() > 0:
                p.normal_(0.0, std)


#: ``conv_out`` of the tiny UNets is scaled by this: a random denoiser with CFG 9 is chaotic (float rounding of
#: 1e-7, e.g. between diffusers versions' scheduler arithmetic, grows to ~3e-3 over 75 steps); a smaller output
#: layer makes it well-conditioned like a trained one (same check: ~4e-6), every path still changes the result.
#: The tiny SR1 (3 levels, CFG 7, 125 steps, chained windows) needs more: 0.01 and v-prediction (a 1e-6 input
#: change then moves its output by ~6e-6 instead of ~2; its first-frame condition still moves it by ~0.04).
OUTPUT_SCALE = {"show-1-sr1": 0.01}


def _save_unet(model: torch.nn.Module, folder: Path, class_name: str) -> None:
    """``save_pretrained`` into ``folder/unet`` with the released class name in ``config.json``."""
    _wake_zero_parameters(model)
    with torch.no_grad():
        for p in model.conv_out.parameters():
            p.mul_(OUTPUT_SCALE.get(folder.name, 0.1))
    model.save_pretrained(folder / "unet", safe_serialization=True)
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = class_name
    cfg["_diffusers_version"] = "0.19.3"
    _write_json(cfg_path, cfg)


def _save_text(folder: Path, kind: str, seed: int) -> None:
    from show1_lightning.models.text_encoder import TextEncoder

    dim = TINY_TEXT_DIM if kind == "t5" else TINY_CLIP_DIM
    te = TextEncoder(kind, max_length=77, seed=seed, tiny_dim=dim, tiny_layers=2)
    te.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
    if kind == "clip":  # the Hub layout (and transformers < 5) names CLIP text weights text_model.*
        from safetensors.torch import load_file, save_file

        path = folder / "text_encoder" / "model.safetensors"
        sd = load_file(str(path))
        save_file(
            {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()},
            str(path),
            metadata={"format": "pt"},
        )
    # A minimal tokenizer_config.json that old (4.29) and new transformers read alike (ByT5 needs no vocab file).
    tok = folder / "tokenizer"
    _write_json(
        tok / "tokenizer_config.json",
        {
            "tokenizer_class": "ByT5Tokenizer",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "extra_ids": 125,
            "model_max_length": 77,
        },
    )


def build_tiny_released_folders(
    root: str | Path, seed: int = 0, names: tuple[str, ...] = RELEASED_NAMES
) -> dict[str, Path]:
    """Write the tiny released-layout folders under ``root`` (one per name); returns name -> folder.

    Weights are random from ``seed`` (the global RNG is left untouched); the T5 is shared by every pixel folder.
    """
    from diffusers import UNet2DConditionModel

    from show1_lightning.models.show1_unet import build_show1_unet
    from show1_lightning.models.vae import tiny_autoencoder

    root = Path(root)
    out: dict[str, Path] = {}
    with torch.random.fork_rng(devices=[]):
        for k, name in enumerate(names):
            folder = root / name
            torch.manual_seed(seed * 101 + k)
            index: dict[str, Any] = {"_class_name": _PIPELINES[name], "_diffusers_version": "0.19.3"}
            if name == "IF-II-L-v1.0":
                unet = UNet2DConditionModel.from_config(
                    {k2: v for k2, v in TINY_IF_II_CONFIG.items() if not k2.startswith("_")}
                )
                _save_unet(unet, folder, "UNet2DConditionModel")
                index.update(
                    unet=["diffusers", "UNet2DConditionModel"],
                    text_encoder=[None, None],
                    tokenizer=[None, None],
                    safety_checker=[None, None],
                    feature_extractor=[None, None],
                    watermarker=[None, None],
                    requires_safety_checker=False,
                )
            else:
                unet = build_show1_unet({k2: v for k2, v in TINY_UNET_CONFIGS[name].items() if k2 != "_class_name"})
                _save_unet(unet, folder, "UNet3DConditionModel")
                index["unet"] = ["diffusers", "UNet3DConditionModel"]
                if name == "show-1-sr2":
                    vae = tiny_autoencoder(
                        block_out_channels=(16, 32),
                        norm_num_groups=8,
                        mid_block_add_attention=True,
                        scaling_factor=0.18215,
                        seed=seed + 7,
                    )
                    vae.save_pretrained(folder / "vae", safe_serialization=True)
                    _save_text(folder, "clip", seed)
                    index.update(
                        vae=["diffusers", "AutoencoderKL"],
                        text_encoder=["transformers", "CLIPTextModel"],
                        tokenizer=["transformers", "ByT5Tokenizer"],
                    )
                else:
                    _save_text(folder, "t5", seed)
                    index.update(
                        text_encoder=["transformers", "T5EncoderModel"],
                        tokenizer=["transformers", "ByT5Tokenizer"],
                        feature_extractor=[None, None],
                    )
            for sub, cfg in TINY_SCHEDULERS[name].items():
                _write_json(folder / sub / "scheduler_config.json", cfg)
                index[sub] = ["diffusers", cfg["_class_name"]]
            _write_json(folder / "model_index.json", index)
            out[name] = folder
    return out
