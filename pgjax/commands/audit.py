"""`pgjax audit STORE --sources DIR_OR_FILE... [--json REPORT]`: search a store for identifiers.

Exit status, for CI: 0 clean, 1 an identifier was found, 2 the audit could not be completed
(no identifiers in the sources, or files of the store that could not be read).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = (
    "search every file and array of a store for identifiers (every PS3.15 Basic Profile "
    "element: names, IDs, dates, times, ages, UIDs, their unsalted hashes...) taken from the "
    "source DICOM files; exit 1 on any hit"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="the store folder to audit")
    p.add_argument(
        "--sources",
        nargs="+",
        required=True,
        metavar="DIR_OR_FILE",
        help="DICOM files or folders the store was made from (or a sample of them)",
    )
    p.add_argument("--json", metavar="REPORT", help="write the (redacted) report as JSON")
    p.add_argument(
        "--weak-ok",
        action="store_true",
        help="report weak hits without failing: single name components, short values or digit "
        "strings shorter than 8 (times, short IDs) found "
        "inside decoded arrays (pixel bytes), where they turn up by chance; a hit in a file "
        "(a token, a table value, a JSON string) always fails",
    )
    p.add_argument(
        "--max-hits", type=int, default=1000, help="list at most this many hits (default 1000)"
    )


def run(args: argparse.Namespace) -> int:
    from pgjax.data.audit import audit_store, collect_identifiers

    try:
        identifiers = collect_identifiers(args.sources)
        if not identifiers:
            print(
                "pgjax audit: no identifiers found in the sources (no DICOM part-10 files?); "
                "nothing to search for",
                file=sys.stderr,
            )
            return 2
        report = audit_store(args.store, identifiers, max_hits=args.max_hits)
    except FileNotFoundError as e:
        print(f"pgjax audit: {e}", file=sys.stderr)
        return 2

    print(
        f"audited {report.store}: {report.files_scanned} files, {report.arrays_scanned} arrays, "
        f"{report.bytes_scanned / 1e6:.1f} MB against {report.identifiers} identifiers"
    )
    for kind, n in sorted(report.hits_by_kind.items()):
        print(f"  {n:8d} hits  {kind}")
    for hit in report.hits[:20]:
        where = f"index {list(hit.index)}" if hit.index is not None else f"offset {hit.offset}"
        where = "in the name" if hit.where == "name" else where
        print(f"  {hit.path}: {hit.kind} {hit.redacted} ({where})")
    if report.hits_total > 20:
        print(f"  ... {report.hits_total - 20} more")
    for path, reason in report.errors:
        print(f"  not audited: {path}: {reason}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1, sort_keys=True) + "\n")

    failing = report.strong_hits_total + (0 if args.weak_ok else report.weak_hits_total)
    if failing:
        print(f"FAIL: {report.hits_total} identifier hits ({report.weak_hits_total} weak)")
        return 1
    if report.errors:
        print(f"INCOMPLETE: {len(report.errors)} files or arrays could not be read")
        return 2
    weak = f" ({report.weak_hits_total} weak hits accepted)" if report.weak_hits_total else ""
    print(f"clean: no identifiers found{weak}")
    return 0
