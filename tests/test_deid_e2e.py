"""End to end: a corpus planted with the leaks of issue 13 (items 1, 2, 4 and 6), preprocessed
with the defaults (K=5), leaves no marker in any byte the run wrote; and `pgjax audit` flags
every planted identifier that reaches a store when the redaction is switched off.

The corpus: copies of pydicom's CT_small.dcm, one study per patient. Three groups of six
patients share their staff, station and dates (as a department does), and each group copies
some of them into allow-listed fields, so without redaction those values pass K. One person
without a PatientID has eight studies with a phrase only they carry. One patient has a KVP of
231.7 that no other patient has.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pgjax.data import scan as scan_module
from pgjax.data.audit import (
    _array_blocks,
    _open_zarr3,
    _zarr_array_chunk_keys,
    audit_store,
    collect_identifiers,
)
from pgjax.data.config import PreprocessConfig
from pgjax.data.deid import redact
from pgjax.data.preprocess import preprocess

# Group -> (header elements, allow-listed fields copying them). Values are shared by the
# group's six patients.
GROUPS = {
    "a": (
        {"OperatorsName": "QUIXOTE^BARNABY", "RequestingPhysician": "PENDLEBURY^OSWIN",
         "NameOfPhysiciansReadingStudy": "FAIRWEATHER^LUDMILA", "StationName": "ZQSTATION77",
         "PatientAge": "098Y"},
        {"SoftwareVersions": "QUIXOTE^BARNABY", "ManufacturerModelName": "OSWIN PENDLEBURY",
         "ConvolutionKernel": "FAIRWEATHER", "ImageType": ["ORIGINAL", "PRIMARY", "ZQSTATION77"],
         "BodyPartExamined": "098Y"},
    ),
    "b": (
        {"StudyDate": "20230917", "AcquisitionDateTime": "20220304081122",
         "PerformingPhysicianName": "ABERNATHY^CORMAC", "ReferringPhysicianName":
         "VANTONGEREN^ILSE", "InstitutionName": "ST ZQUILLA INFIRMARY"},
        {"ConvolutionKernel": "20230917", "SoftwareVersions": "20220304081122",
         "Manufacturer": "ABERNATHY", "BodyPartExamined": "VANTONGEREN",
         "ManufacturerModelName": "ST ZQUILLA INFIRMARY"},
    ),
    "c": (
        {"AccessionNumber": "ZQACC3321", "StudyTime": "174512"},
        {"ConvolutionKernel": "ZQACC3321", "SoftwareVersions": "K174512",
         "ManufacturerModelName": "MONTGOMERIE", "ViewPosition": "2019-03-15"},
    ),
}  # fmt: skip
NESTED_NAME = "MONTGOMERIE^PERPETUA"  # group c: three sequences deep, copied into a field
LONE_PHRASE = "ZQLONELY HEXAGON"  # the person without a PatientID: eight studies
LONE_KVP = "231.7"
# Every marker, as it would be spelled in a store (values are upper-cased by normalisation).
MARKERS = sorted(
    {
        *(
            part
            for header, _ in GROUPS.values()
            for v in header.values()
            for part in [v, *v.split("^")]
        ),
        "2022-03-04", "2023-09-17", "2019-03-15", "174512", NESTED_NAME, "MONTGOMERIE",
        "PERPETUA", "ZQLONELY", LONE_KVP,
    }
)  # fmt: skip


def _nested(name: str) -> Sequence:
    item = Dataset()
    item.ScheduledPerformingPhysicianName = name
    step = Dataset()
    step.ScheduledProcedureStepSequence = Sequence([item])
    return Sequence([step])


def build_corpus(root: Path) -> None:
    n = itertools.count()

    def save(folder: str, **attrs) -> None:
        i = next(n)
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.1{i}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.2{i}"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.3{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for k, v in attrs.items():
            setattr(ds, k, v)
        path = root / "site_a" / folder / f"{i:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path)

    for g, (header, fields) in GROUPS.items():
        for p in range(6):
            extra = {"RequestAttributesSequence": _nested(NESTED_NAME)} if g == "c" else {}
            kvp = {"KVP": LONE_KVP} if (g, p) == ("a", 0) else {}
            save(f"{g}{p}", PatientID=f"ZQ-{g}{p}", PatientName=f"ZQ{g}^{p}",
                 **header, **fields, **extra, **kvp)  # fmt: skip
    for s in range(8):
        save(f"lone{s}", PatientID="", PatientName="", SeriesDescription=LONE_PHRASE)


def store_bytes(store: Path) -> dict[str, bytes]:
    """Every name and byte under the store, zarr arrays decoded (their chunks are compressed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(store):
        here = Path(dirpath)
        rel = here.relative_to(store).as_posix()
        out[f"names of {rel}"] = "\n".join([*dirnames, *filenames]).encode()
        if _zarr_array_chunk_keys(here, filenames) is not None:
            out[f"array {rel}"] = b"".join(_array_blocks(_open_zarr3(here)))
            dirnames[:] = []  # its chunk files are what was just decoded
            filenames = ["zarr.json"]
        for name in filenames:
            out[f"{rel}/{name}"] = (here / name).read_bytes()
    return out


def markers_in(data: dict[str, bytes]) -> dict[str, list[str]]:
    found = {}
    for marker in MARKERS:
        where = [k for k, v in data.items() if marker.lower().encode() in v.lower()]
        if where:
            found[marker] = where
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaks")
    build_corpus(root)
    return root


def test_defaults_leave_no_marker_anywhere(corpus, tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "pgjax.cli", "preprocess", str(corpus), "--out", str(store),
         "--workers", "1"],
        capture_output=True, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    data = store_bytes(store)
    assert {"./vocab.json", "./manifest.json", "./report.json", "images/table.csv"} <= set(data)
    assert "array images/pixels" in data and "array images/tokens" in data
    data["stdout"], data["stderr"] = run.stdout, run.stderr
    assert markers_in(data) == {}
    # The store is usable: the good files are all there (26 files, 26 images).
    assert b"26/26 images" in run.stdout

    audit = subprocess.run(
        [sys.executable, "-m", "pgjax.cli", "audit", str(store), "--sources", str(corpus)],
        capture_output=True, env=env, check=False,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout.decode()
    assert markers_in({"out": audit.stdout, "err": audit.stderr}) == {}


class _NoRedaction:
    def redact(self, protocol, schema):
        return protocol

    def identifying(self, value, freetext):
        return False


def test_the_audit_flags_every_identifier_that_reaches_a_store(corpus, tmp_path, monkeypatch):
    # The same corpus with the redaction of items 1 and 2 switched off, as before the fix.
    studies = itertools.count()
    monkeypatch.setattr(scan_module, "header_redactor", lambda ds: _NoRedaction())
    monkeypatch.setattr(
        scan_module,
        "patient_identity",
        lambda pid, name: ("patient", pid) if pid else ("study-as-patient", str(next(studies))),
    )
    cfg = PreprocessConfig(split_fractions=(1.0, 0.0, 0.0))  # all patients count towards K
    store = tmp_path / "store"
    preprocess([corpus], store, cfg=cfg, workers=1)
    leaked = markers_in(store_bytes(store))
    # The planted leaks did reach this store (a control: the test above is not vacuous).
    expected = {
        "QUIXOTE^BARNABY",
        "ZQSTATION77",
        "20230917",
        "20220304081122",
        "098Y",
        "ST ZQUILLA INFIRMARY",
        "ZQACC3321",
        "174512",
        "MONTGOMERIE",
        "ZQLONELY",
    }
    assert expected <= set(leaked)

    identifiers = collect_identifiers([corpus])
    report = audit_store(store, identifiers)
    assert report.hits_total == len(report.hits)  # none left out of the list
    # What each strong hit found (hits name identifiers redacted only).
    found = [
        i.value.lower()
        for h in report.hits
        if not h.weak
        for i in identifiers
        if redact(i.value) == h.redacted and h.kind == i.kind
    ]
    for marker in leaked:
        if marker in ("ZQLONELY", "2019-03-15"):
            continue  # no header element holds them: K, the date rule and the word list do
        m = marker.lower()
        assert any(m in f or f in m for f in found), marker


def test_redact_words_file_removes_a_name_k_lets_through(corpus, tmp_path):
    # At K=1 the lone phrase would be a token; listed in --redact-words it is not.
    words = tmp_path / "names.txt"
    words.write_text("# names typed into descriptions\nzqlonely hexagon\n")
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "pgjax.cli", "preprocess", str(corpus), "--out", str(store),
         "--workers", "1", "--min-patients", "1", "--redact-words", str(words)],
        capture_output=True, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert markers_in(store_bytes(store)) == {}  # even at K=1 (the header rules do the rest)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["redact_words"] == 1
    assert "<REDACTED>" in (store / "vocab.json").read_text()

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    run = subprocess.run(
        [sys.executable, "-m", "pgjax.cli", "preprocess", str(corpus), "--out", str(store),
         "--workers", "1", "--redact-words", str(empty)],
        capture_output=True, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and b"empty.txt: no words to redact" in run.stderr
