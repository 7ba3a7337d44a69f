"""`pgjax demo`: the whole pipeline on an embedded default, CPU only, in minutes.

Synthesize a multi-site corpus (the last site is the external one; mostly chest radiographs, the
evaluation task), preprocess it into a store, audit the store for the corpus's identifiers,
pretrain Protocol Genome and the image-only baselines SimCLR and MAE in the CPU recipe
(configs/NAME.py:cpu: ResNet-mu encoders, MAE on ViT-mu/8; 64x64 images), evaluate
them with the reference rows (oracle, thumbnail, protocol-only, random init) on the internal test
split and the held-out site at two label fractions (linear probe, calibrated per protocol group
as `pgjax eval --calibrate protocol`, each test item scored for protocol novelty), write the model
card, export the Protocol Genome encoders with their calibrated probe to PyTorch (with the parity
check), and print where everything is, with each row's sanity gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

HELP = "run the pipeline end to end on a small synthetic corpus"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="pgjax-demo", help="where everything goes")
    p.add_argument("--studies", type=int, default=400, help="synthetic studies (400)")
    p.add_argument(
        "--mix",
        default="0.8,0.1,0.1,0",
        help="modality weights XR,CT,MR,US (the evaluation task is on radiographs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=60, help="pretraining steps per model")
    p.add_argument(
        "--baselines",
        default="simclr,mae",
        help="rows of configs/ablations/demo.py pretrained besides pg ('' for none)",
    )
    p.add_argument("--fractions", default="0.2,1.0", help="label fractions of the evaluation")
    p.add_argument("--seeds", default="0,1", help="label-subset seeds")


def run(args) -> int:
    from pgjax.commands.eval import load_tasks_config
    from pgjax.data.audit import audit_store, collect_identifiers
    from pgjax.data.config import PreprocessConfig
    from pgjax.data.preprocess import preprocess
    from pgjax.eval.card import write_card
    from pgjax.eval.embed import Model
    from pgjax.eval.evaluate import EvalSettings, evaluate
    from pgjax.eval.report import console_summary
    from pgjax.eval.sweep import pretrain_rows
    from pgjax.eval.tasks import task_from_config
    from pgjax.synth.corpus import write_corpus
    from pgjax.train.config_lib import load_config

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name, t0):
        timings[name] = time.perf_counter() - t0

    work = Path(args.workdir)
    corpus = work / "corpus"
    mix = tuple(float(v) for v in args.mix.split(","))
    t0 = time.perf_counter()
    print(f"[1/7] synthesizing {args.studies} studies into {corpus}")
    # The demo owns its workdir: a rerun starts afresh (overwrite replaces only a previous
    # synthetic corpus, and the demo's own model folders are cleared below).
    summary = write_corpus(
        corpus, studies=args.studies, seed=args.seed, workers=args.workers, overwrite=True,
        modality_mix=mix,
    )  # fmt: skip
    lap("synth", t0)
    external = summary["external_sites"]
    store = work / "store"
    print(f"[2/7] preprocessing into {store} (external site: {', '.join(external) or 'none'})")
    t0 = time.perf_counter()
    cfg = PreprocessConfig(
        image_size=(64, 64),  # the CPU recipe's size (configs/ablations/benchmark.py)
        volume_shape=(32, 64, 64),
        min_patients=3,
        # A quarter of the training sites' patients for the internal test: at 10% the demo's
        # test split held 6 radiograph studies, too few for any AUROC interval to exclude 0.5.
        split_fractions=(0.6, 0.15, 0.25),
        external_sites=tuple(external),
    )
    # The synthetic corpus's folders are site names (OUT/dicom/<site>/...), not patients: say
    # so explicitly, as a user would with --site-names, or the store would hold salted keys.
    site_names = {d.name: d.name for d in sorted((corpus / "dicom").iterdir()) if d.is_dir()}
    result = preprocess(
        [corpus / "dicom"], store, cfg=cfg, labels=corpus / "labels.csv",
        workers=args.workers, overwrite=True, site_names=site_names,
    )  # fmt: skip
    lap("preprocess", t0)
    print(f"[3/7] auditing {store} for the corpus's identifiers")
    t0 = time.perf_counter()
    report = audit_store(store, collect_identifiers([corpus / "dicom"]))
    audit_json = report.to_json()
    (work / "audit.json").write_text(json.dumps(audit_json, indent=1) + "\n")
    lap("audit", t0)

    ablation = load_config(f"{_configs_dir()}/ablations/demo.py", [f"steps={args.steps}"])
    wanted = ["pg", *[b for b in args.baselines.split(",") if b]]
    known = [r["name"] for r in ablation.rows]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"pgjax demo: unknown baselines {unknown}; known: {known}")
    ablation.rows = tuple(r for r in ablation.rows if r["name"] in wanted)
    models_dir = work / "models"
    print(f"[4/7] pretraining {', '.join(wanted)} (:cpu recipe) for {args.steps} steps each into "
          f"{models_dir}")  # fmt: skip
    t0 = time.perf_counter()
    shutil.rmtree(models_dir, ignore_errors=True)
    trained, failed = pretrain_rows(ablation, str(store), models_dir)
    lap("pretrain", t0)
    if "pg" not in dict(trained):
        print(f"pgjax demo: pretraining Protocol Genome failed: {failed}", file=sys.stderr)
        return 1

    tasks_config = load_tasks_config(None)
    task = task_from_config(tasks_config, ablation.task)
    task = dataclasses.replace(
        task, label_fractions=tuple(float(v) for v in args.fractions.split(",")),
        seeds=tuple(int(v) for v in args.seeds.split(",")),
    )  # fmt: skip
    eval_dir = work / "eval" / task.name
    print(f"[5/7] evaluating on task {task.name} (linear probe; label fractions "
          f"{', '.join(f'{f:.0%}' for f in task.label_fractions)}) into {eval_dir}")  # fmt: skip
    t0 = time.perf_counter()
    # The reference rows (random init of pg's architecture among them) come from the tasks
    # config's `references`.
    models = [Model(name, wd) for name, wd in trained]
    metrics = evaluate(models, task, str(store), eval_dir,
                       EvalSettings.from_config(tasks_config, ("linear",), calibrate="protocol"),
                       labels=corpus / "labels.csv", reference="pg")  # fmt: skip
    lap("eval", t0)
    print("[6/7] writing the model card")
    t0 = time.perf_counter()
    card = write_card(dict(trained)["pg"], eval_dirs=[eval_dir], audit=audit_json,
                      model_name="pg", out=work / "MODEL_CARD.md")  # fmt: skip
    lap("card", t0)
    print("[7/7] exporting Protocol Genome to PyTorch (parity-checked)")
    t0 = time.perf_counter()
    probe = (metrics.get("calibration") or {}).get("files", {}).get("pg/linear")
    exported = export_pg(dict(trained)["pg"], work / "export" / "pg",
                         eval_dir / probe if probe else None)  # fmt: skip
    lap("export", t0)

    counts = result["manifest"]["counts"]
    print()
    print(f"store:  {store}  ({counts['images_ok']} images, {counts['volumes_ok']} volumes)")
    print(f"splits: {json.dumps(_split_counts(store))}")
    weak = report.weak_hits_total
    print(f"audit:  {work / 'audit.json'}  ({report.hits_total - weak} identifier hits, {weak} "
          "weak: name parts or short values inside pixel arrays, accepted as by `pgjax audit "
          "--weak-ok`)")  # fmt: skip
    for _, wd in trained:
        curve = [json.loads(line)["loss"] for line in (wd / "metrics.jsonl").open()]
        print(f"train:  {wd}  (loss {curve[0]:.3f} at the first log, {curve[-1]:.3f} at the last)")
    for name, reason in failed:
        print(f"train:  {name} FAILED: {reason}")
    print(f"task {task.name}, linear probe; reference rows marked (ref):")
    for line in console_summary(metrics):
        print(line)
    print(f"report: {eval_dir / 'report.md'}")
    print(f"card:   {card}")
    print(f"export: {exported}")
    total = time.perf_counter() - started
    print("time:   " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f"; total {total:.0f} s")  # fmt: skip
    return 1 if report.strong_hits_total or failed or exported.startswith("FAILED") else 0


def export_pg(pg_workdir: Path, out: Path, calibration: Path | None = None) -> str:
    """`pgjax export` of the demo's Protocol Genome run (with its calibrated linear probe); a
    line for the summary."""
    from pgjax.export.exporter import export
    from pgjax.export.parity import ParityError
    from pgjax.export.source import ExportError

    if out.exists():
        shutil.rmtree(out)  # the demo owns its workdir (see step 1)
    try:
        report = export(pg_workdir, out, calibration=calibration)
    except (ExportError, ParityError) as e:
        return f"FAILED: {e}"
    probe = "calibrated probe, " if calibration else ""
    return (
        f"{out}  (PyTorch: modeling_pgjax.py + model.safetensors; {probe}protocol novelty; "
        f"parity max |torch - jax| {report['max_abs']:.1e}; "
        f"`python -m pgjax.torch_infer FILES --model {out}`)"
    )


def _configs_dir() -> Path:
    """configs/ of the checkout pgjax runs from (tools/setup.sh installs it editable)."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    if not configs.is_dir():
        raise FileNotFoundError(f"{configs}: the demo needs the repository's configs/ folder")
    return configs


def _split_counts(store: Path) -> dict:
    from collections import Counter

    from pgjax.data.store import read_csv_columns

    table = read_csv_columns(store / "images" / "table.csv")
    return dict(sorted(Counter(table["split"]).items()))
