"""The protocol tokenizer: the min-patients rule, specials, quantile bins, persistence."""

import json
import math
import random

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pgjax.data.protocol import read_protocol
from pgjax.data.schema import Field, Schema
from pgjax.data.tokenizer import MASK, MISSING, PAD, UNK, Z_CLIP, Vocabulary

SCHEMA = Schema(
    fields=(
        Field("Manufacturer", "categorical"),
        Field("SeriesDescription", "categorical", freetext=True),
        Field("KVP", "numeric", multi="first"),
        Field("SliceThickness", "numeric", transform="log", multi="first"),
        Field("ContrastBolusAgent", "presence"),
    )
)
FIELDS = len(SCHEMA.fields)


def record(**values) -> dict:
    return {k: values.get(k) for k in SCHEMA.keywords}


def fit(records, min_patients=1, numeric_bins=4, schema=SCHEMA) -> Vocabulary:
    return Vocabulary.fit(schema, records, min_patients=min_patients, numeric_bins=numeric_bins)


def sample_records(n_patients=40, seed=0):
    rng = random.Random(seed)
    out = []
    for p in range(n_patients):
        for _ in range(rng.randint(1, 3)):
            out.append(
                (
                    f"patient{p}",
                    record(
                        Manufacturer=rng.choice(["GE", "SIEMENS", "PHILIPS"]),
                        SeriesDescription=rng.choice(["AX T#", "COR T#", None]),
                        KVP=rng.choice([80.0, 100.0, 120.0, 140.0]),
                        SliceThickness=rng.choice([0.625, 1.25, 2.5, 5.0]),
                        ContrastBolusAgent=rng.random() < 0.3,
                    ),
                )
            )
    return out


# --------------------------------------------------------------------------- the patient rule


def test_value_needs_min_patients_distinct_patients():
    records = [(f"p{i}", record(Manufacturer="COMMON")) for i in range(5)]
    # one patient's name typed into 100 series, plus three more patients
    records += [("p0", record(Manufacturer="RARE"))] * 100
    records += [(f"p{i}", record(Manufacturer="RARE")) for i in (1, 2, 3)]
    strict, loose = fit(records, min_patients=5), fit(records, min_patients=4)

    assert strict.encode(record(Manufacturer="RARE"))[0][0] == UNK
    assert strict.decode(strict.encode(record(Manufacturer="COMMON"))[0][0]) == (
        "Manufacturer",
        "COMMON",
    )
    rare = loose.encode(record(Manufacturer="RARE"))[0][0]
    assert rare >= 4 and loose.decode(rare) == ("Manufacturer", "RARE")


def test_token_order_and_patient_counts():
    records = [(f"p{i}", record(Manufacturer="B")) for i in range(3)]
    records += [(f"p{i}", record(Manufacturer="A")) for i in range(3)]
    records += [(f"p{i}", record(Manufacturer="C")) for i in range(5)]
    vocab = fit(records)
    start, stop = vocab.field_ranges[0]
    assert [vocab.decode(t)[1] for t in range(start, stop)] == ["C", "A", "B"]
    assert vocab.to_json()["fields"][0]["patients"] == [5, 3, 3]


def test_missing_unknown_and_mask_ids():
    vocab = fit(sample_records())
    assert vocab.specials == {"PAD": PAD, "MISSING": MISSING, "UNK": UNK, "MASK": MASK}
    assert (PAD, MISSING, UNK, MASK) == (0, 1, 2, 3)
    ids, values, mask = vocab.encode(record(Manufacturer="NEVER SEEN", KVP=None))
    assert ids[0] == UNK and ids[2] == MISSING and ids[1] == MISSING
    assert values[2] == 0 and mask[2] == 0
    assert vocab.decode(MISSING) == ("", "<missing>")
    assert vocab.decode(MASK) == ("", "<mask>")
    # MASK is reserved for masked prediction: encode never produces it
    ids, _, _ = vocab.encode_many(r for _, r in sample_records(seed=1))
    assert not (ids == MASK).any() and not (ids == PAD).any()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode(vocab.size)


def test_field_ranges_are_contiguous_and_ids_stay_in_range():
    vocab = fit(sample_records())
    ranges = vocab.field_ranges
    assert ranges[0][0] == 4 and ranges[-1][1] == vocab.size
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    assert vocab.field_kinds == ["categorical", "categorical", "numeric", "numeric", "presence"]
    ids, _, _ = vocab.encode_many(r for _, r in sample_records(seed=2))
    for col, (start, stop) in enumerate(ranges):
        real = ids[:, col][ids[:, col] > MASK]
        assert ((real >= start) & (real < stop)).all()
        assert all(vocab.decode(t)[0] == SCHEMA.keywords[col] for t in set(real.tolist()))


def test_presence_tokens():
    vocab = fit(sample_records())
    start, stop = vocab.field_ranges[4]
    assert stop - start == 2
    assert vocab.decode(vocab.encode(record(ContrastBolusAgent=True))[0][4]) == (
        "ContrastBolusAgent",
        "<present>",
    )
    assert vocab.encode(record(ContrastBolusAgent=False))[0][4] == start


def test_records_must_hold_schema_fields_only():
    vocab = fit(sample_records())
    with pytest.raises(ValueError, match=r"outside the protocol schema: \['PatientName'\]"):
        vocab.encode({**record(), "PatientName": "DOE^JOHN"})
    with pytest.raises(ValueError, match="field KVP \\(numeric\\) holds a str") as e:
        vocab.encode(record(KVP="120 kV"))
    assert "120" not in str(e.value)  # messages name fields, never values
    with pytest.raises(ValueError, match="not finite"):
        fit([("p", record(KVP=math.nan))])


# ------------------------------------------------------------------------------ numeric fields


def test_numeric_bins_are_quantiles():
    rng = np.random.default_rng(0)
    kvp = rng.uniform(70, 140, size=8000)
    vocab = fit(((f"p{i}", record(KVP=float(v))) for i, v in enumerate(kvp)), numeric_bins=8)
    start, stop = vocab.field_ranges[2]
    assert stop - start == 8
    ids, values, mask = vocab.encode_many(record(KVP=float(v)) for v in kvp)
    counts = np.bincount(ids[:, 2] - start, minlength=8)
    assert counts.min() >= 0.95 * len(kvp) / 8 and counts.max() <= 1.05 * len(kvp) / 8
    assert mask[:, 2].all()
    assert abs(values[:, 2].mean()) < 1e-3 and abs(values[:, 2].std() - 1) < 1e-3
    # beyond the fitted range: the end bins
    assert vocab.encode(record(KVP=10.0))[0][2] == start
    assert vocab.encode(record(KVP=1000.0))[0][2] == stop - 1


def test_log_transform():
    rng = np.random.default_rng(1)
    thickness = np.exp(rng.uniform(np.log(0.5), np.log(10.0), size=2000))
    vocab = fit(((f"p{i}", record(SliceThickness=float(v))) for i, v in enumerate(thickness)))
    saved = vocab.to_json()["fields"][3]
    logs = np.log1p(np.sort(thickness))
    assert saved["mean"] == pytest.approx(logs.mean()) and saved["std"] == pytest.approx(logs.std())
    quantiles = np.quantile(logs, [0, 0.25, 0.5, 0.75, 1])
    assert saved["edges"] == pytest.approx(quantiles.tolist(), rel=1e-3)
    assert not set(saved["edges"]) & set(logs.tolist())  # no edge is one patient's value
    _, values, _ = vocab.encode(record(SliceThickness=5.0))
    assert values[3] == pytest.approx((math.log1p(5.0) - logs.mean()) / logs.std(), rel=1e-5)
    # bin labels are in millimetres, not log units
    lo, hi = vocab.decode(vocab.field_ranges[3][0])[1].strip("[)").split(", ")
    assert float(lo) == pytest.approx(thickness.min(), rel=1e-3)
    assert float(hi) == pytest.approx(np.quantile(thickness, 0.25), rel=1e-2)
    # a negative thickness is malformed for a log field: missing
    assert vocab.encode(record(SliceThickness=-1.0))[0][3] == MISSING


def test_constant_numeric_field():
    vocab = fit([(f"p{i}", record(KVP=120.0)) for i in range(50)], numeric_bins=16)
    start, stop = vocab.field_ranges[2]
    assert stop - start == 1  # duplicate edges merged
    ids, values, mask = vocab.encode(record(KVP=120.0))
    assert ids[2] == start and values[2] == 0.0 and mask[2] == 1
    ids, values, _ = vocab.encode(record(KVP=140.0))
    assert ids[2] == start and values[2] == Z_CLIP  # no spread known: clipped, never inf
    assert vocab.decode(start) == ("KVP", "[120]")


def test_numeric_field_without_training_values():
    vocab = fit([(f"p{i}", record(Manufacturer="GE")) for i in range(3)])
    assert vocab.field_ranges[2][0] == vocab.field_ranges[2][1]
    ids, _, mask = vocab.encode(record(KVP=120.0))
    assert ids[2] == UNK and mask[2] == 0


# --------------------------------------------------------------------------------- persistence


def test_same_records_in_any_order_give_identical_bytes(tmp_path):
    records = sample_records()
    shuffled = records[:]
    random.Random(5).shuffle(shuffled)
    fit(records).save(tmp_path / "a.json")
    fit(iter(shuffled)).save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_save_load_round_trip(tmp_path):
    vocab = fit(sample_records(), min_patients=2)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json", schema=SCHEMA)
    assert loaded.size == vocab.size and loaded.field_ranges == vocab.field_ranges
    assert [loaded.decode(t) for t in range(loaded.size)] == [
        vocab.decode(t) for t in range(vocab.size)
    ]
    probe = [r for _, r in sample_records(seed=3)]
    for a, b in zip(vocab.encode_many(probe), loaded.encode_many(probe), strict=True):
        np.testing.assert_array_equal(a, b)
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "vocab.json").read_bytes()
    saved = json.loads((tmp_path / "vocab.json").read_text())
    assert (saved["format"], saved["version"], saved["min_patients"]) == (
        "pgjax-vocabulary",
        1,
        2,
    )
    assert Vocabulary.load(tmp_path / "vocab.json").schema == SCHEMA


def edited(tmp_path, change) -> str:
    fit(sample_records()).save(tmp_path / "vocab.json")
    obj = json.loads((tmp_path / "vocab.json").read_text())
    change(obj)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(obj))
    return str(path)


def test_load_refuses_another_format(tmp_path):
    path = edited(tmp_path, lambda o: o.update(format="something-else"))
    with pytest.raises(ValueError, match=f"{path}: not a pgjax vocabulary"):
        Vocabulary.load(path)


def test_load_refuses_another_version(tmp_path):
    path = edited(tmp_path, lambda o: o.update(version=2))
    with pytest.raises(ValueError, match=f"{path}: vocabulary version 2"):
        Vocabulary.load(path)


def test_load_refuses_edited_content(tmp_path):
    path = edited(tmp_path, lambda o: o["fields"][0]["values"].append("DOE^JOHN"))
    with pytest.raises(ValueError, match=f"{path}: .*content hash mismatch"):
        Vocabulary.load(path)


def test_load_refuses_another_schema(tmp_path):
    fit(sample_records()).save(tmp_path / "vocab.json")
    kvp = Field("KVP", "numeric", transform="log", multi="first")
    other = Schema(fields=(*SCHEMA.fields[:2], kvp, *SCHEMA.fields[3:]))
    with pytest.raises(ValueError, match="fitted for another protocol schema") as e:
        Vocabulary.load(tmp_path / "vocab.json", schema=other)
    assert str(tmp_path / "vocab.json") in str(e.value) and "KVP" in str(e.value)


def test_load_refuses_a_file_that_is_not_json(tmp_path):
    (tmp_path / "vocab.json").write_text("not json")
    with pytest.raises(ValueError, match="cannot read vocabulary"):
        Vocabulary.load(tmp_path / "vocab.json")


# ---------------------------------------------------------------------------------- real files


def test_encode_real_files_through_read_protocol():
    schema = Schema()
    files = ["CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "US1_UNCI.dcm"]
    protocols = {
        name: read_protocol(
            pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True), schema
        )
        for name in files
    }
    vocab = Vocabulary.fit(
        schema, ((name, p) for name, p in protocols.items()), min_patients=1, numeric_bins=4
    )
    ids, values, mask = vocab.encode_many(protocols.values())
    assert ids.shape == values.shape == mask.shape == (4, len(schema.fields))
    assert (ids.dtype, values.dtype, mask.dtype) == (np.int32, np.float32, np.uint8)
    column = {k: i for i, k in enumerate(schema.keywords)}
    assert [vocab.decode(t) for t in ids[:, column["Modality"]]] == [
        ("Modality", m) for m in ("CT", "MR", "CR", "US")
    ]
    assert ids[1, column["KVP"]] == MISSING  # MR has no kVp
    assert mask[0, column["KVP"]] == 1 and mask[1, column["KVP"]] == 0
    assert vocab.decode(ids[0, column["ContrastBolusAgent"]])[1] == "<present>"

    # Each file is one patient: at min_patients=2 a value only CT_small has becomes UNK, while
    # one CT_small shares with MR_small (MONOCHROME2) stays.
    strict = Vocabulary.fit(schema, protocols.items(), min_patients=2, numeric_bins=4)
    ct = strict.encode(protocols["CT_small.dcm"])[0]
    assert ct[column["Manufacturer"]] == UNK
    assert strict.decode(ct[column["PhotometricInterpretation"]]) == (
        "PhotometricInterpretation",
        "MONOCHROME2",
    )


def test_numeric_edges_are_never_one_patients_value():
    # One patient weighs 231.7; the rest share a handful of common values.
    schema = Schema(fields=(Field("KVP", "numeric", multi="first"),))
    rng = random.Random(3)
    records = [(f"p{i}", {"KVP": rng.choice([70.0, 80.0, 90.0, 100.0])}) for i in range(60)]
    records += [("lone", {"KVP": 231.7}), ("lone", {"KVP": 231.7}), ("pair", {"KVP": 0.37})]
    for k in (1, 5):
        vocab = Vocabulary.fit(schema, records, min_patients=k, numeric_bins=16)
        fv = vocab.fields[0]
        text = json.dumps(vocab.to_json())
        assert "231.7" not in text and "0.37" not in text
        assert not {231.7, 0.37} & set(fv.edges)
        assert min(fv.patients) >= k  # every bin is k-anonymous
        # the lone values still land in the end bins
        ids = vocab.encode({"KVP": 231.7})[0]
        assert ids[0] == fv.stop - 1 and vocab.encode({"KVP": 0.37})[0][0] == fv.start


def test_numeric_field_with_fewer_than_k_patients_gets_no_bins():
    schema = Schema(fields=(Field("KVP", "numeric", multi="first"),))
    records = [(f"p{i}", {"KVP": 100.0 + i}) for i in range(4)]
    vocab = Vocabulary.fit(schema, records, min_patients=5, numeric_bins=4)
    assert vocab.fields[0].values == () and vocab.fields[0].edges == ()
    assert vocab.encode({"KVP": 101.0})[0][0] == UNK
