"""`pgjax bench NAME`: benchmarks that write JSON records under benchmarks/results/."""

from __future__ import annotations

import argparse
import os
import sys

HELP = (
    "benchmarks (loader, preprocess, train, compile, export, report); records go to "
    "benchmarks/results/"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    pre = sub.add_parser("preprocess", help="files/s against pydicom's decode-only rate")
    pre.add_argument("inputs", nargs="*", help="DICOM folders (default: a synthetic corpus)")
    pre.add_argument("--preset", choices=("small", "clinical"), default="small",
                     help="synthetic corpus: small (128x128 slices, --studies) or clinical "
                     "(CT 512, radiographs 2500x2048, MR 256-384, enhanced multi-frame, several "
                     "transfer syntaxes, each also measured alone; --patients)")  # fmt: skip
    pre.add_argument("--studies", type=int, default=60, help="small corpus size (studies)")
    pre.add_argument("--patients", type=int, default=4,
                     help="clinical corpus size (patients, 31 files each by default)")  # fmt: skip
    pre.add_argument("--workers", default="1,2", help="worker counts to measure, e.g. 1,2")
    pre.add_argument("--rounds", type=int, default=3, help="alternating rounds per count")
    pre.add_argument("--out", default="benchmarks/results", help="folder for the JSON record")
    tr = sub.add_parser("train", help="train step time, images/s, XLA FLOPs, MFU")
    tr.add_argument("--config", required=True, help="configs/NAME.py[:VARIANT]")
    tr.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    tr.add_argument("--batches", default="", help="global batch sizes to sweep, e.g. 8,16,32")
    tr.add_argument("--devices", default="", help="device counts to sweep, e.g. 1,2,4,8")
    tr.add_argument("--image-sizes", default="", help="image sides to sweep, e.g. 64,128,256")
    tr.add_argument("--rounds", type=int, default=5,
                    help="rounds of the real loop against the resident step")  # fmt: skip
    tr.add_argument("--out", default="benchmarks/results", help="folder for the JSON record")
    co = sub.add_parser(
        "compile", help="a config's train step compiled for meshes: FLOPs, memory, collectives"
    )
    co.add_argument("--config", required=True, help="configs/NAME.py[:VARIANT]")
    co.add_argument("--mesh", action="append", help="data=N,fsdp=M (repeatable; default: "
                    "data=8, data=2,fsdp=4 and fsdp=8)")  # fmt: skip
    co.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    co.add_argument("--store", help="take the vocabulary from this store (default: a stand-in "
                    "of the default schema's shape)")  # fmt: skip
    co.add_argument("--out", default="benchmarks/results", help="folder for the JSON record")
    ex = sub.add_parser("export", help="PyTorch CPU inference items/s beside the JAX model's")
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training workdir (its latest checkpoint)")
    src.add_argument(
        "--config", help="configs/NAME.py[:VARIANT] at initial weights (needs --store)"
    )
    ex.add_argument("--store", help="the store (default for --workdir: its config's)")
    ex.add_argument("--batch", type=int, default=16, help="items per call")
    ex.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    ex.add_argument("--threads", default="0,1", help="torch thread counts, 0: torch's default")
    ex.add_argument("--out", default="benchmarks/results", help="folder for the JSON record")
    lo = sub.add_parser("loader", help="input pipeline images/s against TensorStore and memmap")
    lo.add_argument("--store", help="a store (default: a 256x256 uint8 reference store)")
    lo.add_argument("--config", default="configs/pg.py",
                    help="config whose augmentation, batch and train record are used")  # fmt: skip
    lo.add_argument("--batch", type=int, help="global batch (default: the config's)")
    lo.add_argument("--workers", default="0,1,2,all", help="Grain worker counts to measure")
    lo.add_argument("--steps", type=int, default=60, help="timed batches per measurement")
    lo.add_argument("--rounds", type=int, default=5, help="rounds of limits + pipeline")
    lo.add_argument("--images", type=int, default=8192, help="reference store: images")
    lo.add_argument("--size", type=int, default=256, help="reference store: image side")
    lo.add_argument("--compression", choices=["none", "zstd"], default="none",
                    help="reference store: chunk compression")  # fmt: skip
    lo.add_argument("--out", default="benchmarks/results", help="folder for the JSON record")
    rep = sub.add_parser("report", help="all records as benchmarks/README.md")
    rep.add_argument("--results", default="benchmarks/results")


def _cpu_devices_for_compile(argv: list[str]) -> None:
    """`bench compile` simulates an 8-device mesh on a CPU host: XLA reads the device count once,
    when JAX starts, so it is set here, before anything imports JAX (a count already given in
    XLA_FLAGS is kept)."""
    if argv[:1] == ["compile"] and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """`pgjax bench train` and `bench export --config` take --config.KEY=VALUE overrides like
    `pgjax train`."""
    _cpu_devices_for_compile(argv)
    overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run(args) -> int:
    if args.bench == "preprocess":
        from pathlib import Path

        from pgjax.bench.preprocess import run_bench

        workers = [int(w) for w in args.workers.split(",") if w]
        try:
            path = run_bench(
                [Path(p) for p in args.inputs], args.studies, workers, args.out,
                rounds=args.rounds, preset=args.preset, patients=args.patients,
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as e:  # e.g. no DICOM files under the inputs
            print(f"pgjax bench preprocess: {e}", file=sys.stderr)
            return 2
        print(f"record: {path}")
    elif args.bench == "train":
        from pgjax.bench.train import run_bench as run_train_bench

        path = run_train_bench(
            args.config, args.extra, steps=args.steps, batches=_ints(args.batches),
            device_counts=_ints(args.devices), image_sizes=_ints(args.image_sizes),
            out_dir=args.out, rounds=args.rounds,
        )  # fmt: skip
        print(f"record: {path}")
    elif args.bench == "compile":
        from pgjax.bench.compile import DEFAULT_MESHES
        from pgjax.bench.compile import run_bench as run_compile_bench

        try:
            path = run_compile_bench(
                args.config, args.extra, meshes=args.mesh or DEFAULT_MESHES,
                image_size=args.image_size, store=args.store, out_dir=args.out,
            )  # fmt: skip
        except ValueError as e:  # a bad --mesh, or too few devices for it
            print(f"pgjax bench compile: {e}", file=sys.stderr)
            return 2
        print(f"record: {path}")
    elif args.bench == "export":
        from pgjax.bench.export import run_bench as run_export_bench

        if args.config and not args.store:
            print("pgjax bench export: --config needs --store", file=sys.stderr)
            return 2
        path = run_export_bench(
            workdir=args.workdir, config=args.config, overrides=args.extra, store=args.store,
            batch=args.batch, seconds=args.seconds, threads=tuple(_ints(args.threads)),
            out_dir=args.out,
        )  # fmt: skip
        print(f"record: {path}")
    elif args.bench == "loader":
        from pgjax.bench.loader import run_bench as run_loader_bench
        from pgjax.bench.loader import worker_counts

        path = run_loader_bench(
            args.store, config_path=args.config, overrides=args.extra, batch=args.batch,
            workers=worker_counts(args.workers), steps=args.steps, rounds=args.rounds,
            reference_images=args.images,
            reference_size=args.size, compression=args.compression, out_dir=args.out,
        )  # fmt: skip
        print(f"record: {path}")
    elif args.bench == "report":
        from pgjax.bench.report import write_report

        print(f"report: {write_report(args.results)}")
    return 0
