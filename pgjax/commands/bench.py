"""`pgjax bench NAME`: benchmarks that write JSON records under benchmarks/results/."""

from __future__ import annotations

import argparse

HELP = "benchmarks (preprocess); records go to benchmarks/results/"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    pre = sub.add_parser("preprocess", help="files/s against pydicom's decode-only rate")
    pre.add_argument("inputs", nargs="*", help="DICOM folders (default: a synthetic corpus)")
    pre.add_argument("--studies", type=int, default=60, help="synthetic corpus size")
    pre.add_argument("--workers", default="1,2", help="worker counts to measure, e.g. 1,2")
    pre.add_argument("--out", default="benchmarks/results", help="folder for the JSON record")


def run(args) -> int:
    if args.bench == "preprocess":
        from pathlib import Path

        from pgjax.bench.preprocess import run_bench

        workers = [int(w) for w in args.workers.split(",") if w]
        path = run_bench([Path(p) for p in args.inputs], args.studies, workers, args.out)
        print(f"record: {path}")
    return 0
