"""The model card of a pretrained model: what it is for, what it saw, how it did, what it is not.

Assembled from the workdir (config.json, metrics.jsonl), the store it trained on (manifest and
item table: training data by site, vendor and modality), the evaluation folders (metrics.json:
external-site results with intervals, calibration, subgroup gaps) and the de-identification
audit (`pgjax audit`'s JSON report, or a fresh audit of the store against source DICOM files).
Every number is read from those files; nothing is typed in.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pgjax.eval.report import (
    calibration_tables,
    fmt_ci,
    fmt_worst,
    headline_runs,
    is_external,
    ordered_splits,
    split_slug,
    subgroup_table,
    value,
)

INTENDED_USE = (
    "Research on self-supervised pretraining of medical-image encoders with DICOM header "
    "(protocol) supervision: an encoder whose frozen or fine-tuned features feed downstream "
    "classifiers that are themselves validated. Not a medical device; not for diagnosis, "
    "triage or any decision about a patient. A model trained on the synthetic corpus "
    "(`pgjax synth`) describes synthetic data only."
)


def training_data(store: Path, splits=("train",)) -> dict:
    from pgjax.data.store import open_store

    s = open_store(store)
    out = {"store": str(store), "counts": s.manifest.get("counts", {})}
    table = s.images.table()
    keep = [i for i, (ok, sp) in enumerate(zip(table["ok"], table["split"], strict=True))
            if ok == "1" and sp in splits]  # fmt: skip
    for col in ("site", "vendor", "modality"):
        out[col] = dict(sorted(Counter(str(table[col][i]) for i in keep).items()))
    out["items"] = len(keep)
    out["patients"] = len({table["patient_key"][i] for i in keep})
    all_splits = Counter(str(x) for x in table["split"])
    out["splits"] = dict(sorted(all_splits.items()))
    return out


def audit_section(audit: dict | None) -> list[str]:
    if audit is None:
        return ["Not run for this card: give `--audit REPORT.json` (from `pgjax audit --json`) or "
                "`--sources DICOM_DIR` to embed it."]  # fmt: skip
    hits = audit.get("hits_total", len(audit.get("hits", [])))
    L = [f"`pgjax audit` of `{audit.get('store')}`: {audit.get('files_scanned')} files and "
         f"{audit.get('arrays_scanned')} arrays searched for {audit.get('identifiers')} "
         f"identifiers from the source DICOM files (names, IDs, dates, UIDs and their unsalted "
         f"hashes).", ""]  # fmt: skip
    weak = int(audit.get("weak_hits_total", 0) or 0)
    if not hits:
        L.append("**Result: clean** (no identifier found).")
    elif hits == weak:
        L.append(f"**Result: clean of strong identifiers**; {weak} weak hits (a single name "
                 "component, e.g. a short given name, matched somewhere in the store's bytes; "
                 "`pgjax audit --weak-ok` accepts these), redacted:")  # fmt: skip
    else:
        L.append(f"**Result: {hits - weak} identifier hits** ({weak} more weak), redacted:")
    if hits:
        for kind, n in sorted((audit.get("hits_by_kind") or {}).items()):
            L.append(f"- {kind}: {n}")
        for h in (audit.get("hits") or [])[:10]:
            if isinstance(h, dict):
                where = "in a decoded array" if h.get("where") == "array" else h.get("where")
                L.append(f"  - `{h.get('path')}` {where}: {h.get('redacted')}"
                         + (" (weak)" if h.get("weak") else ""))  # fmt: skip
    errors = audit.get("errors") or []
    if errors:
        L.append(f"{len(errors)} files or arrays could not be read: the audit is incomplete.")
    return L


def _model_runs(metrics: dict, name: str, split: str) -> list[dict]:
    return [r for r in headline_runs(metrics, split) if r["model"] == name]


def write_card(workdir: str | Path, *, eval_dirs=(), audit: dict | None = None,
               model_name: str | None = None, out: str | Path | None = None) -> Path:  # fmt: skip
    from pgjax.eval.embed import load_workdir_config

    workdir = Path(workdir)
    config = load_workdir_config(workdir)
    name = model_name or workdir.name
    store = Path(str(config.input.store))
    data = training_data(store, tuple(config.input.splits))
    curve = []
    if (workdir / "metrics.jsonl").exists():
        curve = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
    objectives = {k: dict(v) for k, v in config.objectives.items() if float(v.get("weight", 0)) > 0}

    L = [f"# Model card: {name}", "", "## Intended use", "", INTENDED_USE, ""]
    L += ["## Model and objectives", "",
          f"- Image encoder: `{config.model.image_encoder}`; protocol encoder: "
          f"`{config.model.protocol_encoder}`; compute dtype {config.model.dtype}.",
          f"- Pretraining: {config.total_steps} steps, global batch {config.input.global_batch}, "
          f"AdamW peak lr {config.optim.lr}, seed {config.seed}; workdir `{workdir}`.",
          "- Objectives (weight): " + ", ".join(f"{k} ({v['weight']})"
                                               for k, v in objectives.items()),
          ]  # fmt: skip
    if curve:
        L.append(f"- Loss: {curve[0]['loss']:.3f} at step {curve[0]['step']}, "
                 f"{curve[-1]['loss']:.3f} at step {curve[-1]['step']}.")  # fmt: skip
    L += ["", "## Training data", "",
          f"Store `{data['store']}`, splits used for pretraining: "
          f"{', '.join(config.input.splits)}: {data['items']} images of {data['patients']} "
          "patients (identities are salted hashes; patient-level splits).", ""]  # fmt: skip
    for col in ("site", "vendor", "modality"):
        L.append(f"- by {col}: " + ", ".join(f"{k} {v}" for k, v in data[col].items()))
    L.append("- all items by split: " + ", ".join(f"{k} {v}" for k, v in data["splits"].items()))

    limits = [
        "Trained and evaluated on the data described above only; performance at other sites, "
        "vendors, scanner models or protocols is unknown until measured there.",
        "Synthetic corpora are small and simplified: absolute numbers say little about real "
        "images.",
    ]
    for ed in eval_dirs:
        ed = Path(ed)
        mpath = ed / "metrics.json"
        if not mpath.exists():
            L += ["", f"(no metrics.json in {ed})"]
            continue
        metrics = json.loads(mpath.read_text())
        context = json.loads((ed / "context.json").read_text()) if (ed / "context.json").exists() \
            else {}  # fmt: skip
        who = name if any(r["model"] == name for r in metrics["runs"]) else metrics["reference"]
        L += ["", f"## Evaluation: task {metrics['task']} (`{ed}`)", ""]
        gate = ((metrics.get("gate") or {}).get("models") or {}).get(who)
        if gate and gate["status"] != "informative":
            L += [f"**Sanity gate: {gate['status']}.** No row of {who} has an internal test "
                  "AUROC interval above 0.5: the results below are not evidence of what it "
                  "learned.", ""]  # fmt: skip
        splits = ordered_splits({r["split"] for r in metrics["runs"]})
        for split in [s for s in splits if is_external(s) or s == "test"]:
            title = (
                "Internal test split"
                if split == "test"
                else "External validation (held-out site"
                + ("s, pooled)" if split == "external" else f" {split.partition(':')[2]})")
            )
            runs = _model_runs(metrics, who, split)
            if not runs:
                continue
            L += [f"### {title}", "",
                  "| head | labels | n (pos) | AUROC [95% CI] | worst stratum AUROC | gate | "
                  "ECE-15 [CI] | ECE-mass [CI] | Brier [CI] | FPR at sens. |",
                  "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
            for r in runs:
                o = r["overall"]
                fpr = value(o, "fpr_at_sensitivity")
                L.append(f"| {r['head']} | {r['label_fraction']:.0%} | {o.get('n')} "
                         f"({o.get('n_pos')}) | {fmt_ci(o, 'auroc')} | {fmt_worst(r)} | "
                         f"{r.get('gate', 'n/a')} | {fmt_ci(o, 'ece_uniform')}"
                         f" | {fmt_ci(o, 'ece_quantile')} | {fmt_ci(o, 'brier')} | "
                         f"{'n/a' if fpr is None else f'{fpr:.3f}'} |")  # fmt: skip
            L.append("")
        for split in [s for s in splits if is_external(s)]:
            _external_sections(L, limits, metrics, context, ed, who, split)
        _calibration_section(L, metrics, who, splits)
        _novelty_section(L, limits, metrics)
    L += ["", "## De-identification audit", ""] + audit_section(audit)
    L += ["", "## Known limits", ""] + [f"- {x}" for x in limits]
    L += ["- Identifiers burned into pixels (ultrasound annotations, scanned documents) are "
          "not detected by the audit.", ""]  # fmt: skip
    path = Path(out) if out else workdir / "MODEL_CARD.md"
    path.write_text("\n".join(L))
    return path


def _calibration_section(L: list, metrics: dict, who: str, splits: list[str]) -> None:
    """ECE of each calibration method per split and protocol stratum (`--calibrate`)."""
    info = metrics.get("calibration") or {}
    if info.get("method", "none") == "none":
        return
    mine = {**metrics, "runs": [r for r in metrics["runs"] if r["model"] == who]}
    tables = [(split, calibration_tables(mine, split)) for split in splits]
    if not any(t for _, t in tables):
        return
    L += [f"### Recalibration (`pgjax eval --calibrate {info['method']}`)", "",
          "Temperatures fitted on the validation split: one (temperature), or one per "
          f"{' x '.join(info.get('fields', []))} group with at least {info.get('min_count')} "
          "validation items, the global one elsewhere (protocol). ECE-15 with 95% patient "
          "bootstrap intervals.", ""]  # fmt: skip
    for split, t in tables:
        if t:
            L += [f"{split}:", "", *t, ""]
    probe = (info.get("files") or {}).get(f"{who}/linear")
    if probe:
        L += [f"The calibrated linear probe: `{probe}` (`pgjax export --calibration`).", ""]


def _novelty_section(L: list, limits: list, metrics: dict) -> None:
    """How well the protocol-novelty score flags unfamiliar acquisitions."""
    nov = metrics.get("novelty") or {}
    if not nov.get("model"):
        return
    sep = nov.get("separation") or {}

    def cell(e):
        e = e or {}
        if e.get("value") is None:
            return f"n/a ({e.get('reason', 'not computed')})"
        return f"{e['value']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"

    border = (sep.get("border_vs_typical") or {}).get("all test items")
    L += ["### Protocol novelty", "",
          f"Every prediction can come with a protocol-novelty score ({nov['score']}, by "
          f"{nov['model']}) and the list of unseen or rare header values. On this evaluation's "
          f"test items it separates protocol-border items from typical ones with AUROC "
          f"{cell(border)}, and external-site items from internal test items with AUROC "
          f"{cell(sep.get('external_vs_internal'))}. Training items' own scores: "
          + ", ".join(f"{k} {v:.2f}" for k, v in (nov.get("train_quantiles") or {}).items())
          + ".", ""]  # fmt: skip
    note = ("Items whose protocol-novelty score exceeds the training items' 99th percentile "
            "were acquired unlike anything in training: check the unusual values listed with "
            "them before trusting a prediction.")  # fmt: skip
    if note not in limits:
        limits.append(note)


def _external_sections(L: list, limits: list, metrics: dict, context: dict, ed: Path, who: str,
                       split: str) -> None:  # fmt: skip
    """Calibration, bias audit and comparisons of the model on one external split."""
    ext = _model_runs(metrics, who, split)
    if not ext:
        return
    top = max(ext, key=lambda r: r["label_fraction"])
    where = "all held-out sites" if split == "external" else split.partition(":")[2]
    L += [f"### Calibration ({where})", "",
          f"ECE over 15 equal-width bins {fmt_ci(top['overall'], 'ece_uniform')}, over 15 "
          f"equal-mass bins {fmt_ci(top['overall'], 'ece_quantile')} ({split}, "
          f"{top['label_fraction']:.0%} labels). Reliability diagram: "
          f"`{ed / 'plots' / f'roc_reliability_{split_slug(split)}.png'}`. Probabilities come "
          "from a probe fitted at the training sites; recalibrate before use elsewhere.", "",
          f"### Bias audit: subgroups, {where} (largest gaps flagged)", ""]  # fmt: skip
    L += subgroup_table(top)
    others = [r for r in headline_runs(metrics, split) if r["model"] != who
              and r["label_fraction"] == top["label_fraction"]
              and r["head"] == top["head"]]  # fmt: skip
    if others:
        L += ["", f"### Compared with other encoders ({split}, same cases)", "",
              "| model | AUROC [95% CI] | gate | Δ vs this model | paired DeLong p |",
              "| --- | --- | --- | ---: | ---: |"]  # fmt: skip
        for r in others:
            vs = r.get("vs_reference") or {}
            d = vs.get("diff")
            p = vs.get("p_value")
            L.append(f"| {r['model']} | {fmt_ci(r['overall'], 'auroc')} | {r.get('gate', 'n/a')}"
                     f" | {'n/a' if d is None else f'{d:+.3f}'} | "
                     f"{'n/a' if p is None else f'{p:.3f}'} |")  # fmt: skip
    L.append("")
    b = context.get("protocol_border")
    if b:
        note = (f"{b['border_items']} of the test items of task {metrics['task']} have a "
                "protocol rare or unseen at the training sites (see the report's "
                "protocol-border table); expect such cases to differ.")  # fmt: skip
        if note not in limits:
            limits.append(note)
    n_ext = (top["overall"] or {}).get("n")
    if n_ext is not None and n_ext < 200:
        limits.append(f"The {split} test set of task {metrics['task']} has {n_ext} cases: "
                      "intervals are wide.")  # fmt: skip
