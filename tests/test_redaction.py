"""Redaction of allow-listed values that repeat an identifier, and the patient count of K.

Markers are planted in copies of pydicom's CT_small.dcm and read back through the scan
(`scan_file`), the way `pgjax preprocess` reads every file.
"""

import json

import pydicom
import pytest
from pydicom.data import get_testdata_file

from pgjax.data.scan import scan_file
from pgjax.data.schema import Schema
from pgjax.data.tokenizer import Vocabulary

SALT = b"r" * 32
SCHEMA = Schema()

# (name, {element: value}, {allow-listed field: value}, marker that must not come out)
LEAKS = [
    ("operator", {"OperatorsName": "QUIXOTE^BARNABY"},
     {"SoftwareVersions": "QUIXOTE^BARNABY"}, "QUIXOTE"),
    ("requesting", {"RequestingPhysician": "PENDLEBURY^OSWIN"},
     {"ManufacturerModelName": "OSWIN PENDLEBURY"}, "PENDLEBURY"),
    ("reading", {"NameOfPhysiciansReadingStudy": "FAIRWEATHER^LUDMILA"},
     {"ConvolutionKernel": "FAIRWEATHER"}, "FAIRWEATHER"),
    ("performing", {"PerformingPhysicianName": "ABERNATHY^CORMAC"},
     {"Manufacturer": "ABERNATHY"}, "ABERNATHY"),
    ("referring", {"ReferringPhysicianName": "VANTONGEREN^ILSE"},
     {"BodyPartExamined": "VANTONGEREN"}, "VANTONGEREN"),
    ("station", {"StationName": "ZQSTATION77"},
     {"ImageType": ["ORIGINAL", "PRIMARY", "ZQSTATION77"]}, "ZQSTATION77"),
    ("institution", {"InstitutionName": "ST ZQUILLA INFIRMARY"},
     {"ManufacturerModelName": "ST ZQUILLA INFIRMARY"}, "ZQUILLA"),
    ("patient id", {"PatientID": "ZQPID4471"},
     {"SoftwareVersions": "V1 ZQPID4471"}, "ZQPID4471"),
    ("accession", {"AccessionNumber": "ZQACC3321"},
     {"ConvolutionKernel": "ZQACC3321"}, "ZQACC3321"),
    ("study date", {"StudyDate": "20230917"}, {"ConvolutionKernel": "20230917"}, "20230917"),
    ("date-time", {"AcquisitionDateTime": "20230917101530"},
     {"SoftwareVersions": "20230917101530"}, "20230917"),
    ("time", {"StudyTime": "174512"}, {"ConvolutionKernel": "K174512"}, "174512"),
    ("age", {"PatientAge": "098Y"}, {"BodyPartExamined": "098Y"}, "098Y"),
    ("other date", {}, {"ConvolutionKernel": "2019-03-15"}, "2019-03-15"),
    ("other date, day first", {}, {"SoftwareVersions": "VER 15.03.2019"}, "15.03.2019"),
    ("name in free text", {"OperatorsName": "MCGILLICUDDY^ROSALIND"},
     {"SeriesDescription": "AX T1 rosalind"}, "ROSALIND"),
]  # fmt: skip


def write(tmp_path, name, **attrs):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k, v in attrs.items():
        setattr(ds, k, v)
    path = tmp_path / f"{name.replace(' ', '_').replace(',', '')}.dcm"
    ds.save_as(path)
    return str(path)


@pytest.mark.parametrize("name, header, fields, marker", LEAKS, ids=[x[0] for x in LEAKS])
def test_an_allow_listed_value_repeating_an_identifier_is_redacted(
    tmp_path, name, header, fields, marker
):
    record = scan_file(
        str(tmp_path), write(tmp_path, name, **header, **fields), SCHEMA, SALT, "dir"
    )
    assert record.ok, record.reason
    assert marker.upper() not in json.dumps(record.protocol).upper()
    keyword = next(iter(fields))
    assert record.protocol[keyword] == "<REDACTED>"
    # The other fields of the file are kept: only the identifying value goes.
    assert record.protocol["Manufacturer" if keyword != "Manufacturer" else "Modality"]


def test_ordinary_values_are_kept(tmp_path):
    # An institution sharing a word with the manufacturer, a short station name, dates and
    # names elsewhere in the header: none of the protocol values repeats them.
    path = write(
        tmp_path,
        "plain",
        InstitutionName="ZQ MEDICAL CENTER",
        StationName="CT01",
        OperatorsName="SMITH^ANNA",
        StudyDate="20230917",
        PatientAge="054Y",
        SeriesDescription="AX 5MM STANDARD",
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
    )
    p = scan_file(str(tmp_path), path, SCHEMA, SALT, "dir").protocol
    assert p["Manufacturer"] == "GE MEDICAL SYSTEMS"
    assert p["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert p["ConvolutionKernel"] == "STANDARD"
    assert p["SeriesDescription"] == "AX #MM STANDARD"
    assert p["KVP"] == 120.0


def test_numeric_value_that_reads_as_a_date_is_dropped(tmp_path):
    path = write(tmp_path, "kvp", KVP="20230917")
    assert scan_file(str(tmp_path), path, SCHEMA, SALT, "dir").protocol["KVP"] is None


def test_user_word_list_redacts_names_no_header_declares(tmp_path):
    from pgjax.data.redaction import read_redact_words, words_redactor

    words = tmp_path / "names.txt"
    # One name or phrase a line, matched whole: "Ingrid Vasquez-Oyelaran" does not redact
    # a value with "INGRID" alone.
    words.write_text("# staff\nhollowbrook\n  Ingrid Vasquez-Oyelaran \n\n")
    redactor = words_redactor(read_redact_words(words))
    protocol = {
        "SeriesDescription": "T1 HOLLOWBROOK",
        "SoftwareVersions": "DR INGRID VASQUEZ-OYELARAN",
    }
    schema = Schema.from_json(
        [
            {"keyword": "SeriesDescription", "kind": "categorical", "freetext": True},
            {"keyword": "SoftwareVersions", "kind": "categorical"},
        ]
    )
    out = redactor.redact(protocol, schema)
    assert out == {"SeriesDescription": "<REDACTED>", "SoftwareVersions": "<REDACTED>"}
    kept = {"SeriesDescription": "T1 HOLLOW", "SoftwareVersions": "INGRID 2"}
    assert redactor.redact(kept, schema) == kept
    with pytest.raises(ValueError, match="names.txt: no words"):
        words.write_text("# nothing\n")
        read_redact_words(words)


# ------------------------------------------------------------------------- K counts patients


def studies_of_one_person(tmp_path, n, **identity):
    paths = []
    for s in range(n):
        paths.append(
            write(
                tmp_path,
                f"study{s}",
                StudyInstanceUID=f"1.2.826.0.1.3680043.8.498.77{s}",
                SeriesInstanceUID=f"1.2.826.0.1.3680043.8.498.88{s}",
                SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.99{s}",
                SeriesDescription="ZQUNIQUE PHRASE",
                **identity,
            )
        )
    return [scan_file(str(tmp_path), p, SCHEMA, SALT, "dir") for p in paths]


@pytest.mark.parametrize("name", ["DOE^ZQJOHN", ""], ids=["name only", "no identity"])
def test_studies_without_patient_id_do_not_count_as_patients(tmp_path, name):
    records = studies_of_one_person(tmp_path, 8, PatientID="", PatientName=name)
    assert all(r.ok for r in records)
    assert len({r.patient_key for r in records}) == 1
    assert len({r.study_key for r in records}) == 8
    vocab = Vocabulary.fit(
        SCHEMA, ((r.patient_key, r.protocol) for r in records), min_patients=5, numeric_bins=4
    )
    assert "ZQUNIQUE PHRASE" not in json.dumps(vocab.to_json())


def test_patient_id_still_separates_patients(tmp_path):
    keys = set()
    for i in range(3):  # one name, three PatientIDs: three patients
        path = write(tmp_path, f"p{i}", PatientID=f"ZQ{i}", PatientName="DOE^ZQJOHN")
        keys.add(scan_file(str(tmp_path), path, SCHEMA, SALT, "dir").patient_key)
    assert len(keys) == 3


def test_nested_names_and_the_modality_column(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.ScheduledPerformingPhysicianName = "MONTGOMERIE^PERPETUA"
    step = Dataset()
    step.ScheduledProcedureStepSequence = Sequence([item])
    path = write(
        tmp_path,
        "nested",
        RequestAttributesSequence=Sequence([step]),
        ConvolutionKernel="MONTGOMERIE",
        OperatorsName="ZQOPERATOR",
        Modality="ZQOPERATOR",
    )
    record = scan_file(str(tmp_path), path, SCHEMA, SALT, "dir")
    assert record.protocol["ConvolutionKernel"] == "<REDACTED>"
    assert record.modality == "OT"  # table.csv's modality column, which K does not filter
