"""Check that two preprocessing runs wrote the same store (e.g. before and after a speed change).

    python tools/compare_stores.py REFERENCE_STORE NEW_STORE [--ignore-manifest KEY ...]

Compares every array (pixels, tokens, values, value_mask) element for element, the tables,
vocabulary, schema and report byte for byte, the manifest key by key (`written_by` and any
--ignore-manifest keys excepted), and, in the private folders (STORE.private), the skip list
and the protocol values, keys and geometry of every scan record. Exits 1 on any difference.
Both runs must use the same inputs (same paths) and the same salt file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pgjax.data import store as st

SCAN_FIELDS = (
    "path", "reason", "site", "patient_key", "study_key", "series_key", "instance_key",
    "modality", "manufacturer", "n_frames", "protocol", "geometry", "instance_number",
)  # fmt: skip


def _scan_records(private: Path) -> list[dict]:
    out = []
    for chunk in sorted((private / "scan").glob("chunk-*.json")):
        out.extend(json.loads(chunk.read_text()))
    return out


def compare(ref: Path, new: Path, ignore_manifest=()) -> list[str]:
    problems = []
    for name in ("schema.json", "vocab.json", "report.json"):
        if (ref / name).read_bytes() != (new / name).read_bytes():
            problems.append(f"{name} differs")
    m_ref, m_new = (json.loads((s / "manifest.json").read_text()) for s in (ref, new))
    for key in sorted(set(m_ref) | set(m_new)):
        if key in ("written_by", *ignore_manifest):
            continue
        if m_ref.get(key) != m_new.get(key):
            problems.append(f"manifest[{key!r}] differs")
    for group in st.GROUPS:
        if (ref / group / "table.csv").read_bytes() != (new / group / "table.csv").read_bytes():
            problems.append(f"{group}/table.csv differs")
        for name in ("pixels", *st.TOKEN_ARRAYS):
            a = st.open_array(ref / group / name).read().result()
            b = st.open_array(new / group / name).read().result()
            if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
                problems.append(f"{group}/{name} differs")
    p_ref, p_new = (s.with_name(s.name + ".private") for s in (ref, new))
    if (p_ref / "skipped.csv").read_bytes() != (p_new / "skipped.csv").read_bytes():
        problems.append("private skipped.csv differs")
    r_ref, r_new = _scan_records(p_ref), _scan_records(p_new)
    if len(r_ref) != len(r_new):
        problems.append(f"scan records: {len(r_ref)} vs {len(r_new)}")
    for a, b in zip(r_ref, r_new, strict=False):
        for f in SCAN_FIELDS:
            if a.get(f) != b.get(f):
                problems.append(f"scan record {a['path']}: {f} {a.get(f)!r} != {b.get(f)!r}")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--ignore-manifest", nargs="*", default=[])
    args = p.parse_args()
    problems = compare(args.reference, args.new, args.ignore_manifest)
    for line in problems[:50]:
        print(line)
    print(f"{len(problems)} difference(s)" if problems else "stores equal")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
