"""One evaluation: models x heads x label fractions x seeds on one task, to predictions.csv.

Every model (pretrained checkpoints, and a random init of the reference's architecture) and
every reference row (`pgjax.eval.references`: oracle, thumbnail, protocol-only) goes through the
same code: the same items, the same label subsets, the same probe and penalty grid. Each
encoder's frozen embedding also gets the representation diagnostics (`pgjax.eval.diagnostics`).
The predictions are written first; `pgjax.eval.report` then computes metrics.json from exactly
the rows of predictions.csv and writes the report and plots.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from pgjax.data.store import open_store
from pgjax.eval import border as border_lib
from pgjax.eval import calibration as cal_lib
from pgjax.eval import diagnostics as diag_lib
from pgjax.eval import probe as probe_lib
from pgjax.eval import references as ref_lib
from pgjax.eval.embed import Embedder, Model, _latest_step, cached_embeddings
from pgjax.eval.tasks import TaskItems, TaskSpec, describe, fraction_patients, load_items

# Protocol fields the diagnostics try to read from each frozen image embedding (where the store
# has them and they vary).
DIAGNOSTIC_FIELDS = ("ViewPosition", "Manufacturer", "ConvolutionKernel")
HEADS = ("linear", "linear+protocol", "finetune", "finetune+protocol")
PREDICTION_COLUMNS = ("task", "model", "head", "label_fraction", "seed", "split", "item_id",
                      "patient_key", "site", "vendor", "scanner_model", "modality",
                      "protocol_border", "stratum", "label", "prob", "novelty",
                      "novel_decile", "prob_temperature", "prob_protocol")  # fmt: skip
# Calibrated probabilities written beside `prob` (the uncalibrated probe) for each method up to
# the one asked for: `protocol` falls back to the global temperature, so both are reported.
CALIBRATED = {"none": (), "temperature": ("temperature",),
              "protocol": ("temperature", "protocol")}  # fmt: skip
NOVEL_QUANTILE = 0.9  # the most novel decile of the test items
FLOAT_COLUMNS = ("novelty", "prob_temperature", "prob_protocol")


@dataclasses.dataclass
class EvalSettings:
    heads: tuple[str, ...] = ("linear",)
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    finetune: dict = dataclasses.field(
        default_factory=lambda: dict(
            steps=60, batch=16, lr=1e-4, head_lr=1e-2, weight_decay=1e-4, eval_every=20
        )  # fmt: skip
    )
    n_boot: int = 1000
    subgroup_boot: int = 200
    sensitivity: float = 0.9
    border_min_patients: int = 3
    embed_batch: int = 64
    references: tuple[str, ...] = ref_lib.REFERENCES
    calibrate: str = "none"
    calibration_min_count: int = cal_lib.MIN_COUNT

    def __post_init__(self):
        bad = [h for h in self.heads if h not in HEADS]
        if bad or not self.heads:
            raise ValueError(f"heads must be among {HEADS}, not {list(self.heads)}")
        self.references = ref_lib.check_names(tuple(self.references))
        cal_lib.check_method(self.calibrate)
        if self.calibration_min_count < 1:
            raise ValueError(f"calibration_min_count must be >= 1, not "
                             f"{self.calibration_min_count}")  # fmt: skip

    @classmethod
    def from_config(cls, c, heads=None, calibrate: str = "none") -> EvalSettings:
        p, m = c.probe, c.metrics
        if heads is None:
            heads = ("linear", "linear+protocol") if p.conditioned else ("linear",)
        return cls(
            heads=tuple(heads), l2_grid=tuple(float(v) for v in p.l2_grid),
            finetune=dict(c.finetune), n_boot=int(m.n_boot), subgroup_boot=int(m.subgroup_boot),
            sensitivity=float(m.sensitivity), border_min_patients=int(m.border_min_patients),
            embed_batch=int(c.embed_batch),
            references=tuple(c.get("references", ref_lib.REFERENCES)), calibrate=calibrate,
            calibration_min_count=int(c.get("calibration", {}).get("min_count",
                                                                   cal_lib.MIN_COUNT)),
        )  # fmt: skip


def log(msg: str) -> None:
    print(f"[eval] {msg}", flush=True)


def evaluate(
    models: list[Model],
    task: TaskSpec,
    store: str | Path,
    out: str | Path,
    settings: EvalSettings,
    *,
    labels: str | Path | None = None,
    salt_file: str | Path | None = None,
    reference: str | None = None,
) -> dict:
    """Write out/predictions.csv, out/metrics.json, out/report.md and out/plots/; returns the
    metrics. `reference` names the model the others are compared with (paired DeLong).
    settings.references adds the reference rows; `random_init` is added (a random init of the
    reference model's architecture) unless a random-init model is among `models`."""
    from pgjax.eval import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique: {names}")
    reference = reference or names[0]
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not among the models {names}")
    feature_refs = [r for r in settings.references if r != "random_init"]
    clash = sorted(set(feature_refs) & set(names))
    if clash:
        raise ValueError(f"model names {clash} are taken by reference rows; rename the models")
    models = list(models)
    if "random_init" in settings.references and not any(m.random_init for m in models):
        if "random_init" in names:
            raise ValueError("a model named 'random_init' that is not a random init")
        ref_model = next(m for m in models if m.name == reference)
        models.append(Model("random_init", ref_model.workdir, random_init=True))

    started = time.perf_counter()
    items = load_items(store, task, labels=labels, salt_file=salt_file)
    idx_train = items.where(task.train_splits)
    idx_val = items.where(task.val_splits)
    idx_test = items.where(task.test_splits)
    counts = describe(items)
    log(f"task {task.name}: {len(items)} labelled items; "
        + ", ".join(f"{s} {c['items']} ({c['positive_items']} positive)"
                    for s, c in counts.items()))  # fmt: skip
    if len(idx_test) == 0:
        raise ValueError(f"task {task.name}: no items in the test splits {task.test_splits}")
    border, protocols, scanner, border_summary = border_lib.border_flags(
        store, task.group, items.rows[idx_test], min_patients=settings.border_min_patients
    )
    used = np.concatenate([idx_train, idx_val, idx_test])
    rows = items.rows[used]
    position = {int(i): k for k, i in enumerate(used)}
    strata, strata_info, fields = _strata_and_fields(store, task, rows)
    stratum_of = {int(i): strata[k] for k, i in enumerate(used)}
    scores = None if items.scores is None else items.scores[used]
    keys, key_names, group_columns = _calibration_groups(store, task.group, rows)
    test_pos = np.array([position[int(i)] for i in idx_test], dtype=np.int64)
    novelty, novelty_summary = _novelty(models, reference, store, task, rows, test_pos, border,
                                        items.columns["split"][idx_test], settings,
                                        out / "embeddings")  # fmt: skip
    novel = None
    if novelty is not None:
        novel = novelty >= np.quantile(novelty, NOVEL_QUANTILE)
    extra_cols = {"novelty": novelty, "novel_decile": novel}
    provenance = {"task": task.name, "label": task.label, "group": task.group,
                  "vocab_sha256": _vocab_sha(store)}  # fmt: skip
    calibration_files: dict = {}

    predictions: list[dict] = []
    skipped: list[dict] = []
    notes: dict = {}
    representation: dict = {}
    reference_rows: list[dict] = []
    sources = [(m.name, m) for m in models]
    sources += [(name, None) for name in feature_refs]
    for name, model in sources:
        t0 = time.perf_counter()
        embedder = None
        if model is not None:
            emb, embedder = cached_embeddings(
                model, store, rows, out / "embeddings", group=task.group,
                batch=settings.embed_batch,
            )  # fmt: skip
            log(f"{name}: embeddings {emb['image'].shape} ({time.perf_counter() - t0:.1f} s)")
            representation[name] = diag_lib.representation_diagnostics(
                emb["image"], items.columns["patient_key"][used], scores, strata, fields,
                scores_reason=items.scores_reason,
            )  # fmt: skip
            if model.random_init:
                reference_rows.append({"name": name, "status": "ok",
                                       "what": ref_lib.DESCRIPTIONS["random_init"]})  # fmt: skip
        else:
            try:
                x = ref_lib.features(name, store, task.group, rows, scores, items.scores_reason)
            except ref_lib.Unavailable as e:
                reason = str(e)
                log(f"reference {name}: skipped, {reason}")
                skipped.append({"model": name, "reason": f"reference row not computed: {reason}"})
                reference_rows.append({"name": name, "status": "skipped", "reason": reason,
                                       "what": ref_lib.DESCRIPTIONS[name]})  # fmt: skip
                continue
            emb = {"image": x}
            reference_rows.append({"name": name, "status": "ok", "features": int(x.shape[1]),
                                   "what": ref_lib.DESCRIPTIONS[name]})  # fmt: skip
            log(f"reference {name}: {x.shape[1]} features ({time.perf_counter() - t0:.1f} s)")
        for head in settings.heads:
            if model is None and head != "linear":
                skipped.append({"model": name, "head": head,
                                "reason": "reference row: linear probe only"})  # fmt: skip
                continue
            if head.endswith("+protocol") and "protocol" not in emb:
                skipped.append({"model": name, "head": head,
                                "reason": "no protocol encoder (image-only model)"})  # fmt: skip
                continue
            if head.startswith("finetune") and embedder is None:
                embedder = Embedder(model, store, group=task.group, batch=settings.embed_batch)
            for fraction in task.label_fractions:
                # At 100% every seed draws the same patients; a probe fit is deterministic.
                stochastic = fraction < 1.0 or head.startswith("finetune")
                seeds = task.seeds if stochastic else task.seeds[:1]
                for seed in seeds:
                    result = _run_one(
                        items, emb, position, idx_train, idx_val, idx_test, head, fraction,
                        seed, settings, embedder, keys, key_names,
                    )  # fmt: skip
                    if isinstance(result, str):
                        skipped.append({"model": name, "head": head,
                                        "label_fraction": fraction, "seed": seed,
                                        "reason": result})  # fmt: skip
                        continue
                    probs, note, calibrated, probe = result
                    notes[f"{name}/{head}/{fraction}/{seed}"] = note
                    predictions.extend(_prediction_rows(
                        items, idx_test, probs, border, scanner, task, name, head,
                        fraction, seed, [stratum_of[int(i)] for i in idx_test],
                        {**extra_cols, **calibrated},
                    ))  # fmt: skip
                    if (model is not None and not model.random_init and probe is not None
                            and fraction == max(task.label_fractions) and seed == seeds[0]):
                        calibration_files[f"{name}/{head}"] = _write_probe_record(
                            out, name, head, fraction, seed, model, probe, note, group_columns,
                            provenance,
                        )  # fmt: skip
    for s in skipped:
        log(f"skipped {s}")
    if not predictions:
        raise ValueError(f"task {task.name}: no model produced predictions ({skipped})")
    write_predictions(out / "predictions.csv", predictions)
    context = {
        "task": dataclasses.asdict(task),
        "store": str(store),
        "models": [
            {
                "name": m.name,
                "workdir": str(m.workdir),
                "random_init": m.random_init,
                "transfer": m.transfer,
                "objectives": _objectives(m),
            }
            for m in models
        ],  # fmt: skip
        "reference_rows": reference_rows,
        "strata": strata_info,
        "representation": representation,
        "reference": reference,
        "settings": dataclasses.asdict(settings),
        "label_join": items.join,
        "counts": counts,
        "protocol_border": border_summary,
        "novelty": novelty_summary,
        "calibration": {
            "method": settings.calibrate,
            "methods": ["none", *CALIBRATED[settings.calibrate]],
            "fields": list(cal_lib.GROUP_FIELDS),
            "min_count": settings.calibration_min_count,
            "files": calibration_files,
        },
        "border_protocols": sorted(
            {str(p) for p, b in zip(protocols, border, strict=True) if b}
        ),  # fmt: skip
        "probe": notes,
        "skipped": skipped,
        "predict_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "context.json").write_text(json.dumps(context, indent=1, default=str) + "\n")
    t0 = time.perf_counter()
    metrics = report.write_all(out, context)
    log(f"metrics and report in {time.perf_counter() - t0:.1f} s: {out / 'report.md'}")
    return metrics


def _objectives(model: Model) -> list[str]:
    if model.random_init:
        return ["(random init)"]
    if model.transfer:
        return ["(transfer: no pretraining)"]
    objectives = model.config.objectives
    return [n for n in objectives if float(objectives[n].get("weight", 0.0)) > 0]


def _strata_and_fields(store, task: TaskSpec, rows: np.ndarray):
    """(stratum name per row, what the strata are, {field: values} of the protocol fields the
    diagnostics try to read from embeddings)."""
    wanted = tuple(dict.fromkeys((*task.strata, *DIAGNOSTIC_FIELDS)))
    decoded = border_lib.ProtocolDecoder(store, task.group, fields=wanted).fields(rows)
    present = [f for f in task.strata if f in decoded]
    missing = [f for f in task.strata if f not in decoded]
    info = {"fields": present}
    if missing:
        info["missing"] = {f: "not among the store's protocol keywords" for f in missing}
    if present:
        strata = np.array(["; ".join(f"{f}={decoded[f][k]}" for f in present)
                           for k in range(len(rows))], dtype=object)  # fmt: skip
    else:
        strata = np.array(["all"] * len(rows), dtype=object)
    fields = {f: decoded[f] for f in DIAGNOSTIC_FIELDS if f in decoded}
    # A field absent from every item of this group (a CT kernel on radiographs) says nothing.
    fields = {f: v for f, v in fields.items() if not np.all(v == "<missing>")}
    return strata, info, fields


def _run_one(items: TaskItems, emb, position, idx_train, idx_val, idx_test, head, fraction,
             seed, settings: EvalSettings, embedder, keys, key_names):  # fmt: skip
    """(test probabilities (item level), note, calibrated test probabilities {column: array},
    the linear probe or None) of one head at one label fraction and seed, or the reason it could
    not be fitted."""
    patients = items.columns["patient_key"]
    chosen = fraction_patients(patients[idx_train], items.labels[idx_train], fraction, seed)
    sub = idx_train[np.isin(patients[idx_train], chosen)]
    y_sub = items.labels[sub].astype(np.float64)
    if not (0 < y_sub.sum() < len(y_sub)):
        return "the label subset has one class only"

    def features(idx):
        pos = [position[int(i)] for i in idx]
        x = emb["image"][pos]
        if head.endswith("+protocol"):
            x = np.concatenate([x, emb["protocol"][pos]], axis=1)
        return x.astype(np.float64)

    y_val = items.labels[idx_val].astype(np.float64)
    probe = probe_lib.train_linear_probe(
        features(sub), y_sub, patients[sub], features(idx_val), y_val, settings.l2_grid
    )
    note = {"train_items": int(len(sub)), "train_patients": int(len(chosen)),
            "train_positives": int(y_sub.sum()), "l2": probe.l2,
            "selection": probe.selection}  # fmt: skip
    if not head.startswith("finetune"):
        calibrated, fits = _calibrate(
            probe, features(idx_val), y_val, features(idx_test),
            keys[[position[int(i)] for i in idx_val]], keys[[position[int(i)] for i in idx_test]],
            settings, key_names,
        )  # fmt: skip
        if fits:
            note["calibration"] = fits
        return probe.predict(features(idx_test)), note, calibrated, probe
    ft = settings.finetune
    result = probe_lib.finetune(
        embedder, items.rows[sub], y_sub, items.rows[idx_val], y_val, items.rows[idx_test],
        probe.raw_head(), steps=int(ft["steps"]), batch=int(ft["batch"]), lr=float(ft["lr"]),
        head_lr=float(ft["head_lr"]), weight_decay=float(ft["weight_decay"]),
        eval_every=int(ft["eval_every"]), seed=seed, with_protocol=head.endswith("+protocol"),
    )  # fmt: skip
    note.update(best_step=result.best_step, val_losses=result.val_losses)
    if settings.calibrate != "none":
        note["calibration"] = "not calibrated: fine-tuned heads keep no validation logits"
    return result.probs, note, {}, None


def _calibrate(probe, x_val, y_val, x_test, keys_val, keys_test, settings: EvalSettings,
               key_names) -> tuple[dict, dict]:  # fmt: skip
    """({"prob_<method>": test probabilities}, {method: fitted calibration}) of the methods
    up to settings.calibrate, fitted on the validation logits."""
    z_val, z_test = probe.logits(x_val), probe.logits(x_test)
    probs, fits = {}, {}
    for method in CALIBRATED[settings.calibrate]:
        fit = cal_lib.fit(method, z_val, y_val, keys_val,
                          min_count=settings.calibration_min_count, names=key_names)  # fmt: skip
        probs[f"prob_{method}"] = cal_lib.apply(fit, z_test, keys_test)
        fits[method] = fit
    return probs, fits


def _calibration_groups(store, group: str, rows: np.ndarray):
    """(calibration group key per row, {key: readable name}, the token columns of the group
    fields). A store without those fields puts every item in one group."""
    from pgjax import novelty as nov

    vocab = open_store(store).vocabulary()
    keywords = list(vocab.keywords)
    columns = [keywords.index(f) for f in cal_lib.GROUP_FIELDS if f in keywords]
    tokens = nov.read_tokens(store, group, rows)[:, columns]
    keys = cal_lib.group_keys(tokens)
    names = {}
    for key, row in zip(keys, tokens, strict=True):
        if key not in names:
            names[key] = " | ".join(vocab.decode(int(t))[1] for t in row) or "all"
    return keys, names, columns


def _vocab_sha(store) -> str | None:
    return open_store(store).manifest.get("vocab_sha256")


def _write_probe_record(out: Path, name, head, fraction, seed, model: Model, probe, note,
                        group_columns, provenance) -> str:  # fmt: skip
    """OUT/calibration/<model>__<head>.json: the probe and its calibration, for an export."""
    fits = note.get("calibration") or {}
    method = next(reversed(fits)) if fits else "none"
    record = cal_lib.probe_record(
        probe=probe, calibration=fits.get(method) or cal_lib.fit("none", [], []),
        inputs=["image", "protocol"] if head.endswith("+protocol") else ["image"],
        group_columns=group_columns,
        provenance={**provenance, "model": name, "head": head, "label_fraction": fraction,
                    "seed": seed, "step": _latest_step(model.workdir)},
    )  # fmt: skip
    path = out / "calibration" / f"{name}__{head.replace('+', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return str(path.relative_to(out))


def _novelty(models, reference, store, task: TaskSpec, rows, test_pos, border, splits,
             settings: EvalSettings, cache_dir: Path):  # fmt: skip
    """(protocol-novelty score per test item or None, summary): the Mahalanobis distance of
    the test items' protocol embeddings from the training split's, by the reference model (or
    the first model with a protocol encoder), and how well it separates protocol-border items
    and external-site items from the others (AUROC with its DeLong interval)."""
    from pgjax import novelty as nov

    pretrained = [m for m in models if not m.random_init]
    order = sorted(pretrained, key=lambda m: m.name != reference)
    reasons = {}
    for m in order:
        emb, embedder = cached_embeddings(m, store, rows, cache_dir, group=task.group,
                                          batch=settings.embed_batch)  # fmt: skip
        if "protocol" not in emb:
            reasons[m.name] = ("no protocol encoder, or the store's vocabulary is not its "
                               "training store's")  # fmt: skip
            continue
        train_store = Path(str(m.config.input.store))
        same = embedder is not None and train_store.resolve() == Path(store).resolve()
        stats = nov.for_checkpoint(m.workdir, embedder=embedder if same else None)
        score = stats.distance(emb["protocol"][test_pos])
        unusual = stats.unusual(nov.read_tokens(store, task.group, rows[test_pos]))
        summary = {
            "model": m.name,
            "score": "Mahalanobis distance of the pooled protocol embedding from its training "
            "distribution (mean and Ledoit-Wolf covariance)",
            "recorded_on": stats.source.get("items"),
            "train_items": stats.n_items, "embedded_items": stats.n_embedded,
            "shrinkage": stats.shrinkage, "train_quantiles": stats.train_quantiles,
            "novel_threshold": float(np.quantile(score, NOVEL_QUANTILE)),
            "separation": _separation(score, border, splits),
            "unusual_values": _top_unusual(unusual, splits),
            "not_scored_by": reasons,
        }  # fmt: skip
        return score, summary
    return None, {"model": None, "reason": "no pretrained model with a protocol encoder",
                  "not_scored_by": reasons}  # fmt: skip


def _separation(score, border, splits) -> dict:
    """AUROC [DeLong 95%] of the novelty score for border vs typical test items (per split
    and over all), and for external-site items vs internal test items."""
    from pgjax.eval import metrics as M
    from pgjax.eval.report import is_external

    def auc(positive, sel):
        y = np.asarray(positive[sel], np.int64)
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        entry = {"n_pos": n_pos, "n_neg": n_neg}
        if n_pos < 2 or n_neg < 2:
            return {**entry, "value": None, "reason": "needs 2 items of each kind"}
        ci = M.delong_ci(y, score[sel])
        return {**entry, "value": float(ci.auc), "lo": float(ci.lo), "hi": float(ci.hi)}

    splits = np.asarray(splits, dtype=str)
    everything = np.ones(len(score), bool)
    border = np.asarray(border, bool)
    out = {"border_vs_typical": {"all test items": auc(border, everything)}}
    for split in sorted(set(splits)):
        out["border_vs_typical"][split] = auc(border, splits == split)
    external = np.array([is_external(s) for s in splits])
    out["external_vs_internal"] = auc(external, everything)
    return out


def _top_unusual(unusual: list[list[str]], splits, top: int = 15) -> dict:
    """Per split: items with an unseen or rare field value, and the commonest such values."""
    from collections import Counter

    out = {}
    for split in sorted(set(splits)):
        lists = [u for u, s in zip(unusual, splits, strict=True) if s == split]
        counts = Counter(v for u in lists for v in u)
        out[split] = {"items": len(lists), "with_unusual": sum(1 for u in lists if u),
                      "values": dict(counts.most_common(top))}  # fmt: skip
    return out


def _prediction_rows(items: TaskItems, idx_test, probs, border, scanner, task: TaskSpec, model,
                     head, fraction, seed, strata, extra) -> list[dict]:  # fmt: skip
    """`extra`: {column: array over idx_test or None} (novelty, calibrated probabilities)."""
    c = items.columns
    extra = {k: v for k, v in extra.items() if v is not None}
    base = {"task": task.name, "model": model, "head": head, "label_fraction": fraction,
            "seed": seed}  # fmt: skip
    if task.unit == "item":
        return [
            {
                **base,
                "split": c["split"][i],
                "item_id": f"{task.group}:{items.rows[i]}",
                "patient_key": c["patient_key"][i],
                "site": c["site"][i],
                "vendor": c["vendor"][i],
                "scanner_model": scanner[k],
                "modality": c["modality"][i],
                "protocol_border": int(border[k]),
                "stratum": strata[k],
                "label": int(items.labels[i]),
                "prob": float(probs[k]),
                **{col: _cell(col, v[[k]]) for col, v in extra.items()},
            }  # fmt: skip
            for k, i in enumerate(idx_test)
        ]
    # Study level: the mean probability of the study's items; border if any item is.
    groups: dict[tuple[str, str], list[int]] = {}
    for k, i in enumerate(idx_test):
        groups.setdefault((c["split"][i], c["study_key"][i]), []).append(k)
    out = []
    for (split, study), ks in groups.items():
        i = idx_test[ks[0]]
        out.append({
            **base, "split": split, "item_id": study, "patient_key": c["patient_key"][i],
            "site": c["site"][i], "vendor": c["vendor"][i], "scanner_model": scanner[ks[0]],
            "modality": c["modality"][i], "protocol_border": int(border[ks].any()),
            # A study whose items lie in different strata belongs to none of them.
            "stratum": strata[ks[0]] if len({strata[k] for k in ks}) == 1 else "mixed",
            "label": int(items.labels[i]), "prob": float(np.mean(probs[ks])),
            **{col: _cell(col, v[ks]) for col, v in extra.items()},
        })  # fmt: skip
    return out


def _cell(column: str, values: np.ndarray):
    """One prediction row's value of an extra column from its items' values: a study is as
    novel as its most novel item, in the novel decile if any item is; probabilities average."""
    if column == "novelty":
        return float(np.max(values))
    if column == "novel_decile":
        return int(np.any(values))
    return float(np.mean(values))


def write_predictions(path: Path, rows: list[dict]) -> None:
    """CSV, probabilities in full precision (repr), written atomically."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "prob": repr(float(r["prob"])),
                        "label_fraction": repr(float(r["label_fraction"])),
                        **{k: repr(float(r[k])) for k in FLOAT_COLUMNS if k in r}})  # fmt: skip
    tmp.replace(path)
