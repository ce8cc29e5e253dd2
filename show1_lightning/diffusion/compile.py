"""``stage.compile``: torch.compile of a stage's UNet, in place, with its state_dict keys unchanged.

``nn.Module.compile`` compiles the module's ``__call__`` in place (unlike ``torch.compile(module)``, which wraps it
in an ``OptimizedModule`` whose state_dict keys carry an ``_orig_mod.`` prefix), so checkpoints, EMA, exports and
LoRA adapters see the same parameter names whether or not the stage is compiled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def compile_options(spec: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """torch.compile keyword arguments for a ``stage.compile`` value; None when compilation is off.

    ``false``/``null``: off. ``true``: ``torch.compile`` defaults (the inductor backend; on a CPU it needs a C++
    compiler). A mapping: ``torch.compile`` arguments (``backend``, ``mode``, ``dynamic``, ``fullgraph``,
    ``options``), plus ``enabled`` (default true).
    """
    if spec is None or spec is False:
        return None
    if spec is True:
        return {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"stage.compile must be true, false or a mapping of torch.compile arguments; got {spec!r}")
    opts = dict(spec)
    if not opts.pop("enabled", True):
        return None
    unknown = set(opts) - {"backend", "mode", "dynamic", "fullgraph", "options"}
    if unknown:
        raise ValueError(f"stage.compile: unknown torch.compile arguments {sorted(unknown)}")
    return opts


def compile_in_place(module: nn.Module, spec: bool | Mapping[str, Any] | None) -> bool:
    """Compile ``module``'s forward in place per ``spec`` (:func:`compile_options`); idempotent.

    Returns whether the module is compiled afterwards. Parameters, buffers and state_dict keys are untouched.
    """
    opts = compile_options(spec)
    if opts is None:
        return False
    if not is_compiled(module):
        module.compile(**opts)
    return True


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` has been applied (its calls go through a compiled ``_call_impl``)."""
    return getattr(module, "_compiled_call_impl", None) is not None
