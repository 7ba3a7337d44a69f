"""metrics.json from exactly the rows of predictions.csv, then the Markdown report and the plots.

The metrics are computed by reading predictions.csv back (not from the arrays that produced it),
so anyone holding the CSV can recompute them: `python tools/recompute_metrics.py DIR` does so with
scikit-learn and NumPy alone and compares. The formulas live in `pgjax.eval.metrics`.

Per run (model, head, label fraction, seed) and test split: AUROC with its DeLong 95% interval,
ECE (15 equal-width bins, and 15 equal-mass bins), Brier score, both with patient-level bootstrap
intervals, the false-positive rate at a fixed sensitivity; the same per subgroup (site, vendor,
scanner model, modality, protocol border, protocol stratum); the worst stratum's AUROC beside
the pooled one; a paired DeLong test against the reference model on the same cases. The gate:
a (model, head, label fraction) whose internal `test` AUROC 95% DeLong interval does not lie
above 0.5 is "not informative" on every split, and verdicts name it so instead of comparing it.
The representation diagnostics (computed from embeddings, not predictions) are copied from the
evaluation's context.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

SUBGROUPS = ("site", "vendor", "scanner_model", "modality", "protocol_border", "stratum",
             "novel_decile")  # fmt: skip
GROUP_NAMES = {"protocol_border": {"0": "typical", "1": "border"},
               "novel_decile": {"0": "rest", "1": "most novel 10%"}}  # fmt: skip
CALIBRATION_METHODS = ("none", "temperature", "protocol")
INTERNAL_TEST = "test"
GATE_RULE = ("informative when the internal test split's AUROC 95% DeLong interval lies above "
             "0.5 (per model, head and label fraction, first seed); otherwise not informative "
             "on every split, and not compared with other rows")  # fmt: skip


def is_external(split: str) -> bool:
    """The pooled "external" split, or one held-out site's "external:<site>"."""
    return split == "external" or split.startswith("external:")


def ordered_splits(splits) -> list[str]:
    """External splits first (pooled, then per site by name), then the internal test, then
    the rest: the order of the report's, card's and sweep's tables."""
    splits = set(splits)
    ext = sorted(s for s in splits if is_external(s))
    rest = [INTERNAL_TEST] if INTERNAL_TEST in splits else []
    return ext + rest + sorted(splits - set(ext) - set(rest))


def split_slug(split: str) -> str:
    """A split name usable in a file name ("external:site_d" -> "external_site_d")."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in split)


def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no predictions")
    cols = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    cols["label"] = cols["label"].astype(np.int64)
    cols["prob"] = cols["prob"].astype(np.float64)
    cols["label_fraction"] = cols["label_fraction"].astype(np.float64)
    cols["seed"] = cols["seed"].astype(np.int64)
    return cols


def run_keys(p: dict) -> list[tuple]:
    """(model, head, label_fraction, seed, split) in order of first appearance."""
    seen = {}
    for key in zip(p["model"], p["head"], p["label_fraction"], p["seed"], p["split"],
                   strict=True):  # fmt: skip
        seen.setdefault((str(key[0]), str(key[1]), float(key[2]), int(key[3]), str(key[4])), None)
    return list(seen)


def _select(p, model, head, fraction, seed, split) -> np.ndarray:
    return np.flatnonzero((p["model"] == model) & (p["head"] == head)
                          & (p["label_fraction"] == fraction) & (p["seed"] == seed)
                          & (p["split"] == split))  # fmt: skip


def value(summary: dict | None, metric: str):
    """summary[metric]["value"], or None (e.g. AUROC of a one-class subgroup)."""
    if not summary:
        return None
    m = summary.get(metric)
    if isinstance(m, dict):
        return m.get("value", m.get("fpr"))  # fpr_at_sensitivity keeps its value under "fpr"
    return m


def compute_metrics(pred_path: str | Path, context: dict) -> dict:
    from pgjax.eval import metrics as M

    pred_path = Path(pred_path)
    p = read_predictions(pred_path)
    s = context["settings"]
    reference = context["reference"]
    runs = []
    for model, head, fraction, seed, split in run_keys(p):
        idx = _select(p, model, head, fraction, seed, split)
        # One order for every model (by item id), so paired tests line up the same cases.
        idx = idx[np.argsort(p["item_id"][idx], kind="stable")]
        y, prob, clusters = p["label"][idx], p["prob"][idx], p["patient_key"][idx]
        run = {
            "model": model, "head": head, "label_fraction": fraction, "seed": seed,
            "split": split,
            "overall": M.summarize(y, prob, clusters=clusters, sensitivity=s["sensitivity"],
                                   n_boot=s["n_boot"], seed=0),
            "subgroups": {},
        }  # fmt: skip
        for attr in SUBGROUPS:
            # Predictions from before the column existed, or without the score behind it.
            if attr not in p or np.all(p[attr][idx] == ""):
                continue
            table = {}
            for g in sorted(set(p[attr][idx])):
                k = p[attr][idx] == g
                name = GROUP_NAMES.get(attr, {}).get(g, g)
                table[name] = M.summarize(
                    y[k], prob[k], clusters=clusters[k], sensitivity=s["sensitivity"],
                    n_boot=s["subgroup_boot"], seed=0,
                )  # fmt: skip
            run["subgroups"][attr] = table
        calibration = _calibration_metrics(M, p, idx, run, s)
        if calibration:
            run["calibration"] = calibration
        overall_auc = value(run["overall"], "auroc")
        run["gaps"] = {attr: _gaps(M, t, overall_auc) for attr, t in run["subgroups"].items()}
        run["worst_stratum"] = worst_stratum(run["subgroups"].get("stratum", {}))
        if model != reference:
            ref = _select(p, reference, head, fraction, seed, split)
            ref = ref[np.argsort(p["item_id"][ref], kind="stable")]
            if len(ref) == len(idx) and np.array_equal(p["item_id"][ref], p["item_id"][idx]):
                try:
                    d = M.delong_paired(y, prob, p["prob"][ref], alpha=0.05)
                    run["vs_reference"] = {"reference": reference, **_asdict(d)}
                except ValueError as e:  # e.g. fewer than 2 cases of a class
                    run["vs_reference"] = {"reference": reference, "reason": str(e)}
            else:
                run["vs_reference"] = {
                    "reference": reference,
                    "reason": "the reference has no run on the same cases",
                }
        runs.append(run)
    gate = gate_runs(runs)
    for run in runs:
        run["gate"] = gate[(run["model"], run["head"], run["label_fraction"])]["status"]
    digest = hashlib.sha256(pred_path.read_bytes()).hexdigest()
    return {
        "format": "pgjax-eval-metrics",
        "version": 1,
        "predictions": pred_path.name,
        "predictions_sha256": digest,
        "predictions_rows": int(len(p["prob"])),
        "task": context["task"]["name"],
        "reference": reference,
        "alpha": 0.05,
        "definitions": {
            "auroc": "area under the ROC curve; 95% interval from DeLong et al. 1988",
            "ece_uniform": "expected calibration error, 15 equal-width bins on [0, 1]",
            "ece_quantile": "expected calibration error, 15 equal-mass bins",
            "brier": "mean squared error of the probability",
            "fpr_at_sensitivity": f"false-positive rate at sensitivity >= {s['sensitivity']}",
            "intervals": "ECE and Brier: percentile bootstrap resampling patients "
            f"({s['n_boot']} resamples overall, {s['subgroup_boot']} per subgroup)",
            "vs_reference": "paired DeLong test of AUROC against the reference on the same cases",
            "stratum": "protocol stratum: the values of the fields "
            f"{(context.get('strata') or {}).get('fields', [])} (a study whose items differ: "
            "'mixed')",
            "worst_stratum": "the lowest AUROC among strata with at least 2 positives and 2 "
            "negatives",
            "gate": GATE_RULE,
            "representation": "per encoder, from its frozen image embedding of all evaluated "
            "items: score_r = Pearson r of patient-grouped 5-fold cross-validated ridge "
            "predictions of the true latent score (pooled, and fitted within each stratum); "
            "fields = cross-validated accuracy of a one-vs-rest logistic probe reading each "
            "protocol field, beside the majority-class rate",
            "unit": context["task"]["unit"],
            "novelty": "protocol novelty: Mahalanobis distance of an item's pooled protocol "
            "embedding from the training split's (mean, Ledoit-Wolf covariance), by the model "
            "named in `novelty`; novel_decile: the test items at or above its 90th percentile "
            "(a study: if any of its items is)",
            "calibration": "ECE of the probe's probabilities uncalibrated (none), with one "
            "temperature fitted on the validation split (temperature), and with one temperature "
            "per protocol group (vendor x scanner model) with at least min_count validation "
            "items and both classes, others the global one (protocol); per split and per "
            "protocol stratum, patient bootstrap intervals",
        },
        "novelty": context.get("novelty"),
        "calibration": context.get("calibration"),
        "reference_rows": context.get("reference_rows", []),
        "gate": {
            "rule": GATE_RULE,
            "rows": [
                {"model": m, "head": h, "label_fraction": f, **g} for (m, h, f), g in gate.items()
            ],
            "models": gate_models(gate),
        },  # fmt: skip
        "representation": context.get("representation", {}),
        "runs": runs,
        "across_seeds": _across_seeds(runs),
    }


def _calibration_metrics(M, p: dict, idx: np.ndarray, run: dict, s: dict) -> dict:
    """{method: {"overall": summary, "strata": {stratum: summary}}} of the calibrated
    probabilities of a run, where predictions.csv has them ("none" is the run's own)."""
    out = {}
    y, clusters = p["label"][idx], p["patient_key"][idx]
    strata = p["stratum"][idx] if "stratum" in p else None
    for method in CALIBRATION_METHODS:
        if method == "none":
            prob = p["prob"][idx]
        else:
            column = p.get(f"prob_{method}")
            if column is None or np.any(column[idx] == ""):
                continue
            prob = column[idx].astype(np.float64)
        entry = {"overall": run["overall"] if method == "none" else M.summarize(
            y, prob, clusters=clusters, sensitivity=s["sensitivity"], n_boot=s["n_boot"],
            seed=0)}  # fmt: skip
        if strata is not None:
            entry["strata"] = {
                g: run["subgroups"]["stratum"][g] if method == "none" else M.summarize(
                    y[strata == g], prob[strata == g], clusters=clusters[strata == g],
                    sensitivity=s["sensitivity"], n_boot=s["subgroup_boot"], seed=0)
                for g in sorted(set(strata))
            }  # fmt: skip
        out[method] = entry
    return out if len(out) > 1 else {}


def worst_stratum(table: dict) -> dict:
    """The stratum with the lowest AUROC among those with a DeLong interval (>= 2 positives
    and 2 negatives); with how many strata qualified."""
    ok = {
        g: s
        for g, s in table.items()
        if (s.get("auroc") or {}).get("value") is not None and s["auroc"].get("lo") is not None
    }
    if not ok:
        return {"stratum": None, "strata": 0, "reason": "no stratum has 2 positives and 2 "
                "negatives"}  # fmt: skip
    g = min(ok, key=lambda k: (ok[k]["auroc"]["value"], k))
    a = ok[g]["auroc"]
    return {"stratum": g, "strata": len(ok), "of": len(table), "auroc": a["value"],
            "lo": a["lo"], "hi": a["hi"], "n": ok[g]["n"], "n_pos": ok[g]["n_pos"]}  # fmt: skip


def gate_status(lo, hi, missing: str = "n/a") -> tuple[str, str | None]:
    """GATE_RULE on one internal-test interval: ("informative", None) when it lies above 0.5,
    else ("not informative", why). The one place the rule is applied (metrics.json's gate and
    the sweep's comparison both call it)."""
    if lo is None:
        return "not informative", f"no internal test interval ({missing})"
    if lo > 0.5:
        return "informative", None
    if hi < 0.5:
        return "not informative", "internal test interval below 0.5"
    return "not informative", "internal test interval contains 0.5"


def gate_runs(runs: list[dict]) -> dict[tuple, dict]:
    """{(model, head, fraction): {"status", "auroc", "lo", "hi", "reason"}} from the first
    seed's internal test run; see GATE_RULE."""
    out: dict[tuple, dict] = {}
    for r in runs:
        key = (r["model"], r["head"], r["label_fraction"])
        if r["split"] == INTERNAL_TEST and key not in out:
            a = r["overall"].get("auroc") or {}
            entry = {"seed": r["seed"], "auroc": a.get("value"), "lo": a.get("lo"),
                     "hi": a.get("hi")}  # fmt: skip
            status, reason = gate_status(a.get("lo"), a.get("hi"), a.get("reason", "n/a"))
            entry["status"] = status
            if reason:
                entry["reason"] = reason
            out[key] = entry
    for r in runs:
        key = (r["model"], r["head"], r["label_fraction"])
        out.setdefault(key, {"status": "unknown", "reason": "no internal test split"})
    return out


def gate_models(gate: dict[tuple, dict]) -> dict[str, dict]:
    """Per model: informative if any of its (head, fraction) rows is; with those rows' counts."""
    models: dict[str, dict] = {}
    for (m, h, f), g in gate.items():
        e = models.setdefault(m, {"status": "not informative", "informative_rows": [],
                                  "rows": 0})  # fmt: skip
        e["rows"] += 1
        if g["status"] == "informative":
            e["status"] = "informative"
            e["informative_rows"].append(f"{h} {f:.0%}")
        elif g["status"] == "unknown" and e["status"] != "informative":
            e["status"] = "unknown"
    return models


def _asdict(x) -> dict:
    if hasattr(x, "_asdict"):
        x = x._asdict()
    elif hasattr(x, "__dataclass_fields__"):
        import dataclasses

        x = dataclasses.asdict(x)
    return {k: _plain(v) for k, v in dict(x).items()}


def _plain(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _gaps(M, table: dict, overall_auc):
    """Each subgroup's AUROC gap to the overall AUROC (pgjax.eval.metrics.subgroup_gaps)."""
    if overall_auc is None:
        return {"reason": "no overall AUROC (one class only)"}
    rows = [{"group": g, **s} for g, s in table.items()]
    return _jsonable(M.subgroup_gaps(rows, metric="auroc", overall=overall_auc))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "_asdict") or hasattr(x, "__dataclass_fields__"):
        return _jsonable(_asdict(x))
    return _plain(x)


def _across_seeds(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation of AUROC, ECE and Brier over the seeds of a label fraction."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["model"], r["head"], r["label_fraction"], r["split"])].append(r)
    out = []
    for (model, head, fraction, split), rs in groups.items():
        row = {"model": model, "head": head, "label_fraction": fraction, "split": split,
               "seeds": [r["seed"] for r in rs]}  # fmt: skip
        for metric in ("auroc", "ece_uniform", "brier"):
            vals = [value(r["overall"], metric) for r in rs]
            vals = [v for v in vals if v is not None]
            row[metric] = {
                "mean": float(np.mean(vals)) if vals else None,
                "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                "n": len(vals),
            }
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def write_all(out: str | Path, context: dict) -> dict:
    out = Path(out)
    metrics = compute_metrics(out / "predictions.csv", context)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(_jsonable(metrics), indent=1) + "\n")
    tmp.replace(out / "metrics.json")
    from pgjax.eval import plots

    figures = plots.write_plots(out, read_predictions(out / "predictions.csv"), metrics, context)
    (out / "report.md").write_text(render_report(metrics, context, figures))
    return metrics


def fmt_ci(summary: dict | None, metric: str, digits: int = 3) -> str:
    if not summary:
        return "n/a"
    m = summary.get(metric)
    if not isinstance(m, dict) or m.get("value") is None:
        reason = (m or {}).get("reason") if isinstance(m, dict) else summary.get("reason")
        return f"n/a ({reason})" if reason else "n/a"
    v, lo, hi = m.get("value"), m.get("lo"), m.get("hi")
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_p(p) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def headline_runs(metrics: dict, split: str) -> list[dict]:
    """The first seed's run of each (model, head, fraction) on a split: the report's rows."""
    seen, rows = set(), []
    for r in metrics["runs"]:
        key = (r["model"], r["head"], r["label_fraction"])
        if r["split"] == split and key not in seen:
            seen.add(key)
            rows.append(r)
    return rows


def _seed_stats(metrics, r) -> str:
    for a in metrics["across_seeds"]:
        if (a["model"], a["head"], a["label_fraction"], a["split"]) == (
            r["model"], r["head"], r["label_fraction"], r["split"]
        ):  # fmt: skip
            m = a["auroc"]
            if m["n"] > 1 and m["mean"] is not None:
                return f"{m['mean']:.3f} ± {m['sd']:.3f} ({m['n']})"
            return "1 seed"
    return ""


def reference_names(metrics: dict) -> set[str]:
    return {r["name"] for r in metrics.get("reference_rows", [])}


def fmt_worst(run: dict) -> str:
    w = run.get("worst_stratum") or {}
    if w.get("stratum") is None:
        return "n/a"
    # "ViewPosition=AP" -> "AP": the field names are in the table's explanation
    name = "; ".join(part.partition("=")[2] or part for part in w["stratum"].split("; "))
    return f"{w['auroc']:.3f} [{w['lo']:.3f}, {w['hi']:.3f}] ({name}, {w['strata']}/{w['of']})"


def fmt_gate(run: dict) -> str:
    g = run.get("gate")
    return "**not informative**" if g == "not informative" else (g or "n/a")


def results_table(metrics: dict, split: str) -> list[str]:
    """One row per (model, head, fraction), reference rows last."""
    lines = [
        "| model | head | labels | n (pos) | AUROC [95% CI] | worst stratum AUROC [CI] | gate | "
        "ECE-15 [CI] | Brier [CI] | FPR@sens | ΔAUROC vs ref (p) | AUROC over seeds |",
        "| --- | --- | ---: | ---: | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    refs = reference_names(metrics)
    rows = headline_runs(metrics, split)
    rows = [r for r in rows if r["model"] not in refs] + [r for r in rows if r["model"] in refs]
    ref_gate = {(r["head"], r["label_fraction"]): r.get("gate") for r in rows
                if r["model"] == metrics["reference"]}  # fmt: skip
    for r in rows:
        o = r["overall"]
        vs = r.get("vs_reference")
        if r.get("gate") == "not informative" and r["model"] != metrics["reference"]:
            delta = "not compared"
        elif vs and ref_gate.get((r["head"], r["label_fraction"])) == "not informative":
            delta = "not compared (ref. not informative)"
        elif vs and vs.get("diff") is not None:
            delta = f"{vs['diff']:+.3f} ({fmt_p(vs.get('p_value'))})"
        else:
            delta = "reference" if not vs else "n/a"
        fpr = value(o, "fpr_at_sensitivity")
        name = f"{r['model']} (ref. row)" if r["model"] in refs else r["model"]
        lines.append(
            f"| {name} | {r['head']} | {r['label_fraction']:.0%} | {o.get('n')} "
            f"({o.get('n_pos')}) | {fmt_ci(o, 'auroc')} | {fmt_worst(r)} | {fmt_gate(r)} | "
            f"{fmt_ci(o, 'ece_uniform')} | {fmt_ci(o, 'brier')} | "
            f"{'n/a' if fpr is None else f'{fpr:.3f}'} | {delta} | {_seed_stats(metrics, r)} |"
        )
    return lines


def strata_table(metrics: dict, split: str) -> list[str]:
    """AUROC within each protocol stratum, one column per stratum."""
    rows = headline_runs(metrics, split)
    strata = sorted({g for r in rows for g in r["subgroups"].get("stratum", {})})
    if len(strata) < 2:
        return []
    lines = ["| model | head | labels | " + " | ".join(f"{g}: n (pos), AUROC" for g in strata)
             + " |", "| --- | --- | ---: |" + " --- |" * len(strata)]  # fmt: skip
    for r in rows:
        t = r["subgroups"].get("stratum", {})
        cells = [f"{t[g]['n']} ({t[g]['n_pos']}), {fmt_ci(t[g], 'auroc')}" if g in t else "-"
                 for g in strata]  # fmt: skip
        lines.append(f"| {r['model']} | {r['head']} | {r['label_fraction']:.0%} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return lines


def calibration_tables(metrics: dict, split: str) -> list[str]:
    """ECE [95% CI] of each calibration method: one row per (model, head, fraction), then one
    per protocol stratum. Empty when the evaluation was not calibrated."""
    rows = [r for r in headline_runs(metrics, split) if r.get("calibration")]
    if not rows:
        return []
    methods = [m for m in CALIBRATION_METHODS if any(m in r["calibration"] for r in rows)]
    cols = " | ".join(f"ECE-15 {m} [CI]" for m in methods)
    L = [f"| model | head | labels | n (pos) | {cols} | AUROC {methods[-1]} [CI] |",
         "| --- | --- | ---: | ---: |" + " --- |" * (len(methods) + 1)]  # fmt: skip
    for r in rows:
        c = r["calibration"]
        o = r["overall"]
        cells = [fmt_ci((c.get(m) or {}).get("overall"), "ece_uniform") for m in methods]
        L.append(f"| {r['model']} | {r['head']} | {r['label_fraction']:.0%} | {o.get('n')} "
                 f"({o.get('n_pos')}) | " + " | ".join(cells)
                 + f" | {fmt_ci(c[methods[-1]]['overall'], 'auroc')} |")  # fmt: skip
    L += ["", "Per protocol stratum:", "",
          f"| model | head | labels | stratum | n (pos) | {cols} |",
          "| --- | --- | ---: | --- | ---: |" + " --- |" * len(methods)]  # fmt: skip
    for r in rows:
        c = r["calibration"]
        for g, base in (c["none"].get("strata") or {}).items():
            cells = [fmt_ci(((c.get(m) or {}).get("strata") or {}).get(g), "ece_uniform")
                     for m in methods]  # fmt: skip
            L.append(f"| {r['model']} | {r['head']} | {r['label_fraction']:.0%} | {g} | "
                     f"{base.get('n')} ({base.get('n_pos')}) | " + " | ".join(cells) + " |")
    return L


def calibration_block(metrics: dict, splits: list[str]) -> list[str]:
    info = metrics.get("calibration") or {}
    if info.get("method", "none") == "none":
        return []
    L = ["## Calibration", "",
         f"`--calibrate {info['method']}`: the probe's logits are rescaled by temperatures "
         "fitted on the validation split (minimum log-loss). temperature: one for all items; "
         f"protocol: one per {' x '.join(info.get('fields', []))} group with at least "
         f"{info.get('min_count')} validation items and both classes, the global one for the "
         "other groups (and for groups never seen in validation, such as a new vendor). "
         "ECE over 15 equal-width bins, 95% patient-bootstrap intervals. The other tables "
         "report the uncalibrated probabilities.", ""]  # fmt: skip
    for split in splits:
        t = calibration_tables(metrics, split)
        if t:
            L += [f"### {split}", "", *t, ""]
    files = info.get("files") or {}
    if files:
        L += ["Fitted probes with their calibration, for `pgjax export --calibration FILE`: "
              + ", ".join(f"`{f}`" for f in files.values()) + "."]  # fmt: skip
    return L


def novelty_block(metrics: dict, splits: list[str]) -> list[str]:
    """The protocol-novelty score: how it separates border and external items, and each
    model's results in the most novel decile against the rest."""
    nov = metrics.get("novelty") or {}
    if not nov:
        return []
    L = ["## Protocol novelty", ""]
    if nov.get("model") is None:
        return L + [f"Not scored: {nov.get('reason')}."]
    q = nov.get("train_quantiles") or {}
    L += [f"Score: {nov['score']}, by **{nov['model']}**, recorded on "
          f"{nov.get('recorded_on')} ({nov.get('embedded_items')} items embedded, shrinkage "
          f"{nov.get('shrinkage') or 0:.3f}). Training items' own distances: "
          + ", ".join(f"{k} {v:.2f}" for k, v in q.items())
          + f". Most novel decile: score >= {nov['novel_threshold']:.2f}.", "",
          "| items separated | positives | negatives | AUROC [95% CI] |",
          "| --- | ---: | ---: | --- |"]  # fmt: skip

    def cell(e):
        if e.get("value") is None:
            return f"n/a ({e.get('reason')})"
        return f"{e['value']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"

    sep = nov.get("separation") or {}
    for where, e in (sep.get("border_vs_typical") or {}).items():
        L.append(f"| border vs typical, {where} | {e['n_pos']} | {e['n_neg']} | {cell(e)} |")
    if sep.get("external_vs_internal"):
        e = sep["external_vs_internal"]
        L.append(f"| external sites vs internal test | {e['n_pos']} | {e['n_neg']} | "
                 f"{cell(e)} |")  # fmt: skip
    L += ["", "Unseen or rare protocol values (field=token, fewer than 1% of training items), "
          "most common first:", ""]  # fmt: skip
    for split, u in (nov.get("unusual_values") or {}).items():
        values = ", ".join(f"{v} x{n}" for v, n in u["values"].items()) or "none"
        L.append(f"- {split}: {u['with_unusual']} of {u['items']} items; {values}")
    L += ["", "Each model in the most novel decile of the test items against the rest:", "",
          "| model | head | labels | split | novel n (pos) | novel AUROC | novel ECE-15 | "
          "rest n (pos) | rest AUROC | rest ECE-15 |",
          "| --- | --- | ---: | --- | ---: | --- | --- | ---: | --- | --- |"]  # fmt: skip
    for split in splits:
        for r in headline_runs(metrics, split):
            t = r["subgroups"].get("novel_decile") or {}
            if not t:
                continue
            a, b = t.get("most novel 10%") or {}, t.get("rest") or {}
            L.append(f"| {r['model']} | {r['head']} | {r['label_fraction']:.0%} | {split} | "
                     f"{a.get('n', 0)} ({a.get('n_pos', 0)}) | {fmt_ci(a, 'auroc')} | "
                     f"{fmt_ci(a, 'ece_uniform')} | {b.get('n', 0)} ({b.get('n_pos', 0)}) | "
                     f"{fmt_ci(b, 'auroc')} | {fmt_ci(b, 'ece_uniform')} |")  # fmt: skip
    return L


def reference_block(metrics: dict) -> list[str]:
    rows = metrics.get("reference_rows") or []
    if not rows:
        return []
    L = ["## Reference rows", "",
         "Computed in every evaluation, through the same items, label subsets and probe as the "
         "models: the oracle bounds what any model can reach, the thumbnail is what pixels give "
         "with no learning, protocol-only is what the acquisition alone says.", ""]  # fmt: skip
    for r in rows:
        state = "" if r["status"] == "ok" else f" **skipped: {r['reason']}**"
        L.append(f"- **{r['name']}**: {r['what']}.{state}")
    return L


def gate_block(metrics: dict) -> list[str]:
    gate = metrics.get("gate") or {}
    models = gate.get("models") or {}
    if not models:
        return []
    L = ["## Sanity gate", "", f"Rule: {gate['rule']}.", ""]
    for m, g in models.items():
        if g["status"] == "informative":
            L.append(f"- {m}: informative ({', '.join(g['informative_rows'])}).")
        else:
            L.append(f"- {m}: **{g['status']}** in each of its {g['rows']} rows: its numbers "
                     "below are not evidence for or against it.")  # fmt: skip
    return L


def diagnostics_table(metrics: dict) -> list[str]:
    rep = metrics.get("representation") or {}
    if not rep:
        return []
    strata = sorted({s for d in rep.values() for s in (d.get("score_r") or {}).get("strata", {})})
    fields = sorted({f for d in rep.values() for f in d.get("fields", {})})
    L = ["## Representation diagnostics", "",
         "From each encoder's frozen image embedding of all evaluated items, patient-grouped "
         "5-fold cross-validation. Score r: Pearson r of ridge predictions of the true latent "
         "score, fitted within each stratum and pooled (near 0 within strata: the encoder does "
         "not see the finding itself). Field: probe accuracy reading a protocol field "
         "(majority-class rate in brackets).", ""]  # fmt: skip
    head = ["encoder", "dim", "score r pooled", *(f"score r {s}" for s in strata),
            *(f"{f} acc. (majority)" for f in fields)]  # fmt: skip
    L += ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]

    def r_cell(e):
        if not e or e.get("r") is None:
            return f"n/a ({(e or {}).get('reason', 'no score')})"
        return f"{e['r']:.2f} (n {e['n']})"

    for name, d in rep.items():
        sr = d.get("score_r") or {}
        cells = [name, str(d.get("dim")), r_cell(sr.get("pooled") if "pooled" in sr else sr)]
        cells += [r_cell(sr.get("strata", {}).get(s)) for s in strata]
        for f in fields:
            e = d.get("fields", {}).get(f)
            if not e:
                cells.append("-")
            elif e.get("accuracy") is None:
                cells.append(f"n/a ({e.get('reason')})")
            else:
                cells.append(f"{e['accuracy']:.2f} ({e['majority']:.2f})")
        L.append("| " + " | ".join(cells) + " |")
    return L


def verdict(metrics: dict, split: str = "external") -> list[str]:
    """Plain sentences: does the reference beat each other model on this split, and is the
    difference significant? Written from the numbers, whatever they are. A row that fails the
    gate (internal test interval not above 0.5) is named as not informative, not compared."""
    rows = headline_runs(metrics, split)
    ref = metrics["reference"]
    out = []
    gate = {(r["model"], r["head"], r["label_fraction"]): r.get("gate") for r in rows}
    failed: dict[str, list[str]] = {}
    for r in rows:
        if r.get("gate") == "not informative":
            failed.setdefault(r["model"], []).append(f"{r['head']} {r['label_fraction']:.0%}")
    if failed:
        out.append("- Not informative (internal test AUROC interval not above 0.5), so not "
                   "compared: " + "; ".join(f"**{m}** ({', '.join(v)})" for m, v in failed.items())
                   + ".")  # fmt: skip
    for r in rows:
        if r.get("gate") == "not informative":
            continue
        a = r["overall"].get("auroc") or {}
        if a.get("hi") is not None and a["hi"] < 0.5:
            out.append(
                f"- {r['model']}, {r['head']}, {r['label_fraction']:.0%} labels: AUROC "
                f"{a['value']:.3f} with its interval below 0.5, worse than chance: the probe's "
                "direction reverses on this split, as when a shortcut learned at the training "
                "sites is reversed here."
            )
    for r in rows:
        if r["model"] == ref or r.get("gate") == "not informative":
            continue
        if gate.get((ref, r["head"], r["label_fraction"])) == "not informative":
            continue  # the reference's own line says so
        vs = r.get("vs_reference") or {}
        if vs.get("diff") is None:
            continue
        a_ref, a = vs["auc_b"], vs["auc_a"]
        better = "beats" if a_ref > a else "does not beat"
        sig = "significant" if (vs.get("p_value") or 1.0) < 0.05 else "not significant"
        out.append(
            f"- {r['head']}, {r['label_fraction']:.0%} labels: {ref} {better} {r['model']} "
            f"(AUROC {a_ref:.3f} vs {a:.3f}, paired DeLong p = {fmt_p(vs.get('p_value'))}, "
            f"{sig} at 0.05)."
        )
    return out


def console_summary(metrics: dict) -> list[str]:
    """A few lines for a terminal: each test split's rows (models, then reference rows) with
    AUROC, worst stratum and gate, the reference rows' status, and whether any pretrained
    encoder passes the gate (and, if none does, why the numbers cannot tell)."""
    refs = reference_names(metrics)
    L = []
    for split in ordered_splits({r["split"] for r in metrics["runs"]}):
        what = "internal test" if split == INTERNAL_TEST else split
        L.append(f"{what} (AUROC [DeLong 95% CI]; worst stratum; gate):")
        rows = headline_runs(metrics, split)
        rows = [r for r in rows if r["model"] not in refs] + [r for r in rows if r["model"] in refs]
        for r in rows:
            name = r["model"] + (" (ref)" if r["model"] in refs else "")
            L.append(f"  {name:22s} {r['head']:8s} {r['label_fraction']:>4.0%}  "
                     f"{fmt_ci(r['overall'], 'auroc')}  worst {fmt_worst(r)}  "
                     f"{r.get('gate', 'n/a')}")  # fmt: skip
    for r in metrics.get("reference_rows", []):
        if r["status"] != "ok":
            L.append(f"reference row {r['name']} skipped: {r['reason']}")
    models = (metrics.get("gate") or {}).get("models") or {}
    encoders = [m for m in models if m not in refs]
    passed = [m for m in encoders if models[m]["status"] == "informative"]
    if passed:
        L.append(
            "gate: informative (internal test AUROC interval above 0.5): "
            + ", ".join(f"{m} ({', '.join(models[m]['informative_rows'])})" for m in passed)
        )
    if set(encoders) - set(passed):
        L.append("gate: NOT informative, not compared: "
                 + ", ".join(m for m in encoders if m not in passed))  # fmt: skip
    if encoders and not passed:
        ok = [m for m in ("oracle", "thumbnail") if models.get(m, {}).get("status") ==
              "informative"]  # fmt: skip
        why = (f"the finding is learnable ({' and '.join(ok)} pass the gate), so the encoders "
               "did not learn it: more pretraining steps or data are needed"
               if ok else "the reference rows do not pass either: the internal test split is "
               "too small to tell anything from chance")  # fmt: skip
        L.append(f"no pretrained encoder passes the gate: {why}.")
    return L


def subgroup_table(run: dict) -> list[str]:
    lines = ["| attribute | group | n (pos) | AUROC [95% CI] | AUROC gap | ECE-15 | Brier |",
             "| --- | --- | ---: | --- | ---: | --- | --- |"]  # fmt: skip
    for attr, table in run["subgroups"].items():
        gaps = run.get("gaps", {}).get(attr)
        gaps = {e["group"]: e for e in gaps} if isinstance(gaps, list) else {}
        for g, s in table.items():
            e = gaps.get(g, {})
            # A lone group is the overall population: no gap to flag.
            several = len(table) > 1
            marks = []
            if several and e.get("largest"):
                marks.append("largest gap" + (", worse" if e.get("worse") else ""))
            if several and e.get("flagged"):
                marks.append("CI excludes overall")
            mark = f" **({'; '.join(marks)})**" if marks else ""
            lines.append(
                f"| {attr} | {g}{mark} | {s.get('n')} ({s.get('n_pos')}) | {fmt_ci(s, 'auroc')} | "
                f"{'n/a' if e.get('gap') is None else format(e['gap'], '+.3f')} | "
                f"{fmt_ci(s, 'ece_uniform')} | {fmt_ci(s, 'brier')} |"
            )
    return lines


def render_report(metrics: dict, context: dict, figures: dict) -> str:
    task = context["task"]
    L = [f"# Evaluation: {task['name']}", ""]
    L += [
        f"Task label `{task['label']}` on the {task['group']} of `{context['store']}`, one "
        f"prediction per {task['unit']}. Probes train on {', '.join(task['train_splits'])} "
        f"(training sites, patient-level split), choose their penalty on "
        f"{', '.join(task['val_splits'])}, and are tested on {', '.join(task['test_splits'])}. "
        f"Reference model for paired tests: **{metrics['reference']}**.",
        "",
        f"Predictions: `{metrics['predictions']}` ({metrics['predictions_rows']} rows, sha256 "
        f"{metrics['predictions_sha256'][:16]}...); every number below is computed from those "
        "rows (`python tools/recompute_metrics.py` recomputes them with scikit-learn).",
        "",
        "## Data",
        "",
        "| split | items | studies | patients | positive items | sites |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for split, c in context["counts"].items():
        sites = ", ".join(f"{k} {v}" for k, v in c["sites"].items())
        L.append(f"| {split} | {c['items']} | {c['studies']} | {c['patients']} | "
                 f"{c['positive_items']} | {sites} |")  # fmt: skip
    L += ["", "Models:", ""]
    for m in context["models"]:
        what = (
            "random initialisation of the reference architecture"
            if m["random_init"]
            else "published weights in the image encoder (init.from), no pretraining"
            if m.get("transfer")
            else ("objectives " + ", ".join(m["objectives"]))
        )
        L.append(f"- **{m['name']}**: {what} (`{m['workdir']}`)")
    splits = ordered_splits(r["split"] for r in metrics["runs"])
    L += [""] + reference_block(metrics)
    g = gate_block(metrics)
    if g:
        L += [""] + g
    strata_fields = (context.get("strata") or {}).get("fields") or []
    L += ["", "Tables: one per test split. Worst stratum: the lowest AUROC within one protocol "
          f"stratum ({', '.join(strata_fields) or 'none'}) with 2+ positives and negatives (k/m: "
          "k of the m strata had that many): a model that leans on the protocol loses most there. "
          "Gate: the row's internal test AUROC interval must lie above 0.5. Intervals: AUROC by "
          "DeLong; ECE, Brier by patient-level bootstrap. 'AUROC over seeds': mean ± sd over "
          "label-subset seeds. Small test sets give wide intervals: read them before the point "
          "estimates."]  # fmt: skip
    for split in splits:
        L += ["", f"## Results: {split} split", ""]
        if split == "external":
            L += ["Whole held-out site(s), pooled: never seen in pretraining or probing.", ""]
        elif is_external(split):
            L += [f"Held-out site {split.partition(':')[2]}: never seen in pretraining or "
                  "probing.", ""]  # fmt: skip
        elif split == INTERNAL_TEST:
            L += ["Internal test: held-out patients of the training sites (the gate's split).",
                  ""]  # fmt: skip
        L += results_table(metrics, split)
        st = strata_table(metrics, split)
        if st:
            L += ["", "Within each protocol stratum:", "", *st]
        v = verdict(metrics, split)
        if v:
            L += ["", f"Against the reference ({split}):", "", *v]
    d = diagnostics_table(metrics)
    if d:
        L += [""] + d
    L += [""]
    b = context["protocol_border"]
    L += ["## Protocol-border cases", "",
          f"Definition: {b['definition']}. {b['border_items']} test items are border "
          f"({b['unseen_items']} with a protocol unseen in training); training had "
          f"{b['training_protocols']} distinct protocols.", ""]  # fmt: skip
    L += ["| model | head | labels | split | border n | border AUROC | typical n | typical AUROC |",
          "| --- | --- | ---: | --- | ---: | --- | ---: | --- |"]  # fmt: skip
    refs = reference_names(metrics) - {"random_init"}  # feature rows: no encoder to audit
    for split in splits:
        for r in headline_runs(metrics, split):
            if r["model"] in refs:
                continue
            t = r["subgroups"].get("protocol_border", {})
            bo, ty = t.get("border"), t.get("typical")
            L.append(f"| {r['model']} | {r['head']} | {r['label_fraction']:.0%} | {split} | "
                     f"{(bo or {}).get('n', 0)} | {fmt_ci(bo, 'auroc')} | {(ty or {}).get('n', 0)}"
                     f" | {fmt_ci(ty, 'auroc')} |")  # fmt: skip
    for block in (novelty_block(metrics, splits), calibration_block(metrics, splits)):
        if block:
            L += [""] + block
    ref_runs = [r for r in headline_runs(metrics, splits[0]) if r["model"] == metrics["reference"]]
    if ref_runs:
        r = max(ref_runs, key=lambda r: r["label_fraction"])
        L += ["", f"## Subgroups (bias audit): {r['model']}, {r['head']}, "
              f"{r['label_fraction']:.0%} labels, {r['split']} split", ""]  # fmt: skip
        L += subgroup_table(r)
    if figures:
        L += ["", "## Plots", ""]
        for title, path in figures.items():
            L.append(f"![{title}]({path})")
    if context.get("skipped"):
        L += ["", "## Not run", ""]
        L += [f"- {json.dumps(s)}" for s in context["skipped"]]
    L += ["", "## Label join", "", "```", json.dumps(context["label_join"], indent=1), "```", ""]
    return "\n".join(L)
