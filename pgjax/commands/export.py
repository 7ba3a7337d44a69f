"""`pgjax export --workdir DIR [--step N] [--store STORE] [--calibration FILE] --out OUT`."""

from __future__ import annotations

import argparse
import sys

HELP = "export a checkpoint to a PyTorch model folder (safetensors, modeling file, parity)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="training workdir (config.json, checkpoints/)")
    p.add_argument("--out", required=True, help="the export folder to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--store", help="the training store (default: input.store of the config)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max float32 |torch - jax| of any embedding (default 1e-4)")  # fmt: skip
    p.add_argument("--calibration",
                   help="a probe with its calibration from `pgjax eval` "
                   "(EVAL_DIR/calibration/MODEL__HEAD.json, fitted on this checkpoint): the "
                   "export then gives calibrated probabilities")  # fmt: skip


def run(args) -> int:
    from pgjax.export.exporter import export
    from pgjax.export.parity import ParityError
    from pgjax.export.source import ExportError

    try:
        report = export(args.workdir, args.out, step=args.step, store=args.store,
                        tolerance=args.tolerance, calibration=args.calibration)  # fmt: skip
    except (ExportError, ValueError) as e:
        print(f"pgjax export: {e}", file=sys.stderr)
        return 2
    except ParityError as e:
        print(f"pgjax export: {e}", file=sys.stderr)
        return 1
    sets = ", ".join(f"{k} ({n} items)" for k, n in report["inputs"].items())
    print(f"exported to {args.out}: parity max |torch - jax| = {report['max_abs']:.2e} "
          f"on {sets}")  # fmt: skip
    return 0
