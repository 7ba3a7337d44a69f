"""`pgjax card --workdir DIR [--eval EVAL_DIR ...] [--audit REPORT.json | --sources DIR...]`.

Writes DIR/MODEL_CARD.md (or --out): intended use, training data by site/vendor/modality,
objectives and config, external-validation results with intervals, calibration, the subgroup
(bias) table with the largest gaps flagged, the de-identification audit, and known limits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "write a model card: data, objectives, external validation, calibration, audits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="pretraining workdir")
    p.add_argument(
        "--eval",
        dest="evals",
        action="append",
        default=[],
        metavar="EVAL_DIR",
        help="evaluation folder(s) (default: every DIR/eval/*/ with a metrics.json)",
    )
    p.add_argument("--name", help="the model's name in the evaluation (default: DIR's name)")
    p.add_argument("--audit", help="a `pgjax audit --json` report to embed")
    p.add_argument("--sources", nargs="+", help="run the audit now against these DICOM files")
    p.add_argument("--out", help="output file (default DIR/MODEL_CARD.md)")


def run(args) -> int:
    from pgjax.eval.card import write_card

    workdir = Path(args.workdir)
    evals = [Path(e) for e in args.evals] or sorted(
        p.parent for p in (workdir / "eval").glob("*/metrics.json")
    )
    try:
        audit = None
        if args.audit:
            audit = json.loads(Path(args.audit).read_text())
        elif args.sources:
            from pgjax.data.audit import audit_store, collect_identifiers
            from pgjax.eval.embed import load_workdir_config

            store = str(load_workdir_config(workdir).input.store)
            audit = audit_store(store, collect_identifiers(args.sources)).to_json()
        path = write_card(workdir, eval_dirs=evals, audit=audit, model_name=args.name,
                          out=args.out)  # fmt: skip
    except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError) as e:
        print(f"pgjax card: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"model card: {path}")
    return 0
