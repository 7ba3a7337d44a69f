"""The two-level (pretraining seed x patient) bootstrap of row differences: coverage on
simulated encoders, exact null behaviour, the predictions.csv path and its errors. NumPy only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pgjax.eval import metrics as M
from pgjax.eval.hierarchical import (
    compare_rows,
    gather_row,
    hierarchical_bootstrap,
    instance_name,
    row_summary,
    split_model_name,
)

# Simulated encoders (the model and its exact truth: tools/bootstrap_coverage.py).
_spec = importlib.util.spec_from_file_location(
    "bootstrap_coverage", Path(__file__).resolve().parents[1] / "tools" / "bootstrap_coverage.py"
)
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)
MU_A, MU_B, CASE_SD, NOISE_SD = sim.MU_A, sim.MU_B, sim.CASE_SD, sim.NOISE_SD
expected_auroc, simulate = sim.expected_auroc, sim.simulate


def test_the_expected_auroc_formula_matches_a_huge_simulation():
    """The truth the coverage test uses, against its definition simulated directly: over
    2 million (seed, positive case, negative case) draws, how often the positive scores higher."""
    rng = np.random.default_rng(123)
    tau, draws = 0.5, 2_000_000

    def simulated(mu):
        u = rng.normal(0.0, tau, draws)
        pos = mu + u + rng.normal(0.0, CASE_SD, draws) + rng.normal(0.0, NOISE_SD, draws)
        neg = rng.normal(0.0, CASE_SD, draws) + rng.normal(0.0, NOISE_SD, draws)
        return np.mean(pos > neg)

    for mu in (MU_A, MU_B):
        assert simulated(mu) == pytest.approx(expected_auroc(mu, tau), abs=0.002)


def test_interval_covers_the_true_difference_and_one_seed_delong_does_not():
    """200 simulated ablations with a large seed effect: the hierarchical 95% interval covers
    the true difference of expected AUROC about 95% of the time; a paired DeLong interval on
    one seed of each row (the encoder treated as fixed) covers it far less often."""
    runs = 200
    hier, delong = sim.coverage(8, 0.5, runs=runs, n=150, n_boot=200, seed=0)
    assert 0.89 <= hier <= 0.99, hier
    assert delong < 0.75, delong


def test_identical_rows_differ_by_zero_with_p_one():
    rng = np.random.default_rng(1)
    y, a, _ = simulate(rng, 120, 3, 0.3)
    patients = np.arange(120) // 2
    out = hierarchical_bootstrap(y, patients, a, a, n_boot=100)
    for m in ("auroc", "ece_uniform"):
        d = out[m]
        assert d.diff == 0.0 and d.lo == 0.0 and d.hi == 0.0 and d.se == 0.0
        assert d.p_value == 1.0
        assert d.paired_seeds and d.n_seeds_a == d.n_seeds_b == 3


def test_patients_are_the_resampling_unit_and_results_are_seeded():
    """Every case copied into a second item of the same patient: the same resamples (clusters
    are drawn, not items), and the same AUROC and ECE, so an identical result."""
    rng = np.random.default_rng(2)
    y, a, b = simulate(rng, 100, 3, 0.3)
    one = hierarchical_bootstrap(y, np.arange(100), a, b, n_boot=150, seed=7)
    twice = hierarchical_bootstrap(
        np.repeat(y, 2), np.repeat(np.arange(100), 2), [np.repeat(p, 2, axis=1) for p in a],
        [np.repeat(p, 2, axis=1) for p in b], n_boot=150, seed=7,
    )  # fmt: skip
    for m in one:
        assert one[m].diff == pytest.approx(twice[m].diff, abs=1e-12)
        assert (one[m].lo, one[m].hi) == pytest.approx((twice[m].lo, twice[m].hi), abs=1e-12)
    # Items as their own clusters is another resampling: a different interval.
    items = hierarchical_bootstrap(
        np.repeat(y, 2),
        None,
        [np.repeat(p, 2, axis=1) for p in a],
        [np.repeat(p, 2, axis=1) for p in b],
        n_boot=150,
        seed=7,
    )
    assert items["auroc"].se < one["auroc"].se  # pretending copies are independent: too sure
    again = hierarchical_bootstrap(y, np.arange(100), a, b, n_boot=150, seed=7)
    assert again == one


def test_seed_spread_widens_the_interval_and_unpaired_seeds_are_drawn_independently():
    rng = np.random.default_rng(3)
    y, a, b = simulate(rng, 200, 4, 0.0)
    fixed = hierarchical_bootstrap(
        y,
        None,
        [a[0]] * 4,
        [b[0]] * 4,
        seeds_a=[0, 1, 2, 3],
        seeds_b=[0, 1, 2, 3],
        metrics=("auroc",),
        n_boot=300,
    )
    spread = [p + (k - 1.5) * 0.15 * y[None] for k, p in enumerate([a[0]] * 4)]
    spread = [np.clip(p, 0, 1) for p in spread]
    wide = hierarchical_bootstrap(
        y,
        None,
        spread,
        [b[0]] * 4,
        seeds_a=[0, 1, 2, 3],
        seeds_b=[5, 6, 7, 8],
        metrics=("auroc",),
        n_boot=300,
    )
    assert wide["auroc"].se > fixed["auroc"].se
    assert fixed["auroc"].paired_seeds and not wide["auroc"].paired_seeds


def test_bad_input_gives_clear_errors():
    rng = np.random.default_rng(4)
    y, a, b = simulate(rng, 50, 2, 0.3)
    with pytest.raises(ValueError, match="needs both classes"):
        hierarchical_bootstrap(np.zeros(50, int), None, a, b)
    with pytest.raises(ValueError, match=r"instance 1 has shape \(1, 49\)"):
        hierarchical_bootstrap(y, None, a, [b[0], b[1][:, :49]])
    with pytest.raises(ValueError, match="no instances"):
        hierarchical_bootstrap(y, None, a, [])
    with pytest.raises(ValueError, match="unknown metrics"):
        hierarchical_bootstrap(y, None, a, b, metrics=("f1",))
    with pytest.raises(ValueError, match="must be distinct"):
        hierarchical_bootstrap(y, None, a, b, seeds_a=[1, 1])


# ---------------------------------------------------------------------------------------------
# From predictions.csv columns


def predictions(rows: dict, y, patients, split="external", label_seeds=(0, 1), drop=None):
    """read_predictions-style columns: rows {model: (L, n) probabilities}."""
    cols = {k: [] for k in ("model", "head", "label_fraction", "seed", "split", "item_id",
                            "patient_key", "label", "prob")}  # fmt: skip
    for model, probs in rows.items():
        for ls, line in zip(label_seeds, probs, strict=False):
            for i, (yi, pi) in enumerate(zip(y, line, strict=True)):
                if drop and drop == (model, i):
                    continue
                for k, v in (
                    ("model", model),
                    ("head", "linear"),
                    ("label_fraction", 0.2),
                    ("seed", ls),
                    ("split", split),
                    ("item_id", f"s{i:03d}"),
                    ("patient_key", patients[i]),
                    ("label", yi),
                    ("prob", pi),
                ):
                    cols[k].append(v)  # fmt: skip
    out = {k: np.array(v) for k, v in cols.items()}
    out["label"] = out["label"].astype(np.int64)
    out["seed"] = out["seed"].astype(np.int64)
    out["label_fraction"] = out["label_fraction"].astype(np.float64)
    out["prob"] = out["prob"].astype(np.float64)
    return out


def test_compare_rows_averages_label_subset_seeds_then_pretraining_seeds():
    rng = np.random.default_rng(5)
    n = 80
    y = (rng.random(n) < 0.4).astype(int)
    patients = np.array([f"p{i // 2:02d}" for i in range(n)])
    probs = {f"{row}@{k}": rng.random((2, n)) * 0.5 + 0.4 * y * (row == "pg")
             for row in ("pg", "simclr") for k in (0, 1, 2)}  # fmt: skip
    p = predictions(probs, y, patients)
    out = compare_rows(p, "pg", "simclr", split="external", head="linear", label_fraction=0.2,
                       n_boot=100)  # fmt: skip
    mean = {row: np.mean([M.auroc(y, line) for k in range(3) for line in probs[f"{row}@{k}"]])
            for row in ("pg", "simclr")}  # fmt: skip
    assert out["auroc"]["diff"] == pytest.approx(mean["pg"] - mean["simclr"], abs=1e-12)
    assert out["a"] == ["pg@0", "pg@1", "pg@2"] and out["n"] == n
    assert out["auroc"]["n_seeds_a"] == 3 and out["auroc"]["paired_seeds"]
    assert out["auroc"]["lo"] <= out["auroc"]["diff"] <= out["auroc"]["hi"]
    assert out["auroc"]["p_value"] < 0.05
    summary = row_summary(gather_row(p, "pg", split="external", head="linear",
                                     label_fraction=0.2))  # fmt: skip
    per = [np.mean([M.auroc(y, line) for line in probs[f"pg@{k}"]]) for k in range(3)]
    assert summary["auroc_mean"] == pytest.approx(np.mean(per))
    assert summary["auroc_seed_sd"] == pytest.approx(np.std(per, ddof=1))


def test_compare_rows_errors_name_the_rows_and_reason():
    rng = np.random.default_rng(6)
    n = 30
    y = (np.arange(n) % 3 == 0).astype(int)
    patients = np.array([f"p{i}" for i in range(n)])
    probs = {m: rng.random((1, n)) for m in ("pg@0", "pg@1", "simclr@0", "simclr@1")}
    kw = dict(split="external", head="linear", label_fraction=0.2, n_boot=20)
    p = predictions(probs, y, patients, label_seeds=(0,), drop=("pg@1", 4))
    with pytest.raises(ValueError, match=r"row 'pg'.*pg@1 \(label seed 0\) is on other cases"):
        compare_rows(p, "pg", "simclr", **kw)
    p = predictions(probs, np.zeros(n, int), patients, label_seeds=(0,))
    with pytest.raises(ValueError, match="pg vs simclr.*needs both classes"):
        compare_rows(p, "pg", "simclr", **kw)
    p = predictions(probs, y, patients, label_seeds=(0,))
    with pytest.raises(ValueError, match="row 'mae'.*no predictions"):
        compare_rows(p, "mae", "simclr", **kw)
    with pytest.raises(ValueError, match="split 'test'.*no predictions"):
        compare_rows(p, "pg", "simclr", **{**kw, "split": "test"})


def test_model_names():
    assert split_model_name("pg@2") == ("pg", 2)
    assert split_model_name("oracle") == ("oracle", None)
    assert split_model_name("random_init@0") == ("random_init", 0)
    with pytest.raises(ValueError, match="ROW@SEED"):
        split_model_name("pg@x")
    assert instance_name("pg", 0, (0,)) == "pg"
    assert instance_name("pg", 1, (0, 1)) == "pg@1"
