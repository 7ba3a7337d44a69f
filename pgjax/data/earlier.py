"""Appending to a store: an earlier run's rows are reused where their source files are gone.

`pgjax pull` removes the files it received once their store is complete, so a later pull that
adds studies cannot decode the earlier files again. It moves the earlier store aside, with the
earlier scan records and skip list, into an EARLIER folder:

    EARLIER/store/        the earlier (complete) store
    EARLIER/scan.json     its scan records (private: paths and raw header values)
    EARLIER/skipped.csv   its private skip list (the reasons of rows that failed to decode)

and preprocesses the new files with `earlier=EARLIER`. The plan is made from the earlier and new
scan records together, exactly as one run over all the files would be (vocabulary, splits and
row order are functions of the records). A 2D row is a function of its file, frame and the
settings, and a volume of its series' files and plan, so an earlier row whose files are gone is
copied from the earlier store: the result equals one run over all the files. A series that
gains instances is not reusable (its volume changes): the pull fetches all of it again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pgjax.data import store as st
from pgjax.data.scan import ScanRecord

# Table columns every store has; any other column of a volumes table is a per-row fact.
BASE_COLUMNS = {
    "row", "ok", "site", "vendor", "modality", "patient_key", "study_key", "series_key",
    "instance_key", "frame", "slice_index", "volume", "n_slices", "split", "task", "label",
    "score",
}  # fmt: skip


def load_records(earlier: Path) -> list[ScanRecord]:
    return [ScanRecord.from_json(r) for r in json.loads((earlier / "scan.json").read_text())]


def merge_records(new: list[ScanRecord], earlier: Path | None) -> list[ScanRecord]:
    """New records plus the earlier ones; a file scanned again replaces its earlier record."""
    if earlier is None:
        return new
    paths = {r.path for r in new}
    return new + [r for r in load_records(earlier) if r.path not in paths]


def _earlier_failures(earlier: Path, group: str) -> dict[str, str]:
    """path -> reason for the earlier store's rows of this group that failed to decode."""
    path = earlier / "skipped.csv"
    if not path.exists():
        return {}
    table = st.read_csv_columns(path)
    prefix = f"{group[:-1]} not decoded: "
    return {
        p: r[len(prefix) :]
        for p, r in zip(table["path"], table["reason"], strict=True)
        if r.startswith(prefix)
    }


def reusable_rows(earlier: Path, group: str, rows: list[dict]) -> dict[int, int]:
    """Unit row -> earlier store row, for rows whose source files are gone."""
    table = st.read_csv_columns(earlier / "store" / group / "table.csv")
    out = {}
    if group == "images":
        index = {
            (k, int(f)): i
            for i, (k, f) in enumerate(zip(table["instance_key"], table["frame"], strict=True))
        }
        for r, row in enumerate(rows):
            i = index.get((row["key"], int(row["frame"])))
            if i is not None and not os.path.exists(row["path"]):
                out[r] = i
    else:
        index = {k: i for i, k in enumerate(table["series_key"])}
        for r, row in enumerate(rows):
            i = index.get(row["key"])
            if i is None or int(table["n_slices"][i]) != len(row["paths"]):
                continue
            if not all(os.path.exists(p) for p in row["paths"]):
                out[r] = i
    return out


def fill_reusing(fill, rows: list[dict], cfg, group: str, earlier: Path):
    """fill(rows, cfg) for the rows with files; earlier rows copied for the rest."""
    reuse = reusable_rows(earlier, group, rows)
    todo = [r for r in range(len(rows)) if r not in reuse]
    block_new, failures_new, facts_new = fill([rows[r] for r in todo], cfg)
    block = np.zeros((len(rows), *block_new.shape[1:]), dtype=block_new.dtype)
    block[todo] = block_new
    failures = [(todo[r], why) for r, why in failures_new]
    facts = {todo[r]: f for r, f in facts_new.items()}
    if reuse:
        pixels = st.open_array(earlier / "store" / group / "pixels")
        targets = sorted(reuse)
        block[targets] = pixels[[reuse[r] for r in targets]].read().result()
        table = st.read_csv_columns(earlier / "store" / group / "table.csv")
        fact_columns = [c for c in table if c not in BASE_COLUMNS]
        reasons = _earlier_failures(earlier, group)
        for r, i in reuse.items():
            if group == "volumes":
                facts[r] = {c: table[c][i] for c in fact_columns if table[c][i] != ""}
            if table["ok"][i] == "0":
                path = rows[r].get("path") or rows[r]["paths"][0]
                failures.append((r, reasons.get(path, "not decoded in an earlier run")))
    return block, sorted(failures), facts
