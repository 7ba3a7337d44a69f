"""Row-against-row differences over pretraining seeds and patients: a two-level bootstrap.

An ablation row (a pretraining recipe) is evaluated as several pretraining-seed instances
(`pg@0`, `pg@1`, ...) on the same test cases. The question "does recipe A beat recipe B?" is
about the recipes, not about one trained encoder of each: a paired DeLong test on one seed
treats the encoder as fixed and leaves out the seed-to-seed spread, which for small pretrained
models is often larger than the case-sampling error. Here both sources are resampled:

1. pretraining seeds, with replacement (`_seed_counts`: paired or independent draws; their
   spread widened for the few-seed shrinkage, `_drawn_mean`);
2. patients (clusters: the `patient_key` column), with replacement, one draw shared by every
   instance of both rows, so the comparison stays paired on cases.

The statistic is mean over the drawn seed instances of metric(A) minus the same for B, where an
instance's metric is its mean over the label-subset seeds of its run (label fractions below
100% draw several training subsets; at 100% there is one). Patient resamples are integer weight
vectors evaluated by the vectorised kernels of pgjax.eval.metrics, so no metric is written
twice and thousands of resamples cost one pass per instance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pgjax.eval import metrics as M

METRICS = {
    # name -> (weighted form, prepare keywords); the ECE is the report's (15 equal-width bins).
    "auroc": (M._AUROC_FORM, {}),
    "ece_uniform": (M._ECE_FORM, {"n_bins": 15, "strategy": "uniform"}),
}


@dataclasses.dataclass(frozen=True)
class Difference:
    """metric(A) - metric(B), averaged over pretraining seeds, with its bootstrap summary."""

    metric: str
    a: float  # mean over A's instances
    b: float
    diff: float
    lo: float
    hi: float
    se: float
    p_value: float
    n_seeds_a: int
    n_seeds_b: int
    paired_seeds: bool
    n_boot: int
    n_skipped: int  # patient resamples with one class only (AUROC undefined), left out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_model_name(model: str) -> tuple[str, int | None]:
    """ "pg@2" -> ("pg", 2); "oracle" -> ("oracle", None) (a single-instance row)."""
    row, sep, k = str(model).rpartition("@")
    if not sep:
        return str(model), None
    if not row or not k.lstrip("-").isdigit():
        raise ValueError(f"model name {model!r}: expected ROW@SEED with an integer seed")
    return row, int(k)


def instance_name(row: str, seed: int, seeds: Sequence[int]) -> str:
    """The evaluated model's name: ROW@SEED, or ROW alone for the default seeds (0,) (the
    layout and names of sweeps before pretraining seeds existed)."""
    return row if tuple(seeds) == (0,) else f"{row}@{seed}"


# --------------------------------------------------------------------------------- core


def _seed_counts(rng, n_boot: int, seeds_a: Sequence, seeds_b: Sequence):
    """Per replicate, how often each instance of A and of B is drawn: (n_boot, S_a), (n_boot, S_b).

    Paired by seed index when both rows have the same seeds: seed k of every row starts from the
    same random key and sees the batches in the same order, so instances sharing k can be
    correlated, and drawing them together keeps that covariance in the resampled difference
    (were they independent, joint draws give the same variance in expectation, so pairing costs
    nothing). Rows with different seeds share nothing at that level: independent draws.
    """
    sa, sb = len(seeds_a), len(seeds_b)
    paired = list(seeds_a) == list(seeds_b)
    draws_a = rng.integers(0, sa, size=(n_boot, sa))
    draws_b = draws_a if paired else rng.integers(0, sb, size=(n_boot, sb))

    def counts(draws, s):
        c = np.zeros((n_boot, s))
        np.add.at(c, (np.repeat(np.arange(n_boot), draws.shape[1]), draws.ravel()), 1.0)
        return c

    return counts(draws_a, sa), counts(draws_b, sb), paired


def _instance_values(states, w: np.ndarray, form) -> np.ndarray:
    """(rows, S): per instance, the metric under each weight row, averaged over its label
    subset seeds."""
    return np.stack(
        [np.mean([form.evaluate(st, w) for st in runs], axis=0) for runs in states], axis=1
    )


def _drawn_mean(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of the drawn instances per replicate, its spread around the replicate's mean over
    all instances widened by sqrt(S / (S - 1)).

    Drawing S of S seeds with replacement gives their mean a variance of (S - 1) / S times the
    sample variance over S, not 1 (the plain bootstrap's known shrinkage with few top-level
    units, Davison and Hinkley 1997, section 3.8): with 3 seeds a third of the seed spread would
    be lost. Linear in the values, so a paired difference gets the same correction.
    """
    s = values.shape[1]
    drawn = (weights * values).sum(axis=1)
    if s == 1:
        return drawn
    centre = values.mean(axis=1)
    return centre + np.sqrt(s / (s - 1)) * (drawn - centre)


def hierarchical_bootstrap(
    labels,
    clusters,
    probs_a: Sequence[np.ndarray],
    probs_b: Sequence[np.ndarray],
    *,
    seeds_a: Sequence[int] | None = None,
    seeds_b: Sequence[int] | None = None,
    metrics: Sequence[str] = ("auroc", "ece_uniform"),
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    where: str = "hierarchical_bootstrap",
) -> dict[str, Difference]:
    """Two-level bootstrap of metric(A) - metric(B) on the same cases.

    probs_a[i] holds instance i of row A (one pretraining seed) as an (L_i, n) array: one line
    per label-subset seed, n test cases aligned with labels and clusters (patient keys).
    seeds_a / seeds_b name the instances' pretraining seeds (default 0..S-1); equal lists pair
    the seed draws. Returns {metric: Difference}: the point estimate, percentile interval,
    bootstrap SE and a two-sided bootstrap p-value for "no difference".
    """
    y = M._check_labels(labels, where)
    cluster_of, n_clusters = M._cluster_index(clusters, y.size, where)
    M._check_alpha(alpha, where)
    if int(n_boot) != n_boot or n_boot < 2:
        raise ValueError(f"{where}: n_boot must be an integer >= 2, got {n_boot}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"{where}: unknown metrics {unknown}; known: {sorted(METRICS)}")
    rows = {}
    for name, probs, seeds in (("A", probs_a, seeds_a), ("B", probs_b, seeds_b)):
        if len(probs) == 0:
            raise ValueError(f"{where}: row {name} has no instances")
        inst = []
        for i, p in enumerate(probs):
            p = np.atleast_2d(np.asarray(p, dtype=np.float64))
            if p.shape[1] != y.size or p.shape[0] == 0:
                raise ValueError(
                    f"{where}: row {name} instance {i} has shape {p.shape}; expected "
                    f"(label seeds, {y.size}) on the same cases as the labels"
                )
            for line in p:
                M._check_scores(line, y.size, f"{where}: row {name} instance {i}", "probs",
                                probability=True)  # fmt: skip
            inst.append(p)
        seeds = list(range(len(inst))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(inst) or len(set(seeds)) != len(seeds):
            raise ValueError(f"{where}: row {name}: seeds {seeds} must be distinct, one per "
                             f"instance ({len(inst)})")  # fmt: skip
        rows[name] = (inst, seeds)
    (inst_a, seeds_a), (inst_b, seeds_b) = rows["A"], rows["B"]
    if "auroc" in metrics:
        M._check_both_classes(y, where)

    n_boot = int(n_boot)
    rng = np.random.default_rng([seed, 1])  # seed draws: a stream apart from the patient draws
    ca, cb, paired = _seed_counts(rng, n_boot, seeds_a, seeds_b)
    ca /= len(seeds_a)
    cb /= len(seeds_b)
    plans = {}
    for m in metrics:
        form, kw = METRICS[m]
        plans[m] = (form, [[form.prepare(y, line, **kw) for line in p] for p in inst_a],
                    [[form.prepare(y, line, **kw) for line in p] for p in inst_b])  # fmt: skip
    reps = {m: np.full(n_boot, np.nan) for m in metrics}
    point = {}
    ones = np.ones((1, y.size))
    y_float = y.astype(np.float64)
    for m, (form, sa, sb) in plans.items():
        point[m] = (float(_instance_values(sa, ones, form).mean()),
                    float(_instance_values(sb, ones, form).mean()))  # fmt: skip
    done = 0
    for w in M._resample_weights(cluster_of, n_clusters, n_boot, seed):
        w_pos = w @ y_float
        keep = ~((w_pos == 0) | (w_pos == w.sum(axis=1)))
        for m, (form, sa, sb) in plans.items():
            k = keep if form.needs_both_classes else np.ones(w.shape[0], bool)
            if not k.any():
                continue
            wk = w if k.all() else w[k]
            va, vb = _instance_values(sa, wk, form), _instance_values(sb, wk, form)
            idx = np.arange(done, done + w.shape[0])[k]
            reps[m][idx] = _drawn_mean(ca[idx], va) - _drawn_mean(cb[idx], vb)
        done += w.shape[0]

    out = {}
    for m in metrics:
        a, b = point[m]
        values = reps[m][~np.isnan(reps[m])]
        if values.size < 2:
            raise ValueError(f"{where}: {m}: fewer than 2 of {n_boot} patient resamples held "
                             f"both classes ({int(y.sum())} positives in {n_clusters} "
                             "patients)")  # fmt: skip
        lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
        # Two-sided: twice the smaller tail beyond 0, each counted with the observed sample
        # (+1), so p is never exactly 0 from a finite number of resamples.
        below = (1 + np.count_nonzero(values <= 0)) / (values.size + 1)
        above = (1 + np.count_nonzero(values >= 0)) / (values.size + 1)
        out[m] = Difference(
            metric=m, a=a, b=b, diff=a - b, lo=float(lo), hi=float(hi),
            se=float(np.std(values, ddof=1)), p_value=float(min(1.0, 2 * min(below, above))),
            n_seeds_a=len(seeds_a), n_seeds_b=len(seeds_b), paired_seeds=paired,
            n_boot=n_boot, n_skipped=int(n_boot - values.size),
        )  # fmt: skip
    return out


# ------------------------------------------------------------------ from predictions.csv


@dataclasses.dataclass
class RowData:
    """A row's instances on one (split, head, label fraction): cases aligned across them."""

    row: str
    seeds: list  # pretraining seed per instance (None for a single-instance row)
    models: list[str]
    item_id: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    probs: list[np.ndarray]  # per instance: (label-subset seeds, n)
    label_seeds: list[list[int]]


def row_instances(p: dict) -> dict[str, list[tuple[int | None, str]]]:
    """{row: [(pretraining seed, model name), ...]} for the models in predictions columns."""
    names, first = np.unique(np.asarray(p["model"]).astype(str), return_index=True)
    rows: dict[str, dict] = {}
    for model in names[np.argsort(first)]:  # in order of first appearance
        row, k = split_model_name(str(model))
        rows.setdefault(row, {})[k] = str(model)
    out = {}
    for row, by_seed in rows.items():
        if None in by_seed and len(by_seed) > 1:
            raise ValueError(f"predictions: row {row!r} appears both with and without @SEED "
                             f"({sorted(by_seed.values())})")  # fmt: skip
        out[row] = sorted(by_seed.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
    return out


def gather_row(p: dict, row: str, *, split: str, head: str, label_fraction: float,
               source: str = "predictions") -> RowData:  # fmt: skip
    """A row's predictions on one split, head and label fraction, from read_predictions
    columns; every instance and label-subset seed must cover the same cases."""
    where = f"{source}: row {row!r}, {head}, {label_fraction:.0%} labels, split {split!r}"
    instances = row_instances(p).get(row)
    if not instances:
        raise ValueError(f"{where}: no predictions for this row")
    sel_base = ((p["head"] == head) & (p["label_fraction"] == float(label_fraction))
                & (p["split"] == split))  # fmt: skip
    ref_items = ref_labels = ref_patients = None
    seeds, models, probs, label_seeds = [], [], [], []
    for k, model in instances:
        sel = sel_base & (p["model"] == model)
        if not sel.any():
            continue  # this instance has no run here (e.g. its probe could not be fitted)
        lines, used = [], []
        for ls in sorted(set(p["seed"][sel].tolist())):
            idx = np.flatnonzero(sel & (p["seed"] == ls))
            idx = idx[np.argsort(p["item_id"][idx], kind="stable")]
            items = p["item_id"][idx]
            if len(set(items.tolist())) != len(items):
                raise ValueError(f"{where}: {model} (label seed {ls}) lists an item twice")
            if ref_items is None:
                ref_items, ref_labels = items, p["label"][idx]
                ref_patients = p["patient_key"][idx]
            elif len(items) != len(ref_items) or (items != ref_items).any():
                raise ValueError(
                    f"{where}: {model} (label seed {ls}) is on other cases than "
                    f"{models[0] if models else model}: {len(items)} vs {len(ref_items)} items, "
                    f"{len(set(items.tolist()) ^ set(ref_items.tolist()))} not in both"
                )
            elif (p["label"][idx] != ref_labels).any() or (
                p["patient_key"][idx] != ref_patients
            ).any():  # fmt: skip
                raise ValueError(f"{where}: {model} (label seed {ls}) gives other labels or "
                                 "patients for the same items")  # fmt: skip
            lines.append(p["prob"][idx])
            used.append(int(ls))
        seeds.append(k)
        models.append(model)
        probs.append(np.stack(lines))
        label_seeds.append(used)
    if not models:
        raise ValueError(f"{where}: no predictions for this row")
    return RowData(row, seeds, models, ref_items, ref_labels, ref_patients, probs, label_seeds)


def compare_rows(p: dict, row_a: str, row_b: str, *, split: str, head: str,
                 label_fraction: float, metrics: Sequence[str] = ("auroc", "ece_uniform"),
                 n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                 source: str = "predictions") -> dict:  # fmt: skip
    """Row A minus row B on one split, head and label fraction, from read_predictions columns.

    Returns {"a": models of A, "b": models of B, metric: Difference.to_dict(), ...}."""
    a = gather_row(p, row_a, split=split, head=head, label_fraction=label_fraction, source=source)
    b = gather_row(p, row_b, split=split, head=head, label_fraction=label_fraction, source=source)
    where = f"{source}: {row_a} vs {row_b}, {head}, {label_fraction:.0%} labels, split {split!r}"
    if len(a.item_id) != len(b.item_id) or (a.item_id != b.item_id).any():
        raise ValueError(
            f"{where}: the rows are on other cases ({len(a.item_id)} vs {len(b.item_id)} items, "
            f"{len(set(a.item_id.tolist()) ^ set(b.item_id.tolist()))} not in both)"
        )
    if (a.labels != b.labels).any():
        raise ValueError(f"{where}: the rows give other labels for the same items")
    diffs = hierarchical_bootstrap(
        a.labels, a.patients, a.probs, b.probs,
        seeds_a=[-1 if k is None else k for k in a.seeds],
        seeds_b=[-1 if k is None else k for k in b.seeds],
        metrics=metrics, n_boot=n_boot, alpha=alpha, seed=seed, where=where,
    )  # fmt: skip
    return {"a": a.models, "b": b.models, "n": int(a.labels.size),
            "n_pos": int(a.labels.sum()),
            **{m: d.to_dict() for m, d in diffs.items()}}  # fmt: skip


def row_summary(data: RowData) -> dict:
    """Mean AUROC over a row's instances and its seed spread (sd over pretraining seeds, each
    instance averaged over its label-subset seeds), plus the per-instance values."""
    y = data.labels
    per = []
    for lines in data.probs:
        vals = []
        for line in lines:
            try:
                vals.append(M.auroc(y, line))
            except M.SingleClassError:
                vals.append(float("nan"))
        per.append(float(np.mean(vals)))
    arr = np.asarray(per)
    ok = arr[~np.isnan(arr)]
    return {
        "models": data.models,
        "n": int(y.size),
        "n_pos": int(y.sum()),
        "auroc_mean": float(ok.mean()) if ok.size else None,
        "auroc_seed_sd": float(ok.std(ddof=1)) if ok.size > 1 else None,
        "auroc_per_instance": {
            m: (None if np.isnan(v) else v) for m, v in zip(data.models, per, strict=True)
        },  # fmt: skip
        "n_instances": len(data.models),
    }
