"""Binary-classification metrics with confidence intervals, for one split or one subgroup.

NumPy and SciPy only (no JAX, no scikit-learn), so anyone can recompute a report from its
predictions. Labels are 0/1 (1 = finding present); scores are any real numbers where only their
order matters (AUROC, DeLong, FPR at a sensitivity), probabilities in [0, 1] where their value
matters (ECE, Brier). Definitions and choices, in short (README, "Evaluation metrics"):

- AUROC: the Mann-Whitney statistic, P(score of a positive > score of a negative), ties 1/2.
- DeLong et al. (1988) variance of the AUROC, computed with the midrank algorithm of Sun and Xu
  (2014); the interval is the normal one on the AUC scale, clipped to [0, 1] (a logit-scale
  interval is an option). Paired DeLong compares two scores on the same cases.
- ECE: sum over bins of (bin count / n) * |fraction positive - mean probability|. Bins are
  [a, b) with the last bin closed, like `np.histogram`: "uniform" cuts [0, 1] into equal widths,
  "quantile" cuts at the sample percentiles of the probabilities (NumPy's default linear
  interpolation, the edges `sklearn.calibration.calibration_curve(strategy="quantile")` uses).
- Bootstrap: percentile intervals from resampling whole clusters (patients) with replacement.
  Every resample is a vector of integer weights (how often each item was drawn), so the known
  metrics run on all resamples at once, without building resampled arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special, stats

__all__ = [
    "AurocCI",
    "BootstrapCI",
    "PairedDelong",
    "SingleClassError",
    "auroc",
    "bootstrap_ci",
    "brier",
    "delong_ci",
    "delong_paired",
    "ece",
    "fpr_at_sensitivity",
    "reliability",
    "subgroup_gaps",
    "summarize",
]

STRATEGIES = ("uniform", "quantile")
# Resamples are evaluated in blocks of about this many (resample, item) weights, so memory stays
# bounded (~16 MB per array) whatever n_boot and n are.
_BLOCK_ELEMENTS = 1 << 21


class SingleClassError(ValueError):
    """The metric needs both positives and negatives, and the labels hold one class only."""


# ---------------------------------------------------------------------------- input checks


def _check_labels(labels: Any, where: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{where}: no items (labels is empty)")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.number) or np.iscomplexobj(y):
        raise ValueError(f"{where}: labels must be 0/1 numbers, got dtype {y.dtype}")
    ok = (y == 0) | (y == 1)
    if not ok.all():
        raise ValueError(
            f"{where}: labels must be 0 or 1; {int((~ok).sum())} are not, "
            f"e.g. {y[~ok][:3].tolist()}"
        )
    return y.astype(np.int64)


def _check_scores(
    scores: Any, n: int, where: str, name: str = "scores", probability: bool = False
) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"{where}: {name} must be 1-D, got shape {s.shape}")
    if s.shape[0] != n:
        raise ValueError(f"{where}: labels has {n} items but {name} has {s.shape[0]}")
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"{where}: {name} must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    nan = np.isnan(s)
    if nan.any():
        raise ValueError(
            f"{where}: {name} has {int(nan.sum())} NaN values (first at index {int(nan.argmax())})"
        )
    if probability:
        bad = (s < 0.0) | (s > 1.0)
        if bad.any():
            raise ValueError(
                f"{where}: {name} must be probabilities in [0, 1]; {int(bad.sum())} are not "
                f"(first at index {int(bad.argmax())}: {s[bad.argmax()]})"
            )
    return s


def _check_both_classes(y: np.ndarray, where: str) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise SingleClassError(
            f"{where}: needs both classes, but all {y.size} labels are {int(y[0])} "
            f"(n_pos={n_pos}, n_neg={n_neg})"
        )
    return n_pos, n_neg


def _check_alpha(alpha: float, where: str) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{where}: alpha must be in (0, 1), got {alpha}")


def _check_bins(n_bins: int, strategy: str, where: str) -> None:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"{where}: n_bins must be a positive integer, got {n_bins}")
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: strategy must be one of {STRATEGIES}, got {strategy!r}")


# ------------------------------------------------------------------- weighted metric kernels
#
# Each known metric has a "weighted form": prepare(labels, probs, **kw) runs once on the full
# data (sorting, binning), evaluate(state, w) takes a (B, n) matrix of integer weights (one row
# per bootstrap resample, w[b, i] = how often item i was drawn) and returns B values. A row of
# ones is the plain metric, which is how the public functions below compute it: one code path.
# Items run along axis 1: cumulative sums along contiguous rows are several times faster.


@dataclass(frozen=True)
class _WeightedForm:
    prepare: Callable[..., Any]
    evaluate: Callable[[Any, np.ndarray], np.ndarray]
    needs_both_classes: bool


@dataclass(frozen=True)
class _Ranking:
    order: np.ndarray  # sorts the items by score
    y_sorted: np.ndarray
    positives: np.ndarray  # sorted positions of the positives
    tie_start: np.ndarray  # per positive: first sorted position of its tie group
    tie_end: np.ndarray  # per positive: one past the last position of its tie group


def _auroc_prepare(y: np.ndarray, s: np.ndarray) -> _Ranking:
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order].astype(np.float64)
    new_group = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], s.size]
    group = np.cumsum(new_group) - 1
    positives = np.flatnonzero(y_sorted == 1)
    return _Ranking(order, y_sorted, positives, starts[group[positives]], ends[group[positives]])


def _auroc_evaluate(state: _Ranking, w: np.ndarray) -> np.ndarray:
    w = np.take(w, state.order, axis=1)
    # Exclusive cumulative negative weight: neg[:, k] = negatives drawn among sorted items < k.
    neg = np.zeros((w.shape[0], w.shape[1] + 1))
    np.cumsum(w * (1.0 - state.y_sorted), axis=1, out=neg[:, 1:])
    # A positive beats the negatives below its tie group and ties (1/2) those inside it:
    # below + inside / 2 = (neg[start] + neg[end]) / 2. Sums of halves: exact in float64.
    w_pos = np.take(w, state.positives, axis=1)
    tied_or_below = np.take(neg, state.tie_start, axis=1) + np.take(neg, state.tie_end, axis=1)
    wins = 0.5 * np.einsum("bi,bi->b", w_pos, tied_or_below)
    with np.errstate(invalid="ignore", divide="ignore"):
        return wins / (w_pos.sum(axis=1) * neg[:, -1])


def _brier_prepare(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return (p - y) ** 2


def _brier_evaluate(sq_err: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (w @ sq_err) / w.sum(axis=1)


@dataclass(frozen=True)
class _Binning:
    order: np.ndarray  # sorts the items by probability
    p_sorted: np.ndarray
    y_sorted: np.ndarray
    n_bins: int
    strategy: str
    # "uniform" only: the bins do not depend on the resample, so per-bin sums are one matrix
    # product of the weights with [one-hot bin | one-hot * p | one-hot * y] (n, 3 n_bins).
    design: np.ndarray | None = None


def _uniform_edges(n_bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n_bins + 1)


def _ece_prepare(
    y: np.ndarray, p: np.ndarray, n_bins: int = 15, strategy: str = "uniform"
) -> _Binning:
    _check_bins(n_bins, strategy, "ece")
    n_bins = int(n_bins)
    order = np.argsort(p, kind="stable")
    design = None
    if strategy == "uniform":
        # Bin k is [edge k, edge k+1), the last closed: the number of inner edges <= p.
        bin_of = np.searchsorted(_uniform_edges(n_bins)[1:-1], p, side="right")
        onehot = np.zeros((p.size, n_bins))
        onehot[np.arange(p.size), bin_of] = 1.0
        design = np.concatenate([onehot, onehot * p[:, None], onehot * y[:, None]], axis=1)
    return _Binning(order, p[order], y[order].astype(np.float64), n_bins, strategy, design)


def _percentile_edges(p_sorted: np.ndarray, cum_w: np.ndarray, n_bins: int) -> np.ndarray:
    """Per resample, np.percentile(expanded sample, linspace(0, 100, n_bins + 1)): (B, n_bins + 1).

    cum_w[:, k] is the weight of sorted items < k. The expanded sample of a resample repeats
    item i w[i] times; its j-th smallest value is the item where cum_w first exceeds j. The
    index and interpolation arithmetic mirrors NumPy 2's "linear" method (Hyndman-Fan 7)
    operation by operation, so the edges are bit-equal to np.percentile's on the expanded
    sample (tested): an item lying exactly on an edge lands in the same bin either way.
    """
    total = cum_w[:, -1].astype(np.int64)
    q = np.true_divide(np.linspace(0.0, 1.0, n_bins + 1) * 100, 100)
    virtual = (total - 1)[:, None] * q
    prev = np.floor(virtual)
    gamma = virtual - prev
    prev = prev.astype(np.int64)
    last = np.broadcast_to((total - 1)[:, None], prev.shape)
    top = virtual >= last
    nxt = np.where(top, last, prev + 1)
    prev = np.where(top, last, prev)
    # Expanded index -> item, per resample (2 (n_bins + 1) lookups each: cheap).
    keys = np.concatenate([prev, nxt], axis=1)
    items = np.empty_like(keys)
    for r in range(keys.shape[0]):
        items[r] = np.searchsorted(cum_w[r, 1:], keys[r], side="right")
    a = p_sorted[items[:, : n_bins + 1]]
    b = p_sorted[items[:, n_bins + 1 :]]
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def _bin_sums(state: _Binning, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per resample and bin (B, n_bins): weighted count, sum of probabilities, sum of labels;
    and the edges (B, n_bins + 1)."""
    n_rows, n = w.shape
    k = state.n_bins
    if state.design is not None:
        sums = w @ state.design
        edges = np.broadcast_to(_uniform_edges(k), (n_rows, k + 1))
        return sums[:, :k], sums[:, k : 2 * k], sums[:, 2 * k :], edges
    w = np.take(w, state.order, axis=1)

    def cumulative(values: np.ndarray) -> np.ndarray:  # exclusive: cum[:, k] = sum over < k
        cum = np.zeros((n_rows, n + 1))
        np.cumsum(values, axis=1, out=cum[:, 1:])
        return cum

    cum_w = cumulative(w)
    edges = _percentile_edges(state.p_sorted, cum_w, k)
    # Bins are [a, b), the last one closed: on sorted probabilities, bin k runs from the first
    # item >= its lower edge to the first item >= the next edge (the top bin takes the rest).
    inner = np.searchsorted(state.p_sorted, edges[:, 1:-1].ravel(), side="left")
    bounds = np.concatenate(
        [
            np.zeros((n_rows, 1), np.int64),
            inner.reshape(n_rows, k - 1),
            np.full((n_rows, 1), n, np.int64),
        ],
        axis=1,
    )
    rows = np.arange(n_rows)[:, None]

    def per_bin(cum: np.ndarray) -> np.ndarray:
        return np.diff(cum[rows, bounds], axis=1)

    return (
        per_bin(cum_w),
        per_bin(cumulative(w * state.p_sorted)),
        per_bin(cumulative(w * state.y_sorted)),
        edges,
    )


def _ece_evaluate(state: _Binning, w: np.ndarray) -> np.ndarray:
    count, sum_p, sum_y, _ = _bin_sums(state, w)
    # (count / n) * |sum_y / count - sum_p / count| = |sum_y - sum_p| / n; empty bins add 0.
    return np.abs(sum_y - sum_p).sum(axis=1) / count.sum(axis=1)


_AUROC_FORM = _WeightedForm(_auroc_prepare, _auroc_evaluate, needs_both_classes=True)
_BRIER_FORM = _WeightedForm(_brier_prepare, _brier_evaluate, needs_both_classes=False)
_ECE_FORM = _WeightedForm(_ece_prepare, _ece_evaluate, needs_both_classes=False)


def _plain(form: _WeightedForm, y: np.ndarray, p: np.ndarray, **kw: Any) -> float:
    state = form.prepare(y, p, **kw)
    return float(form.evaluate(state, np.ones((1, y.size)))[0])


# ------------------------------------------------------------------------- point metrics


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve: the Mann-Whitney U of positives against negatives / (n+ n-).

    P(score of a random positive > score of a random negative), a tie counting 1/2. Raises
    SingleClassError (a ValueError) when the labels hold one class only.
    """
    y = _check_labels(labels, "auroc")
    s = _check_scores(scores, y.size, "auroc")
    _check_both_classes(y, "auroc")
    return _plain(_AUROC_FORM, y, s)


def brier(labels: Any, probs: Any) -> float:
    """Brier score: mean of (probability - label)^2. Defined for one class too."""
    y = _check_labels(labels, "brier")
    p = _check_scores(probs, y.size, "brier", "probs", probability=True)
    return float(np.mean((p - y) ** 2))


def ece(labels: Any, probs: Any, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Expected calibration error: sum_k (n_k / n) * |frac_pos_k - mean_prob_k| over bins.

    strategy "uniform": n_bins equal-width bins on [0, 1]; "quantile": equal-mass bins cut at
    the sample percentiles of probs (ties stay together, so a bin may be empty; empty bins add
    nothing). Bins are [a, b) with the last one closed, as in np.histogram.
    """
    y = _check_labels(labels, "ece")
    p = _check_scores(probs, y.size, "ece", "probs", probability=True)
    _check_bins(n_bins, strategy, "ece")
    return _plain(_ECE_FORM, y, p, n_bins=n_bins, strategy=strategy)


def reliability(
    labels: Any, probs: Any, n_bins: int = 15, strategy: str = "uniform"
) -> dict[str, np.ndarray]:
    """The reliability diagram behind `ece`: one entry per bin, empty bins included.

    Returns arrays bin_lower, bin_upper (edges; percentiles of probs for "quantile"), count,
    mean_prob and frac_pos (NaN for an empty bin). For non-empty bins, mean_prob and frac_pos
    equal sklearn's calibration_curve(..., strategy) prob_pred and prob_true, except that
    scikit-learn puts a probability lying exactly on an inner edge into the lower bin.
    """
    y = _check_labels(labels, "reliability")
    p = _check_scores(probs, y.size, "reliability", "probs", probability=True)
    _check_bins(n_bins, strategy, "reliability")
    state = _ece_prepare(y, p, n_bins, strategy)
    count, sum_p, sum_y, edges = _bin_sums(state, np.ones((1, y.size)))
    count, sum_p, sum_y, edges = count[0], sum_p[0], sum_y[0], edges[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.where(count > 0, sum_p / count, np.nan)
        frac_pos = np.where(count > 0, sum_y / count, np.nan)
    return {
        "bin_lower": np.array(edges[:-1]),
        "bin_upper": np.array(edges[1:]),
        "count": np.rint(count).astype(np.int64),
        "mean_prob": mean_prob,
        "frac_pos": frac_pos,
    }


def fpr_at_sensitivity(labels: Any, scores: Any, sensitivity: float = 0.9) -> tuple[float, float]:
    """(fpr, threshold): the lowest false-positive rate at which sensitivity >= `sensitivity`.

    An item is called positive when score >= threshold; thresholds are the observed scores.
    Among thresholds with that lowest FPR, the lowest one (the highest sensitivity) is returned.
    """
    y = _check_labels(labels, "fpr_at_sensitivity")
    s = _check_scores(scores, y.size, "fpr_at_sensitivity")
    n_pos, n_neg = _check_both_classes(y, "fpr_at_sensitivity")
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"fpr_at_sensitivity: sensitivity must be in (0, 1], got {sensitivity}")
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    # One operating point per distinct score: the last item of each tie group.
    last = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])
    tp = np.cumsum(y_desc)[last]
    fp = np.cumsum(1 - y_desc)[last]
    reaches = tp / n_pos >= sensitivity  # tp / n_pos, not tp >= sens * n_pos: 0.9 * 30 > 27
    first = int(np.argmax(reaches))  # reaches is True at least at the lowest threshold
    best = int(np.flatnonzero(fp == fp[first])[-1])
    return float(fp[best] / n_neg), float(s_desc[last[best]])


# ------------------------------------------------------------------------------- DeLong


@dataclass(frozen=True)
class AurocCI:
    """AUROC with its DeLong standard error and (1 - alpha) interval."""

    auc: float
    se: float
    lo: float
    hi: float
    n: int
    n_pos: int


@dataclass(frozen=True)
class PairedDelong:
    """DeLong test of two correlated AUROCs (same cases): diff = auc_a - auc_b."""

    auc_a: float
    auc_b: float
    diff: float
    se: float
    z: float
    p_value: float
    lo: float
    hi: float


def _delong(y: np.ndarray, scores: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their DeLong covariance (k, k) for k score rows, by midranks (Sun & Xu).

    With m positives X and n negatives Y, the structural components of DeLong et al. are
    V10(X_i) = (1/n) sum_j psi(X_i, Y_j) and V01(Y_j) = (1/m) sum_i psi(X_i, Y_j); from midranks
    T over all items, Tx within positives, Ty within negatives: V10 = (T - Tx) / n and
    V01 = 1 - (T - Ty) / m. Cov(AUC) = S10 / m + S01 / n with S10, S01 the sample covariances
    (divisor m - 1, n - 1) of the components across models.
    """
    n_pos, n_neg = _check_both_classes(y, where)
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            f"{where}: the DeLong variance needs at least 2 positives and 2 negatives "
            f"(n_pos={n_pos}, n_neg={n_neg})"
        )
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    t_all = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (t_all[:, :n_pos] - stats.rankdata(pos, axis=1)) / n_neg
    v01 = 1.0 - (t_all[:, n_pos:] - stats.rankdata(neg, axis=1)) / n_pos
    aucs = v10.mean(axis=1)
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / n_pos + s01 / n_neg


def delong_ci(labels: Any, scores: Any, alpha: float = 0.05, scale: str = "auc") -> AurocCI:
    """AUROC with the DeLong (1988) standard error and a normal (1 - alpha) interval.

    scale "auc" (default): auc +- z * se, clipped to [0, 1]; simple and what most papers
    report, but it can reach 1 near perfect AUCs. scale "logit": the interval of logit(auc)
    with the delta-method se / (auc (1 - auc)), mapped back; it stays inside (0, 1). At auc 0
    or 1 the DeLong se is 0 and both give [auc, auc]. DeLong treats items as independent; with
    several items per patient use the cluster bootstrap (`bootstrap_ci(auroc, ...)`) as well.
    Needs at least 2 positives and 2 negatives.
    """
    y = _check_labels(labels, "delong_ci")
    s = _check_scores(scores, y.size, "delong_ci")
    _check_alpha(alpha, "delong_ci")
    if scale not in ("auc", "logit"):
        raise ValueError(f"delong_ci: scale must be 'auc' or 'logit', got {scale!r}")
    aucs, cov = _delong(y, s[None, :], "delong_ci")
    auc, se = float(aucs[0]), math.sqrt(max(float(cov[0, 0]), 0.0))
    z = float(special.ndtri(1.0 - alpha / 2))
    if scale == "logit" and 0.0 < auc < 1.0:
        centre, half = special.logit(auc), z * se / (auc * (1.0 - auc))
        lo, hi = float(special.expit(centre - half)), float(special.expit(centre + half))
    else:
        lo, hi = max(0.0, auc - z * se), min(1.0, auc + z * se)
    return AurocCI(auc=auc, se=se, lo=lo, hi=hi, n=int(y.size), n_pos=int(y.sum()))


def delong_paired(labels: Any, scores_a: Any, scores_b: Any, alpha: float = 0.05) -> PairedDelong:
    """DeLong's test for two correlated ROC curves on the same cases (two-sided).

    diff = auc_a - auc_b, se from the 2x2 DeLong covariance: var_a + var_b - 2 cov_ab;
    z = diff / se; interval diff +- z_(1 - alpha/2) * se (not clipped). If se is 0 (both
    models' structural components differ by a constant), z is 0 and p 1 for diff 0, else
    z is +-inf and p 0: what the asymptotic formula gives, to be read with care.
    """
    y = _check_labels(labels, "delong_paired")
    a = _check_scores(scores_a, y.size, "delong_paired", "scores_a")
    b = _check_scores(scores_b, y.size, "delong_paired", "scores_b")
    _check_alpha(alpha, "delong_paired")
    aucs, cov = _delong(y, np.stack([a, b]), "delong_paired")
    diff = float(aucs[0] - aucs[1])
    se = math.sqrt(max(float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]), 0.0))
    if se > 0.0:
        z = diff / se
    else:
        z = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    p_value = float(2.0 * special.ndtr(-abs(z)))
    half = float(special.ndtri(1.0 - alpha / 2)) * se
    return PairedDelong(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        diff=diff,
        se=se,
        z=z,
        p_value=p_value,
        lo=diff - half,
        hi=diff + half,
    )


# ---------------------------------------------------------------------------- bootstrap


class BootstrapCI(tuple):
    """(point, lo, hi) as a plain 3-tuple, plus n_boot (resamples drawn) and n_skipped."""

    def __new__(cls, point: float, lo: float, hi: float, *, n_boot: int, n_skipped: int):
        self = super().__new__(cls, (point, lo, hi))
        self.point, self.lo, self.hi = point, lo, hi
        self.n_boot, self.n_skipped = n_boot, n_skipped
        return self

    def __getnewargs_ex__(self):
        return (self.point, self.lo, self.hi), {"n_boot": self.n_boot, "n_skipped": self.n_skipped}

    def __repr__(self) -> str:
        return (
            f"BootstrapCI(point={self.point!r}, lo={self.lo!r}, hi={self.hi!r}, "
            f"n_boot={self.n_boot}, n_skipped={self.n_skipped})"
        )


def _cluster_index(clusters: Any, n: int, where: str) -> tuple[np.ndarray, int]:
    """Cluster (patient) of each item as 0..C-1; each item its own cluster when None."""
    if clusters is None:
        return np.arange(n), n
    c = np.asarray(clusters)
    if c.ndim != 1 or c.shape[0] != n:
        raise ValueError(
            f"{where}: clusters must be 1-D with one entry per item ({n}), got shape {c.shape}"
        )
    if c.dtype.kind == "f" and np.isnan(c).any():
        raise ValueError(f"{where}: clusters has NaN entries (a missing patient key)")
    if c.dtype == object:
        if any(v is None for v in c):
            raise ValueError(f"{where}: clusters has None entries (a missing patient key)")
        index: dict[Any, int] = {}
        inverse = np.fromiter((index.setdefault(v, len(index)) for v in c), np.int64, n)
        return inverse, len(index)
    uniq, inverse = np.unique(c, return_inverse=True)
    return inverse.reshape(-1), int(uniq.size)


def _resample_weights(
    cluster_of: np.ndarray, n_clusters: int, n_boot: int, seed: int
) -> Iterator[np.ndarray]:
    """Blocks of (B, n) item weights: each row draws n_clusters clusters with replacement.

    Block sizes depend only on n and the cluster count, so a seed gives the same resamples.
    """
    rng = np.random.default_rng(seed)
    n = cluster_of.size
    block = max(1, min(n_boot, _BLOCK_ELEMENTS // max(n, n_clusters)))
    one_item_clusters = n_clusters == n and bool((cluster_of == np.arange(n)).all())
    for start in range(0, n_boot, block):
        rows = min(block, n_boot - start)
        draws = rng.integers(0, n_clusters, size=(rows, n_clusters))
        draws += n_clusters * np.arange(rows)[:, None]
        counts = np.bincount(draws.ravel(), minlength=rows * n_clusters)
        counts = counts.reshape(rows, n_clusters).astype(np.float64)
        yield counts if one_item_clusters else np.take(counts, cluster_of, axis=1)


def _weighted_form(metric: Callable) -> tuple[_WeightedForm, dict[str, Any]] | None:
    """The weighted form of a known metric (or a keyword-only functools.partial of one)."""
    keywords: dict[str, Any] = {}
    if isinstance(metric, functools.partial) and not metric.args:
        keywords, metric = dict(metric.keywords), metric.func
    form = _FORMS.get(metric)
    return None if form is None else (form, keywords)


def _replicates(
    metrics: Sequence[Callable],
    y: np.ndarray,
    p: np.ndarray,
    cluster_of: np.ndarray,
    n_clusters: int,
    n_boot: int,
    seed: int,
    skip_single_class: Sequence[bool],
) -> list[np.ndarray]:
    """Bootstrap values (n_boot,) per metric, on the same resamples; NaN where skipped."""
    plans = []
    for metric in metrics:
        known = _weighted_form(metric)
        if known is None:
            plans.append(None)
        else:
            form, keywords = known
            plans.append((form, form.prepare(y, p, **keywords)))
    out = [np.full(n_boot, np.nan) for _ in metrics]
    items = np.arange(y.size)
    y_float = y.astype(np.float64)
    done = 0
    for w in _resample_weights(cluster_of, n_clusters, n_boot, seed):
        rows = slice(done, done + w.shape[0])
        w_pos = w @ y_float
        single = (w_pos == 0) | (w_pos == w.sum(axis=1))
        for values, metric, plan, skip in zip(out, metrics, plans, skip_single_class, strict=True):
            keep = ~single if skip else np.ones(w.shape[0], bool)
            block = values[rows]  # a view: writes land in values
            if plan is not None:
                form, state = plan
                block[keep] = form.evaluate(state, w if keep.all() else w[keep])
            else:  # any other callable: build each resample (slow path, same resamples)
                for r in np.flatnonzero(keep):
                    idx = np.repeat(items, w[r].astype(np.int64))
                    block[r] = metric(y[idx], p[idx])
        done += w.shape[0]
    return out


def _needs_both(metric: Callable, skip_single_class: bool | None) -> bool:
    if skip_single_class is not None:
        return bool(skip_single_class)
    known = _weighted_form(metric)
    # An unknown metric may need both classes (most ranking metrics do): skip to be safe.
    return True if known is None else known[0].needs_both_classes


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    labels: Any,
    probs: Any,
    clusters: Any = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    skip_single_class: bool | None = None,
) -> BootstrapCI:
    """Percentile bootstrap interval of metric(labels, probs), resampling whole clusters.

    Each resample draws as many clusters (patients; items when clusters is None) as there are,
    with replacement, and keeps all items of each drawn cluster. point is the metric on the
    full data; lo and hi are the alpha/2 and 1 - alpha/2 quantiles of the resample values.
    A resample holding one class only is skipped, not redrawn, for metrics that need both
    classes (auroc; any unknown callable unless skip_single_class=False); the count is
    returned as n_skipped. Deterministic for a seed. auroc, brier, ece and keyword partials
    of ece (functools.partial(ece, strategy="quantile")) run vectorised over all resamples;
    any other callable is called once per resample, on the same resamples.
    """
    y = _check_labels(labels, "bootstrap_ci")
    p = _check_scores(probs, y.size, "bootstrap_ci", "probs")
    _check_alpha(alpha, "bootstrap_ci")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be a positive integer, got {n_boot}")
    cluster_of, n_clusters = _cluster_index(clusters, y.size, "bootstrap_ci")
    point = float(metric(y, p))
    skip = _needs_both(metric, skip_single_class)
    (values,) = _replicates([metric], y, p, cluster_of, n_clusters, int(n_boot), seed, [skip])
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        raise ValueError(
            f"bootstrap_ci: all {n_boot} resamples held one class only; "
            f"the data has {int(y.sum())} positives in {n_clusters} clusters"
        )
    lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(
        point, float(lo), float(hi), n_boot=int(n_boot), n_skipped=int(n_boot - valid.size)
    )


# ----------------------------------------------------------------------------- summaries


def _num(x: Any) -> float | None:
    """A JSON-ready float: None for NaN and infinities."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def summarize(
    labels: Any,
    probs: Any,
    clusters: Any = None,
    sensitivity: float = 0.9,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    alpha: float = 0.05,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Every metric of one split or subgroup, as a JSON-ready dict.

    Keys: n, n_pos, n_patients (distinct clusters; None when clusters is None), auroc {value,
    lo, hi, se} (DeLong) plus boot_lo/boot_hi (cluster bootstrap), ece_uniform and
    ece_quantile {value, lo, hi, n_bins}, brier {value, lo, hi} (cluster bootstrap, the same
    resamples for all three), fpr_at_sensitivity {sensitivity, fpr, threshold}, and "ci"
    (level and methods). Where a metric cannot be computed (one class only; fewer than 2
    positives or negatives for the DeLong se) its numbers are None and a "reason" says why;
    no exception. NaN never appears: missing numbers are None.
    """
    y = _check_labels(labels, "summarize")
    p = _check_scores(probs, y.size, "summarize", "probs", probability=True)
    _check_alpha(alpha, "summarize")
    _check_bins(n_bins, "uniform", "summarize")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"summarize: n_boot must be a positive integer, got {n_boot}")
    cluster_of, n_clusters = _cluster_index(clusters, y.size, "summarize")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)

    ece_u = functools.partial(ece, n_bins=n_bins, strategy="uniform")
    ece_q = functools.partial(ece, n_bins=n_bins, strategy="quantile")
    two_classes = n_pos > 0 and n_neg > 0
    metrics: list[Callable] = [ece_u, ece_q, brier] + ([auroc] if two_classes else [])
    reps = _replicates(
        metrics,
        y,
        p,
        cluster_of,
        n_clusters,
        n_boot,
        seed,
        [False, False, False] + ([True] if two_classes else []),
    )

    def interval(values: np.ndarray) -> tuple[float | None, float | None]:
        valid = values[~np.isnan(values)]
        if valid.size == 0:
            return None, None
        lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
        return _num(lo), _num(hi)

    def boot_entry(value: float, values: np.ndarray, **extra: Any) -> dict[str, Any]:
        lo, hi = interval(values)
        return {"value": _num(value), "lo": lo, "hi": hi, **extra}

    auroc_entry: dict[str, Any] = {"value": None, "lo": None, "hi": None, "se": None}
    fpr_entry: dict[str, Any] = {"sensitivity": float(sensitivity), "fpr": None, "threshold": None}
    if not two_classes:
        reason = f"one class only (n_pos={n_pos}, n_neg={n_neg})"
        auroc_entry["reason"] = reason
        fpr_entry["reason"] = reason
    else:
        auroc_entry["value"] = _num(auroc(y, p))
        if n_pos >= 2 and n_neg >= 2:
            ci = delong_ci(y, p, alpha=alpha)
            auroc_entry.update(lo=_num(ci.lo), hi=_num(ci.hi), se=_num(ci.se))
        else:
            auroc_entry["reason"] = (
                f"DeLong se needs at least 2 positives and 2 negatives (n_pos={n_pos}, "
                f"n_neg={n_neg})"
            )
        boot_lo, boot_hi = interval(reps[3])
        auroc_entry.update(
            boot_lo=boot_lo, boot_hi=boot_hi, boot_skipped=int(np.isnan(reps[3]).sum())
        )
        fpr, threshold = fpr_at_sensitivity(y, p, sensitivity)
        fpr_entry.update(fpr=_num(fpr), threshold=_num(threshold))

    return {
        "n": int(y.size),
        "n_pos": n_pos,
        "n_patients": None if clusters is None else n_clusters,
        "auroc": auroc_entry,
        "ece_uniform": boot_entry(ece_u(y, p), reps[0], n_bins=int(n_bins)),
        "ece_quantile": boot_entry(ece_q(y, p), reps[1], n_bins=int(n_bins)),
        "brier": boot_entry(brier(y, p), reps[2]),
        "fpr_at_sensitivity": fpr_entry,
        "ci": {
            "level": 1.0 - alpha,
            "auroc": "DeLong (1988), normal interval on the AUC scale clipped to [0, 1]",
            "bootstrap": {
                "method": "percentile",
                "unit": "item" if clusters is None else "patient",
                "n_boot": int(n_boot),
                "seed": int(seed),
            },
        },
    }


# Which direction is worse, per metric name of `summarize`.
_HIGHER_IS_BETTER = {
    "auroc": True,
    "ece_uniform": False,
    "ece_quantile": False,
    "brier": False,
    "fpr_at_sensitivity": False,
}


def _row_value(row: dict[str, Any], metric: str) -> tuple[Any, Any, Any]:
    """(value, lo, hi) of a table row: flat {"value", "lo", "hi"} or a summarize() entry."""
    entry = row.get(metric)
    if isinstance(entry, dict):
        value = entry.get("value", entry.get("fpr"))
        return value, entry.get("lo"), entry.get("hi")
    if "value" not in row:
        raise ValueError(
            f"subgroup_gaps: row {row.get('group')!r} has neither a {metric!r} entry nor 'value'"
        )
    return row["value"], row.get("lo"), row.get("hi")


def subgroup_gaps(
    table: list[dict[str, Any]], metric: str = "auroc", overall: float | None = None
) -> list[dict[str, Any]]:
    """Each subgroup's gap to the overall value, largest first, with the notable ones flagged.

    table: rows with a "group" name and either flat "value"/"lo"/"hi" keys or the summarize()
    output under `metric` (e.g. {"group": "vendor=GE", **summarize(...)}). The overall value
    is `overall` or else the row whose group is "overall" (exactly one). Rule: gap = value -
    overall; a subgroup is flagged when its own (1 - alpha) interval excludes the overall
    value. The subgroup is part of the overall population, so this is a screen, not a test.
    Rows come back sorted by |gap|, largest first, with "largest" True on the first; rows
    without a value (e.g. one class only) come last with gap None and their "reason".
    "worse" says whether the gap is in the bad direction (lower AUROC, higher ECE/Brier/FPR).
    """
    rows = [r for r in table if r.get("group") != "overall"]
    if overall is None:
        overall_rows = [r for r in table if r.get("group") == "overall"]
        if len(overall_rows) != 1:
            raise ValueError(
                f"subgroup_gaps: need exactly one row with group 'overall' (or pass overall=), "
                f"found {len(overall_rows)}"
            )
        overall = _row_value(overall_rows[0], metric)[0]
        if overall is None:
            raise ValueError(f"subgroup_gaps: the overall row has no {metric} value")
    overall = float(overall)
    higher_better = _HIGHER_IS_BETTER.get(metric, True)
    out = []
    for row in rows:
        value, lo, hi = _row_value(row, metric)
        entry: dict[str, Any] = {
            "group": row.get("group"),
            "metric": metric,
            "value": _num(value),
            "lo": _num(lo),
            "hi": _num(hi),
            "overall": overall,
            "gap": None,
            "worse": None,
            "flagged": False,
            "largest": False,
        }
        if entry["value"] is None:
            detail = row.get(metric)
            reason = detail.get("reason") if isinstance(detail, dict) else row.get("reason")
            entry["reason"] = reason or "no value"
        else:
            gap = entry["value"] - overall
            entry["gap"] = gap
            entry["worse"] = bool(gap < 0 if higher_better else gap > 0)
            if entry["lo"] is not None and entry["hi"] is not None:
                entry["flagged"] = bool(overall < entry["lo"] or overall > entry["hi"])
        out.append(entry)
    out.sort(key=lambda e: (e["gap"] is None, -abs(e["gap"]) if e["gap"] is not None else 0.0))
    if out and out[0]["gap"] is not None:
        out[0]["largest"] = True
    return out


_FORMS: dict[Callable, _WeightedForm] = {auroc: _AUROC_FORM, brier: _BRIER_FORM, ece: _ECE_FORM}
