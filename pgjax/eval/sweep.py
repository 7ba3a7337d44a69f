"""Ablation sweeps: pretrain a list of configs, evaluate them together, write one table.

An ablation file (configs/ablations/NAME.py) returns a ConfigDict:

  task            task name in the tasks config (configs/tasks.py)
  label_fractions, seeds, heads    evaluation settings (override the task's)
  reference       the row the others are compared with (paired DeLong on the same cases)
  random_init     also evaluate a random init of the reference's architecture
  steps           pretraining steps of every row (total_steps)
  overrides       config overrides applied to every row ("KEY=VALUE" strings)
  rows            (name, config, overrides) dicts: config is "configs/NAME.py[:VARIANT]"

Each row pretrains into WORKDIR/<name> (resuming from its checkpoint; a finished row is not
retrained); a row whose training fails is reported and the sweep goes on without it. All rows are
then evaluated in one `evaluate` call into WORKDIR/eval, and WORKDIR/table.md and table.csv hold
the comparison: external-site AUROC, ECE and Brier with intervals, and the difference to the
reference with its paired DeLong p-value, per label fraction.
"""

from __future__ import annotations

import csv
import json
import time
import traceback
from pathlib import Path

from pgjax.eval.report import fmt_ci, fmt_p, headline_runs, ordered_splits, value

ROOT = Path(__file__).resolve().parents[2]


def resolve_config_path(spec: str) -> str:
    """configs/NAME.py[:VARIANT], relative to the working folder or else to the repository."""
    path, sep, variant = spec.partition(":")
    if not Path(path).exists() and (ROOT / path).exists():
        path = str(ROOT / path)
    return path + (sep + variant if sep else "")


def finished_step(workdir: Path) -> int | None:
    root = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit()) if root.exists() else []
    return steps[-1] if steps else None


def pretrain_rows(
    ablation, store: str, workdir: Path, log=print, *, eval_only: bool = False
) -> tuple[list, list]:
    """Train every row; returns ([(name, workdir)], [(name, reason)] of failed rows). With
    eval_only, nothing is trained: rows without a finished checkpoint are reported as such."""
    from pgjax.train.config_lib import load_config
    from pgjax.train.train import train

    done, failed = [], []
    for row in ablation.rows:
        name = row["name"]
        wd = workdir / name
        overrides = [f"input.store={store}", f"total_steps={int(ablation.steps)}",
                     *ablation.get("overrides", ()), *row.get("overrides", ())]  # fmt: skip
        try:
            config = load_config(resolve_config_path(row["config"]), overrides)
            if finished_step(wd) == config.total_steps:
                log(f"[sweep] {name}: already trained ({config.total_steps} steps)")
            elif eval_only:
                failed.append((name, f"not trained to {config.total_steps} steps (--eval-only)"))
                continue
            else:
                t0 = time.perf_counter()
                log(f"[sweep] {name}: pretraining {row['config']} for {config.total_steps} steps")
                train(config, wd)
                log(f"[sweep] {name}: {time.perf_counter() - t0:.0f} s")
            done.append((name, wd))
        except Exception as e:  # one failed config must not stop the sweep
            reason = f"{type(e).__name__}: {e}"
            log(f"[sweep] {name}: FAILED, {reason}")
            (workdir / f"{name}.error.txt").write_text(traceback.format_exc())
            failed.append((name, reason))
    return done, failed


def run_sweep(ablation, store: str, workdir: str | Path, tasks_config, *, labels=None,
              salt_file=None, log=print, eval_only: bool = False) -> dict:  # fmt: skip
    import dataclasses

    from pgjax.eval.embed import Model
    from pgjax.eval.evaluate import EvalSettings, evaluate
    from pgjax.eval.tasks import task_from_config

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trained, failed = pretrain_rows(ablation, store, workdir, log, eval_only=eval_only)
    if not trained:
        raise RuntimeError(f"every row of the sweep failed: {failed}")
    task = task_from_config(tasks_config, ablation.task)
    task = dataclasses.replace(
        task,
        label_fractions=tuple(float(f) for f in ablation.label_fractions),
        seeds=tuple(int(s) for s in ablation.seeds),
    )
    settings = EvalSettings.from_config(tasks_config, tuple(ablation.heads))
    models = [Model(name, wd) for name, wd in trained]
    reference = ablation.reference if ablation.reference in dict(trained) else trained[0][0]
    if ablation.get("random_init", True):
        models.append(Model("random_init", dict(trained)[reference], random_init=True))
    pretrain_s = time.perf_counter() - started
    metrics = evaluate(models, task, store, workdir / "eval", settings, labels=labels,
                       salt_file=salt_file, reference=reference)  # fmt: skip
    rows = table_rows(metrics)
    write_table(workdir, rows, metrics, failed, ablation)
    summary = {"pretrain_seconds": round(pretrain_s, 1),
               "total_seconds": round(time.perf_counter() - started, 1),
               "failed": failed, "rows": len(rows)}  # fmt: skip
    (workdir / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {"metrics": metrics, "table": rows, **summary}


TABLE_COLUMNS = ("model", "head", "label_fraction", "split", "n", "n_pos", "auroc", "auroc_lo",
                 "auroc_hi", "ece_uniform", "ece_uniform_lo", "ece_uniform_hi", "ece_quantile",
                 "brier", "brier_lo", "brier_hi", "fpr_at_sensitivity", "diff_vs_reference",
                 "p_value_vs_reference", "auroc_seed_mean", "auroc_seed_sd", "n_seeds")  # fmt: skip


def table_rows(metrics: dict) -> list[dict]:
    """One row per (model, head, fraction) on each split (first seed), plus the seed spread."""
    spread = {(a["model"], a["head"], a["label_fraction"], a["split"]): a["auroc"]
              for a in metrics["across_seeds"]}  # fmt: skip
    out = []
    for split in ordered_splits({r["split"] for r in metrics["runs"]}):
        for r in headline_runs(metrics, split):
            o = r["overall"]
            vs = r.get("vs_reference") or {}
            sd = spread.get((r["model"], r["head"], r["label_fraction"], split), {})
            row = {"model": r["model"], "head": r["head"], "label_fraction": r["label_fraction"],
                   "split": split, "n": o.get("n"), "n_pos": o.get("n_pos")}  # fmt: skip
            for m in ("auroc", "ece_uniform", "brier"):
                d = o.get(m) if isinstance(o.get(m), dict) else {}
                row[m], row[f"{m}_lo"], row[f"{m}_hi"] = d.get("value"), d.get("lo"), d.get("hi")
            row["ece_quantile"] = value(o, "ece_quantile")
            row["fpr_at_sensitivity"] = value(o, "fpr_at_sensitivity")
            row["diff_vs_reference"] = vs.get("diff")
            row["p_value_vs_reference"] = vs.get("p_value")
            row["auroc_seed_mean"], row["auroc_seed_sd"] = sd.get("mean"), sd.get("sd")
            row["n_seeds"] = sd.get("n")
            row["_run"] = r
            out.append(row)
    return out


def write_table(workdir: Path, rows: list[dict], metrics: dict, failed, ablation) -> None:
    with (workdir / "table.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in TABLE_COLUMNS})
    L = [f"# Ablation table: task {metrics['task']}", "",
         f"Reference: **{metrics['reference']}**; {int(ablation.steps)} pretraining steps per row; "
         "linear probe unless the head says otherwise. AUROC with DeLong 95% CI; ECE (15 "
         "equal-width bins) and Brier with patient-level bootstrap CIs; Δ and p: paired DeLong "
         "against the reference on the same cases (first seed); last column: AUROC mean ± sd "
         "over label-subset seeds.", ""]  # fmt: skip
    for split in dict.fromkeys(r["split"] for r in rows):
        sel = [r for r in rows if r["split"] == split]
        if not sel:
            continue
        L += [f"## {split} split", "",
              "| model | head | labels | n (pos) | AUROC [95% CI] | ECE-15 [CI] | Brier [CI] | "
              "Δ AUROC | p | AUROC over seeds |",
              "| --- | --- | ---: | ---: | --- | --- | --- | ---: | ---: | --- |"]  # fmt: skip
        for r in sorted(sel, key=lambda r: (r["label_fraction"], r["head"])):
            run = r["_run"]["overall"]
            diff = (
                "ref"
                if r["model"] == metrics["reference"]
                else ("n/a" if r["diff_vs_reference"] is None else f"{r['diff_vs_reference']:+.3f}")
            )
            p = "" if r["model"] == metrics["reference"] else fmt_p(r["p_value_vs_reference"])
            seeds = (
                ""
                if r["auroc_seed_mean"] is None or (r["n_seeds"] or 0) < 2
                else f"{r['auroc_seed_mean']:.3f} ± {r['auroc_seed_sd']:.3f} ({r['n_seeds']})"
            )
            L.append(f"| {r['model']} | {r['head']} | {r['label_fraction']:.0%} | {r['n']} "
                     f"({r['n_pos']}) | {fmt_ci(run, 'auroc')} | {fmt_ci(run, 'ece_uniform')} | "
                     f"{fmt_ci(run, 'brier')} | {diff} | {p} | {seeds} |")  # fmt: skip
        L.append("")
    if failed:
        L += ["Rows not in the table (failed or not trained):", ""]
        L += [f"- {name}: {reason}" for name, reason in failed]
        L.append("")
    L += ["Full report: `eval/report.md`; every number: `eval/metrics.json`, recomputable from "
          "`eval/predictions.csv`.", ""]  # fmt: skip
    (workdir / "table.md").write_text("\n".join(L))
