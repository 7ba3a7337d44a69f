"""The `pgjax` command: one entry point, one module per subcommand in pgjax/commands/.

Each command module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their command runs, so `pgjax --help` does not import JAX.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "synth": "pgjax.commands.synth",
    "preprocess": "pgjax.commands.preprocess",
    "audit": "pgjax.commands.audit",
    "bench": "pgjax.commands.bench",
}

_HELP = {
    "synth": "write a synthetic multi-site DICOM corpus",
    "preprocess": "DICOM files to a de-identified, tokenized TensorStore store",
    "audit": "scan a store for identifiers taken from source DICOM files",
    "bench": "benchmarks; results go to benchmarks/results/",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pgjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        sub.add_parser(name, help=_HELP.get(name, ""), add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    cmd = argparse.ArgumentParser(prog=f"pgjax {argv[0]}", description=module.HELP)
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
