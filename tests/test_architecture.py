"""The import layering of docs/architecture.md: a module imports only its own layer and the layers below.

Imports are read with ``ast`` from every .py file (function-level, lazy imports included), so the test sees what
``grep`` would and needs no import of the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; a unit is a top-level module of show1_lightning, a subpackage of it, or a top-level folder/script.
LAYERS: list[set[str]] = [
    {
        "show1_lightning",
        "show1_lightning.fileio",
        "show1_lightning.video_ops",
        "show1_lightning.plain",
        "show1_lightning.precision",
        "show1_lightning.ranks",
        "show1_lightning.wandb_mode",
    },
    {"show1_lightning.models", "show1_lightning.data"},
    {"show1_lightning.diffusion"},
    {"show1_lightning.stages"},
    {"show1_lightning.runtime", "show1_lightning.callbacks", "show1_lightning.pipelines"},
    {"evaluation"},
    {"train", "generate", "evaluate", "bench", "scripts", "data"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
# Known upward imports (lazy, inside a function), each with the move that removes it. An entry that no longer
# occurs fails the test, so the list only shrinks.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def unit_of_file(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "show1_lightning":
        return "show1_lightning" if parts[1] == "__init__" else f"show1_lightning.{parts[1]}"
    return parts[0]


def unit_of_module(name: str) -> str | None:
    """The layer unit of an imported module name; None for third-party and standard-library modules."""
    parts = name.split(".")
    if parts[0] == "show1_lightning":
        return "show1_lightning" if len(parts) == 1 else f"show1_lightning.{parts[1]}"
    if parts[0] in RANK:
        return parts[0]
    if parts[0] == "efficiency_lib":  # bench/'s library, imported as a plain module
        return "bench"
    return None


def project_files() -> list[Path]:
    files = [ROOT / f"{name}.py" for name in ("train", "generate", "evaluate")]
    for folder in ("show1_lightning", "evaluation", "bench", "scripts", "data"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def upward_imports() -> set[tuple[str, str]]:
    found = set()
    for path in project_files():
        src = unit_of_file(path)
        assert src in RANK, f"{path.relative_to(ROOT)}: unit {src!r} has no layer in docs/architecture.md"
        for name in imports(path):
            dst = unit_of_module(name)
            if dst is not None and RANK[dst] > RANK[src]:
                found.add((str(path.relative_to(ROOT)), dst))
    return found


def test_no_module_imports_a_higher_layer() -> None:
    found = upward_imports()
    assert found - KNOWN_UPWARD == set(), "lower layer imports a higher one (see docs/architecture.md)"
    assert KNOWN_UPWARD - found == set(), "a known upward import is gone: drop it from KNOWN_UPWARD"


def test_show1_lightning_never_imports_evaluation_or_the_entry_points() -> None:
    top = {"evaluation", "train", "generate", "evaluate", "bench", "scripts", "data"}
    bad = [
        (str(p.relative_to(ROOT)), n)
        for p in (ROOT / "show1_lightning").rglob("*.py")
        for n in imports(p)
        if n.split(".")[0] in top
    ]
    assert bad == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The parser finds lazy imports too: a function-level import of evaluation in a show1_lightning module."""
    code = "def f():\n    from evaluation.runner import run_evaluation\n    import show1_lightning.stages.loading\n"
    path = tmp_path / "m.py"
    path.write_text(code)
    units = {unit_of_module(n) for n in imports(path)}
    assert units == {"evaluation", "show1_lightning.stages"}
    assert RANK["evaluation"] > RANK["show1_lightning.models"] > RANK["show1_lightning.fileio"]
