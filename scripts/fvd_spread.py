"""How much FVD moves between repeated draws of the same two distributions, by sample count.

Two fixed Gaussians in 400-d with I3D-logit-like scales (``tats_parity.synthetic_features``: variances
from 9 down to 0.0025, FVD about 790 between them) stand in for real and generated I3D features; each
repeat draws ``N`` real and ``N`` generated samples afresh (TATS and StyleGAN-V draw both sets at random)
and computes FVD with the protocol's covariance and distance. Prints mean and std over repeats and the
smallest difference two models' FVDs must have to be told apart (1.96 x sqrt(2) x std, about 95 %)::

    python scripts/fvd_spread.py --sizes 256 512 1024 2048 4096 10000 --repeats 20

The spread of real UCF-101 features differs; measure it on your own run with
``eval_protocol.fvd.repeats=R`` (R generated sets of ``num_generated``, tgan2 style).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> int:
    import torch

    from evaluation.fvd import frechet_distance_by

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 10000])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    d = 400
    rng = np.random.default_rng(args.seed)
    basis = rng.normal(size=(d, d)) / np.sqrt(d)
    scales = np.geomspace(3.0, 0.05, d)
    real_mean, fake_mean = rng.normal(0, 1.0, d), rng.normal(0, 1.0, d) * 0.9
    fake_scales = scales * rng.uniform(0.7, 1.3, d)

    def moments(x: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray]:
        return x.mean(0), np.cov(x, rowvar=False, ddof=ddof)

    protocols = {"tf_fvd / tats (unbiased)": (1, "eigh_float64"), "stylegan_v (biased)": (0, "eigh_float64")}
    print(f"{'protocol':28} {'N':>6} {'mean FVD':>9} {'std':>7} {'resolvable difference':>22}")
    for name, (ddof, distance) in protocols.items():
        for n in args.sizes:
            values = []
            for _ in range(args.repeats):
                real = rng.normal(size=(n, d)) * scales @ basis + real_mean
                fake = rng.normal(size=(n, d)) * fake_scales @ basis + fake_mean
                m1, s1 = moments(real, ddof)
                m2, s2 = moments(fake, ddof)
                values.append(frechet_distance_by(distance, m1, s1, m2, s2))
            v = np.array(values)
            print(
                f"{name:28} {n:>6} {v.mean():>9.2f} {v.std(ddof=1):>7.2f} {1.96 * np.sqrt(2) * v.std(ddof=1):>22.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
