"""The `pgjax` command: one entry point, one module per subcommand in pgjax/commands/.

Each command module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`, and may
define `split_argv(argv) -> (argv, extra)` to take arguments argparse cannot declare. Modules are
imported only when their command runs, so `pgjax --help` does not import JAX.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pgjax import __version__

COMMANDS = {
    "synth": "pgjax.commands.synth",
    "preprocess": "pgjax.commands.preprocess",
    "pull": "pgjax.commands.pull",
    "audit": "pgjax.commands.audit",
    "bench": "pgjax.commands.bench",
    "demo": "pgjax.commands.demo",
    "train": "pgjax.commands.train",
    "export": "pgjax.commands.export",
    "eval": "pgjax.commands.eval",
    "sweep": "pgjax.commands.sweep",
    "card": "pgjax.commands.card",
}

_HELP = {
    "synth": "write a synthetic multi-site DICOM corpus",
    "preprocess": "DICOM files to a de-identified, tokenized TensorStore store",
    "pull": "studies from a PACS (DICOMweb or DIMSE) into a store, as preprocess does",
    "audit": "scan a store for identifiers taken from source DICOM files",
    "bench": "benchmarks; results go to benchmarks/results/",
    "demo": "the pipeline end to end on a small synthetic corpus",
    "train": "pretrain from a config file (resumes from the last checkpoint)",
    "export": "a checkpoint to a PyTorch model folder, with a parity check",
    "eval": "evaluate encoders on a downstream task (probe, fine-tune, calibration, DeLong)",
    "sweep": "pretrain and evaluate a list of configs; one comparison table",
    "card": "write a model card (data, objectives, results, calibration, audits)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="pgjax", description="pgjax: Protocol Genome pretraining for medical images in JAX"
    )
    parser.add_argument("--version", action="version", version=f"pgjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        sub.add_parser(name, help=_HELP[name], add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, --version, or an error naming the unknown command
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[argv[0]])
    cmd = argparse.ArgumentParser(prog=f"pgjax {argv[0]}", description=module.HELP)
    module.add_arguments(cmd)
    rest, extra = argv[1:], []
    if hasattr(module, "split_argv"):  # e.g. train's free-form --config.KEY=VALUE overrides
        rest, extra = module.split_argv(rest)
    args = cmd.parse_args(rest)
    args.extra = extra
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
