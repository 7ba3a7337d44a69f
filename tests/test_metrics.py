"""Evaluation metrics against independent references.

scikit-learn for AUROC, Brier, calibration bins and ROC operating points; a literal transcription
of DeLong, DeLong and Clarke-Pearson (1988) with explicit double loops; ECE worked out by hand;
the bootstrap checked for determinism, for resampling whole clusters, and for coverage.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from pgjax.eval import metrics as M

# ----------------------------------------------------------------- a literal DeLong (1988)


def psi(x: float, y: float) -> float:
    """The Mann-Whitney kernel of the paper: 1 if Y < X, 1/2 if Y = X, 0 if Y > X."""
    return 1.0 if y < x else 0.5 if y == x else 0.0


def literal_delong(labels, score_rows):
    """theta (k,), S (k, k) = S10 / m + S01 / n, straight from the paper's definitions."""
    k = len(score_rows)
    X = [[s[i] for i in range(len(labels)) if labels[i] == 1] for s in score_rows]
    Y = [[s[j] for j in range(len(labels)) if labels[j] == 0] for s in score_rows]
    m, n = len(X[0]), len(Y[0])
    V10 = [[0.0] * m for _ in range(k)]
    V01 = [[0.0] * n for _ in range(k)]
    theta = [0.0] * k
    for r in range(k):
        total = 0.0
        for i in range(m):
            for j in range(n):
                v = psi(X[r][i], Y[r][j])
                V10[r][i] += v / n
                V01[r][j] += v / m
                total += v
        theta[r] = total / (m * n)
    S10 = [[0.0] * k for _ in range(k)]
    S01 = [[0.0] * k for _ in range(k)]
    for r in range(k):
        for s in range(k):
            S10[r][s] = sum((V10[r][i] - theta[r]) * (V10[s][i] - theta[s]) for i in range(m)) / (
                m - 1
            )
            S01[r][s] = sum((V01[r][j] - theta[r]) * (V01[s][j] - theta[s]) for j in range(n)) / (
                n - 1
            )
    S = [[S10[r][s] / m + S01[r][s] / n for s in range(k)] for r in range(k)]
    return theta, S


def test_literal_delong_matches_hand_arithmetic():
    # Positives 0.8, 0.6; negatives 0.7, 0.2, 0.2. V10 = (1, 2/3), V01 = (1/2, 1, 1),
    # AUC = 5/6, S10 = 1/18, S01 = 1/12, var = S10/2 + S01/3 = 1/18.
    theta, S = literal_delong([1, 1, 0, 0, 0], [[0.8, 0.6, 0.7, 0.2, 0.2]])
    assert theta[0] == pytest.approx(5 / 6)
    assert S[0][0] == pytest.approx(1 / 18)


def test_delong_ci_hand_case():
    labels, scores = [1, 1, 0, 0, 0], [0.8, 0.6, 0.7, 0.2, 0.2]
    ci = M.delong_ci(labels, scores)
    z = statistics.NormalDist().inv_cdf(0.975)
    se = math.sqrt(1 / 18)
    assert ci.auc == pytest.approx(5 / 6, abs=1e-15)
    assert ci.se == pytest.approx(se, rel=1e-12)
    assert ci.lo == pytest.approx(5 / 6 - z * se, rel=1e-12)
    assert ci.hi == 1.0  # 5/6 + 1.96 * 0.236 > 1: clipped
    assert (ci.n, ci.n_pos) == (5, 2)


def test_delong_ci_hand_case_with_a_tie():
    # A positive ties a negative at 0.6: V10 = (1, 5/6), V01 = (3/4, 1, 1), AUC = 11/12,
    # var = (1/72) / 2 + (1/24) / 3 = 1/72.
    ci = M.delong_ci([1, 1, 0, 0, 0], [0.8, 0.6, 0.6, 0.2, 0.2])
    assert ci.auc == pytest.approx(11 / 12, abs=1e-15)
    assert ci.se == pytest.approx(math.sqrt(1 / 72), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_delong_ci_matches_literal_formulas(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 25))
    labels = rng.permutation(np.r_[[0, 0, 1, 1], rng.integers(0, 2, n - 4)])
    scores = rng.integers(0, 6, n) + labels * rng.integers(0, 3, n)  # many ties
    theta, S = literal_delong(labels.tolist(), [scores.tolist()])
    ci = M.delong_ci(labels, scores, alpha=0.1)
    assert ci.auc == pytest.approx(theta[0], abs=1e-12)
    assert ci.se == pytest.approx(math.sqrt(S[0][0]), rel=1e-10, abs=1e-15)
    z = statistics.NormalDist().inv_cdf(0.95)
    assert ci.lo == pytest.approx(max(0.0, theta[0] - z * math.sqrt(S[0][0])), abs=1e-12)
    assert ci.hi == pytest.approx(min(1.0, theta[0] + z * math.sqrt(S[0][0])), abs=1e-12)


def test_delong_paired_hand_case():
    labels = [1, 1, 1, 0, 0, 0]
    a = [0.9, 0.8, 0.4, 0.5, 0.3, 0.1]
    b = [0.7, 0.2, 0.6, 0.65, 0.3, 0.1]
    theta, S = literal_delong(labels, [a, b])
    # By hand: AUC_a = (3 + 3 + 2) / 9 = 8/9; AUC_b = (3 + 1 + 2) / 9 = 2/3.
    assert theta == pytest.approx([8 / 9, 2 / 3])
    res = M.delong_paired(labels, a, b)
    var = S[0][0] + S[1][1] - 2 * S[0][1]
    assert res.auc_a == pytest.approx(theta[0]) and res.auc_b == pytest.approx(theta[1])
    assert res.diff == pytest.approx(theta[0] - theta[1], abs=1e-12)
    assert res.se == pytest.approx(math.sqrt(var), rel=1e-10)
    assert res.z == pytest.approx((theta[0] - theta[1]) / math.sqrt(var), rel=1e-10)
    assert res.p_value == pytest.approx(math.erfc(abs(res.z) / math.sqrt(2)), rel=1e-10)
    half = statistics.NormalDist().inv_cdf(0.975) * math.sqrt(var)
    assert (res.lo, res.hi) == pytest.approx((res.diff - half, res.diff + half), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_delong_paired_matches_literal_formulas(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(8, 30))
    labels = rng.permutation(np.r_[[0, 0, 1, 1], rng.integers(0, 2, n - 4)])
    a = np.round(labels + rng.normal(0, 1.0, n), 1)
    b = np.round(0.5 * a + rng.normal(0, 0.8, n), 1)  # correlated with a, and tied
    theta, S = literal_delong(labels.tolist(), [a.tolist(), b.tolist()])
    res = M.delong_paired(labels, a, b)
    var = S[0][0] + S[1][1] - 2 * S[0][1]
    assert res.diff == pytest.approx(theta[0] - theta[1], abs=1e-12)
    assert res.se == pytest.approx(math.sqrt(var), rel=1e-9)
    assert res.p_value == pytest.approx(math.erfc(abs(res.z) / math.sqrt(2)), rel=1e-9)
    assert S[0][1] != 0.0  # a real covariance term was exercised


def test_delong_paired_same_scores():
    res = M.delong_paired([0, 1, 0, 1, 1, 0], [1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 5, 0])
    assert (res.diff, res.se, res.z, res.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_delong_logit_interval():
    labels, scores = [1, 1, 0, 0, 0], [0.8, 0.6, 0.7, 0.2, 0.2]
    ci = M.delong_ci(labels, scores, scale="logit")
    auc, se = 5 / 6, math.sqrt(1 / 18)
    z = statistics.NormalDist().inv_cdf(0.975)
    centre, half = math.log(auc / (1 - auc)), z * se / (auc * (1 - auc))
    assert ci.lo == pytest.approx(1 / (1 + math.exp(-(centre - half))), rel=1e-12)
    assert ci.hi == pytest.approx(1 / (1 + math.exp(-(centre + half))), rel=1e-12)
    assert 0 < ci.lo < ci.auc < ci.hi < 1
    perfect = M.delong_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], scale="logit")
    assert (perfect.auc, perfect.se, perfect.lo, perfect.hi) == (1.0, 0.0, 1.0, 1.0)


# ------------------------------------------------------------------------- AUROC, Brier


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["continuous", "tied", "all_tied", "bool"])
def test_auroc_and_brier_match_sklearn(seed, kind):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = rng.permutation(np.r_[0, 1, rng.integers(0, 2, n - 2)])
    p = rng.beta(2, 2, n) * 0.6 + 0.3 * y
    if kind == "tied":
        p = np.round(p, 1)
    elif kind == "all_tied":
        p = np.full(n, 0.4)
    elif kind == "bool":
        y = y.astype(bool)
    assert M.auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert M.brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert M.delong_ci(y, p).auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auroc_accepts_any_real_scores():
    y = [0, 0, 1, 1, 0, 1]
    logits = [-np.inf, -2.0, 3.5, np.inf, 3.5, 1e300]
    same_order = [-10.0, -2.0, 3.5, 20.0, 3.5, 10.0]  # scikit-learn refuses infinities
    assert M.auroc(y, logits) == pytest.approx(roc_auc_score(y, same_order), abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(-20, 20)), min_size=2, max_size=40).filter(
        lambda rows: len({label for label, _ in rows}) == 2
    )
)
def test_auroc_invariant_to_monotone_transforms(rows):
    y = np.array([label for label, _ in rows])
    s = np.array([score for _, score in rows], float)
    a = M.auroc(y, s)
    assert M.auroc(y, np.exp(s / 7.0)) == pytest.approx(a, abs=1e-12)
    assert M.auroc(y, 3.0 * s - 11.0) == pytest.approx(a, abs=1e-12)
    assert M.auroc(y, -s) == pytest.approx(1.0 - a, abs=1e-12)
    assert M.auroc(1 - y, s) == pytest.approx(1.0 - a, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 8), st.integers(0, 8)), min_size=4, max_size=30
    ).filter(lambda rows: 2 <= sum(r[0] for r in rows) <= len(rows) - 2)
)
def test_delong_paired_is_antisymmetric(rows):
    y = [r[0] for r in rows]
    a = [r[1] for r in rows]
    b = [r[2] for r in rows]
    ab, ba = M.delong_paired(y, a, b), M.delong_paired(y, b, a)
    assert ab.diff == pytest.approx(-ba.diff, abs=1e-12)
    assert ab.se == pytest.approx(ba.se, abs=1e-12)
    assert ab.p_value == pytest.approx(ba.p_value, abs=1e-9)
    assert (ab.lo, ab.hi) == pytest.approx((-ba.hi, -ba.lo), abs=1e-12)
    assert ab.auc_a == pytest.approx(M.auroc(y, a), abs=1e-12)


# --------------------------------------------------------------------------------- ECE


HAND_LABELS = [0, 0, 1, 0, 1, 1, 0, 1]
HAND_PROBS = [0.05, 0.25, 0.3, 0.5, 0.6, 0.9, 0.95, 1.0]


def test_ece_uniform_by_hand():
    # 4 bins [0,.25) [.25,.5) [.5,.75) [.75,1]; 0.25 and 0.5 sit on edges and go up, 1.0 is in
    # the closed last bin. Bins: {.05|0}: .05; {.25,.3|0,1}: |.5-.275| = .225;
    # {.5,.6|0,1}: |.5-.55| = .05; {.9,.95,1|1,0,1}: |2/3-.95|. ECE = sum count * gap / 8.
    expected = (1 * 0.05 + 2 * 0.225 + 2 * 0.05 + 3 * (0.95 - 2 / 3)) / 8
    assert M.ece(HAND_LABELS, HAND_PROBS, n_bins=4) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.18125)
    rel = M.reliability(HAND_LABELS, HAND_PROBS, n_bins=4)
    assert rel["count"].tolist() == [1, 2, 2, 3]
    assert rel["mean_prob"] == pytest.approx([0.05, 0.275, 0.55, 0.95])
    assert rel["frac_pos"] == pytest.approx([0.0, 0.5, 0.5, 2 / 3])
    assert rel["bin_lower"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert rel["bin_upper"].tolist() == [0.25, 0.5, 0.75, 1.0]


def test_ece_quantile_by_hand():
    # 2 equal-mass bins: the median of the 8 probabilities is (.5 + .6) / 2 = .55.
    # {.05,.25,.3,.5|0,0,1,0}: |.25-.275| = .025; {.6,.9,.95,1|1,1,0,1}: |.75-.8625| = .1125.
    expected = (4 * 0.025 + 4 * 0.1125) / 8
    got = M.ece(HAND_LABELS, HAND_PROBS, n_bins=2, strategy="quantile")
    assert got == pytest.approx(expected, abs=1e-12)
    # Odd count: the median is a data value (0.4) and, bins being [a, b), starts the upper bin.
    # {.1,.2|0,1}: |.5-.15| = .35; {.4,.7,.8|0,1,1}: |2/3 - 19/30| = 1/30. ECE = (.7 + .1) / 5.
    got = M.ece([0, 1, 0, 1, 1], [0.1, 0.2, 0.4, 0.7, 0.8], n_bins=2, strategy="quantile")
    assert got == pytest.approx(0.16, abs=1e-12)
    rel = M.reliability([0, 1, 0, 1, 1], [0.1, 0.2, 0.4, 0.7, 0.8], n_bins=2, strategy="quantile")
    assert rel["count"].tolist() == [2, 3]
    assert rel["bin_lower"].tolist() == [0.1, 0.4] and rel["bin_upper"].tolist() == [0.4, 0.8]


def test_ece_perfect_and_constant_cases():
    assert M.ece([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0]) == 0.0
    assert M.ece([0, 1, 0, 1], [0.5] * 4, strategy="quantile") == 0.0
    assert M.ece([1, 1, 1], [0.2, 0.2, 0.2]) == pytest.approx(0.8)  # one class is fine
    rel = M.reliability([1, 1, 1], [0.2, 0.2, 0.2], n_bins=3, strategy="quantile")
    assert rel["count"].sum() == 3  # all edges equal 0.2: every item lands in the last bin
    assert np.isnan(rel["mean_prob"][0]) and rel["count"][0] == 0


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("seed", range(4))
def test_reliability_matches_sklearn_and_histogram(strategy, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 700))
    while math.gcd(n - 1, 15) != 1:  # quantile edges at (n - 1) i / 15: never on an item
        n += 1
    # Continuous probabilities, so no item lies exactly on an edge: scikit-learn puts such an
    # item into the lower bin, np.histogram and pgjax into the upper one.
    p = rng.beta(0.7, 1.5, n)
    y = (rng.random(n) < p**0.8).astype(int)
    rel = M.reliability(y, p, n_bins=15, strategy=strategy)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=15, strategy=strategy)
    full = rel["count"] > 0
    assert rel["frac_pos"][full] == pytest.approx(prob_true, abs=1e-12)
    assert rel["mean_prob"][full] == pytest.approx(prob_pred, abs=1e-12)
    edges = np.r_[rel["bin_lower"], rel["bin_upper"][-1]]
    if strategy == "quantile":
        assert np.array_equal(edges, np.percentile(p, np.linspace(0, 1, 16) * 100))
    # np.histogram bins the same way ([a, b), last closed), also for tied and on-edge values.
    p_tied = np.round(p, 1)
    rel_tied = M.reliability(y, p_tied, n_bins=15, strategy=strategy)
    edges_tied = np.r_[rel_tied["bin_lower"], rel_tied["bin_upper"][-1]]
    assert np.array_equal(rel_tied["count"], np.histogram(p_tied, bins=edges_tied)[0])
    weights = np.histogram(p_tied, bins=edges_tied, weights=p_tied)[0]
    positives = np.histogram(p_tied, bins=edges_tied, weights=y)[0]
    expected = np.abs(positives - weights).sum() / n
    assert M.ece(y, p_tied, strategy=strategy) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------- FPR at a sensitivity


def test_fpr_at_sensitivity_by_hand():
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1]
    # Sensitivity 0.75 first at threshold 0.6 (3 of 4 positives, negatives 0.7 above: 1/5).
    assert M.fpr_at_sensitivity(labels, scores, 0.75) == (0.2, 0.6)
    # All 4 positives need threshold 0.3: negatives 0.7, 0.5, 0.4 pass: 3/5.
    assert M.fpr_at_sensitivity(labels, scores, 1.0) == (0.6, 0.3)
    # 0.5 needs 2 positives: threshold 0.8, no negative above. 0.9 alone gives only 1/4.
    assert M.fpr_at_sensitivity(labels, scores, 0.5) == (0.0, 0.8)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sensitivity", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_fpr_at_sensitivity_matches_sklearn_roc(seed, sensitivity):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(y * 1.2, 1.0), 1)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    ok = tpr >= sensitivity
    best = fpr[ok].min()
    expected_thr = thr[ok & (fpr == best)].min()  # equal FPR: the highest sensitivity
    assert M.fpr_at_sensitivity(y, s, sensitivity) == (pytest.approx(best), expected_thr)


# --------------------------------------------------------------------------- bootstrap


def clustered_data(seed: int, patients: int = 60, per_patient: int = 4):
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(patients), per_patient)
    risk = rng.beta(2, 3, patients)[patient]
    y = (rng.random(patient.size) < risk).astype(int)
    p = np.clip(risk + rng.normal(0, 0.1, patient.size), 0, 1)
    keys = np.array([f"patient-{k:03d}" for k in patient])
    return y, p, keys


METRICS = {
    "auroc": M.auroc,
    "brier": M.brier,
    "ece_uniform": M.ece,
    "ece_quantile": functools.partial(M.ece, strategy="quantile", n_bins=10),
}


@pytest.mark.parametrize("name", list(METRICS))
def test_bootstrap_is_deterministic_and_matches_the_slow_path(name):
    metric = METRICS[name]
    y, p, keys = clustered_data(0)
    first = M.bootstrap_ci(metric, y, p, clusters=keys, n_boot=300, seed=7)
    again = M.bootstrap_ci(metric, y, p, clusters=keys, n_boot=300, seed=7)
    other = M.bootstrap_ci(metric, y, p, clusters=keys, n_boot=300, seed=8)
    assert tuple(first) == tuple(again) and tuple(first) != tuple(other)
    assert first.point == pytest.approx(metric(y, p), abs=0) and first.lo <= first.hi
    # A plain callable is evaluated on explicitly built resamples (np.repeat of each drawn
    # item): the same resamples must give the same interval as the weighted, vectorised path.
    slow = M.bootstrap_ci(
        lambda a, b: metric(a, b),
        y,
        p,
        clusters=keys,
        n_boot=300,
        seed=7,
        skip_single_class=name == "auroc",
    )
    assert tuple(slow) == pytest.approx(tuple(first), abs=1e-12)


def test_bootstrap_resamples_whole_clusters():
    # 25 patients with 40 identical items each. Resampling patients, the expanded data behaves
    # exactly like the 25 collapsed items resampled one by one with the same draws; resampling
    # the 1,000 items independently would give a ~6x narrower interval.
    rng = np.random.default_rng(3)
    y1 = np.r_[np.zeros(12, int), np.ones(13, int)]
    p1 = np.clip(0.2 + 0.5 * y1 + rng.normal(0, 0.2, 25), 0, 1)
    keys = np.repeat(np.arange(25), 40)
    y, p = y1[keys], p1[keys]
    # (Uniform ECE only: quantile edges interpolate between neighbours, and duplicating every
    # item 40 times moves those neighbours.)
    for metric in (M.brier, M.auroc, M.ece):
        by_patient = M.bootstrap_ci(metric, y, p, clusters=keys, n_boot=400, seed=1)
        collapsed = M.bootstrap_ci(metric, y1, p1, n_boot=400, seed=1)
        assert tuple(by_patient) == pytest.approx(tuple(collapsed), abs=1e-12)
        by_item = M.bootstrap_ci(metric, y, p, n_boot=400, seed=1)
        assert (by_item.hi - by_item.lo) < 0.4 * (by_patient.hi - by_patient.lo)


def test_bootstrap_skips_single_class_resamples_and_counts_them():
    y = np.r_[1, np.zeros(9, int)]
    p = np.linspace(0.1, 0.9, 10)
    res = M.bootstrap_ci(M.auroc, y, p, n_boot=500, seed=0)
    # P(the one positive is never drawn in 10 draws) = 0.9**10 = 0.35.
    assert 0.25 * 500 < res.n_skipped < 0.45 * 500 and res.n_boot == 500
    assert M.bootstrap_ci(M.brier, y, p, n_boot=500, seed=0).n_skipped == 0
    with pytest.raises(ValueError, match="needs both classes"):
        M.bootstrap_ci(M.auroc, np.zeros(5, int), p[:5])


def test_bootstrap_coverage_on_simulated_data():
    # Perfectly calibrated p ~ U(0, 1): the true Brier score is E[p (1 - p)] = 1/6.
    rng = np.random.default_rng(11)
    hits = 0
    reps = 150
    for rep in range(reps):
        p = rng.random(150)
        y = (rng.random(150) < p).astype(int)
        ci = M.bootstrap_ci(M.brier, y, p, n_boot=300, seed=rep)
        hits += ci.lo <= 1 / 6 <= ci.hi
    assert 0.88 <= hits / reps <= 0.99


def test_cluster_bootstrap_keeps_coverage_where_item_bootstrap_loses_it():
    # Items of a patient share both risk and label, so the patient is the unit of information.
    rng = np.random.default_rng(12)
    reps, hits_cluster, hits_item = 120, 0, 0
    for rep in range(reps):
        risk = rng.random(40)
        label = (rng.random(40) < risk).astype(int)
        keys = np.repeat(np.arange(40), 5)
        p, y = np.clip(risk[keys] + rng.normal(0, 0.02, 200), 0, 1), label[keys]
        by_patient = M.bootstrap_ci(M.brier, y, p, clusters=keys, n_boot=200, seed=rep)
        by_item = M.bootstrap_ci(M.brier, y, p, n_boot=200, seed=rep)
        truth = 1 / 6 + 0.02**2  # E[(p - y)^2], nearly; the clip changes it by < 1e-4
        hits_cluster += by_patient.lo <= truth <= by_patient.hi
        hits_item += by_item.lo <= truth <= by_item.hi
    assert hits_cluster / reps >= 0.85
    assert hits_item / reps <= hits_cluster / reps - 0.15


def test_delong_coverage_on_binormal_data():
    # Positives N(1, 1), negatives N(0, 1): AUC = Phi(1 / sqrt 2).
    truth = statistics.NormalDist().cdf(1 / math.sqrt(2))
    rng = np.random.default_rng(13)
    reps, hits = 300, 0
    for _ in range(reps):
        y = np.r_[np.ones(40, int), np.zeros(40, int)]
        s = rng.normal(y.astype(float), 1.0)
        ci = M.delong_ci(y, s)
        hits += ci.lo <= truth <= ci.hi
    assert 0.90 <= hits / reps <= 0.98


# ----------------------------------------------------------------------------- summarize


def test_summarize_bundle_is_json_ready_and_consistent():
    y, p, keys = clustered_data(5)
    out = M.summarize(y, p, clusters=keys, n_boot=200, seed=3)
    json.dumps(out, allow_nan=False)
    assert (out["n"], out["n_pos"], out["n_patients"]) == (240, int(y.sum()), 60)
    ci = M.delong_ci(y, p)
    assert out["auroc"]["value"] == pytest.approx(ci.auc)
    assert (out["auroc"]["lo"], out["auroc"]["hi"], out["auroc"]["se"]) == (ci.lo, ci.hi, ci.se)
    partial = functools.partial(M.ece, strategy="quantile")
    for key, metric in [("ece_uniform", M.ece), ("ece_quantile", partial), ("brier", M.brier)]:
        boot = M.bootstrap_ci(metric, y, p, clusters=keys, n_boot=200, seed=3)
        entry = out[key]
        assert (entry["value"], entry["lo"], entry["hi"]) == pytest.approx(tuple(boot), abs=1e-12)
    boot = M.bootstrap_ci(M.auroc, y, p, clusters=keys, n_boot=200, seed=3)
    assert (out["auroc"]["boot_lo"], out["auroc"]["boot_hi"]) == pytest.approx(boot[1:])
    fpr, thr = M.fpr_at_sensitivity(y, p, 0.9)
    assert out["fpr_at_sensitivity"] == {"sensitivity": 0.9, "fpr": fpr, "threshold": thr}
    assert out["ci"]["bootstrap"]["unit"] == "patient"


def test_summarize_single_class_subgroup_has_reasons_not_exceptions():
    out = M.summarize([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.2], n_boot=50)
    json.dumps(out, allow_nan=False)
    assert out["auroc"]["value"] is None and "one class" in out["auroc"]["reason"]
    assert out["fpr_at_sensitivity"]["fpr"] is None and "reason" in out["fpr_at_sensitivity"]
    assert out["brier"]["value"] == pytest.approx(np.mean(np.square([0.1, 0.2, 0.3, 0.2])))
    assert out["ece_uniform"]["lo"] is not None and out["n_patients"] is None
    one_positive = M.summarize([1, 0, 0, 0], [0.9, 0.2, 0.3, 0.2], n_boot=50)
    assert one_positive["auroc"]["value"] == 1.0 and one_positive["auroc"]["se"] is None
    assert "2 positives" in one_positive["auroc"]["reason"]


# ------------------------------------------------------------------------- subgroup gaps


def test_subgroup_gaps_flags_intervals_that_exclude_the_overall_value():
    table = [
        {"group": "overall", "value": 0.80, "lo": 0.78, "hi": 0.82},
        {"group": "vendor=A", "value": 0.83, "lo": 0.79, "hi": 0.87},
        {"group": "vendor=B", "value": 0.70, "lo": 0.64, "hi": 0.76},
        {"group": "vendor=C", "value": 0.88, "lo": 0.81, "hi": 0.95},
        {"group": "vendor=D", "value": None, "reason": "one class only"},
    ]
    rows = M.subgroup_gaps(table)
    assert [r["group"] for r in rows] == ["vendor=B", "vendor=C", "vendor=A", "vendor=D"]
    by = {r["group"]: r for r in rows}
    assert by["vendor=B"]["largest"] and by["vendor=B"]["flagged"] and by["vendor=B"]["worse"]
    assert by["vendor=B"]["gap"] == pytest.approx(-0.10)
    assert by["vendor=C"]["flagged"] and not by["vendor=C"]["worse"]
    assert not by["vendor=A"]["flagged"]
    assert by["vendor=D"]["gap"] is None and by["vendor=D"]["reason"] == "one class only"
    # ECE: higher is worse.
    rows = M.subgroup_gaps(
        [{"group": "site=x", "value": 0.09, "lo": 0.07, "hi": 0.11}], "ece_uniform", overall=0.05
    )
    assert rows[0]["flagged"] and rows[0]["worse"]
    with pytest.raises(ValueError, match="overall"):
        M.subgroup_gaps([{"group": "site=x", "value": 0.5}])


def test_subgroup_gaps_reads_summarize_rows():
    y, p, keys = clustered_data(6, patients=80)
    table = [{"group": "overall", **M.summarize(y, p, keys, n_boot=100)}]
    site = np.repeat(np.arange(80), 4) // 20
    for s in range(4):
        rows = site == s
        summary = M.summarize(y[rows], p[rows], keys[rows], n_boot=100)
        table.append({"group": f"site={s}", **summary})
    for metric in ("auroc", "brier", "ece_quantile", "fpr_at_sensitivity"):
        rows = M.subgroup_gaps(table, metric)
        assert len(rows) == 4 and rows[0]["largest"]
        assert abs(rows[0]["gap"]) == max(abs(r["gap"]) for r in rows)
        json.dumps(rows, allow_nan=False)


# ------------------------------------------------------------------------------ errors


def test_errors_are_clear():
    with pytest.raises(M.SingleClassError, match="needs both classes.*all 3 labels are 1"):
        M.auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="needs both classes"):
        M.delong_ci([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2 positives and 2 negatives"):
        M.delong_ci([1, 0, 0], [0.9, 0.1, 0.2])
    with pytest.raises(ValueError, match="1 NaN values .first at index 1"):
        M.auroc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="labels has 3 items but probs has 2"):
        M.brier([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores_b"):
        M.delong_paired([0, 1, 0, 1], [1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        M.auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        M.ece([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="strategy"):
        M.ece([0, 1], [0.1, 0.2], strategy="equal")
    with pytest.raises(ValueError, match="empty"):
        M.brier([], [])
    with pytest.raises(ValueError, match="1-D"):
        M.auroc([[0, 1]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="sensitivity"):
        M.fpr_at_sensitivity([0, 1], [0.1, 0.2], 0.0)
    with pytest.raises(ValueError, match="clusters"):
        M.bootstrap_ci(M.brier, [0, 1], [0.1, 0.2], clusters=[1])
    with pytest.raises(ValueError, match="missing patient key"):
        M.summarize([0, 1], [0.1, 0.2], clusters=["a", None])


def test_exact_fractions_of_a_tiny_auroc():
    # 2 positives x 3 negatives, one tie: wins 3 + 2 + 0.5 -> 5.5 / 6.
    assert Fraction(M.auroc([1, 1, 0, 0, 0], [3, 2, 2, 1, 0])).limit_denominator(100) == Fraction(
        11, 12
    )
