"""Recompute an evaluation's metrics.json from its predictions.csv with scikit-learn and NumPy.

    python tools/recompute_metrics.py EVAL_DIR [--tol 1e-9]

Independent of pgjax (imports nothing from it): anyone holding predictions.csv can check the
reported numbers. For every run (model, head, label fraction, seed, split) and every subgroup
(site, vendor, scanner model, modality, protocol border, protocol stratum, most novel decile),
and for each calibration method's probabilities (`pgjax eval --calibrate`), it recomputes n,
n_pos, the number of
patients, AUROC (sklearn roc_auc_score), Brier score (sklearn brier_score_loss), ECE over 15
equal-width and 15 equal-mass bins (bins [a, b) with the last closed, as np.histogram; equal-mass
edges are np.percentile(probs, np.linspace(0, 1, 16) * 100), the edges of
sklearn.calibration.calibration_curve: with linspace(0, 100, 16) instead, an edge can move by
one ulp onto a probability and change its bin), and the false-positive rate at the reported
sensitivity (from sklearn roc_curve), and compares them with metrics.json; and per run the worst
stratum (lowest AUROC among strata with at least 2 positives and 2 negatives). It also checks
the file's SHA-256. Splits are whatever predictions.csv names ("test", "external", or one
"external:<site>" per held-out site). Not recomputed: the DeLong and bootstrap intervals, the
paired p-values (no scikit-learn equivalent; the bootstrap depends on the random stream), the
gate (it reads the DeLong interval) and the representation diagnostics (from embeddings, not
predictions).

Exit status 0 when everything agrees within --tol, 1 otherwise (each disagreement printed).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

SUBGROUPS = ("site", "vendor", "scanner_model", "modality", "protocol_border", "stratum",
             "novel_decile")  # fmt: skip
GROUP_VALUES = {"typical": "0", "border": "1", "rest": "0", "most novel 10%": "1"}


def ece(y: np.ndarray, p: np.ndarray, edges: np.ndarray) -> float:
    bins = np.searchsorted(edges[1:-1], p, side="right")  # [a, b), last bin closed
    total = 0.0
    for b in np.unique(bins):
        k = bins == b
        total += k.sum() / len(p) * abs(y[k].mean() - p[k].mean())
    return float(total)


def fpr_at(y: np.ndarray, p: np.ndarray, sensitivity: float) -> float:
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    return float(fpr[tpr >= sensitivity - 1e-12].min())


def recompute(y: np.ndarray, p: np.ndarray, patients: np.ndarray, sensitivity: float) -> dict:
    out = {"n": len(y), "n_pos": int(y.sum()), "n_patients": len(set(patients)),
           "brier": brier_score_loss(y, p, pos_label=1) if len(y) else None,
           "ece_uniform": ece(y, p, np.linspace(0, 1, 16)),
           "ece_quantile": ece(y, p, np.percentile(p, np.linspace(0, 1, 16) * 100))}  # fmt: skip
    two = 0 < y.sum() < len(y)
    out["auroc"] = float(roc_auc_score(y, p)) if two else None
    out["fpr_at_sensitivity"] = fpr_at(y, p, sensitivity) if two else None
    return out


def worst_stratum(y, p, strata, sel) -> tuple:
    """(stratum, AUROC) of the lowest AUROC among strata with >= 2 positives and negatives
    (ties: the first name in sorted order); (None, None) when none qualifies."""
    found = []
    for g in sorted(set(strata[sel])):
        k = sel & (strata == g)
        pos = int(y[k].sum())
        if pos >= 2 and k.sum() - pos >= 2:
            found.append((float(roc_auc_score(y[k], p[k])), g))
    if not found:
        return None, None
    auc, g = min(found)
    return g, auc


def reported(summary: dict) -> dict:
    def v(key):
        m = summary.get(key)
        return m.get("value", m.get("fpr")) if isinstance(m, dict) else m

    keys = ("brier", "ece_uniform", "ece_quantile", "auroc", "fpr_at_sensitivity")
    return {"n": summary["n"], "n_pos": summary["n_pos"], "n_patients": summary["n_patients"],
            **{k: v(k) for k in keys}}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("eval_dir")
    ap.add_argument("--tol", type=float, default=1e-9)
    args = ap.parse_args(argv)
    root = Path(args.eval_dir)
    metrics = json.loads((root / "metrics.json").read_text())
    pred_path = root / metrics["predictions"]
    problems = []
    if hashlib.sha256(pred_path.read_bytes()).hexdigest() != metrics["predictions_sha256"]:
        problems.append(f"{pred_path}: SHA-256 differs from metrics.json's")
    with pred_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != metrics["predictions_rows"]:
        problems.append(f"{len(rows)} rows, metrics.json says {metrics['predictions_rows']}")
    col = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    y_all = col["label"].astype(int)
    p_all = col["prob"].astype(float)
    frac = col["label_fraction"].astype(float)
    seed = col["seed"].astype(int)
    checked = 0
    covered = np.zeros(len(rows), bool)
    for run in metrics["runs"]:
        sel = ((col["model"] == run["model"]) & (col["head"] == run["head"])
               & (frac == run["label_fraction"]) & (seed == run["seed"])
               & (col["split"] == run["split"]))  # fmt: skip
        covered |= sel
        sens = run["overall"]["fpr_at_sensitivity"]["sensitivity"]
        where = f"{run['model']}/{run['head']}/{run['label_fraction']}/{run['seed']}/{run['split']}"
        tables = [("overall", sel, run["overall"], p_all)]
        for attr in SUBGROUPS:
            for g, s in run["subgroups"].get(attr, {}).items():
                flag = attr in ("protocol_border", "novel_decile")
                value = GROUP_VALUES.get(g, g) if flag else g
                tables.append((f"{attr}={g}", sel & (col[attr] == value), s, p_all))
        # Calibrated probabilities (pgjax eval --calibrate): their own column per method.
        for method, entry in (run.get("calibration") or {}).items():
            probs = p_all if method == "none" else col[f"prob_{method}"]
            probs = np.where(sel, probs, "0").astype(float)
            tables.append((f"calibration {method}", sel, entry["overall"], probs))
            for g, s in (entry.get("strata") or {}).items():
                tables.append((f"calibration {method} stratum={g}",
                               sel & (col["stratum"] == g), s, probs))  # fmt: skip
        if "worst_stratum" in run:
            worst = worst_stratum(y_all, p_all, col["stratum"], sel)
            theirs = (run["worst_stratum"].get("stratum"), run["worst_stratum"].get("auroc"))
            checked += 1
            if (
                worst[0] != theirs[0]
                or (worst[1] is None) != (theirs[1] is None)
                or (worst[1] is not None and abs(worst[1] - theirs[1]) > args.tol)
            ):
                problems.append(f"{where} worst stratum: recomputed {worst}, metrics.json {theirs}")
        for name, k, summary, probs in tables:
            mine = recompute(y_all[k], probs[k], col["patient_key"][k], sens)
            theirs = reported(summary)
            for key, a in mine.items():
                b = theirs[key]
                checked += 1
                same = (a is None and b is None) or (
                    a is not None and b is not None and abs(float(a) - float(b)) <= args.tol
                )
                if not same:
                    problems.append(f"{where} {name} {key}: recomputed {a}, metrics.json {b}")
    if not covered.all():
        problems.append(f"{int((~covered).sum())} prediction rows belong to no run")
    for p in problems:
        print(p)
    status = "AGREE" if not problems else f"DISAGREE ({len(problems)} differences)"
    print(f"{status}: {checked} values from {len(metrics['runs'])} runs recomputed from "
          f"{len(rows)} rows of {pred_path}")  # fmt: skip
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
