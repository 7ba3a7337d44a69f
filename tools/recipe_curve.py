"""Does a CPU-size pretraining recipe teach an encoder the finding? A curve per objective.

    python tools/recipe_curve.py STORE --out DIR --configs configs/pg.py:tiny,configs/mae.py:tiny \
        --steps 100,300,600 [--set KEY=VALUE ...] [--task cardiomegaly]

Each config is pretrained in stages (resuming its checkpoint) to each step count; after each
stage its frozen image embedding is probed on the store's labelled items: a linear probe
(pgjax's, penalty chosen on the val split) trained on the train split, tested on the internal
test split (AUROC with DeLong CI), and a cross-validated ridge r between the embedding and the
true latent score (the store's `score` column). A random init of each config is step 0. Writes
DIR/curve.json and DIR/curve.md; the README's "CPU recipe" paragraph quotes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def ridge_r(x: np.ndarray, y: np.ndarray, groups: np.ndarray, l2: float = 0.01, folds: int = 5):
    """Pearson r between y and its patient-grouped cross-validated ridge prediction from x."""
    xs = (x - x.mean(0)) / np.where(x.std(0) > 1e-6, x.std(0), 1.0)
    patients = np.unique(groups)
    fold_of = {p: i % folds for i, p in enumerate(np.random.default_rng(0).permutation(patients))}
    fold = np.array([fold_of[g] for g in groups])
    pred = np.zeros_like(y)
    for f in range(folds):
        tr, te = fold != f, fold == f
        a, b = xs[tr], y[tr] - y[tr].mean()
        w = np.linalg.solve(a.T @ a + l2 * len(a) * np.eye(a.shape[1]), a.T @ b)
        pred[te] = xs[te] @ w + y[tr].mean()
    return float(np.corrcoef(pred, y)[0, 1])


def probe(model, store: str, items, settings) -> dict:
    from pgjax.eval import metrics
    from pgjax.eval import probe as probe_lib
    from pgjax.eval.embed import Embedder

    idx = {s: items.where((s,)) for s in ("train", "val", "test")}
    emb = Embedder(model, store, group="images", batch=64).embed(items.rows)["image"]
    emb = emb.astype(np.float64)
    y = items.labels.astype(np.float64)
    patients = items.columns["patient_key"]
    lp = probe_lib.train_linear_probe(emb[idx["train"]], y[idx["train"]], patients[idx["train"]],
                                      emb[idx["val"]], y[idx["val"]], settings)  # fmt: skip
    p = lp.predict(emb[idx["test"]])
    ci = metrics.delong_ci(y[idx["test"]], p)
    score = items.columns["score"].astype(np.float64)
    tr = idx["train"]
    return {"test_auroc": round(ci.auc, 4), "test_lo": round(ci.lo, 4),
            "test_hi": round(ci.hi, 4), "n_test": int(len(idx["test"])),
            "ridge_r_train": round(ridge_r(emb[tr], score[tr], patients[tr]), 4)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", required=True, help="comma list of configs/NAME.py[:VARIANT]")
    ap.add_argument("--steps", required=True, help="comma list of step counts, increasing")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--task", default="cardiomegaly")
    args = ap.parse_args(argv)

    from pgjax.eval.embed import Model
    from pgjax.eval.sweep import resolve_config_path
    from pgjax.eval.tasks import TaskSpec, load_items
    from pgjax.train.config_lib import load_config
    from pgjax.train.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_items(args.store, TaskSpec(name=args.task, label=args.task))
    grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    curve = json.loads((out / "curve.json").read_text()) if (out / "curve.json").exists() else {}
    for spec in args.configs.split(","):
        path, _, variant = spec.partition(":")
        name = Path(path).stem + (f":{variant}" if variant else "")
        wd = out / name.replace(":", "_")
        steps = [int(s) for s in args.steps.split(",")]
        rows = curve.setdefault(name, {})
        for step in sorted({0, *steps}):
            if str(step) in rows:
                continue
            t0 = time.perf_counter()
            if step == 0:
                config = load_config(resolve_config_path(spec),
                                     [f"input.store={args.store}", "total_steps=1", *args.set])
                wd.mkdir(parents=True, exist_ok=True)  # a random init needs only the config
                (wd / "config.json").write_text(config.to_json_best_effort(indent=1) + "\n")
                model = Model(name, wd, random_init=True)
            else:
                config = load_config(resolve_config_path(spec),
                                     [f"input.store={args.store}", f"total_steps={step}",
                                      *args.set])  # fmt: skip
                train(config, wd)
                model = Model(name, wd)
            rows[str(step)] = {**probe(model, args.store, items, grid),
                               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            print(f"[recipe] {name} step {step}: {rows[str(step)]}", flush=True)
            (out / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    lines = ["| config | step | internal test AUROC [95% CI] | ridge r (latent, train) | s |",
             "| --- | ---: | --- | ---: | ---: |"]  # fmt: skip
    for name, rows in curve.items():
        for step, r in sorted(rows.items(), key=lambda kv: int(kv[0])):
            ci = f"{r['test_auroc']:.3f} [{r['test_lo']:.3f}, {r['test_hi']:.3f}]"
            lines.append(f"| {name} | {step} | {ci} | {r['ridge_r_train']:.3f} | {r['seconds']} |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
