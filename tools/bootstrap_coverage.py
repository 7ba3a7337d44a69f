"""How often the 95% intervals of a row difference cover the truth, on simulated encoders.

    PYTHONPATH=. python3 tools/bootstrap_coverage.py [--seeds 3,8] [--tau 0,0.5,0.8] [--runs 200]

Each simulated ablation has two rows (recipes A and B) of S pretraining-seed instances scored on
the same n cases: score = (signal + seed effect) * label + case effect + noise. The seed effect
u ~ N(0, tau) moves an instance's separation (an additive shift would leave AUROC alone); the
case effect is shared by every encoder (hard cases are hard for all); the noise is per instance
and case. The truth, the difference of expected AUROC over seeds and cases, is exact:
Phi(mu / sqrt(2 s^2 + tau^2)) with s^2 the case plus noise variance (tests/test_hierarchical.py
checks it against a 2-million-draw simulation). Printed per (S, tau): the coverage of the
hierarchical bootstrap (pgjax/eval/hierarchical.py) and of a paired DeLong interval on one seed
of each row (an encoder treated as fixed).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import norm

MU_A, MU_B, CASE_SD, NOISE_SD = 1.0, 0.8, 0.6, 0.8


def expected_auroc(mu: float, tau: float) -> float:
    """E over seeds of the population AUROC: P(mu + u + N(0, 2 s^2) > 0)."""
    return float(norm.cdf(mu / np.sqrt(2 * (CASE_SD**2 + NOISE_SD**2) + tau**2)))


def simulate(rng, n: int, seeds: int, tau: float, prevalence: float = 0.4):
    """(labels, [A's instances], [B's instances]); each instance (1, n) probabilities (one
    label-subset seed)."""
    y = (rng.random(n) < prevalence).astype(np.int64)
    case = rng.normal(0.0, CASE_SD, n)

    def instance(mu):
        s = (mu + rng.normal(0.0, tau)) * y + case + rng.normal(0.0, NOISE_SD, n)
        return (1.0 / (1.0 + np.exp(-s)))[None]

    return y, [instance(MU_A) for _ in range(seeds)], [instance(MU_B) for _ in range(seeds)]


def coverage(seeds: int, tau: float, *, runs: int = 200, n: int = 150, n_boot: int = 200,
             seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """(hierarchical bootstrap, one-seed paired DeLong) coverage of the true difference."""
    from pgjax.eval import metrics as M
    from pgjax.eval.hierarchical import hierarchical_bootstrap

    truth = expected_auroc(MU_A, tau) - expected_auroc(MU_B, tau)
    rng = np.random.default_rng(seed)
    hier = delong = 0
    for r in range(runs):
        y, a, b = simulate(rng, n, seeds, tau)
        d = hierarchical_bootstrap(y, np.arange(n), a, b, metrics=("auroc",), n_boot=n_boot,
                                   seed=r)["auroc"]  # fmt: skip
        hier += d.lo <= truth <= d.hi
        one = M.delong_paired(y, a[0][0], b[0][0])
        delong += one.lo <= truth <= one.hi
    return hier / runs, delong / runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="3,8", help="pretraining seeds per row")
    ap.add_argument("--tau", default="0,0.5,0.8", help="sd of the seed effect")
    ap.add_argument("--runs", type=int, default=200, help="simulated ablations per setting")
    ap.add_argument("--cases", type=int, default=150)
    ap.add_argument("--n-boot", type=int, default=200)
    args = ap.parse_args()
    print("| seeds | tau | hierarchical bootstrap | one-seed DeLong |")
    print("| ---: | ---: | ---: | ---: |")
    for s in (int(v) for v in args.seeds.split(",")):
        for tau in (float(v) for v in args.tau.split(",")):
            h, d = coverage(s, tau, runs=args.runs, n=args.cases, n_boot=args.n_boot)
            print(f"| {s} | {tau:g} | {h:.3f} | {d:.3f} |", flush=True)


if __name__ == "__main__":
    main()
