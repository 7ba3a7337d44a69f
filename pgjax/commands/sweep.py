"""`pgjax sweep configs/ablations/NAME.py --store STORE --workdir DIR`: the ablation table.

Pretrains every row of the ablation file once per pretraining seed (resuming finished or
interrupted instances), evaluates all of them the same way, and writes DIR/table.md,
DIR/table.csv and DIR/comparison.json (see pgjax/eval/sweep.py).
"""

from __future__ import annotations

import argparse
import sys

HELP = "pretrain and evaluate a list of configs; one comparison table with CIs and p-values"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ablation", help="configs/ablations/NAME.py")
    p.add_argument("--store", required=True, help="the store to pretrain and evaluate on")
    p.add_argument("--workdir", required=True, help="one subfolder per row, eval/, table.*")
    p.add_argument(
        "--labels",
        help="labels.csv joined by salted study key (default: the store's label columns)",
    )
    p.add_argument("--salt-file", help="the store's salt (default STORE.private/salt)")
    p.add_argument("--tasks", help="tasks config (default configs/tasks.py)")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="train nothing; evaluate the rows whose pretraining has finished",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the ablation file, e.g. steps=200",
    )


def run(args) -> int:
    from pgjax.commands.eval import load_tasks_config
    from pgjax.eval.sweep import run_sweep
    from pgjax.train.config_lib import load_config

    try:
        ablation = load_config(args.ablation, args.set)
        tasks_config = load_tasks_config(args.tasks)
        result = run_sweep(
            ablation, args.store, args.workdir, tasks_config, labels=args.labels,
            salt_file=args.salt_file, eval_only=args.eval_only,
        )  # fmt: skip
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"pgjax sweep: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"table:  {args.workdir}/table.md (and table.csv)")
    print(f"comparison: {args.workdir}/comparison.json")
    print(f"report: {args.workdir}/eval/report.md")
    print(
        f"time:   {result['total_seconds']:.0f} s ({result['pretrain_seconds']:.0f} s pretraining)"
    )
    for name, reason in result["failed"]:
        print(f"not in the table: {name}: {reason}", file=sys.stderr)
    return 1 if result["failed"] else 0
