"""Ablation sweeps: pretrain a list of configs, evaluate them together, write one table.

An ablation file (configs/ablations/NAME.py) returns a ConfigDict:

  task            task name in the tasks config (configs/tasks.py)
  label_fractions, seeds, heads    evaluation settings (override the task's; `seeds` are the
                  label-subset seeds)
  reference       the row the others are compared with
  random_init     also evaluate a random init of the reference's architecture
  steps           pretraining steps of every row (total_steps)
  pretrain_seeds  pretraining seeds of every row (default (0,)): the training config's `seed`
  overrides       config overrides applied to every row ("KEY=VALUE" strings)
  rows            (name, config, overrides) dicts: config is "configs/NAME.py[:VARIANT]"; a row
                  may name its own `reference` (a ResNet group compared with a ResNet row)
  primary         optional dict(split, head, label_fraction, row, versus, metric): the
                  registered primary metric, row minus versus, with its decision rule applied
                  (comparison.json "primary", the first line of table.md)
  finetune        optional dict(rows=..., label_fractions=...): fine-tuning heads for those rows
                  (and "random_init") in a second evaluation, WORKDIR/eval_finetune/, with
                  comparison_finetune.json and table_finetune.{md,csv}
  transfer        optional dict(checkpoint, config, overrides): the row `transfer`, an encoder
                  loaded from published weights (a local timm-layout or big_vision file, see
                  pgjax/train/init_from.py) and probed without pretraining, compared with the
                  reference. config: "configs/NAME.py[:VARIANT]" for its architecture, default
                  the reference row's config and overrides. Without a checkpoint the row is
                  skipped, and the reason is listed in sweep.json ("skipped"), comparison.json
                  and under the table.

Each row pretrains once per pretraining seed k into WORKDIR/<name>/seed<k> (with the default
pretrain_seeds=(0,): WORKDIR/<name>, as before seeds existed), resuming from its checkpoint; a
finished instance is not retrained, and one whose training fails is reported while the sweep
goes on without it. The evaluated models are named <name>@<k> (<name> alone with the default
seeds); `random_init@k` is the reference's architecture with init seed k. All instances are
evaluated in one `evaluate` call into WORKDIR/eval.

WORKDIR/comparison.json holds, per split found in predictions.csv, head and label fraction,
each row's mean AUROC over its instances and their spread, and its difference to its reference
by a hierarchical bootstrap over pretraining seeds x patients (pgjax/eval/hierarchical.py).
Rows of another image-encoder architecture or width than their reference are not compared (the
table says so), nor are rows whose every instance fails the gate (internal test AUROC interval
not above 0.5). Models the evaluation adds itself (reference rows such as `oracle`) are listed
as single instances without a difference. WORKDIR/table.md and table.csv: with one pretraining
seed, every run's AUROC, ECE and Brier with intervals and the paired DeLong difference to the
reference (first label seed); with several, one line per row from comparison.json.
"""

from __future__ import annotations

import csv
import json
import time
import traceback
from pathlib import Path

from pgjax.eval.hierarchical import (
    compare_rows,
    gather_row,
    instance_name,
    row_instances,
    row_summary,
    split_model_name,
)
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


def pretrain_seeds(ablation) -> tuple[int, ...]:
    """The ablation's `pretrain_seeds`, checked: distinct non-negative integers, at least one."""
    raw = ablation.get("pretrain_seeds", (0,))
    try:
        seeds = tuple(int(s) for s in raw)
        ok = all(float(s) == int(s) for s in raw)
    except (TypeError, ValueError):
        seeds, ok = (), False
    if not ok or not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(
            f"ablation field pretrain_seeds: expected distinct non-negative integers, got {raw!r}"
        )
    return seeds


def instance_workdir(workdir: Path, row: str, seed: int, seeds: tuple[int, ...]) -> Path:
    return workdir / row if seeds == (0,) else workdir / row / f"seed{seed}"


def pretrain_rows(
    ablation, store: str, workdir: Path, log=print, *, eval_only: bool = False
) -> tuple[list, list]:
    """Train every row once per pretraining seed; returns ([(model name, workdir)], [(model
    name, reason)] of failed instances). With eval_only, nothing is trained: instances without
    a finished checkpoint are reported as such."""
    from pgjax.train.config_lib import load_config
    from pgjax.train.train import train

    seeds = pretrain_seeds(ablation)
    done, failed = [], []
    for row in ablation.rows:
        for k in seeds:
            name = instance_name(row["name"], k, seeds)
            wd = instance_workdir(workdir, row["name"], k, seeds)
            overrides = [f"input.store={store}", f"total_steps={int(ablation.steps)}",
                         *ablation.get("overrides", ()), *row.get("overrides", ())]  # fmt: skip
            if seeds != (0,):  # (0,) leaves the config's own seed, as before seeds existed
                overrides.append(f"seed={k}")
            try:
                config = load_config(resolve_config_path(row["config"]), overrides)
                if finished_step(wd) == config.total_steps:
                    log(f"[sweep] {name}: already trained ({config.total_steps} steps)")
                elif eval_only:
                    failed.append((name, f"not trained to {config.total_steps} steps "
                                         "(--eval-only)"))  # fmt: skip
                    continue
                else:
                    t0 = time.perf_counter()
                    log(f"[sweep] {name}: pretraining {row['config']} for "
                        f"{config.total_steps} steps")  # fmt: skip
                    train(config, wd)
                    log(f"[sweep] {name}: {time.perf_counter() - t0:.0f} s")
                done.append((name, wd))
            except Exception as e:  # one failed instance must not stop the sweep
                reason = f"{type(e).__name__}: {e}"
                log(f"[sweep] {name}: FAILED, {reason}")
                wd.parent.mkdir(parents=True, exist_ok=True)
                (wd.parent / f"{wd.name}.error.txt").write_text(traceback.format_exc())
                failed.append((name, reason))
    return done, failed


TRANSFER = "transfer"


def transfer_row(ablation, store: str, workdir: Path, ref_row: str, log=print):
    """The ablation's `transfer` row: ((Model, rows_info entry) or None, failed, skipped), the
    last two [(name, reason)]: failed when its checkpoint does not load into its encoder,
    skipped when no checkpoint is given; all empty without a `transfer` field.

    WORKDIR/transfer/config.json is the config the row is evaluated with (its `init` block
    names the checkpoint); nothing is trained. The load is tried here, so that a checkpoint
    that does not fit is reported while the sweep goes on.
    """
    from pgjax.eval.embed import Embedder, Model
    from pgjax.train.config_lib import load_config

    spec = ablation.get("transfer")
    if not spec:
        return None, [], []
    spec = dict(spec)
    unknown = sorted(set(spec) - {"checkpoint", "config", "overrides"})
    if unknown:
        raise ValueError(f"ablation field transfer: unknown keys {unknown} (known: checkpoint, "
                         "config, overrides)")  # fmt: skip
    if not spec.get("checkpoint"):
        reason = "skipped: no checkpoint given (ablation field transfer.checkpoint)"
        log(f"[sweep] {TRANSFER}: {reason}")
        return None, [], [(TRANSFER, reason)]
    ref = next(r for r in ablation.rows if r["name"] == ref_row)
    config_spec = spec.get("config") or ref["config"]
    own = tuple(spec.get("overrides") or ()) if spec.get("config") else tuple(
        ref.get("overrides", ())
    )  # fmt: skip
    checkpoint = Path(str(spec["checkpoint"]))
    wd = workdir / TRANSFER
    try:
        config = load_config(resolve_config_path(config_spec),
                             [f"input.store={store}", *ablation.get("overrides", ()), *own,
                              f"init.from={checkpoint.resolve()}"])  # fmt: skip
        wd.mkdir(parents=True, exist_ok=True)
        (wd / "config.json").write_text(config.to_json_best_effort(indent=1) + "\n")
        model = Model(TRANSFER, wd, transfer=True)
        record = Embedder(model, store).init_record
        (wd / "init_from.json").write_text(json.dumps(record, indent=1) + "\n")
    except Exception as e:  # a checkpoint that does not fit must not stop the sweep
        reason = f"{type(e).__name__}: {e}"
        log(f"[sweep] {TRANSFER}: FAILED, {reason}")
        wd.mkdir(parents=True, exist_ok=True)
        (wd.parent / f"{wd.name}.error.txt").write_text(traceback.format_exc())
        return None, [(TRANSFER, reason)], []
    from pgjax.train.init_from import summary

    log(f"[sweep] {TRANSFER}: {summary(record)}")
    what = f"(transfer: {checkpoint.name} into {config_spec}, no pretraining)"
    info = {"reference": ref_row, "image_encoder": image_encoder_of(config), "config": what}
    return (model, info), [], []


def image_encoder_of(config) -> dict:
    """{"key": what must match for two rows to be compared, "label": name and width}."""
    from pgjax.models import build_image_encoder

    name = str(config.model.image_encoder)
    kw = dict(config.model.get("image_encoder_kw") or {})
    try:
        width = getattr(build_image_encoder(name, **kw), "width", None)
    except Exception:  # an unbuildable name: compare on the name and keywords alone
        width = None
    key = json.dumps({"name": name, "width": width, "kw": kw}, sort_keys=True, default=str)
    return {"key": key, "label": name if width is None else f"{name} (width {width})"}


def check_references(ablation) -> None:
    """The ablation's `reference` and every row's own `reference` name a row of the list."""
    names = [r["name"] for r in ablation.rows]
    if ablation.get("transfer") and TRANSFER in names:
        raise ValueError(f"ablation field rows: {TRANSFER!r} is the transfer row's name; rename "
                         "the row")  # fmt: skip
    wanted = [("reference", ablation.reference)]
    wanted += [(f"rows[{i}].reference", r["reference"])
               for i, r in enumerate(ablation.rows) if "reference" in r]  # fmt: skip
    for field, ref in wanted:
        if ref not in names:
            raise ValueError(f"ablation field {field}: {ref!r} is not a row name ({names})")
    # Checked before anything trains: the fine-tuning pass runs last.
    extra = ["random_init", *([TRANSFER] if ablation.get("transfer") else [])]
    for name in (ablation.get("finetune") or {}).get("rows", ()):
        if name not in [*names, *extra]:
            raise ValueError(f"ablation field finetune.rows: {name!r} is not a row name "
                             f"({names} or {extra})")  # fmt: skip


def run_sweep(ablation, store: str, workdir: str | Path, tasks_config, *, labels=None,
              salt_file=None, log=print, eval_only: bool = False) -> dict:  # fmt: skip
    import dataclasses

    from pgjax.eval.embed import Model, load_workdir_config
    from pgjax.eval.evaluate import EvalSettings, evaluate
    from pgjax.eval.tasks import task_from_config

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = pretrain_seeds(ablation)
    check_references(ablation)
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
    by_row: dict[str, list[Path]] = {}
    for row in ablation.rows:
        for k in seeds:
            wd = dict(trained).get(instance_name(row["name"], k, seeds))
            if wd is not None:
                by_row.setdefault(row["name"], []).append(wd)
    ref_row = ablation.reference if ablation.reference in by_row else next(iter(by_row))
    reference = next(n for n, wd in trained if wd in by_row[ref_row])
    rows_info = {}
    for row in ablation.rows:
        if row["name"] in by_row:
            rows_info[row["name"]] = {
                "reference": row.get("reference", ablation.reference),
                "image_encoder": image_encoder_of(load_workdir_config(by_row[row["name"]][0])),
                "config": row["config"],
            }
    transfer, transfer_failed, skipped = transfer_row(ablation, store, workdir, ref_row, log)
    failed = [*failed, *transfer_failed]  # a checkpoint that does not load: like a failed row
    if transfer is not None:
        models.append(transfer[0])
        rows_info[TRANSFER] = transfer[1]
    if ablation.get("random_init", True):
        # Any trained instance of the reference serves: only its config (architecture) is read.
        for k in seeds:
            models.append(Model(instance_name("random_init", k, seeds), by_row[ref_row][0],
                                random_init=True, init_seed=k))  # fmt: skip
        rows_info["random_init"] = {
            "reference": ref_row, "config": "(random init)",
            "image_encoder": rows_info[ref_row]["image_encoder"],
        }  # fmt: skip
    pretrain_s = time.perf_counter() - started
    metrics = finished_evaluation(workdir / "eval", models, task, store, settings, log)
    if metrics is None:
        metrics = evaluate(models, task, store, workdir / "eval", settings, labels=labels,
                           salt_file=salt_file, reference=reference)  # fmt: skip
    from pgjax.eval.report import read_predictions

    predictions = read_predictions(workdir / "eval" / "predictions.csv")
    # Named relative to the workdir: reasons land in comparison.json, and a path can name a
    # person or a site.
    comparison = compare_sweep(predictions, rows_info, [*failed, *skipped], n_boot=settings.n_boot,
                               source="eval/predictions.csv")  # fmt: skip
    comparison.update(task=metrics["task"], pretrain_seeds=list(seeds),
                      steps=int(ablation.steps), skipped=[list(x) for x in skipped])  # fmt: skip
    if ablation.get("primary"):
        comparison["primary"] = primary_result(comparison, ablation.primary)
    (workdir / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
    if seeds == (0,):
        # The single-seed table's Δ is the evaluation's paired DeLong against the reference: not
        # shown for rows of another image encoder than the reference (comparison.json says why).
        ref_arch = rows_info[ref_row]["image_encoder"]
        other = {name: f"{info['image_encoder']['label']} vs {ref_arch['label']}"
                 for name, info in rows_info.items()
                 if info["image_encoder"]["key"] != ref_arch["key"]}  # fmt: skip
        rows = table_rows(metrics, other)
        write_table(workdir, rows, metrics, [*failed, *skipped], ablation, other)
    else:
        rows = comparison["results"]
        write_seed_table(workdir, comparison, ablation)
    if ablation.get("finetune"):
        finetune_pass(ablation, models, task, settings, store, workdir, rows_info, failed,
                      seeds, labels=labels, salt_file=salt_file, reference=reference)  # fmt: skip
    summary = {"pretrain_seconds": round(pretrain_s, 1),
               "total_seconds": round(time.perf_counter() - started, 1),
               "failed": failed, "skipped": skipped, "rows": len(rows)}  # fmt: skip
    (workdir / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {"metrics": metrics, "table": rows, "comparison": comparison, **summary}


def finished_evaluation(out: Path, models, task, store, settings, log=print) -> dict | None:
    """The metrics of an evaluation already written to `out` for exactly these models, task,
    store and settings, with no checkpoint newer than it; else None. A resumed sweep (or
    `--eval-only` after a stop in the fine-tuning pass) then does not redo it."""
    import dataclasses

    metrics_file, context_file = out / "metrics.json", out / "context.json"
    if not (metrics_file.is_file() and context_file.is_file()):
        return None
    context = json.loads(context_file.read_text())

    def canon(x):
        return json.loads(json.dumps(x, default=str))

    wanted = [{"name": m.name, "workdir": str(m.workdir), "random_init": m.random_init}
              for m in models]  # fmt: skip
    have = [{k: m.get(k) for k in ("name", "workdir", "random_init")}
            for m in context.get("models", [])]  # fmt: skip
    same = (have == wanted and context.get("store") == str(store)
            and canon(context.get("task")) == canon(dataclasses.asdict(task))
            and canon(context.get("settings")) == canon(dataclasses.asdict(settings)))  # fmt: skip
    written = metrics_file.stat().st_mtime
    # A transfer row's workdir is rewritten (init_from.json) each time its file is loaded, so
    # such a row is evaluated again whenever the sweep reloads it.
    read = {m.name: (Path(m.workdir).glob("*") if getattr(m, "transfer", False)
                     else [] if m.random_init else (Path(m.workdir) / "checkpoints").glob("*"))
            for m in models}  # fmt: skip
    newer = [name for name, paths in read.items()
             if any(p.stat().st_mtime > written for p in paths)]
    newer += [name for name in ("manifest.json", "vocab.json")  # a rebuilt store
              if (Path(store) / name).is_file() and (Path(store) / name).stat().st_mtime > written]
    if not same or newer:
        return None
    log(f"[sweep] {out.name}: already evaluated for these models and settings "
        f"({metrics_file.name} kept; delete it to evaluate again)")
    return json.loads(metrics_file.read_text())


def finetune_pass(ablation, models, task, settings, store, workdir: Path, rows_info, failed,
                  seeds, *, labels=None, salt_file=None, reference=None) -> dict:
    """Fine-tuning heads beside the linear probes, for the rows and label fractions the
    ablation's `finetune` names (every run trains an encoder, so it is kept to those):
    WORKDIR/eval_finetune/, comparison_finetune.json and table_finetune.{md,csv}."""
    import dataclasses

    from pgjax.eval.evaluate import evaluate
    from pgjax.eval.report import read_predictions

    ft = ablation.finetune
    wanted = set(ft["rows"])
    unknown = sorted(wanted - set(rows_info))
    if unknown:
        raise ValueError(f"ablation field finetune.rows: {unknown} are not trained rows of the "
                         f"sweep ({sorted(rows_info)})")  # fmt: skip
    chosen = [m for m in models if split_model_name(m.name)[0] in wanted]
    task = dataclasses.replace(task, label_fractions=tuple(float(f) for f in ft["label_fractions"]))
    # The reference rows are features, not encoders: nothing of theirs can be fine-tuned.
    settings = dataclasses.replace(settings, heads=("finetune",), references=())
    ref = reference if any(m.name == reference for m in chosen) else chosen[0].name
    if finished_evaluation(workdir / "eval_finetune", chosen, task, store, settings) is None:
        evaluate(chosen, task, store, workdir / "eval_finetune", settings, labels=labels,
                 salt_file=salt_file, reference=ref)  # fmt: skip
    predictions = read_predictions(workdir / "eval_finetune" / "predictions.csv")
    comparison = compare_sweep(predictions, {k: v for k, v in rows_info.items() if k in wanted},
                               failed, n_boot=settings.n_boot,
                               source="eval_finetune/predictions.csv")  # fmt: skip
    comparison.update(task=task.name, pretrain_seeds=list(seeds), steps=int(ablation.steps))
    (workdir / "comparison_finetune.json").write_text(json.dumps(comparison, indent=1) + "\n")
    write_seed_table(workdir, comparison, ablation, stem="table_finetune")
    return comparison


# ------------------------------------------------------------------- multi-seed comparison


def _gate(models, test: dict) -> list[str]:
    """The models that fail the gate (pgjax.eval.report.GATE_RULE, the rule metrics.json
    applies): their internal `test` AUROC 95% DeLong interval (first label seed) does not lie
    above 0.5, so they are not informative whatever their other splits say. `test`:
    predictions columns of the test split, one head and label fraction."""
    from pgjax.eval import metrics as M
    from pgjax.eval.report import gate_status

    out = []
    for model in models:
        sel = test["model"] == model
        if not sel.any():
            continue
        first = sel & (test["seed"] == test["seed"][sel].min())
        try:
            ci = M.delong_ci(test["label"][first], test["prob"][first])
            lo, hi = ci.lo, ci.hi
        except ValueError:  # one class in the test split: no interval, so no evidence either
            lo = hi = None
        if gate_status(lo, hi)[0] != "informative":
            out.append(model)
    return out


def compare_sweep(p: dict, rows_info: dict, failed=(), *, n_boot: int = 1000,
                  alpha: float = 0.05, source: str = "predictions") -> dict:  # fmt: skip
    """Per split x head x label fraction: each row's instances summarised, and each sweep row's
    difference to its reference (hierarchical bootstrap). rows_info: {row: {"reference",
    "image_encoder": {"key", "label"}, "config"}} for the sweep's own rows; any other model in
    the predictions is a reference row (one instance, no difference)."""
    instances = row_instances(p)
    failed_by_row: dict[str, list] = {}
    for name, reason in failed:
        failed_by_row.setdefault(split_model_name(name)[0], []).append(
            {"model": name, "reason": reason}
        )
    rows = []
    for row, inst in instances.items():
        info = rows_info.get(row)
        rows.append({
            "row": row, "kind": "sweep" if info else "reference",
            "models": [m for _, m in inst], "failed": failed_by_row.get(row, []),
            "reference": info["reference"] if info else None,
            "image_encoder": info["image_encoder"]["label"] if info else None,
            "config": info["config"] if info else None,
        })  # fmt: skip
    for row in failed_by_row:
        if row not in instances:
            rows.append({"row": row, "kind": "sweep", "models": [],
                         "failed": failed_by_row[row], "reference": None,
                         "image_encoder": None, "config": None})  # fmt: skip
    keys = sorted({(str(h), float(f)) for h, f in zip(p["head"], p["label_fraction"],
                                                       strict=True)})  # fmt: skip
    gates = {}
    for head, fraction in keys:
        here = (p["split"] == "test") & (p["head"] == head) & (p["label_fraction"] == fraction)
        test = {k: v[here] for k, v in p.items()}
        gates[head, fraction] = {row: _gate([m for _, m in inst], test)
                                 for row, inst in instances.items()}  # fmt: skip
    results = []
    for split in ordered_splits(p["split"].tolist()):
        for head, fraction in keys:
            # One selection per (split, head, fraction): the lookups below then scan its rows
            # only (a benchmark's predictions.csv holds millions).
            here = (p["split"] == split) & (p["head"] == head) & (p["label_fraction"] == fraction)
            sub = {k: v[here] for k, v in p.items()}
            datas, gate = {}, gates[head, fraction]
            for row in instances:
                try:
                    datas[row] = gather_row(sub, row, split=split, head=head,
                                            label_fraction=fraction, source=source)  # fmt: skip
                except ValueError as e:
                    if "no predictions" not in str(e):
                        raise
                    continue  # no run of this row here (e.g. an image-only head mismatch)
            for row, data in datas.items():
                out = {"row": row, "head": head, "label_fraction": fraction, "split": split,
                       **row_summary(data), "not_informative": gate[row],
                       "reference": None, "comparison": None, "not_compared": None}  # fmt: skip
                info = rows_info.get(row)
                if info is not None:
                    ref = info["reference"]
                    out["reference"] = ref
                    if row != ref:
                        out["not_compared"] = _why_not(row, ref, datas, gate, rows_info)
                    if row != ref and out["not_compared"] is None:
                        try:
                            out["comparison"] = compare_rows(
                                sub, row, ref, split=split, head=head, label_fraction=fraction,
                                n_boot=n_boot, alpha=alpha, source=source,
                            )  # fmt: skip
                        except ValueError as e:  # e.g. a split with one class: say why
                            out["not_compared"] = str(e)
                results.append(out)
    return {"method": METHOD, "n_boot": int(n_boot), "alpha": alpha, "rows": rows,
            "results": results}  # fmt: skip


METHOD = ("difference to the reference row: mean over pretraining-seed instances of the "
          "metric (each instance averaged over its label-subset seeds), row minus reference; "
          "percentile interval, SE and two-sided p from a two-level bootstrap resampling "
          "pretraining seeds (paired by seed when both rows have the same seeds) and patients "
          "(shared by both rows)")  # fmt: skip


def _why_not(row, ref, datas, gates, rows_info) -> str | None:
    if ref not in rows_info:
        return f"reference row {ref!r} was not trained"
    if ref not in datas:
        return f"reference row {ref!r} has no run here"
    mine, theirs = rows_info[row]["image_encoder"], rows_info[ref]["image_encoder"]
    if mine["key"] != theirs["key"]:
        return (f"different image encoder: {mine['label']} vs {theirs['label']} "
                f"({ref}); compare within an architecture")  # fmt: skip
    for name in (row, ref):
        if len(gates[name]) == len(datas[name].models):
            return f"{name} is not informative (internal test AUROC interval not above 0.5)"
    return None


TABLE_COLUMNS = ("model", "head", "label_fraction", "split", "n", "n_pos", "auroc", "auroc_lo",
                 "auroc_hi", "ece_uniform", "ece_uniform_lo", "ece_uniform_hi", "ece_quantile",
                 "brier", "brier_lo", "brier_hi", "fpr_at_sensitivity", "diff_vs_reference",
                 "p_value_vs_reference", "auroc_seed_mean", "auroc_seed_sd", "n_seeds")  # fmt: skip


def table_rows(metrics: dict, not_comparable: dict | None = None) -> list[dict]:
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
            comparable = r["model"] not in (not_comparable or {})
            row["diff_vs_reference"] = vs.get("diff") if comparable else None
            row["p_value_vs_reference"] = vs.get("p_value") if comparable else None
            row["auroc_seed_mean"], row["auroc_seed_sd"] = sd.get("mean"), sd.get("sd")
            row["n_seeds"] = sd.get("n")
            row["_run"] = r
            out.append(row)
    return out


def write_table(workdir: Path, rows: list[dict], metrics: dict, failed, ablation,
                not_comparable: dict | None = None) -> None:  # fmt: skip
    not_comparable = not_comparable or {}
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
    for split in ordered_splits(r["split"] for r in rows):
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
                else "not compared*"
                if r["model"] in not_comparable
                else ("n/a" if r["diff_vs_reference"] is None else f"{r['diff_vs_reference']:+.3f}")
            )
            p = (
                ""
                if r["model"] == metrics["reference"] or r["model"] in not_comparable
                else fmt_p(r["p_value_vs_reference"])
            )
            seeds = (
                ""
                if r["auroc_seed_mean"] is None or (r["n_seeds"] or 0) < 2
                else f"{r['auroc_seed_mean']:.3f} ± {r['auroc_seed_sd']:.3f} ({r['n_seeds']})"
            )
            L.append(f"| {r['model']} | {r['head']} | {r['label_fraction']:.0%} | {r['n']} "
                     f"({r['n_pos']}) | {fmt_ci(run, 'auroc')} | {fmt_ci(run, 'ece_uniform')} | "
                     f"{fmt_ci(run, 'brier')} | {diff} | {p} | {seeds} |")  # fmt: skip
        L.append("")
    if not_comparable:
        L += ["\\* Not compared with the reference: another image encoder ("
              + "; ".join(f"{k}: {v}" for k, v in not_comparable.items())
              + "). Compare within an architecture.", ""]  # fmt: skip
    if failed:
        L += ["Rows not in the table (failed, skipped or not trained):", ""]
        L += [f"- {name}: {reason}" for name, reason in failed]
        L.append("")
    L += ["Full report: `eval/report.md`; every number: `eval/metrics.json`, recomputable from "
          "`eval/predictions.csv`.", ""]  # fmt: skip
    (workdir / "table.md").write_text("\n".join(L))


SEED_TABLE_COLUMNS = ("row", "head", "label_fraction", "split", "n", "n_pos", "n_instances",
                      "auroc_mean", "auroc_seed_sd", "reference", "diff_auroc", "diff_auroc_lo",
                      "diff_auroc_hi", "diff_auroc_se", "p_auroc", "diff_ece", "diff_ece_lo",
                      "diff_ece_hi", "p_ece", "not_informative", "note")  # fmt: skip


def seed_table_rows(comparison: dict) -> list[dict]:
    out = []
    for r in comparison["results"]:
        c = r["comparison"] or {}
        a, e = c.get("auroc") or {}, c.get("ece_uniform") or {}
        out.append({
            "row": r["row"], "head": r["head"], "label_fraction": r["label_fraction"],
            "split": r["split"], "n": r["n"], "n_pos": r["n_pos"],
            "n_instances": r["n_instances"], "auroc_mean": r["auroc_mean"],
            "auroc_seed_sd": r["auroc_seed_sd"], "reference": r["reference"],
            "diff_auroc": a.get("diff"), "diff_auroc_lo": a.get("lo"),
            "diff_auroc_hi": a.get("hi"), "diff_auroc_se": a.get("se"), "p_auroc": a.get("p_value"),
            "diff_ece": e.get("diff"), "diff_ece_lo": e.get("lo"), "diff_ece_hi": e.get("hi"),
            "p_ece": e.get("p_value"), "not_informative": " ".join(r["not_informative"]),
            "note": r["not_compared"] or "",
        })  # fmt: skip
    return out


def _fmt_diff(d, key, lo, hi) -> str:
    if d.get(key) is None:
        return ""
    return f"{d[key]:+.3f} [{d[lo]:+.3f}, {d[hi]:+.3f}]"


def primary_result(comparison: dict, primary) -> dict:
    """The registered primary metric, read from a comparison: `primary` names split, head,
    label_fraction, row, versus and metric (an ablation's `primary`), and the registered
    decision rule is applied to row minus versus: better if its interval lies above 0, worse if
    below, otherwise no difference detected at this power."""
    want = dict(primary)
    row, versus, metric = want["row"], want["versus"], want["metric"]
    reasons = []
    for r in comparison["results"]:
        if (r["split"], r["head"], r["label_fraction"]) != (
            want["split"], want["head"], float(want["label_fraction"])
        ):
            continue
        # A difference is stored on the compared row against its reference: either way round.
        if (r["row"], r["reference"]) == (row, versus):
            sign = 1.0
        elif (r["row"], r["reference"]) == (versus, row):
            sign = -1.0
        else:
            continue
        c = (r["comparison"] or {}).get(metric)
        if c is None:
            reasons.append(r["not_compared"] or "no comparison")
            continue
        lo, hi = sorted((sign * c["lo"], sign * c["hi"]))
        verdict = ("better" if lo > 0 else "worse" if hi < 0 else "no difference detected")
        return {**want, "diff": sign * c["diff"], "lo": lo, "hi": hi, "p_value": c["p_value"],
                "verdict": verdict}  # fmt: skip
    return {**want, "diff": None, "verdict": "not computed",
            "reason": "; ".join(reasons) or "no such comparison"}  # fmt: skip


def primary_lines(p: dict) -> list[str]:
    what = (f"{p['metric']} of {p['row']} minus {p['versus']} on {p['split']}, {p['head']} "
            f"head, {float(p['label_fraction']):.0%} labels")  # fmt: skip
    if p["diff"] is None:
        return [f"**Primary metric (registered)**: {what}: not computed ({p['reason']}).", ""]
    return [f"**Primary metric (registered)**: {what}: {p['diff']:+.3f} [{p['lo']:+.3f}, "
            f"{p['hi']:+.3f}], p {fmt_p(p['p_value'])}: **{p['verdict']}** (decision rule: "
            "better if the interval lies above 0, worse if below).", ""]  # fmt: skip


def write_seed_table(workdir: Path, comparison: dict, ablation, stem: str = "table") -> None:
    """STEM.csv and STEM.md of a multi-seed sweep: one line per row, split, head, fraction."""
    rows = seed_table_rows(comparison)
    with (workdir / f"{stem}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SEED_TABLE_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in SEED_TABLE_COLUMNS})
    seeds = comparison["pretrain_seeds"]
    L = [f"# Ablation table: task {comparison['task']}", "",
         f"Each row pretrained with seeds {', '.join(map(str, seeds))} for {int(ablation.steps)} "
         "steps; linear probe unless the head says otherwise. AUROC: mean ± sd over a row's "
         "pretraining-seed instances (each averaged over its label-subset seeds). Δ: row minus "
         f"its reference, with a 95% interval and p from a bootstrap ({comparison['n_boot']} "
         "resamples) over pretraining seeds and patients, so seed-to-seed spread counts as "
         "uncertainty (a DeLong test on one seed treats the encoder as fixed). Rows with "
         "another image encoder than their reference are not compared; instances whose "
         "internal-test AUROC interval does not lie above 0.5 are marked not informative, and "
         "a row "
         "whose every instance is, is not compared. Reference rows added by the evaluation "
         "(one instance, no @seed) have no Δ.", ""]  # fmt: skip
    if comparison.get("primary"):
        L += primary_lines(comparison["primary"])
    arch = {r["row"]: r["image_encoder"] for r in comparison["rows"] if r["image_encoder"]}
    if len(set(arch.values())) > 1:
        L += ["Image encoders: " + "; ".join(f"{k}: {v}" for k, v in arch.items()), ""]
    for split in ordered_splits(r["split"] for r in rows):
        L += [f"## {split} split", "",
              "| row | head | labels | n (pos) | instances | AUROC mean ± sd | vs | "
              "Δ AUROC [95% CI] | p | Δ ECE-15 [95% CI] | p (ECE) | note |",
              "| --- | --- | ---: | ---: | ---: | --- | --- | --- | ---: | --- | ---: | --- |",
              ]  # fmt: skip
        sel = [r for r in rows if r["split"] == split]
        for r in sorted(sel, key=lambda r: (r["label_fraction"], r["head"])):
            if r["auroc_mean"] is None:
                auc = "n/a"
            elif r["auroc_seed_sd"] is None:
                auc = f"{r['auroc_mean']:.3f}"
            else:
                auc = f"{r['auroc_mean']:.3f} ± {r['auroc_seed_sd']:.3f}"
            vs = "" if r["reference"] is None else ("ref" if r["row"] == r["reference"]
                                                     else r["reference"])  # fmt: skip
            note = r["note"]
            if r["not_informative"]:
                note = "; ".join(x for x in (f"not informative: {r['not_informative']}", note)
                                 if x)  # fmt: skip
            has = r["diff_auroc"] is not None
            L.append(
                f"| {r['row']} | {r['head']} | {r['label_fraction']:.0%} | {r['n']} "
                f"({r['n_pos']}) | {r['n_instances']} | {auc} | {vs} | "
                f"{_fmt_diff(r, 'diff_auroc', 'diff_auroc_lo', 'diff_auroc_hi')} | "
                f"{fmt_p(r['p_auroc']) if has else ''} | "
                f"{_fmt_diff(r, 'diff_ece', 'diff_ece_lo', 'diff_ece_hi')} | "
                f"{fmt_p(r['p_ece']) if r['diff_ece'] is not None else ''} | {note} |"
            )
        L.append("")
    missing = [(f["model"], f["reason"]) for row in comparison["rows"] for f in row["failed"]]
    if missing:
        L += ["Instances not in the table (failed, skipped or not trained); their rows are "
              "summarised over the instances that remain:", ""]  # fmt: skip
        L += [f"- {name}: {reason}" for name, reason in missing]
        L.append("")
    suffix = stem.removeprefix("table")  # "_finetune": that pass's own files
    L += [f"Every number: `comparison{suffix}.json`; per instance: `eval{suffix}/report.md` and "
          f"`eval{suffix}/metrics.json`, all recomputable from `eval{suffix}/predictions.csv`.",
          ""]  # fmt: skip
    (workdir / f"{stem}.md").write_text("\n".join(L))
