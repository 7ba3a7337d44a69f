"""Write the README's table of objective settings from pgjax/objectives/defaults.py.

    python tools/objectives_table.py          rewrite the block in README.md
    python tools/objectives_table.py --check  exit 1 if the README's block is out of date

The block lies between BEGIN and END below; tests/test_objectives_package.py checks it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgjax.objectives import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- objectives table: written by tools/objectives_table.py -->"
END = "<!-- end of objectives table -->"


def readme_block(text: str) -> tuple[int, int]:
    """(start, stop) of the table between the markers in the README's text."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{README}: expected one {BEGIN!r} and one {END!r} line")
    start = text.index(BEGIN) + len(BEGIN) + 1
    return start, text.index(END)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 if out of date")
    args = p.parse_args(argv)
    text = README.read_text()
    start, stop = readme_block(text)
    table = settings_table()
    if text[start:stop] == table:
        return 0
    if args.check:
        print(f"{README.name}: the objectives table is out of date; run {__file__}")
        return 1
    README.write_text(text[:start] + table + text[stop:])
    print(f"{README.name}: objectives table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
