"""Parity of ``load_i3d(variant="tats")`` and the TATS FVD distance with TATS's own code.

The independent reference is TATS itself (github.com/songweige/TATS): its ``InceptionI3d``
(``tats/fvd/pytorch_i3d.py``) loaded with our weights written under its state-dict names, and its
``frechet_distance`` (``tats/fvd/fvd.py``). No TATS code is part of this repository: ``--setup``
copies those two files from a TATS checkout (or bare git directory) you name into a test-only
folder and builds a separate virtual environment for them::

    python scripts/tats_parity.py --setup --tats-repo /path/to/TATS   # once (pip installs scikit-learn)
    python scripts/tats_parity.py                                     # a few minutes on 2 cores

Layout (gitignored): ``.cache/tats_ref/src/tats/fvd/{pytorch_i3d,fvd}.py`` (copied, with empty
``__init__.py`` files of ours so that nothing else of TATS is imported) and ``.cache/tats_ref/venv``
(``python -m venv`` + a ``.pth`` file pointing at this project's site-packages, so torch and numpy are
the same local installs; ``scikit-learn``, which ``fvd.py`` imports, comes from PyPI).

The check: (1) I3D logits of 2 natural-looking and 2 uniform-noise clips (16 frames, 224 px), ours
(fused, unfused, and loaded from the ``.pt`` in TATS names) against TATS's network run in that venv:
relative L2 per clip <= ``--tol-logits`` (1e-4). (2) FVD of the same features (two Gaussian sets of
2048 x 400 with logit-like scales): our ``FVD`` (float64 moments, ``eigh_float64``) against TATS's
``frechet_distance`` given the features in float64, relative difference <= ``--tol-fvd`` (1e-5): the
same formula (unbiased covariance, generated set first). (3) TATS in float32, as it runs, against
our ``FVD(distance="tfgan_svd_float32")``: printed with TATS's own float32 spread (the same features
in another order) and its distance from the float64 value; must be within ``--tol-fvd32`` (1e-4).
Exit status 1 if a check fails, 2 if the reference environment is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from reference_venv import make_reference_venv

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = ROOT / ".cache" / "tats_ref"
TATS_FILES = ("tats/fvd/pytorch_i3d.py", "tats/fvd/fvd.py")


def ref_python(ref_dir: Path = REF_DIR) -> Path:
    """The reference venv's interpreter."""
    return ref_dir / "venv" / "bin" / "python"


def reference_ready(ref_dir: Path = REF_DIR) -> str:
    """Empty string when the reference environment is complete, else why not."""
    if not ref_python(ref_dir).is_file():
        return f"no reference venv at {ref_dir / 'venv'} (run scripts/tats_parity.py --setup --tats-repo PATH)"
    missing = [f for f in TATS_FILES if not (ref_dir / "src" / f).is_file()]
    if missing:
        return f"TATS sources {missing} not copied to {ref_dir / 'src'} (run --setup --tats-repo PATH)"
    return ""


def _read_tats_file(repo: Path, rel: str) -> bytes:
    """A TATS file from a checkout (``repo/rel``) or a bare git directory (``git show HEAD:rel``)."""
    if (repo / rel).is_file():
        return (repo / rel).read_bytes()
    out = subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{rel}"], capture_output=True)
    if out.returncode != 0:
        raise FileNotFoundError(f"{rel} is neither in {repo} nor in its git HEAD: {out.stderr.decode()[-300:]}")
    return out.stdout


def setup(tats_repo: Path, ref_dir: Path = REF_DIR) -> None:
    """Copy TATS's I3D and FVD files into ``ref_dir/src`` and build the reference venv."""
    src = ref_dir / "src"
    for rel in TATS_FILES:
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(_read_tats_file(tats_repo, rel))
    for pkg in ("tats", "tats/fvd"):  # ours, empty: keeps TATS's own tats/__init__.py (Lightning, ...) out
        (src / pkg / "__init__.py").write_text("")
    make_reference_venv(ref_dir / "venv", ["scikit-learn"], check_import="sklearn")
    print(f"reference environment ready: {ref_dir}")


# ----------------------------------------------------------------------------- reference side


def ref_worker(work: Path, src: Path, threads: int) -> None:
    """Runs in the reference venv (started with PYTHONPATH=<src>): TATS's network and distance on the inputs in
    ``work``."""
    import torch

    torch.set_num_threads(threads)
    from tats.fvd.fvd import frechet_distance
    from tats.fvd.pytorch_i3d import InceptionI3d

    i3d = InceptionI3d(400, in_channels=3)
    i3d.load_state_dict(torch.load(str(work / "i3d_pretrained_400.pt"), map_location="cpu"))  # strict
    i3d.eval()
    clips = np.load(work / "clips.npy")
    with torch.no_grad():
        logits = torch.cat([i3d(torch.from_numpy(c[None])) for c in clips])  # one clip at a time: memory
    np.save(work / "ref_logits.npy", logits.numpy())
    feats = np.load(work / "features.npz")
    real, fake = torch.from_numpy(feats["real"]), torch.from_numpy(feats["fake"])
    # TATS: frechet_distance(fake_embeddings, real_embeddings). Its code is dtype-generic: float64
    # inputs give its formula without float32 rounding; float32 is what it runs in practice, and
    # the order of the samples (a shuffled loader) changes that rounding.
    perm = torch.from_numpy(np.random.default_rng(1).permutation(real.shape[0]))
    out = {
        "fvd_float64": float(frechet_distance(fake.double(), real.double())),
        "fvd_float32": float(frechet_distance(fake, real)),
        "fvd_float32_permuted": float(frechet_distance(fake[perm], real[perm])),
    }
    (work / "ref_fvd.json").write_text(json.dumps(out))


# ----------------------------------------------------------------------------- our side


def synthetic_features(n: int = 2048, d: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 ``(n, d)`` Gaussian feature sets with logit-like scales and different moments."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(d, d)) / np.sqrt(d)
    scales = np.geomspace(3.0, 0.05, d)
    real = rng.normal(size=(n, d)) * scales @ basis + rng.normal(0, 1.0, d)
    fake = rng.normal(size=(n, d)) * (scales * rng.uniform(0.7, 1.3, d)) @ basis + rng.normal(0, 1.0, d) * 0.9
    return real.astype(np.float32), fake.astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", action="store_true", help="copy the TATS files and build the reference venv")
    ap.add_argument(
        "--tats-repo",
        type=Path,
        default=os.environ.get("TATS_REPO"),
        help="TATS checkout or bare git dir (default: $TATS_REPO)",
    )
    ap.add_argument("--ref-dir", type=Path, default=REF_DIR)
    ap.add_argument("--ref-worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tol-logits", type=float, default=1e-4)
    ap.add_argument("--tol-fvd", type=float, default=1e-5)
    ap.add_argument("--tol-fvd32", type=float, default=1e-4)
    args = ap.parse_args()

    if args.ref_worker is not None:
        ref_worker(args.ref_worker, args.ref_dir / "src", args.threads)
        return 0
    if args.setup:
        if args.tats_repo is None:
            ap.error("--setup needs --tats-repo PATH (or $TATS_REPO)")
        setup(Path(args.tats_repo), args.ref_dir)
        return 0
    why = reference_ready(args.ref_dir)
    if why:
        print(why, file=sys.stderr)
        return 2

    import torch
    from i3d_parity import natural_clip, relative_l2  # the sibling script: scripts/ is sys.path[0] when run as one

    from evaluation.fvd import FVD
    from evaluation.i3d import converted_state_dict, load_i3d, to_tats_state_dict

    torch.set_num_threads(args.threads)
    clips = np.concatenate(
        [
            natural_clip(args.batch, args.frames, args.seed),
            np.random.default_rng(args.seed + 1)
            .uniform(-1, 1, (args.batch, 3, args.frames, 224, 224))
            .astype(np.float32),
        ]
    )
    real, fake = synthetic_features(seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="tats_parity_") as tmp:
        work = Path(tmp)
        state, _ = converted_state_dict()
        torch.save(to_tats_state_dict(state), work / "i3d_pretrained_400.pt")
        np.save(work / "clips.npy", clips)
        np.savez(work / "features.npz", real=real, fake=fake)
        cmd = [
            str(ref_python(args.ref_dir)),
            str(Path(__file__).resolve()),
            "--ref-worker",
            str(work),
            "--ref-dir",
            str(args.ref_dir),
            "--threads",
            str(args.threads),
        ]
        # Only the copied TATS sources on the path: the reference never imports this project.
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(args.ref_dir / "src")})
        ref_logits = np.load(work / "ref_logits.npy")
        ref = json.loads((work / "ref_fvd.json").read_text())
        # The same file loaded by our loader (TATS names -> ours).
        from_pt = load_i3d(work / "i3d_pretrained_400.pt", variant="tats", fuse=False)

    worst = 0.0
    models = {
        "fuse=False": load_i3d(variant="tats", fuse=False),
        "fuse=True ": load_i3d(variant="tats", fuse=True),
        "from .pt  ": from_pt,
    }
    kinds = ["natural"] * args.batch + ["uniform noise"] * args.batch
    for name, model in models.items():
        with torch.inference_mode():
            ours = torch.cat([model(torch.from_numpy(c[None])) for c in clips]).numpy()
        err = relative_l2(ours, ref_logits)
        worst = max(worst, float(err.max()))
        print(
            f"tats {name} T={args.frames} rel L2 per clip ({', '.join(kinds)}): " + " ".join(f"{e:.2e}" for e in err)
        )
    tf_model = load_i3d(variant="tf", fuse=False)
    with torch.inference_mode():
        tf_err = relative_l2(torch.cat([tf_model(torch.from_numpy(c[None])) for c in clips]).numpy(), ref_logits)
    print("for scale: variant=tf vs TATS network, rel L2 per clip: " + " ".join(f"{e:.2e}" for e in tf_err))
    print(f"max relative L2 (tats variant) = {worst:.3e} (tolerance {args.tol_logits:g})")

    values = {}
    for distance in ("eigh_float64", "tfgan_svd_float32"):
        fvd = FVD(feature_extractor=torch.nn.Identity(), distance=distance)
        fvd.add_features(torch.from_numpy(real), real=True)
        fvd.add_features(torch.from_numpy(fake), real=False)
        values[distance] = float(fvd.compute())

    def rel(a: float, b: float) -> float:
        return abs(a - b) / abs(b)

    fvd_err = rel(values["eigh_float64"], ref["fvd_float64"])
    fvd32_err = rel(values["tfgan_svd_float32"], ref["fvd_float32"])
    print(
        f"FVD, 2048 x 400 features: TATS frechet_distance(float64) = {ref['fvd_float64']:.8f}; "
        f"ours (FVD, eigh_float64) = {values['eigh_float64']:.8f}; rel diff {fvd_err:.2e} (tolerance {args.tol_fvd:g})"
    )
    print(
        f"FVD float32: TATS frechet_distance(float32) = {ref['fvd_float32']:.6f} (same features permuted: "
        f"{ref['fvd_float32_permuted']:.6f}, rel {rel(ref['fvd_float32_permuted'], ref['fvd_float32']):.2e}; "
        f"vs its float64 value: rel {rel(ref['fvd_float32'], ref['fvd_float64']):.2e}); "
        f"ours tfgan_svd_float32 = {values['tfgan_svd_float32']:.6f}, rel diff {fvd32_err:.2e} (tolerance {args.tol_fvd32:g})"
    )
    ok = worst <= args.tol_logits and fvd_err <= args.tol_fvd and fvd32_err <= args.tol_fvd32
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
