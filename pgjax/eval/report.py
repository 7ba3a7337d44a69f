"""metrics.json from exactly the rows of predictions.csv, then the Markdown report and the plots.

The metrics are computed by reading predictions.csv back (not from the arrays that produced it),
so anyone holding the CSV can recompute them: `python tools/recompute_metrics.py DIR` does so with
scikit-learn and NumPy alone and compares. The formulas live in `pgjax.eval.metrics`.

Per run (model, head, label fraction, seed) and test split: AUROC with its DeLong 95% interval,
ECE (15 equal-width bins, and 15 equal-mass bins), Brier score, both with patient-level bootstrap
intervals, the false-positive rate at a fixed sensitivity; the same per subgroup (site, vendor,
scanner model, modality, protocol border); a paired DeLong test against the reference model on
the same cases.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

SUBGROUPS = ("site", "vendor", "scanner_model", "modality", "protocol_border")


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
            table = {}
            for g in sorted(set(p[attr][idx])):
                k = p[attr][idx] == g
                name = {"0": "typical", "1": "border"}[g] if attr == "protocol_border" else g
                table[name] = M.summarize(
                    y[k], prob[k], clusters=clusters[k], sensitivity=s["sensitivity"],
                    n_boot=s["subgroup_boot"], seed=0,
                )  # fmt: skip
            run["subgroups"][attr] = table
        overall_auc = value(run["overall"], "auroc")
        run["gaps"] = {attr: _gaps(M, t, overall_auc) for attr, t in run["subgroups"].items()}
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
            "unit": context["task"]["unit"],
        },
        "runs": runs,
        "across_seeds": _across_seeds(runs),
    }


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


def results_table(metrics: dict, split: str) -> list[str]:
    lines = [
        "| model | head | labels | n (pos) | AUROC [95% CI] | ECE-15 [CI] | ECE-mass [CI] | "
        "Brier [CI] | FPR@sens | ΔAUROC vs ref (p) | AUROC over seeds |",
        "| --- | --- | ---: | ---: | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in headline_runs(metrics, split):
        o = r["overall"]
        vs = r.get("vs_reference")
        if vs and vs.get("diff") is not None:
            delta = f"{vs['diff']:+.3f} ({fmt_p(vs.get('p_value'))})"
        else:
            delta = "reference" if not vs else "n/a"
        fpr = value(o, "fpr_at_sensitivity")
        lines.append(
            f"| {r['model']} | {r['head']} | {r['label_fraction']:.0%} | {o.get('n')} "
            f"({o.get('n_pos')}) | {fmt_ci(o, 'auroc')} | {fmt_ci(o, 'ece_uniform')} | "
            f"{fmt_ci(o, 'ece_quantile')} | {fmt_ci(o, 'brier')} | "
            f"{'n/a' if fpr is None else f'{fpr:.3f}'} | {delta} | {_seed_stats(metrics, r)} |"
        )
    return lines


def verdict(metrics: dict, split: str = "external") -> list[str]:
    """Plain sentences: does the reference beat each other model on this split, and is the
    difference significant? Written from the numbers, whatever they are."""
    rows = headline_runs(metrics, split)
    ref = metrics["reference"]
    out = []
    for r in rows:
        a = r["overall"].get("auroc") or {}
        if a.get("hi") is not None and a["hi"] < 0.5:
            out.append(
                f"- {r['model']}, {r['head']}, {r['label_fraction']:.0%} labels: AUROC "
                f"{a['value']:.3f} with its interval below 0.5, worse than chance: the probe's "
                "direction reverses on this split, as when a shortcut learned at the training "
                "sites is reversed here."
            )
    for r in rows:
        if r["model"] == ref:
            continue
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
            else ("objectives " + ", ".join(m["objectives"]))
        )
        L.append(f"- **{m['name']}**: {what} (`{m['workdir']}`)")
    splits = [s for s in ("external", "test") if any(r["split"] == s for r in metrics["runs"])]
    splits += sorted({r["split"] for r in metrics["runs"]} - set(splits))
    for split in splits:
        L += ["", f"## Results: {split} split", ""]
        if split == "external":
            L += ["Whole held-out site(s): never seen in pretraining or probing.", ""]
        L += results_table(metrics, split)
        v = verdict(metrics, split)
        if v:
            L += ["", f"Against the reference ({split}):", "", *v]
    L += ["", "Intervals: AUROC by DeLong; ECE, Brier by patient-level bootstrap. "
          "'AUROC over seeds' is the mean ± sd over label-subset seeds (at 100% labels the subset "
          "does not depend on the seed). Small test sets give wide intervals: read them before "
          "the point estimates.", ""]  # fmt: skip
    b = context["protocol_border"]
    L += ["## Protocol-border cases", "",
          f"Definition: {b['definition']}. {b['border_items']} test items are border "
          f"({b['unseen_items']} with a protocol unseen in training); training had "
          f"{b['training_protocols']} distinct protocols.", ""]  # fmt: skip
    L += ["| model | head | labels | split | border n | border AUROC | typical n | typical AUROC |",
          "| --- | --- | ---: | --- | ---: | --- | ---: | --- |"]  # fmt: skip
    for split in splits:
        for r in headline_runs(metrics, split):
            t = r["subgroups"].get("protocol_border", {})
            bo, ty = t.get("border"), t.get("typical")
            L.append(f"| {r['model']} | {r['head']} | {r['label_fraction']:.0%} | {split} | "
                     f"{(bo or {}).get('n', 0)} | {fmt_ci(bo, 'auroc')} | {(ty or {}).get('n', 0)}"
                     f" | {fmt_ci(ty, 'auroc')} |")  # fmt: skip
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
