"""Precision names: the one map from the spellings used in configs to torch dtypes and autocast.

Configs spell precisions three ways: Lightning's trainer strings (``"32-true"``, ``"bf16-mixed"``), the inference
switch of ``generate.yaml`` / ``eval.yaml`` (``"32"``, ``"fp32"``, ``"bf16"``) and dtype names of frozen models and
caches (``"float32"``, ``"bfloat16"``, ``"float16"``). Every module resolves them here.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES: dict[str, torch.dtype] = {
    "32": torch.float32,
    "fp32": torch.float32,
    "float32": torch.float32,
    "32-true": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16": torch.float16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "64": torch.float64,
    "fp64": torch.float64,
    "float64": torch.float64,
    "64-true": torch.float64,
}
# Lightning's ``trainer.precision`` values.
LIGHTNING_PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")
# Inference precisions (``generate.yaml``, ``eval.yaml``, ``Show1Cascade``): float32, or bf16 autocast.
INFERENCE_PRECISIONS = ("32", "bf16")


def to_dtype(
    name: str | torch.dtype | None, default: torch.dtype = torch.float32, what: str = "precision / dtype"
) -> torch.dtype:
    """The torch dtype of a precision or dtype name (a dtype passes through; None gives ``default``).

    ``what`` names the setting in the error message.
    """
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


def inference_precision(name: str | int) -> str:
    """Normalise an inference precision to ``"32"`` (float32) or ``"bf16"`` (bf16 autocast).

    Accepts every float32 spelling (``32``, ``"fp32"``, ``"float32"``, ``"32-true"``) and every bfloat16 one.
    """
    key = str(name).removeprefix("torch.")
    dtype = DTYPES.get(key)
    if dtype == torch.float32:
        return "32"
    if dtype == torch.bfloat16:
        return "bf16"
    raise ValueError(f"inference precision must be float32 ('32', 'fp32') or 'bf16', got {name!r}")


def autocast(device_type: str, precision: str | int) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision`` "bf16" (any spelling), nothing for float32."""
    if inference_precision(precision) == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
