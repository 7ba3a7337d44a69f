"""Reading protocol fields: normalisation, real headers, malformed and enhanced multi-frame ones."""

import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pgjax.data import protocol
from pgjax.data.protocol import check_schema, normalize_text, read_protocol
from pgjax.data.schema import Field, Schema

SCHEMA = Schema()


def header(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


def raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put an element into `ds` exactly as bytes read from a file (pydicom converts on access)."""
    tag = tag_for_keyword(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def item(**elements) -> Dataset:
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some test values are deliberately not valid DICOM
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
    return ds


# ------------------------------------------------------------------------------ normalize_text


@pytest.mark.parametrize(
    "value, expected",
    [
        ("  head  first ", "HEAD FIRST"),
        ("t1\tmprage\nsag", "T1 MPRAGE SAG"),
        ("STANDARD\x00", "STANDARD"),  # NUL padding
        ("a\u200bb", "AB"),  # a zero-width space is a format character: dropped
        ("ＣＴ　ｈｅａｄ", "CT HEAD"),  # full-width letters and ideographic space (NFKC)
        ("V3.51*P25", "V3.51*P25"),  # non-free-text keeps digits and punctuation
        ("", ""),
    ],
)
def test_normalize_text(value, expected):
    assert normalize_text(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("  Ax T1 post 3.0mm 12/03/2021 ", "AX T# POST #.#MM #/#/#"),
        ("T1,POST", "T# POST"),
        ("T1 (POST)", "T# POST"),
        ("Brain -- w/o contrast!!", "BRAIN - W/O CONTRAST"),
        ("ACC 2019-0004411 chest", "ACC #-# CHEST"),
        ("head__neck..cta", "HEAD_NECK.CTA"),
        ("#1 run", "# RUN"),
        ("12345", "#"),
    ],
)
def test_normalize_text_freetext(value, expected):
    assert normalize_text(value, freetext=True) == expected


def test_freetext_normalisation_merges_dated_variants():
    a = normalize_text("CT Chest 2021-03-04 09:15", freetext=True)
    b = normalize_text("ct  chest 1999-12-31 23:59", freetext=True)
    assert a == b == "CT CHEST #-#-# # #"


# ------------------------------------------------------------------------------- real headers


def test_read_protocol_ct_small():
    p = read_protocol(header("CT_small.dcm"), SCHEMA)
    assert list(p) == SCHEMA.keywords
    assert p["Modality"] == "CT"
    assert p["Manufacturer"] == "GE MEDICAL SYSTEMS"
    assert p["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert p["KVP"] == 120.0 and isinstance(p["KVP"], float)
    assert p["XRayTubeCurrent"] == 170.0  # IS
    assert p["SliceThickness"] == 5.0  # DS "5.000000"
    assert p["PixelSpacing"] == pytest.approx(0.661468)  # mean of the two spacings
    assert p["Rows"] == 128.0  # US
    assert p["ContrastBolusAgent"] is True
    assert p["StudyDescription"] == "E+#"  # free text: digits become '#'
    assert p["RepetitionTime"] is None and p["ViewPosition"] is None


def test_read_protocol_mr_small():
    p = read_protocol(header("MR_small.dcm"), SCHEMA)
    assert p["Modality"] == "MR"
    assert (p["RepetitionTime"], p["EchoTime"], p["FlipAngle"]) == (4000.0, 240.0, 90.0)
    assert p["ScanningSequence"] == "SE"
    assert p["ImageType"] == "DERIVED\\SECONDARY\\OTHER"
    # ContrastBolusAgent is present but empty: not contrast.
    assert p["ContrastBolusAgent"] is False
    assert p["KVP"] is None


def test_read_protocol_cr():
    p = read_protocol(header("RG1_UNCI.dcm"), SCHEMA)
    assert (p["Modality"], p["BodyPartExamined"], p["ViewPosition"]) == ("CR", "CHEST", "PA")
    assert p["KVP"] == 150.0
    assert p["ContrastBolusAgent"] is False


def test_only_schema_fields_leave_the_reader():
    ds = header("CT_small.dcm")
    ds.StudyDescription = "Chest for Doe^John 1CT1"
    p = read_protocol(ds, SCHEMA)
    assert set(p) == set(SCHEMA.keywords)
    text = " ".join(str(v) for v in p.values())
    for identifier in (str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID, ds.StudyDate):
        assert identifier.upper() not in text.upper()


class NoIteration(Dataset):
    """A dataset that fails if anyone walks over all of its elements."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("read_protocol iterated over the whole dataset")

    __iter__ = keys = values = items = elements = iterall = walk = _refuse


def test_read_protocol_looks_up_keywords_only():
    ds = NoIteration(header("MR_small.dcm"))
    assert read_protocol(ds, SCHEMA)["Modality"] == "MR"


def test_schema_with_identifier_is_refused():
    for keyword in ("PatientName", "StudyDate", "PatientID", "SOPInstanceUID"):
        schema = Schema(fields=(Field(keyword, "categorical"),))
        with pytest.raises(ValueError, match=rf"{keyword} \((VR \w\w|PS3.15 Basic Profile)\)"):
            read_protocol(Dataset(), schema)


# --------------------------------------------------------------------------- missing, malformed


def test_missing_fields():
    p = read_protocol(item(Modality="US"), SCHEMA)
    assert p["Modality"] == "US"
    for f in SCHEMA.fields:
        if f.keyword != "Modality":
            # a presence field is never missing: absent means False
            assert p[f.keyword] is (False if f.kind == "presence" else None), f.keyword


def test_empty_values_are_missing():
    ds = item(Modality="", KVP="", ImageType=["", ""], ContrastBolusAgent="")
    p = read_protocol(ds, SCHEMA)
    assert p["Modality"] is None and p["KVP"] is None and p["ImageType"] is None
    assert p["ContrastBolusAgent"] is False


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"5 mm", None),
        (b"", None),
        (b"  ", None),
        (b"nan", None),
        (b"inf", None),
        (b"1_000", None),
        (b"abc", None),
        (b" 7.5 ", 7.5),
        (b"2.5E+00 ", 2.5),
        (b"-.5", -0.5),
    ],
)
def test_malformed_numeric_strings(text, expected):
    ds = item(Modality="CT")
    raw(ds, "SliceThickness", "DS", text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reader must not let pydicom warn (values in text)
        assert read_protocol(ds, SCHEMA)["SliceThickness"] == expected


@pytest.mark.parametrize("fast", [False, True])
def test_header_values_do_not_reach_logs(caplog, monkeypatch, fast):
    if not fast:  # pydicom's conversion is the path that logs invalid values
        monkeypatch.setattr(protocol, "_fast_value", lambda *args, **kwargs: protocol._SLOW)
    ds = item(Modality="CT")
    raw(ds, "StudyDescription", "LO", b"NIGHTINGALE^FLORENCE " * 5)  # too long for LO: invalid
    with caplog.at_level("DEBUG"):
        assert read_protocol(ds, SCHEMA)["StudyDescription"].startswith("NIGHTINGALE FLORENCE")
    if not fast:
        assert caplog.records, "pydicom no longer logs invalid values: this test needs a new probe"
    assert "NIGHTINGALE" not in caplog.text


def test_malformed_multivalue_and_integer_strings():
    ds = item(Modality="CT")
    raw(ds, "PixelSpacing", "DS", b"0.5\\x")  # mean of a malformed pair: missing
    raw(ds, "XRayTubeCurrent", "IS", b"170mA")
    p = read_protocol(ds, SCHEMA)
    assert p["PixelSpacing"] is None and p["XRayTubeCurrent"] is None


def test_numeric_multi_rules():
    ds = item(PixelSpacing=[0.5, 0.7], InversionTime=300)
    first = Schema(fields=(Field("PixelSpacing", "numeric", multi="first"),))
    mean = Schema(fields=(Field("PixelSpacing", "numeric", multi="mean"),))
    assert read_protocol(ds, first)["PixelSpacing"] == 0.5
    assert read_protocol(ds, mean)["PixelSpacing"] == pytest.approx(0.6)


def test_multivalued_categorical_keeps_stored_order():
    ds = item(ImageType=["original", "PRIMARY ", "", "localizer"], ScanningSequence=["SE", "IR"])
    p = read_protocol(ds, SCHEMA)
    assert p["ImageType"] == "ORIGINAL\\PRIMARY\\LOCALIZER"
    assert p["ScanningSequence"] == "SE\\IR"
    first = Schema(fields=(Field("ImageType", "categorical", multi="first"),))
    assert read_protocol(ds, first)["ImageType"] == "ORIGINAL"


def test_freetext_field_is_normalised_hard():
    p = read_protocol(item(SeriesDescription="Ax T1 (post) 12/03/2021"), SCHEMA)
    assert p["SeriesDescription"] == "AX T# POST #/#/#"


# ------------------------------------------------------------------------ enhanced multi-frame


def enhanced_mr() -> Dataset:
    ds = item(Modality="MR", ImageType=["ORIGINAL", "PRIMARY", "M", "NONE"])
    shared = item(
        PixelMeasuresSequence=Sequence([item(SliceThickness="1.2", PixelSpacing=[0.9, 0.9])]),
        MRTimingAndRelatedParametersSequence=Sequence([item(RepetitionTime=2300.0, FlipAngle=8.0)]),
    )
    frame = item(
        MREchoSequence=Sequence([item(EffectiveEchoTime=2.98)]),
        # the shared group says 1.2 mm: shared groups win over per-frame ones
        PixelMeasuresSequence=Sequence([item(SliceThickness="9.9")]),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame, item()])
    return ds


def test_enhanced_multiframe_functional_groups():
    p = read_protocol(enhanced_mr(), SCHEMA)
    assert p["SliceThickness"] == 1.2
    assert p["PixelSpacing"] == pytest.approx(0.9)
    assert (p["RepetitionTime"], p["FlipAngle"]) == (2300.0, 8.0)
    assert p["EchoTime"] == 2.98  # EffectiveEchoTime in the per-frame MR Echo macro
    assert p["InversionTime"] is None


def test_top_level_element_wins_over_functional_groups():
    ds = enhanced_mr()
    ds.SliceThickness = "3"
    assert read_protocol(ds, SCHEMA)["SliceThickness"] == 3.0


def test_enhanced_ct_file_and_contrast_sequence():
    # eCT_Supplemental keeps slice thickness and spacing in the shared Pixel Measures macro and
    # describes its contrast in the Enhanced Contrast/Bolus module.
    p = read_protocol(header("eCT_Supplemental.dcm"), SCHEMA)
    assert p["SliceThickness"] == 10.0
    assert p["PixelSpacing"] == pytest.approx(0.388672)
    assert p["ContrastBolusAgent"] is True


def test_enhanced_ct_kernel_and_kvp():
    ds = item(Modality="CT")
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            item(
                CTXRayDetailsSequence=Sequence([item(KVP="100")]),
                CTReconstructionSequence=Sequence([item(ConvolutionKernel="b30f")]),
                CTExposureSequence=Sequence([item(XRayTubeCurrentInmA=212.5)]),
            )
        ]
    )
    p = read_protocol(ds, SCHEMA)
    assert (p["KVP"], p["ConvolutionKernel"], p["XRayTubeCurrent"]) == (100.0, "B30F", 212.5)


# ------------------------------------------------------------------ the fast raw-value reader
# read_protocol converts plain ASCII values from their raw bytes itself (protocol._fast_value);
# with the fast reader switched off every value goes through pydicom's conversion, as before.
# The two must give the same protocol values, whatever the bytes.


def _slow(monkeypatch):
    from pgjax.data import redaction

    monkeypatch.setattr(protocol, "_fast_value", lambda *args, **kwargs: protocol._SLOW)
    monkeypatch.setattr(redaction, "_fast_text", lambda *args, **kwargs: None)


def _both_ways(monkeypatch, read):
    """read() with the fast reader, then with pydicom's conversion only."""
    fast = read()
    with monkeypatch.context() as m:
        _slow(m)
        slow = read()
    return fast, slow


def _testdata_headers():
    """pydicom's test files that pydicom can read, as the scan reads them."""
    from pydicom.data import get_testdata_files

    for path in sorted(get_testdata_files()):
        try:
            _fresh(path)
        except Exception:
            continue
        yield path


def _allowed(fields):
    """The fields check_schema accepts (the Basic Profile's descriptions only as free text)."""
    out = []
    for f in fields:
        try:
            check_schema(Schema(fields=(f,)))
        except ValueError:
            continue
        out.append(f)
    return Schema(fields=tuple(out))


ALL_KINDS = [
    Schema(fields=tuple(f for f in SCHEMA.fields)),
    # Every default keyword under every other kind and multi rule (where check_schema allows).
    _allowed(Field(f.keyword, "categorical", multi="first") for f in SCHEMA.fields),
    _allowed(Field(f.keyword, "categorical", freetext=True) for f in SCHEMA.fields),
    _allowed(Field(f.keyword, "numeric", multi="mean") for f in SCHEMA.fields),
    _allowed(Field(f.keyword, "presence") for f in SCHEMA.fields),
]


def _identifying_words(ds):
    """What the scan takes from a header to redact protocol values (see redaction.py)."""
    from pgjax.data.redaction import header_redactor

    r = header_redactor(ds)
    return r.plain, r.free


def test_fast_reader_equals_pydicom_on_every_test_file(monkeypatch):

    checked = 0
    for path in _testdata_headers():
        for schema in ALL_KINDS:
            fast, slow = _both_ways(
                monkeypatch, lambda s=schema, p=path: read_protocol(_fresh(p), s)
            )
            assert fast == slow, (path, schema.fields[0].kind)
        fast, slow = _both_ways(monkeypatch, lambda p=path: _identifying_words(_fresh(p)))
        assert fast == slow, path
        checked += 1
    assert checked > 100


def _fresh(path):
    # A new read each time: pydicom keeps converted values, which would hide the raw path.
    return pydicom.dcmread(path, defer_size=4096, force=True)


FAST_KEYWORDS = {  # keyword: VR, one per value representation the fast reader converts
    "KVP": "DS", "XRayTubeCurrent": "IS", "Modality": "CS", "SeriesDescription": "LO",
    "ConvolutionKernel": "SH", "Rows": "US", "DiffusionBValue": "FD", "SliceLocation": "DS",
    "ReferencedFrameNumber": "IS", "DerivationDescription": "ST", "PixelSpacing": "DS",
    "RecommendedDisplayFrameRateInFloat": "FL", "NumberOfWaveformSamples": "UL",
    "TransducerData": "LO",
}  # fmt: skip
PIECES = [
    b"1", b"2.5", b"-.5", b"+3", b"1e3", b"4E-2", b"7.", b".", b"e", b"-", b"+", b"5 mm", b"nan",
    b"inf", b"1_0", b" ", b"  ", b"\\", b"\\\\", b"\x00", b"\t", b"\r\n", b"abc", b"Doe^John",
    b"T1", b"AX", b"\xc3\xa9", b"\xe9", b"\x1b$B", b"=", b"#", b"--", b"..", b"\xd9\xa3",
    b"\x7f", b"ORIGINAL", b"PRIMARY", b"12/03/2021",
]  # fmt: skip
CHARSETS = [None, b"ISO_IR 100", b"ISO_IR 192", b"ISO_IR 13", b"\\ISO 2022 IR 87", b"GB18030"]


def test_fast_reader_equals_pydicom_on_malformed_values(monkeypatch):
    import random

    rng = random.Random(0)
    schemas = [
        _allowed(Field(k, kind, **extra) for k in FAST_KEYWORDS)
        for kind, extra in [
            ("categorical", {}),
            ("categorical", {"multi": "first"}),
            ("categorical", {"freetext": True}),
            ("numeric", {"multi": "first"}),
            ("numeric", {"multi": "mean"}),
            ("presence", {}),
        ]
    ]
    for trial in range(200):
        charset = rng.choice(CHARSETS)
        little = trial % 4 != 3
        values = {}
        for keyword, vr in FAST_KEYWORDS.items():
            if rng.random() < 0.15:
                continue  # absent
            if vr in ("US", "FD", "FL", "UL"):
                values[keyword] = (vr, bytes(rng.randrange(256) for _ in range(rng.randrange(10))))
            else:
                values[keyword] = (vr, b"".join(rng.choices(PIECES, k=rng.randrange(5))))

        def build(values=values, charset=charset, little=little, implicit=trial % 5 == 0):
            ds = Dataset()
            if charset is not None:
                ds[0x00080005] = RawDataElement(0x00080005, "CS", len(charset), charset, 0,
                                                implicit, little)  # fmt: skip
            for keyword, (vr, value) in values.items():
                tag = tag_for_keyword(keyword)
                ds[tag] = RawDataElement(tag, None if implicit else vr, len(value), value, 0,
                                         implicit, little)  # fmt: skip
            return ds

        for schema in schemas:
            fast, slow = _both_ways(monkeypatch, lambda s=schema, b=build: read_protocol(b(), s))
            assert fast == slow, (values, charset, schema.fields[0])


def test_fast_identifying_words_equal_pydicom(monkeypatch):
    import random

    rng = random.Random(1)
    for _ in range(300):
        charset = rng.choice(CHARSETS)
        ds = Dataset()
        if charset is not None:
            ds[0x00080005] = RawDataElement(0x00080005, "CS", len(charset), charset, 0, False, True)
        for keyword, vr in (("PatientName", "PN"), ("OtherPatientIDs", "LO"),
                            ("OperatorsName", "PN"), ("AccessionNumber", "SH"),
                            ("StationName", "SH"), ("StudyDate", "DA"), ("StudyTime", "TM"),
                            ("AcquisitionDateTime", "DT"), ("PatientAge", "AS"),
                            ("StudyInstanceUID", "UI")):  # fmt: skip
            value = b"".join(rng.choices(PIECES, k=rng.randrange(5)))
            ds[tag_for_keyword(keyword)] = RawDataElement(
                tag_for_keyword(keyword), vr, len(value), value, 0, False, True
            )
        fast, slow = _both_ways(monkeypatch, lambda d=ds: _identifying_words(_copy(d)))
        assert fast == slow, ds


def _copy(ds):
    out = Dataset()
    for tag in list(ds._dict):
        out[tag] = ds.get_item(tag, keep_deferred=True)
    return out


def test_normalize_text_ascii_path_equals_general_path():
    import random

    rng = random.Random(2)
    alphabet = [chr(c) for c in range(0x20, 0x7F)]
    for _ in range(3000):
        text = "".join(rng.choices(alphabet, k=rng.randrange(12)))
        for freetext in (False, True):
            # A trailing non-ASCII space forces the general path and normalises away.
            assert normalize_text(text, freetext) == normalize_text(text + "\u00a0", freetext)


def test_fast_reader_serves_plain_headers(monkeypatch):
    served = []
    fast_value = protocol._fast_value

    def counting(*args, **kwargs):
        value = fast_value(*args, **kwargs)
        served.append(value is not protocol._SLOW)
        return value

    monkeypatch.setattr(protocol, "_fast_value", counting)
    read_protocol(_fresh(get_testdata_file("CT_small.dcm")), SCHEMA)
    assert sum(served) >= 15 and all(served)  # every present field of a plain CT header


def test_single_text_equals_pydicom(monkeypatch):
    """scan.single_text (identity UIDs, PatientID, Modality) reads plain values from the raw
    bytes; it must give what str(ds.get(k) or "").strip() gives, for every file and value."""
    import random

    from pgjax.data.scan import single_text

    keywords = {"SOPInstanceUID": "UI", "StudyInstanceUID": "UI", "PatientID": "LO",
                "Modality": "CS", "AccessionNumber": "SH"}  # fmt: skip

    def both(ds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the malformed values
            ok = protocol.ascii_text_safe(ds)
            fast = {k: single_text(ds, k, ok) for k in keywords}
            slow = {k: str(ds.get(k, "") or "").strip() for k in keywords}
        return fast, slow

    for path in _testdata_headers():
        fast, slow = both(_fresh(path))
        assert fast == slow, path
    rng = random.Random(3)
    for trial in range(300):
        ds = Dataset()
        charset = rng.choice(CHARSETS)
        if charset is not None:
            ds[0x00080005] = RawDataElement(0x00080005, "CS", len(charset), charset, 0, False, True)
        for keyword, vr in keywords.items():
            value = b"".join(
                rng.choices(PIECES + [b"1.2.840.10008", b" ", b"\\x00"], k=rng.randrange(4))
            )
            tag = tag_for_keyword(keyword)
            ds[tag] = RawDataElement(tag, None if trial % 3 == 0 else vr, len(value), value, 0,
                                     trial % 3 == 0, True)  # fmt: skip
        fast, slow = both(ds)
        assert fast == slow, ds


@pytest.mark.parametrize(
    "keyword",
    ["PatientAge", "PatientWeight", "PatientSize", "ClinicalTrialSubjectID", "PatientAddress",
     "PatientTelephoneNumbers", "Occupation", "StationName", "EthnicGroup", "MilitaryRank",
     "InstitutionName", "DeviceSerialNumber", "PatientSex"],
)  # fmt: skip
def test_schema_with_a_basic_profile_attribute_is_refused(keyword):
    for kind in ("categorical", "numeric"):
        multi = "first" if kind == "numeric" else "join"
        schema = Schema(
            fields=(Field("Modality", "categorical"), Field(keyword, kind, multi=multi))
        )
        with pytest.raises(ValueError, match=rf"fields {keyword} \(PS3.15 Basic Profile\)"):
            check_schema(schema)


def test_schema_descriptions_only_as_free_text():
    for keyword in ("StudyDescription", "ProtocolName", "PerformedProcedureStepDescription"):
        check_schema(Schema(fields=(Field(keyword, "categorical", freetext=True),)))
        with pytest.raises(ValueError, match=rf"{keyword} \(PS3.15 Basic Profile\)"):
            check_schema(Schema(fields=(Field(keyword, "categorical"),)))
    # A yes/no holds no identity.
    check_schema(Schema(fields=(Field("PatientWeight", "presence"),)))


def test_basic_profile_keywords_are_pydicom_keywords():
    from pgjax.data.basic_profile import BASIC_PROFILE_KEYWORDS, DESCRIPTOR_KEYWORDS

    assert not [k for k in BASIC_PROFILE_KEYWORDS | DESCRIPTOR_KEYWORDS if not tag_for_keyword(k)]
    assert DESCRIPTOR_KEYWORDS <= BASIC_PROFILE_KEYWORDS
