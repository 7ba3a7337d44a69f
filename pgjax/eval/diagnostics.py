"""Representation diagnostics of a frozen image embedding: what it carries, beside any probe.

Two questions per encoder, answered on the evaluation's items (all splits) with patient-grouped
cross-validation (no patient in both a training and a held-out fold):

- Can the finding's latent (the true score) be read from it, within each protocol stratum and
  pooled? Ridge regression of the score on the standardised embedding (penalty chosen by
  generalised cross-validation inside each training fold); the Pearson r of the held-out
  predictions with the truth. Within a stratum (e.g. one view), r says whether the encoder sees
  the anatomy itself rather than the protocol that moves it.
- Can protocol fields (view, vendor, kernel) be read from it? A one-vs-rest L2 logistic probe;
  held-out accuracy beside the majority-class rate (what guessing the commonest value gets).
"""

from __future__ import annotations

import numpy as np

from pgjax.eval.probe import fit_logistic, patient_folds

RIDGE_ALPHAS = tuple(10.0**k for k in range(-3, 5))
FIELD_L2 = 1e-2  # per-item penalty of the field probe (mean log-loss + l2/2 |w|^2)
FOLDS = 5
MIN_ITEMS = 10


def _standardise(x_train, *others):
    mean = x_train.mean(axis=0)
    scale = x_train.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    return [(a - mean) / scale for a in (x_train, *others)]


def _ridge_gcv(x: np.ndarray, y: np.ndarray, alphas) -> tuple[np.ndarray, float]:
    """(w, b) of the ridge fit (x standardised, b unpenalised) whose penalty minimises the
    generalised cross-validation error on (x, y)."""
    b = y.mean()
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uy = u.T @ (y - b)
    n = len(y)
    best = None
    for a in alphas:
        f = s**2 / (s**2 + a)  # shrinkage of each singular direction
        resid = (y - b) - u @ (f * uy)
        gcv = n * float(resid @ resid) / max(n - f.sum() - 1.0, 1e-9) ** 2
        if best is None or gcv < best[0]:
            best = (gcv, a, f)
    _, _, f = best
    w = vt.T @ (f / np.where(s > 0, s, 1.0) * uy)
    return w, float(b)


def ridge_r(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, folds: int = FOLDS) -> dict:
    """{"r", "n", "patients"}: Pearson r of patient-grouped cross-validated ridge predictions
    of y from x; r None with a reason when it cannot be estimated."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n_patients = len(set(groups))
    out = {"r": None, "n": int(len(y)), "patients": n_patients}
    if len(y) < MIN_ITEMS or n_patients < 3:
        return {**out, "reason": f"too few items ({len(y)}) or patients ({n_patients})"}
    if np.ptp(y) == 0:
        return {**out, "reason": "the score is constant"}
    fold = patient_folds(groups, min(folds, n_patients))
    pred = np.zeros(len(y))
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        xs_tr, xs_te = _standardise(x[tr], x[te])
        w, b = _ridge_gcv(xs_tr, y[tr], RIDGE_ALPHAS)
        pred[te] = xs_te @ w + b
    if np.ptp(pred) == 0:
        return {**out, "r": 0.0, "note": "constant predictions"}
    return {**out, "r": float(np.corrcoef(pred, y)[0, 1])}


def field_accuracy(x: np.ndarray, values: np.ndarray, groups: np.ndarray, *,
                   folds: int = FOLDS) -> dict:  # fmt: skip
    """{"accuracy", "majority", "classes", "n"}: patient-grouped cross-validated accuracy of a
    one-vs-rest logistic probe reading a categorical field, and the majority-class rate."""
    x = np.asarray(x, np.float64)
    values = np.asarray(values).astype(str)
    classes, y = np.unique(values, return_inverse=True)
    counts = np.bincount(y)
    n_patients = len(set(groups))
    out = {"accuracy": None, "majority": float(counts.max() / len(y)) if len(y) else None,
           "classes": {str(c): int(k) for c, k in zip(classes, counts, strict=True)},
           "n": int(len(y))}  # fmt: skip
    if len(classes) < 2:
        return {**out, "reason": "one value only"}
    if len(y) < MIN_ITEMS or n_patients < 3:
        return {**out, "reason": f"too few items ({len(y)}) or patients ({n_patients})"}
    fold = patient_folds(groups, min(folds, n_patients))
    correct = 0
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        xs_tr, xs_te = _standardise(x[tr], x[te])
        scores = np.full((int(te.sum()), len(classes)), -np.inf)
        for c in np.unique(y[tr]):  # a class absent from the training fold is never predicted
            w, b = fit_logistic(xs_tr, (y[tr] == c).astype(np.float64), FIELD_L2)
            scores[:, c] = xs_te @ w + b
        correct += int((scores.argmax(axis=1) == y[te]).sum())
    return {**out, "accuracy": correct / len(y)}


def representation_diagnostics(embedding: np.ndarray, groups: np.ndarray,
                               scores: np.ndarray | None, strata: np.ndarray,
                               fields: dict[str, np.ndarray], *,
                               scores_reason: str = "") -> dict:  # fmt: skip
    """The diagnostics of one encoder's embedding of the evaluation's items (see the module
    docstring): {"score_r": {"pooled": ..., "strata": {stratum: ...}}, "fields": {field: ...}}."""
    out: dict = {"n": int(len(embedding)), "dim": int(embedding.shape[1])}
    if scores is None:
        out["score_r"] = {"reason": f"no true latent score ({scores_reason or 'no score'})"}
    else:
        has = ~np.isnan(scores)
        table = {"pooled": ridge_r(embedding[has], scores[has], groups[has]), "strata": {}}
        for s in sorted(set(strata[has])):
            k = has & (strata == s)
            table["strata"][str(s)] = ridge_r(embedding[k], scores[k], groups[k])
        if not has.all():
            table["items_without_score"] = int((~has).sum())
        out["score_r"] = table
    out["fields"] = {f: field_accuracy(embedding, v, groups) for f, v in fields.items()}
    return out
