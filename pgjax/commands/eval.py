"""`pgjax eval --workdir DIR --task NAME [...]`: downstream evaluation of a pretrained model.

The model in DIR, any other pretrained workdirs given with `--with NAME=DIR`, and the reference
rows (oracle, thumbnail, protocol-only, a random init of DIR's architecture; the tasks config's
`references`) are evaluated the same way on the task (see configs/tasks.py); the outputs go to
DIR/eval/TASK/ (or --out): predictions.csv, metrics.json, context.json, report.md, plots/,
and calibration/ (each pretrained model's probe at the largest label fraction, with its fitted
calibration: `pgjax export --calibration FILE` carries it into an export). The report scores
every test item's protocol novelty; `--calibrate` adds the calibration tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "evaluate pretrained encoders on a downstream task (probe, fine-tune, calibration, DeLong)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir", required=True, help="pretraining workdir (config.json, checkpoints)"
    )
    p.add_argument("--task", required=True, help="task name in the tasks config")
    p.add_argument("--tasks", default=None, help="tasks config file (default configs/tasks.py)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a tasks-config key, e.g. tasks.cardiomegaly.seeds=0,1",
    )
    p.add_argument("--store", help="store to evaluate on (default: the one the model trained on)")
    p.add_argument(
        "--labels",
        help="labels.csv (study_uid,task,label); joined by salted study "
        "key. Default: the store's own label columns",
    )
    p.add_argument("--salt-file", help="the store's salt (default STORE.private/salt)")
    p.add_argument("--name", help="name of DIR's model in the tables (default: DIR's name)")
    p.add_argument(
        "--with",
        dest="others",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another pretrained workdir to evaluate identically (repeatable)",
    )
    p.add_argument(
        "--no-random-init",
        action="store_true",
        help="skip the random-init reference row (the others: --set references=...)",
    )
    p.add_argument(
        "--heads",
        help="comma list of linear, linear+protocol, finetune, finetune+protocol "
        "(default: linear, plus linear+protocol if probe.conditioned)",
    )
    p.add_argument("--fractions", help="comma list of label fractions (overrides the task's)")
    p.add_argument("--seeds", help="comma list of seeds (overrides the task's)")
    p.add_argument(
        "--calibrate",
        choices=("none", "temperature", "protocol"),
        default="none",
        help="recalibrate the linear probes on the validation split: one temperature, or one "
        "per protocol group (vendor x scanner model, falling back to the global one); the "
        "report gives the ECE of each method up to this one",
    )
    p.add_argument("--out", help="output folder (default DIR/eval/TASK)")


def run(args) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"pgjax eval: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import dataclasses

    from pgjax.eval.embed import Model, load_workdir_config
    from pgjax.eval.evaluate import EvalSettings, evaluate
    from pgjax.eval.tasks import task_from_config

    tasks_config = load_tasks_config(args.tasks, args.set)
    task = task_from_config(tasks_config, args.task)
    if args.fractions:
        task = dataclasses.replace(task, label_fractions=_floats(args.fractions))
    if args.seeds:
        task = dataclasses.replace(task, seeds=tuple(int(s) for s in args.seeds.split(",")))
    heads = tuple(args.heads.split(",")) if args.heads else None
    settings = EvalSettings.from_config(tasks_config, heads, calibrate=args.calibrate)
    if args.no_random_init:
        settings.references = tuple(r for r in settings.references if r != "random_init")
    workdir = Path(args.workdir)
    models = [Model(args.name or workdir.name, workdir)]
    for item in args.others:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--with {item!r}: expected NAME=DIR")
        models.append(Model(name, Path(path)))
    store = args.store or str(load_workdir_config(workdir).input.store)
    out = Path(args.out) if args.out else workdir / "eval" / task.name
    evaluate(models, task, store, out, settings, labels=args.labels, salt_file=args.salt_file)
    print(f"report:      {out / 'report.md'}")
    print(f"metrics:     {out / 'metrics.json'}")
    print(f"predictions: {out / 'predictions.csv'}")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def configs_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "configs"


def load_tasks_config(path: str | None, overrides=()):
    from pgjax.train.config_lib import load_config

    path = path or str(configs_dir() / "tasks.py")
    return load_config(path, list(overrides))
