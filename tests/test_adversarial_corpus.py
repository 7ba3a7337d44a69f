"""Issue 13's acceptance run: one corpus holding every planted leak (tests/test_deid_e2e.py) and
every hostile input (tests/test_hostile_inputs.py) beside good files, preprocessed and audited
with the defaults. The run ends with exit 0, stores every good file, lists every bad one with its
reason, and no marker reaches the store (arrays decoded), the audit's report or the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_deid_e2e import MARKERS as LEAK_MARKERS
from test_deid_e2e import build_corpus, markers_in, store_bytes
from test_hostile_inputs import MARKERS as HOSTILE_MARKERS
from test_hostile_inputs import hostile_corpus

from pgjax.data import store as st
from pgjax.data.preprocess import printable_text

REPO = Path(__file__).resolve().parents[1]


def _pgjax(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pgjax.cli", *args], capture_output=True,
                          env=env, check=False)  # fmt: skip


def test_one_run_over_planted_leaks_and_hostile_inputs(tmp_path):
    root = tmp_path / "in"
    build_corpus(root / "leaks")
    good, bad = hostile_corpus(root / "hostile")
    store = tmp_path / "store"

    run = _pgjax("preprocess", str(root), "--out", str(store), "--workers", "1")
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    audit = _pgjax("audit", str(store), "--sources", str(root), "--json",
                   str(tmp_path / "audit.json"))  # fmt: skip
    assert audit.returncode == 0, audit.stdout.decode(errors="replace")[-2000:]

    data = store_bytes(store)
    data.update(preprocess_out=run.stdout, preprocess_err=run.stderr, audit_out=audit.stdout,
                audit_err=audit.stderr, audit_json=(tmp_path / "audit.json").read_bytes())
    found = markers_in(data)  # the leak markers, case-insensitive
    for m in HOSTILE_MARKERS:  # path parts: as written
        where = [k for k, v in data.items() if m.encode() in v]
        if where:
            found[m] = where
    assert found == {}, found
    assert LEAK_MARKERS and HOSTILE_MARKERS

    private = tmp_path / "store.private"
    skipped = st.read_csv_columns(private / "skipped.csv")
    listed = dict(zip(skipped["path"], skipped["reason"], strict=True))
    for path, reason in bad.items():
        assert listed[printable_text(path)].startswith(reason), (path, listed.get(path))
    stored = {
        row.get("path") or p
        for plan in (private / "plan").glob("*-*.json")
        for row in json.loads(plan.read_text())["rows"]
        for p in row.get("paths", [None])
    }
    leak_files = {str(p) for p in (root / "leaks").rglob("*.dcm")}
    assert set(good) | leak_files <= stored
    assert json.loads((store / "manifest.json").read_text())["state"] == "complete"
