"""The report's PNG plots (matplotlib, Agg backend: no display needed).

ROC curves and reliability diagrams of each model at the largest label fraction (first seed),
AUROC against label fraction (first seed, with its DeLong interval), and
AUROC per vendor with intervals. The ROC curve's points are computed here for drawing only;
every number comes from pgjax.eval.metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, sensitivity) at every distinct score taken as threshold (score >= t positive),
    from (0, 0): the curve to draw. Its area is what metrics.auroc computes."""
    order = np.argsort(-score, kind="stable")
    s, yy = score[order], y[order]
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # one point per tie group
    tp, fp = np.cumsum(yy)[last], np.cumsum(1 - yy)[last]
    return np.r_[0.0, fp / max(1, fp[-1])], np.r_[0.0, tp / max(1, tp[-1])]


def _or(x, default):
    """x, or default where x is None (an interval the metric could not give)."""
    return default if x is None else x


def _save(plt, fig, plots: Path, name: str) -> str:
    """Write a finished figure as plots/NAME at the report's resolution; its path for the
    report."""
    fig.tight_layout()
    fig.savefig(plots / name, dpi=90)
    plt.close(fig)
    return f"plots/{name}"


def _first_seed_runs(p: dict, split: str, head: str):
    """(model, fraction, seed) of each model's first seed at each fraction on a split."""
    out = {}
    sel = (p["split"] == split) & (p["head"] == head)
    for m, f, s in zip(p["model"][sel], p["label_fraction"][sel], p["seed"][sel], strict=True):
        out.setdefault((str(m), float(f)), int(s))
    return out


def write_plots(out: Path, p: dict, metrics: dict, context: dict) -> dict[str, str]:
    """Writes out/plots/*.png; returns {title: relative path} for the report."""
    from pgjax.eval import metrics as M
    from pgjax.eval.report import is_external, ordered_splits, split_slug

    plt = _plt()
    plots = Path(out) / "plots"
    plots.mkdir(exist_ok=True)
    figures: dict[str, str] = {}
    splits = [s for s in ordered_splits(set(p["split"])) if is_external(s) or s == "test"]
    head = str(p["head"][0])
    models = list(dict.fromkeys(str(m) for m in p["model"]))
    for split in splits:
        runs = _first_seed_runs(p, split, head)
        top = max(f for (_, f) in runs)
        # ROC and reliability, largest fraction
        fig, (ax_roc, ax_rel) = plt.subplots(1, 2, figsize=(11, 4.8))
        for m in models:
            if (m, top) not in runs:
                continue
            k = ((p["model"] == m) & (p["split"] == split) & (p["head"] == head)
                 & (p["label_fraction"] == top) & (p["seed"] == runs[(m, top)]))  # fmt: skip
            y, prob = p["label"][k], p["prob"][k]
            if 0 < y.sum() < len(y):
                fpr, tpr = _roc_points(y, prob)
                ax_roc.plot(fpr, tpr, label=f"{m} ({M.auroc(y, prob):.3f})")
            rel = M.reliability(y, prob, n_bins=15, strategy="uniform")
            count = np.asarray(rel["count"])
            nz = count > 0
            ax_rel.plot(np.asarray(rel["mean_prob"])[nz], np.asarray(rel["frac_pos"])[nz],
                        marker="o", label=m)  # fmt: skip
        ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax_roc.set(xlabel="false-positive rate", ylabel="sensitivity",
                   title=f"ROC, {split}, {top:.0%} labels")  # fmt: skip
        ax_roc.legend(fontsize=7)
        ax_rel.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax_rel.set(xlabel="mean predicted probability (15 equal-width bins)",
                   ylabel="fraction positive", title=f"reliability, {split}", xlim=(0, 1),
                   ylim=(0, 1))  # fmt: skip
        ax_rel.legend(fontsize=7)
        figures[f"ROC and reliability ({split})"] = _save(
            plt, fig, plots, f"roc_reliability_{split_slug(split)}.png"
        )

        # AUROC against label fraction
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for m in models:
            rs = [
                r
                for r in metrics["runs"]
                if r["model"] == m
                and r["split"] == split
                and r["head"] == head
                and runs.get((m, r["label_fraction"])) == r["seed"]
            ]
            rs.sort(key=lambda r: r["label_fraction"])
            pts = [(r["label_fraction"], r["overall"].get("auroc")) for r in rs]
            pts = [(f, a) for f, a in pts if isinstance(a, dict) and a.get("value") is not None]
            if not pts:
                continue
            f = np.array([x for x, _ in pts])
            v = np.array([a["value"] for _, a in pts])
            lo = np.array([_or(a.get("lo"), a["value"]) for _, a in pts])
            hi = np.array([_or(a.get("hi"), a["value"]) for _, a in pts])
            ax.errorbar(f, v, yerr=[v - lo, hi - v], marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set(xlabel="label fraction (training patients)", ylabel="AUROC (DeLong 95% CI)",
               title=f"AUROC vs label fraction, {split}")  # fmt: skip
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7)
        figures[f"AUROC vs label fraction ({split})"] = _save(
            plt, fig, plots, f"auroc_vs_fraction_{split_slug(split)}.png"
        )

        # Per-vendor AUROC bars, largest fraction
        fig, ax = plt.subplots(figsize=(7, 4.2))
        vendors = sorted(set(p["vendor"][p["split"] == split]))
        width = 0.8 / max(1, len(models))
        for j, m in enumerate(models):
            run = next((r for r in metrics["runs"] if r["model"] == m and r["split"] == split
                        and r["head"] == head and r["label_fraction"] == top
                        and r["seed"] == runs.get((m, top))), None)  # fmt: skip
            if run is None:
                continue
            table = run["subgroups"].get("vendor", {})
            vals, errs = [], [[], []]
            for vnd in vendors:
                a = (table.get(vnd) or {}).get("auroc")
                ok = isinstance(a, dict) and a.get("value") is not None
                v = a["value"] if ok else np.nan
                vals.append(v)
                errs[0].append(v - _or(a.get("lo"), v) if ok else 0)
                errs[1].append(_or(a.get("hi"), v) - v if ok else 0)
            x = np.arange(len(vendors)) + j * width
            ax.bar(x, vals, width, yerr=errs, capsize=2, label=m)
        ax.set_xticks(np.arange(len(vendors)) + 0.4 - width / 2, vendors, fontsize=7)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(ylabel="AUROC (DeLong 95% CI)", ylim=(0, 1),
               title=f"AUROC per vendor, {split}, {top:.0%} labels")  # fmt: skip
        ax.legend(fontsize=7)
        figures[f"AUROC per vendor ({split})"] = _save(
            plt, fig, plots, f"auroc_by_vendor_{split_slug(split)}.png"
        )
    return figures
