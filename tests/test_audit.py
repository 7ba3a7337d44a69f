"""De-identification: salted keys, the salt file, and `pgjax audit` on fake stores.

The sources are copies of pydicom's test files with known identifiers planted in them; the
stores are small folders of JSON, CSV, logs and zarr v3 arrays written with TensorStore.
"""

import argparse
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import tensorstore as ts
from pydicom.data import get_testdata_file

from pgjax.commands import audit as audit_command
from pgjax.data.audit import (
    Identifier,
    IdentifierMatcher,
    audit_store,
    collect_identifiers,
)
from pgjax.data.deid import (
    hash_key,
    load_or_create_salt,
    redact,
    salt_from_string,
)

NAME = "Nightingale^Florence"
PATIENT_ID = "PGX-4471-Z"
STUDY_DATE = "20190315"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1234567890"
NUMERIC_ID = "77812345"


# ------------------------------------------------------------------------------- salted keys


def test_hash_key_is_hmac_sha256_truncated():
    salt = b"s" * 32
    expected = hmac.new(salt, b"patient\0" + PATIENT_ID.encode(), hashlib.sha256).hexdigest()
    assert hash_key(salt, "patient", PATIENT_ID) == expected[:16]
    assert hash_key(salt, "patient", f" {PATIENT_ID}\0") == expected[:16]  # DICOM padding


def test_hash_key_namespaces_and_salts_differ():
    salt = b"s" * 32
    keys = {hash_key(salt, kind, "1.2.3") for kind in ("patient", "study", "series", "instance")}
    assert len(keys) == 4
    assert hash_key(b"t" * 32, "study", "1.2.3") != hash_key(salt, "study", "1.2.3")


@pytest.mark.parametrize("value", ["", "   ", None])
def test_hash_key_refuses_missing_values(value):
    with pytest.raises(ValueError, match="patient identifier"):
        hash_key(b"s" * 32, "patient", value)


def test_salt_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / "private" / "deeper" / "salt"
    salt = load_or_create_salt(path)
    assert len(salt) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert bytes.fromhex(path.read_text().strip()) == salt
    assert load_or_create_salt(path) == salt
    assert load_or_create_salt(tmp_path / "other") != salt


def test_salt_inside_the_store_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(ValueError, match="must live outside the store"):
        load_or_create_salt(store / "sub" / "salt", forbidden_root=store)
    assert not (store / "sub").exists()
    assert len(load_or_create_salt(tmp_path / "salt", forbidden_root=store)) == 32


def test_bad_salt_file_and_short_salt_string(tmp_path):
    (tmp_path / "salt").write_text("not hex\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'salt'}: the salt file must hold hex"):
        load_or_create_salt(tmp_path / "salt")
    (tmp_path / "short").write_text("abcd\n")
    with pytest.raises(ValueError, match="2 bytes; at least 16"):
        load_or_create_salt(tmp_path / "short")
    with pytest.raises(ValueError, match="at least 16 characters, not 6"):
        salt_from_string("hunter")  # noqa: S105 - a deliberately weak test salt
    assert salt_from_string("a long enough user salt") == b"a long enough user salt"


def test_redact_never_shows_a_whole_value():
    assert redact("NIGHTGALE") == "NI***LE (9 chars)"
    for value in ("1CT1", "ABCDEFG", STUDY_UID, "x"):
        assert value not in redact(value)


# ---------------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two real test files with planted identifiers, plus a file that is not DICOM."""
    root = tmp_path_factory.mktemp("sources")
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.PatientName = NAME
    ct.PatientID = PATIENT_ID
    ct.StudyDate = STUDY_DATE
    ct.StudyInstanceUID = STUDY_UID
    ct.AccessionNumber = "ACC"  # shorter than 4 characters: ignored
    ct.InstitutionName = "Lakeside General Hospital"
    ct.save_as(root / "ct.dcm")
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.PatientName = "Okonkwo^Chidi"
    mr.PatientID = NUMERIC_ID
    mr.PatientBirthDate = "19610704"
    (root / "site").mkdir()
    mr.save_as(root / "site" / "mr.dcm")
    (root / "site" / "README.txt").write_text("not a DICOM file\n")
    return root


@pytest.fixture(scope="module")
def identifiers(sources):
    return collect_identifiers([sources])


def values_of(identifiers, kind):
    return {i.value for i in identifiers if kind in i.kind.split(", ")}


def test_collect_identifiers_forms(identifiers):
    names = values_of(identifiers, "PatientName")
    assert {NAME, "Florence Nightingale", "Nightingale Florence"} <= names
    assert values_of(identifiers, "PatientName (name part)") >= {"Nightingale", "Florence"}
    assert values_of(identifiers, "PatientID") == {PATIENT_ID, NUMERIC_ID}
    assert values_of(identifiers, "StudyDate (YYYY-MM-DD)") >= {"2019-03-15"}
    assert values_of(identifiers, "PatientBirthDate (YYYY/MM/DD)") == {"1961/07/04"}
    assert values_of(identifiers, "StudyInstanceUID sha256") >= {
        hashlib.sha256(STUDY_UID.encode()).hexdigest()
    }
    assert hashlib.md5(PATIENT_ID.encode()).hexdigest() in values_of(identifiers, "PatientID md5")
    assert "Lakeside General Hospital" in values_of(identifiers, "InstitutionName")
    assert not any(len(i.value) < 4 for i in identifiers)
    lowered = [i.value.lower() for i in identifiers]
    assert len(lowered) == len(set(lowered))  # deduplicated
    # Weak inside arrays: digit strings shorter than 8 (times, short IDs), which grey levels
    # 48-57 spell by chance; a date (8 digits) stays strong.
    short = [i for i in identifiers if i.value.isdigit() and len(i.value) < 8]
    assert any("Time" in i.kind for i in short) and all(i.weak for i in short)
    assert not next(i for i in identifiers if i.value == STUDY_DATE).weak


def test_collect_identifiers_names_a_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here: no such source"):
        collect_identifiers([tmp_path / "nothing-here"])


# ---------------------------------------------------------------------------------- matching


def test_matcher_finds_identifiers_across_block_boundaries():
    matcher = IdentifierMatcher([Identifier("PatientID", PATIENT_ID)])
    data = b"x" * 50 + PATIENT_ID.lower().encode() + b"y" * 7 + PATIENT_ID.encode() + b"z" * 3
    expected = [50, 50 + len(PATIENT_ID) + 7]
    for size in (1, 3, 7, 11, len(data)):
        blocks = [data[i : i + size] for i in range(0, len(data), size)]
        assert [offset for offset, _ in matcher.scan(blocks)] == expected, size


def test_matcher_boundary_rules():
    matcher = IdentifierMatcher(
        [
            Identifier("StudyDate", STUDY_DATE),
            Identifier("PatientName (name part)", "Florence", weak=True),
            Identifier("PatientName", "Florence Nightingale"),
        ]
    )
    found = lambda text: [i.kind for _, _, i in matcher.find(text)]  # noqa: E731
    assert found(b"date=20190315;") == ["StudyDate"]
    assert found(b"x=120190315") == []  # inside a longer number
    assert found(b"Dr FLORENCE protocol") == ["PatientName (name part)"]
    assert found(b"florenceville") == []  # a weak name part inside a word
    assert found(b"mrs florence nightingale") == ["PatientName"]  # longest match


def test_matcher_leaves_digit_runs_inside_hex_keys_alone():
    """A store's salted keys are 16 hex characters: their digit runs are random, and among
    thousands of keys one holds some study's 6-digit time by chance (seen in a demo store:
    "075140" inside "8c075140de3d4d8b"). The same value anywhere else is still a hit."""
    matcher = IdentifierMatcher([Identifier("AcquisitionTime", "075140"),
                                 Identifier("StudyDate", STUDY_DATE, embedded=True)])  # fmt: skip
    found = lambda text: [i.kind for _, _, i in matcher.find(text)]  # noqa: E731
    assert found(b"row,8c075140de3d4d8b,x") == []
    assert found(b"k=ab20190315cd0123456789") == []  # a date inside a 24-character key
    assert found(b"row,075140,x") == ["AcquisitionTime"]
    assert found(b"time=075140Z") == ["AcquisitionTime"]  # next to letters, not in a key
    assert found(b"id:d075140e") == ["AcquisitionTime"]  # short hex-looking: 8 < 16
    assert found(b"8c075140de3d4d8") == ["AcquisitionTime"]  # 15 hex characters
    assert found(b"0000000000075140") == []  # touches digits (the number rule)


# ------------------------------------------------------------------------------------ stores


def write_zarr3(path, data, codec="blosc", shard_rows=None):
    codecs = [{"name": "bytes"}]
    if codec == "blosc":
        codecs.append(
            {
                "name": "blosc",
                "configuration": {"cname": "zstd", "clevel": 5, "shuffle": "bitshuffle"},
            }
        )
    elif codec == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 3}})
    chunk = list(data.shape)
    if shard_rows:
        inner = [shard_rows // 4, *data.shape[1:]]
        codecs = [
            {"name": "sharding_indexed", "configuration": {"chunk_shape": inner, "codecs": codecs}}
        ]
        chunk = [shard_rows, *data.shape[1:]]
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(data.shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
            "data_type": str(data.dtype),
            "codecs": codecs,
        },
        "create": True,
    }
    ts.open(spec).result().write(data).result()


def clean_store(root):
    """A store with JSON, CSV, a log and three arrays, holding no identifier."""
    rng = np.random.default_rng(0)
    root.mkdir()
    salt = b"k" * 32
    (root / "manifest.json").write_text(
        json.dumps({"format": "pgjax-store", "items": 64, "site": "site_3fa1c2d4"})
    )
    rows = ["patient_key,study_key,split"] + [
        f"{hash_key(salt, 'patient', PATIENT_ID + str(i))},"
        f"{hash_key(salt, 'study', STUDY_UID + str(i))},train"
        for i in range(64)
    ]
    (root / "items.csv").write_text("\n".join(rows) + "\n")
    (root / "preprocess.log").write_text("phase scan: 2 files, 0 skipped\nloss 0.123\n")
    write_zarr3(root / "images", rng.integers(0, 16, (64, 256), dtype=np.uint8))
    write_zarr3(root / "noise", rng.integers(0, 256, (64, 256), dtype=np.uint8), codec="zstd")
    write_zarr3(root / "numeric", rng.normal(size=(64, 31)).astype(np.float32), shard_rows=32)
    return root


def test_clean_store_has_no_hits(tmp_path, identifiers):
    store = clean_store(tmp_path / "store")
    report = audit_store(store, identifiers)
    assert report.hits_total == 0 and report.hits == [] and report.errors == []
    assert report.arrays_scanned == 3
    # chunk and shard files are covered by the decoded arrays: only the 3 files + 3 zarr.json
    assert report.files_scanned == 6
    assert report.bytes_scanned >= 64 * 256 * 2 + 64 * 31 * 4


def kinds(report):
    return {h.kind for h in report.hits}


def test_patient_name_in_json(tmp_path, identifiers):
    store = clean_store(tmp_path / "store")
    (store / "notes.json").write_text(json.dumps({"note": "scan of FLORENCE NIGHTINGALE"}))
    report = audit_store(store, identifiers)
    assert report.hits_total == 1
    hit = report.hits[0]
    assert (hit.path, hit.kind, hit.where) == ("notes.json", "PatientName", "file")
    assert hit.offset == len('{"note": "scan of ')
    assert hit.redacted == "Fl***le (20 chars)"


def test_patient_id_inside_a_compressed_zarr3_array(tmp_path, identifiers):
    store = clean_store(tmp_path / "store")
    data = np.random.default_rng(1).integers(0, 16, (64, 256), dtype=np.uint8)
    data[37, 100 : 100 + len(PATIENT_ID)] = np.frombuffer(PATIENT_ID.encode(), np.uint8)
    write_zarr3(store / "labels", data)
    chunk_bytes = [p.read_bytes() for p in (store / "labels").rglob("*") if p.is_file()]
    assert not any(PATIENT_ID.encode() in b for b in chunk_bytes)  # a raw grep would miss it

    report = audit_store(store, identifiers)
    assert report.hits_total == 1
    hit = report.hits[0]
    assert (hit.path, hit.kind, hit.where, hit.index) == ("labels", "PatientID", "array", (37, 100))
    assert hit.offset == 37 * 256 + 100


def test_unsalted_uid_hash_in_csv(tmp_path, identifiers):
    store = clean_store(tmp_path / "store")
    digest = hashlib.sha256(STUDY_UID.encode()).hexdigest()
    (store / "studies.csv").write_text(f"study,label\n{digest.upper()},1\n")
    report = audit_store(store, identifiers)
    assert kinds(report) == {"StudyInstanceUID sha256"}
    assert report.hits[0].offset == len("study,label\n")


def test_iso_date_in_a_log(tmp_path, identifiers):
    store = clean_store(tmp_path / "store")
    (store / "preprocess.log").write_text("phase scan\nfirst study on 2019-03-15 read\n")
    report = audit_store(store, identifiers)
    assert kinds(report) == {"StudyDate (YYYY-MM-DD)"}


def test_identifier_in_a_file_name_and_a_stray_file_in_an_array_folder(tmp_path, identifiers):
    store = clean_store(tmp_path / "store")
    (store / f"{PATIENT_ID}.txt").write_text("empty\n")
    (store / "images" / "notes.txt").write_text(f"born 19610704, id {NUMERIC_ID}\n")
    report = audit_store(store, identifiers)
    by_where = {(h.where, h.kind) for h in report.hits}
    assert by_where == {
        ("name", "PatientID"),
        ("file", "PatientBirthDate"),
        ("file", "PatientID"),
    }
    name_hit = next(h for h in report.hits if h.where == "name")
    assert name_hit.path == "<redacted>.txt"


def test_unreadable_array_is_an_error_and_its_chunks_are_searched_raw(tmp_path, identifiers):
    store = clean_store(tmp_path / "store")
    broken = store / "broken"
    (broken / "c").mkdir(parents=True)
    (broken / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array"}))
    (broken / "c" / "0").write_bytes(b"\x00" * 10 + PATIENT_ID.encode())
    report = audit_store(store, identifiers)
    assert [p for p, _ in report.errors] == ["broken"]
    assert [(h.path, h.kind, h.offset) for h in report.hits] == [("broken/c/0", "PatientID", 10)]


def test_report_holds_no_full_identifier(tmp_path, identifiers):
    store = clean_store(tmp_path / "store")
    planted = f"{NAME} {PATIENT_ID} 2019-03-15 {STUDY_UID} Lakeside General Hospital"
    (store / "leak.txt").write_text(planted)
    report = audit_store(store, identifiers)
    assert report.hits_total >= 5
    text = json.dumps(report.to_json()).lower()
    for ident in identifiers:
        assert ident.value.lower() not in text


def test_max_hits_caps_the_list_not_the_count(tmp_path, identifiers):
    store = clean_store(tmp_path / "store")
    (store / "many.txt").write_text(f"{PATIENT_ID}\n" * 50)
    report = audit_store(store, identifiers, max_hits=10)
    assert report.hits_total == 50 and len(report.hits) == 10


# --------------------------------------------------------------------------------------- CLI


def cli(store, sources, json_path=None, weak_ok=False) -> int:
    args = argparse.Namespace(
        store=str(store), sources=[str(sources)], json=json_path, weak_ok=weak_ok, max_hits=1000
    )
    return audit_command.run(args)


def test_cli_exit_status_and_report(tmp_path, sources, capsys):
    store = clean_store(tmp_path / "store")
    assert cli(store, sources) == 0
    assert "clean" in capsys.readouterr().out

    (store / "notes.json").write_text(json.dumps({"who": NAME}))
    report_path = tmp_path / "report.json"
    assert cli(store, sources, json_path=str(report_path)) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and NAME not in out
    report = json.loads(report_path.read_text())
    assert report["hits_total"] == 1 and report["hits"][0]["kind"] == "PatientName"


def test_cli_weak_hits(tmp_path, sources, capsys):
    # A single name part (a surname that may be a word) in decoded pixel bytes is weak:
    # listed, and accepted with --weak-ok.
    store = clean_store(tmp_path / "store")
    data = np.random.default_rng(2).integers(0, 16, (64, 256), dtype=np.uint8)
    data[5, 10:17] = np.frombuffer(b"OKONKWO", np.uint8)
    write_zarr3(store / "pixels", data)
    assert cli(store, sources) == 1
    assert cli(store, sources, weak_ok=True) == 0
    assert "1 weak hits accepted" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, text",
    [("vocab.json", json.dumps({"values": ["OKONKWO PROTOCOL"]})),
     ("images/table.csv", "row,site\n0,CHIDI_SITE\n")],
)  # fmt: skip
def test_cli_weak_ok_never_passes_a_name_in_a_token_or_table_value(
    tmp_path, sources, capsys, name, text
):
    store = clean_store(tmp_path / "store")
    (store / name).parent.mkdir(exist_ok=True)
    (store / name).write_text(text)
    assert cli(store, sources, weak_ok=True) == 1
    assert "FAIL: 1 identifier hits (0 weak)" in capsys.readouterr().out


def test_cli_incomplete_audit(tmp_path, sources, capsys):
    store = clean_store(tmp_path / "store")
    (store / "broken").mkdir()
    (store / "broken" / "zarr.json").write_text(json.dumps({"node_type": "array"}))
    assert cli(store, sources) == 2
    captured = capsys.readouterr()
    assert "INCOMPLETE" in captured.out and "not audited: broken" in captured.err


def test_cli_without_dicom_sources(tmp_path, capsys):
    store = clean_store(tmp_path / "store")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello")
    assert cli(store, tmp_path / "src") == 2
    assert "no identifiers" in capsys.readouterr().err


def test_cli_help_is_registered():
    out = subprocess.run(
        [sys.executable, "-m", "pgjax.cli", "audit", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--sources" in out and "--json" in out


# --------------------------------------------------------- every identifying element (item 6)

STAFF = {
    "OperatorsName": "QUIBBLESWORTH^TAMSIN",
    "RequestingPhysician": "PENDERGHAST^OSWALDO",
    "NameOfPhysiciansReadingStudy": "FAIRCLOUGH^LUDOVIKA",
    "PerformingPhysicianName": "ABERCROMBIE^CASIMIR",
    "ReferringPhysicianName": "VANDERHOEK^ISOLDE",
}


@pytest.fixture(scope="module")
def staff_sources(tmp_path_factory):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    root = tmp_path_factory.mktemp("staff")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in STAFF.items():
        setattr(ds, keyword, value)
    ds.StationName = "ZQSTATION77"
    ds.StudyDate = "20230917"
    ds.StudyTime = "174512"
    ds.AcquisitionDateTime = "20220304081122"
    ds.PatientAge = "098Y"
    ds.PatientAddress = "12 ZQUILL LANE"
    item = Dataset()
    item.ScheduledPerformingPhysicianName = "MONTGOMERIE^PERPETUA"
    step = Dataset()
    step.ScheduledProcedureStepSequence = Sequence([item])
    ds.RequestAttributesSequence = Sequence([step])
    ds.save_as(root / "ct.dcm")
    return root


def test_collect_identifiers_takes_every_basic_profile_element(staff_sources):
    found = collect_identifiers([staff_sources])
    values = {i.value for i in found}
    for name in STAFF.values():
        family, given = name.split("^")
        assert {name, f"{given} {family}"} <= values, name
    assert {"ZQSTATION77", "174512", "17:45:12", "098Y", "12 ZQUILL LANE"} <= values
    assert {"20220304081122", "20220304", "081122", "2022-03-04", "04.03.2022"} <= values
    assert {"MONTGOMERIE^PERPETUA", "PERPETUA MONTGOMERIE", "17/09/2023"} <= values
    by_value = {i.value: i for i in found}
    assert "StationName" in by_value["ZQSTATION77"].kind
    assert "ScheduledProcedureStepSequence" in by_value["MONTGOMERIE^PERPETUA"].kind
    assert by_value["20230917"].embedded and not by_value["174512"].embedded


def test_a_date_inside_a_longer_digit_string_is_found(tmp_path, staff_sources):
    store = clean_store(tmp_path / "store")
    (store / "vocab.json").write_text(json.dumps({"values": ["20230917101530"]}))
    report = audit_store(store, collect_identifiers([staff_sources]))
    assert report.strong_hits_total == 1 and kinds(report) == {"StudyDate"}


def test_the_leaks_of_allow_listed_fields_fail_the_audit(tmp_path, staff_sources, capsys):
    # What an allow-listed field that repeats an identifier would put into vocab.json.
    store = clean_store(tmp_path / "store")
    tokens = [
        "QUIBBLESWORTH^TAMSIN",  # SoftwareVersions = OperatorsName
        "OSWALDO PENDERGHAST",  # ManufacturerModelName = RequestingPhysician
        "FAIRCLOUGH",  # ConvolutionKernel = a reader's surname
        "ORIGINAL\\\\PRIMARY\\\\ZQSTATION77",  # ImageType with the StationName
        "20230917",  # ConvolutionKernel = StudyDate
        "20220304081122",  # SoftwareVersions = AcquisitionDateTime
        "098Y",  # BodyPartExamined = PatientAge
    ]
    (store / "vocab.json").write_text(json.dumps({"values": tokens}, indent=1))
    report = audit_store(store, collect_identifiers([staff_sources]))
    assert report.weak_hits_total == 0
    hit_offsets = {h.offset for h in report.hits}
    text = (store / "vocab.json").read_text()
    for token in tokens:
        start = text.index(json.dumps(token)) + 1
        assert any(start <= o < start + len(json.dumps(token)) for o in hit_offsets), token
    args = argparse.Namespace(
        store=str(store), sources=[str(staff_sources)], json=None, weak_ok=True, max_hits=1000
    )
    assert audit_command.run(args) == 1
    assert "FAIL" in capsys.readouterr().out


def test_matcher_date_and_number_rules():
    matcher = IdentifierMatcher(
        [
            Identifier("StudyDate", "20230917", embedded=True),
            Identifier("StudyTime", "174512"),
            Identifier("SOPInstanceUID", "1.2.3.4.5"),
        ]
    )
    found = lambda text: [i.kind for _, _, i in matcher.find(text)]  # noqa: E731
    assert found(b'"20230917101530"') == ["StudyDate"]  # a date-time starts with the date
    assert found(b"v=20230917") == ["StudyDate"]
    assert found(b"x=120230917") == [] and found(b"0.20230917") == []  # a number's fraction
    assert found(b"K174512,") == ["StudyTime"] and found(b"t=174512.") == ["StudyTime"]
    assert found(b"0.174512,") == [] and found(b"174512.5") == [] and found(b"1745123") == []
    assert found(b"1.2.3.4.5") == ["SOPInstanceUID"] and found(b"1.2.3.4.5.6") == []
    data = b"ab 20230917101530 cd 0.174512 ef K174512 gh"
    for size in (1, 2, 3, 5, len(data)):
        blocks = [data[i : i + size] for i in range(0, len(data), size)]
        assert [i.kind for _, i in matcher.scan(blocks)] == ["StudyDate", "StudyTime"], size
