"""The synthetic corpus: valid DICOM, determinism, site files, physics measured on generated
images, ground truth, the protocol/label association, and fake PHI where a de-identifier must
find it.

Corpora here use tiny images (32-64 px, a few slices) so the whole file runs in seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from pgjax.cli import main as cli_main
from pgjax.synth import phantoms, physics, sitefile, sites
from pgjax.synth.corpus import (
    SynthSettings,
    make_patient,
    plan_corpus,
    rle_encode_frame,
    study_truths,
    write_corpus,
)

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = REPO / "configs" / "sites" / "benchmark.toml"

TINY = dict(
    radiograph_size=64,
    ct_size=32,
    ct_slices=(4, 6),
    mr_size=32,
    mr_slices=(4, 6),
    us_size=32,
    us_frames=3,
)
CORPUS = dict(
    TINY,
    studies=40,
    seed=7,
    modality_mix=(0.3, 0.3, 0.25, 0.15),
    shuffled_series=0.3,
    phi_in_description=0.1,
)

REQUIRED = {
    "all": [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
        "AccessionNumber", "InstitutionName", "ReferringPhysicianName", "OperatorsName",
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
        "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "BodyPartExamined",
        "StudyDescription", "SeriesDescription", "ProtocolName", "ImageType",
        "PhotometricInterpretation", "Rows", "Columns", "BitsStored", "SeriesDate",
        "AcquisitionDate", "InstanceNumber", "SeriesNumber",
    ],
    "CT": [
        "KVP", "XRayTubeCurrent", "Exposure", "ConvolutionKernel", "SliceThickness",
        "SpacingBetweenSlices", "PixelSpacing", "ContrastBolusAgent", "RescaleSlope",
        "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
        "FrameOfReferenceUID",
    ],
    "MR": [
        "RepetitionTime", "EchoTime", "FlipAngle", "MagneticFieldStrength", "ScanningSequence",
        "SequenceVariant", "MRAcquisitionType", "SliceThickness", "SpacingBetweenSlices",
        "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
        "FrameOfReferenceUID",
    ],
    "DX": ["KVP", "XRayTubeCurrent", "Exposure", "ViewPosition", "PixelSpacing"],
    "CR": ["KVP", "XRayTubeCurrent", "Exposure", "ViewPosition", "PixelSpacing"],
    "US": ["NumberOfFrames", "TransducerData", "FrameTime"],
}  # fmt: skip

SOP_CLASS_NAME = {
    "CT": "CT Image Storage",
    "MR": "MR Image Storage",
    "DX": "Digital X-Ray Image Storage - For Presentation",
    "CR": "Computed Radiography Image Storage",
    "US": "Ultrasound Multi-frame Image Storage",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    write_corpus(out, **CORPUS)
    return out


def _files(root: Path) -> list[Path]:
    return sorted((root / "dicom").rglob("*.dcm"))


def _labels(root: Path) -> list[dict]:
    with (root / "labels.csv").open() as f:
        return list(csv.DictReader(f))


def _series(root: Path) -> dict[str, list[Dataset]]:
    series = defaultdict(list)
    for path in _files(root):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series[ds.SeriesInstanceUID].append(ds)
    return series


# ---------------------------------------------------------------------------------------------
# Files


def test_every_modality_round_trips_through_pydicom(corpus):
    seen_modalities, seen_syntaxes, seen_photometric = set(), set(), set()
    for path in _files(corpus):
        ds = pydicom.dcmread(path)
        modality = ds.Modality
        seen_modalities.add(modality)
        seen_syntaxes.add(ds.file_meta.TransferSyntaxUID)
        seen_photometric.add(ds.PhotometricInterpretation)
        missing = [k for k in REQUIRED["all"] + REQUIRED[modality] if not ds.get(k)]
        assert not missing, f"{path}: missing {missing}"
        assert ds.SOPClassUID.name == SOP_CLASS_NAME[modality]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        pixels = ds.pixel_array
        if modality == "US":
            assert ds.PhotometricInterpretation == "RGB"
            assert pixels.shape == (ds.NumberOfFrames, ds.Rows, ds.Columns, 3)
            assert ds.NumberOfFrames > 1
            assert not np.array_equal(pixels[0], pixels[1])  # speckle moves between frames
        else:
            assert pixels.shape == (ds.Rows, ds.Columns)
            assert int(pixels.max()) < 2**ds.BitsStored
        assert pixels.std() > 0, f"{path}: blank image"
    assert seen_modalities == {"CT", "MR", "DX", "CR", "US"}
    assert {RLELossless, JPEG2000Lossless} <= seen_syntaxes
    assert {"MONOCHROME1", "MONOCHROME2", "RGB"} <= seen_photometric


def test_layout_carries_the_patient_id_and_headers_hold_fake_phi(corpus):
    for path in _files(corpus):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        site, patient_id, study_uid, series_number, name = path.relative_to(corpus / "dicom").parts
        assert site.startswith("site_")
        assert patient_id == ds.PatientID
        assert study_uid == ds.StudyInstanceUID
        assert (int(series_number), int(Path(name).stem)) == (ds.SeriesNumber, ds.InstanceNumber)
        assert "^" in str(ds.PatientName)
        assert len(ds.PatientBirthDate) == 8 and ds.PatientBirthDate < ds.StudyDate
        assert ds.StudyInstanceUID.startswith(pydicom.uid.PYDICOM_ROOT_UID)


def test_nothing_identifying_outside_the_dicom_folder(corpus):
    identifiers = set()
    for path in _files(corpus):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.InstitutionName}
        identifiers.add(str(ds.PatientName).split("^")[0])
    written = [(corpus / n).read_text() for n in ("corpus.json", "labels.csv", "site_names.csv")]
    leaked = sorted(i for i in identifiers if any(i in text for text in written))
    assert not leaked


def test_site_names_file_maps_every_site_folder_to_its_name(corpus):
    rows = (corpus / "site_names.csv").read_text().splitlines()
    folders = sorted(p.name for p in (corpus / "dicom").iterdir())
    assert rows[0] == "folder,site"
    mapped = dict(r.split(",") for r in rows[1:])
    assert set(folders) <= set(mapped) and all(k == v for k, v in mapped.items())


def test_patient_names_leak_into_descriptions_when_asked(tmp_path):
    summary = write_corpus(tmp_path / "c", studies=6, seed=1, phi_in_description=1.0, **TINY)
    assert summary["totals"]["studies_with_name_in_description"] == 6
    by_study = defaultdict(list)
    for path in _files(tmp_path / "c"):
        by_study[path.parts[-3]].append(pydicom.dcmread(path, stop_before_pixels=True))
    for headers in by_study.values():
        family = str(headers[0].PatientName).split("^")[0]
        texts = [h.StudyDescription for h in headers] + [h.SeriesDescription for h in headers]
        assert any(family in t for t in texts)


def test_series_geometry_is_sortable_by_position(corpus):
    shuffled = 0
    frames_of_reference = defaultdict(set)
    for headers in _series(corpus).values():
        if headers[0].Modality not in ("CT", "MR"):
            continue
        iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        by_position = sorted(headers, key=lambda h: float(np.dot(h.ImagePositionPatient, normal)))
        steps = np.diff([np.dot(h.ImagePositionPatient, normal) for h in by_position])
        assert np.allclose(steps, float(headers[0].SpacingBetweenSlices), atol=1e-3)
        numbers = [h.InstanceNumber for h in by_position]
        assert sorted(numbers) == list(range(1, len(headers) + 1))
        shuffled += numbers not in (sorted(numbers), sorted(numbers, reverse=True))
        for h in headers:
            location = np.dot(h.ImagePositionPatient, normal)
            assert float(h.SliceLocation) == pytest.approx(location, abs=1e-3)
            frames_of_reference[h.StudyInstanceUID].add(h.FrameOfReferenceUID)
    assert shuffled > 0  # readers must sort by position, not by file name
    assert all(len(f) == 1 for f in frames_of_reference.values())


def test_ct_storage_follows_each_vendors_convention(corpus):
    conventions = set()
    for path in _files(corpus):
        ds = pydicom.dcmread(path)
        if ds.Modality != "CT":
            continue
        scanner = sites.SCANNERS[ds.ManufacturerModelName]
        assert float(ds.RescaleIntercept) == scanner.rescale_intercept
        pixels = ds.pixel_array
        n = ds.Rows
        r = np.hypot(*np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2))
        outside = pixels[r > n / 2]
        hu_outside = outside * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.all(hu_outside == scanner.outside_fov_hu)
        if "PixelPaddingValue" in ds:
            assert np.all(outside == ds.PixelPaddingValue)
        conventions.add(scanner.rescale_intercept)
    assert conventions  # at least one CT


def test_determinism_across_reruns_and_worker_counts(tmp_path):
    settings = dict(TINY, studies=10, seed=3, modality_mix=(0.3, 0.3, 0.3, 0.1))
    runs = [
        write_corpus(tmp_path / "a", **settings),
        write_corpus(tmp_path / "b", **settings),
        write_corpus(tmp_path / "c", **settings, workers=2),
    ]
    assert runs[0] == runs[1] == runs[2]
    reference = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*")
                 if p.is_file()}  # fmt: skip
    for other in ("b", "c"):
        files = {p.relative_to(tmp_path / other): p.read_bytes()
                 for p in (tmp_path / other).rglob("*") if p.is_file()}  # fmt: skip
        assert files.keys() == reference.keys()
        assert all(files[k] == reference[k] for k in reference), f"run {other} differs"
    different_seed = write_corpus(tmp_path / "d", **dict(settings, seed=4))
    assert different_seed != runs[0]


def test_rerun_refuses_a_used_folder_and_overwrite_regenerates(tmp_path):
    out = tmp_path / "c"
    settings = dict(TINY, studies=2, seed=5, modality_mix=(1, 0, 0, 0))
    write_corpus(out, **settings)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="not empty"):
        write_corpus(out, **settings)
    write_corpus(out, **settings, overwrite=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a pgjax synthetic corpus"):
        write_corpus(foreign, **settings, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_synthesis_does_not_import_jax():
    # Workers are spawned per corpus; they must not pay for importing JAX.
    code = "import sys, pgjax.synth.corpus, pgjax.commands.synth; print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="shortcut must be in"):
        SynthSettings(studies=5, shortcut=1.5)
    with pytest.raises(ValueError, match="studies must be >= 1"):
        SynthSettings(studies=0)


def test_cli_writes_a_corpus_and_rejects_bad_input(tmp_path, capsys):
    args = ["synth", "--out", str(tmp_path / "c"), "--studies", "3", "--seed", "2"]
    tiny = ["--xr-size", "64", "--ct-size", "32", "--ct-slices", "4-5", "--mr-size", "32"]
    tiny += ["--mr-slices", "4", "--us-size", "32", "--us-frames", "2"]
    assert cli_main(args + tiny) == 0
    out = capsys.readouterr().out
    assert "wrote 3 studies" in out and "labels.csv" in out
    assert cli_main(args + tiny) == 2  # the folder is used now
    assert "not empty" in capsys.readouterr().err
    bad = ["synth", "--out", str(tmp_path / "d"), "--shortcut", "2"]
    assert cli_main(bad) == 2
    assert "shortcut" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Site files

# A site file as someone outside the project might write it: a vendor and models the code does
# not know, its own kVp ranges and view mix, most fields left to their defaults.
THEIR_SITES = """
description = "two hospitals of a study group"

[[scanners]]
manufacturer = "Acme Imaging"
model = "Radiant 9000"
modality = "XR"
bits_stored = 14
gain = 0.18
unsharp = 1.2

[[scanners]]
manufacturer = "Acme Imaging"
model = "Radiant Go"
modality = "XR"
portable = true
bits_stored = 14
gain = 0.18

[[sites]]
name = "north"
institution = "North Shore Hospital"
fleet = { "Radiant 9000" = 1.0, "Radiant Go" = 1.0 }
radiograph = { pa_kvp = [131, 139], ap_kvp = [101, 104], modality = "CR" }
view = { p_ap_negative = 0.05, p_ap_positive = 0.95 }
case_mix = { ctr_mean = 0.52 }

[[sites]]
name = "south"
role = "external"
shift = "reversal"
share = 2.0
fleet = { "Ysio Max" = 1.0, "Mobilett Mira Max" = 1.0 }
view = { p_ap_negative = 0.9, p_ap_positive = 0.1 }
"""


def _headers(root: Path) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in _files(root)]


def test_a_site_file_written_by_someone_else(tmp_path):
    path = tmp_path / "their_sites.toml"
    path.write_text(THEIR_SITES)
    xr = dict(TINY, studies=24, seed=1, modality_mix=(1, 0, 0, 0))
    summary = write_corpus(tmp_path / "c", sites=path, **xr)
    assert summary["settings"]["site_file"] == "their_sites.toml"
    assert summary["external_sites"] == ["south"] and summary["shift_types"] == {
        "south": "reversal"
    }
    north, south = summary["sites"]["north"], summary["sites"]["south"]
    assert (north["role"], north["shift"], south["role"]) == ("training", "none", "external")
    assert south["studies"] > north["studies"]  # share 2 : 1
    expected = north["tasks"]["cardiomegaly"]
    assert expected["expected_p_flag_given_negative"] == 0.05
    assert expected["expected_p_flag_given_positive"] == 0.95
    by_site = defaultdict(list)
    for ds in _headers(tmp_path / "c"):
        by_site[Path(ds.filename).relative_to(tmp_path / "c" / "dicom").parts[0]].append(ds)
    assert set(by_site) == {"north", "south"}
    for ds in by_site["north"]:
        assert ds.Manufacturer == "Acme Imaging" and ds.Modality == "CR"
        portable = ds.ManufacturerModelName == "Radiant Go"
        assert portable == (ds.ViewPosition == "AP")
        assert 101 <= float(ds.KVP) <= 104 if portable else 131 <= float(ds.KVP) <= 139
        assert ds.BitsStored == 14
    assert all(ds.Manufacturer == "SIEMENS" for ds in by_site["south"])
    # Spawned workers get the file's sites too: the same corpus.
    again = write_corpus(tmp_path / "w", sites=path, workers=2, **xr)
    assert again == summary
    assert (tmp_path / "w" / "labels.csv").read_bytes() == (
        tmp_path / "c" / "labels.csv"
    ).read_bytes()
    # The same sites as JSON parse to the same thing; the CLI takes the file too.
    import tomllib

    as_json = tmp_path / "their_sites.json"
    as_json.write_text(json.dumps(tomllib.loads(THEIR_SITES)))
    assert sitefile.load_site_file(as_json) == sitefile.load_site_file(path)
    args = ["synth", "--out", str(tmp_path / "cli"), "--studies", "2", "--sites", str(as_json)]
    assert cli_main(args + ["--mix", "1,0,0,0", "--xr-size", "32"]) == 0


def _bad(tmp_path, text: str, name="sites.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(sitefile.SiteFileError) as error:
        sitefile.load_site_file(path)
    return str(error.value)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("p_ap_positive = 0.95", "p_ap_positive = 1.4",
         "sites[0].view.p_ap_positive must be in [0, 1], not 1.4"),
        ('name = "north"', 'name = "north"\ncolour = "blue"',
         "sites[0].colour is not a known field"),
        ("case_mix = { ctr_mean = 0.52 }", "case_mix = { ctr_mean = 0.52, prevalance = 0.3 }",
         "sites[0].case_mix.prevalance is not a known field"),
        ('"Radiant Go" = 1.0 }', '"Radiant Goo" = 1.0 }',
         "sites[0].fleet.Radiant Goo is not a known scanner model"),
        ('shift = "reversal"', 'shift = "sideways"',
         "sites[1].shift must be one of none, acquisition, case_mix, reversal, not 'sideways'"),
        ('role = "external"\nshift = "reversal"', 'shift = "reversal"',
         "sites[1].shift of a training site must be \"none\""),
        ("p_ap_negative = 0.9, p_ap_positive = 0.1", "p_ap_negative = 0.1, p_ap_positive = 0.9",
         "sites[1].view.p_ap_negative of a reversal site must exceed p_ap_positive"),
        ("p_ap_negative = 0.05, p_ap_positive = 0.95", "p_ap_negative = 0.5, p_ap_positive = 0.2",
         "sites[0].view.p_ap_positive (0.2) is below p_ap_negative (0.5)"),
        ("pa_kvp = [131, 139]", "pa_kvp = [139, 131]",
         "sites[0].radiograph.pa_kvp must be a range"),
        ("pa_kvp = [131, 139]", 'pa_kvp = "high"', "sites[0].radiograph.pa_kvp must be a range"),
        ('modality = "CR"', 'modality = "XA"',
         "sites[0].radiograph.modality must be one of DX, CR"),
        ('name = "south"', 'name = "north"', "sites[1].name 'north' is used by an earlier site"),
        ('model = "Radiant Go"', 'model = "Ysio Max"',
         "scanners[1].model 'Ysio Max' is a built-in"),
        ("bits_stored = 14\ngain = 0.18\nunsharp", "bits_stored = 40\ngain = 0.18\nunsharp",
         "scanners[0].bits_stored must be in [8, 16], not 40"),
        ('modality = "XR"\nportable', 'modality = "XR"\nkernels = {}\nportable',
         "scanners[1].kernels is not a known field"),
        ('name = "north"', "name = 7", "sites[0].name must be a non-empty string, not 7"),
        ('fleet = { "Ysio Max" = 1.0, "Mobilett Mira Max" = 1.0 }', "",
         "sites[1].fleet is required"),
        ("[[sites]]", "[[sites]\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_bad_site_files_name_the_file_and_the_field(tmp_path, old, new, message):
    assert old in THEIR_SITES
    error = _bad(tmp_path, THEIR_SITES.replace(old, new, 1))
    assert error.startswith(f"{tmp_path / 'sites.toml'}: ")
    assert message in error


def test_site_files_need_a_known_format_and_sites(tmp_path, capsys):
    assert "must end in .toml or .json" in _bad(tmp_path, THEIR_SITES, "sites.yaml")
    assert "at least one [[sites]]" in _bad(tmp_path, 'description = "empty"\n')
    assert "not valid JSON" in _bad(tmp_path, "{", "sites.json")
    with pytest.raises(sitefile.SiteFileError, match="x.toml: cannot read"):
        sitefile.load_site_file(tmp_path / "x.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text(THEIR_SITES.replace("p_ap_positive = 0.95", "p_ap_positive = 1.4"))
    assert cli_main(["synth", "--out", str(tmp_path / "c"), "--sites", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml: sites[0].view.p_ap_positive must be in [0, 1], not 1.4" in err
    # A modality asked for that a site cannot make is named too.
    good = tmp_path / "good.toml"
    good.write_text(THEIR_SITES)
    assert cli_main(["synth", "--out", str(tmp_path / "d"), "--sites", str(good)]) == 2
    assert "asks for CT but site north has no CT scanner" in capsys.readouterr().err


def test_default_sites_ship_with_the_package_and_sites_n_takes_the_first_n(tmp_path):
    import fnmatch
    import tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["pgjax"]
    relative = sitefile.DEFAULT_FILE.relative_to(REPO / "pgjax").as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data)
    default = sitefile.default_sites()
    assert [s.name for s in default] == ["site_a", "site_b", "site_c", "site_d"]
    assert [s.name for s in default if s.external] == ["site_d"]
    assert default[3].shift == "acquisition"
    training_xr = {m.model for s in default[:3] for m, _ in s.scanners("XR")}
    assert not training_xr & {m.model for m, _ in default[3].scanners("XR")}
    assert default[3].pa_kvp[0] > max(s.pa_kvp[1] for s in default[:3])
    out = tmp_path / "c"
    args = ["synth", "--out", str(out), "--studies", "4", "--sites", "2", "--mix", "1,0,0,0"]
    assert cli_main(args + ["--xr-size", "32", "--external-site", "site_b"]) == 0
    summary = json.loads((out / "corpus.json").read_text())
    assert list(summary["sites"]) == ["site_a", "site_b"]
    assert summary["external_sites"] == ["site_b"]
    with pytest.raises(ValueError, match="number of sites must be 1..4"):
        sitefile.select_sites(None, 5)
    with pytest.raises(ValueError, match="'site_x' is not one of"):
        sitefile.select_sites(None, None, ("site_x",))


def test_the_benchmark_sites_give_each_shift_type_enough_positives():
    benchmark = sitefile.load_site_file(BENCHMARK)
    by_name = {s.name: s for s in benchmark}
    training = [s for s in benchmark if not s.external]
    assert [s.name for s in training] == ["site_a", "site_b", "site_c"]
    assert {s.name: s.shift for s in benchmark if s.external} == {
        "ext_acquisition": "acquisition", "ext_casemix": "case_mix", "ext_reversal": "reversal"
    }  # fmt: skip
    acquisition = by_name["ext_acquisition"]
    # Every scanner of a labelled modality is new (ultrasound carries no task).
    seen = {m.model for s in training for m, _ in s.fleet}
    assert not seen & {m.model for m, _ in acquisition.fleet if m.modality != "US"}
    assert not {m.manufacturer for s in training for m, _ in s.scanners("XR")} & {
        m.manufacturer for m, _ in acquisition.scanners("XR")
    }
    assert acquisition.pa_kvp[0] > max(s.pa_kvp[1] for s in training)
    assert acquisition.ap_kvp[0] > max(s.ap_kvp[1] for s in training)
    # A radiograph corpus at the low end of the benchmark's size holds >= 250 positives at every
    # external site (checked on the labels that would be written, without pixels).
    settings = SynthSettings(studies=4000, seed=1, modality_mix=(1, 0, 0, 0), sites=benchmark)
    positives = Counter()
    for plan, truth in study_truths(settings):
        positives[benchmark[plan.site].name] += truth.label
    assert all(positives[s.name] >= 250 for s in benchmark if s.external), positives


def test_plan_follows_the_site_shares():
    default = sitefile.default_sites()
    shared = [dataclasses.replace(s, share=w) for s, w in zip(default, (1, 3, 0, 1), strict=True)]
    counts = Counter(p.site for p in plan_corpus(SynthSettings(studies=2000, sites=shared)))
    assert counts[2] == 0
    assert counts[1] / 2000 == pytest.approx(0.6, abs=0.04)


# ---------------------------------------------------------------------------------------------
# Ground truth and the shortcut


def test_labels_agree_with_their_scores_and_the_summary(corpus):
    rows = _labels(corpus)
    assert rows
    study_uids = {p.parts[-3] for p in _files(corpus)}
    counts = defaultdict(lambda: {"0": 0, "1": 0})
    for row in rows:
        assert row["study_uid"] in study_uids
        label, score = int(row["label"]), float(row["score"])
        if row["task"] == "glioma_grade":
            assert label == int(score > 0.5)
        elif row["task"] == "cardiomegaly":  # a noisy read of the true ratio (next test)
            assert sites.CTR_LIMITS[0] <= score <= sites.CTR_LIMITS[1]
        else:
            assert row["task"] == "pe" and label == int(score > 0)
        counts[row["task"]][row["label"]] += 1
    summary = json.loads((corpus / "corpus.json").read_text())
    assert summary["counts"]["label"] == dict(counts)


def _ctr_reads(settings) -> tuple[np.ndarray, np.ndarray]:
    """(true ratio, label) of every radiograph study of a corpus, without pixels."""
    truths = study_truths(settings)
    ctr = [make_patient(settings, p.patient, p.site).ctr for p, t in truths]
    return np.array(ctr), np.array([t.label for _, t in truths])


def test_cardiomegaly_is_a_noisy_read_of_a_continuous_latent():
    site = sitefile.default_sites()[0]
    xr = dict(studies=2000, seed=2, modality_mix=(1, 0, 0, 0))
    ctr, label = _ctr_reads(SynthSettings(**xr, sites=(site,)))
    # The latent is continuous and overlaps the threshold; the label disagrees with it near the
    # threshold (reading error) and, rarely, anywhere (label noise).
    assert ctr.std() == pytest.approx(site.ctr_sd, rel=0.15)
    disagree = label != (ctr > 0.5)
    assert 0.04 < disagree.mean() < 0.2
    near = np.abs(ctr - 0.5) < 2 * site.reading_sd
    assert disagree[near].mean() > 3 * disagree[~near].mean()
    assert label.mean() == pytest.approx(sites.site_prevalence("cardiomegaly", site), abs=0.04)
    # Without reading error and label noise the label is the thresholded latent.
    exact = dataclasses.replace(site, reading_sd=0.0, label_noise=0.0)
    ctr, label = _ctr_reads(SynthSettings(**xr, sites=(exact,)))
    assert np.array_equal(label, (ctr > 0.5).astype(int))


def test_headers_carry_the_shortcut_flag_that_was_drawn(corpus):
    settings = SynthSettings(**CORPUS)
    labelled = [truth for _, truth in study_truths(settings) if truth.task]
    rows = _labels(corpus)
    assert len(rows) == len(labelled)
    series = _series(corpus)
    by_study = defaultdict(list)
    for headers in series.values():
        by_study[headers[0].StudyInstanceUID].append(headers[0])
    for row, truth in zip(rows, labelled, strict=True):
        assert (row["task"], int(row["label"])) == (truth.task, truth.label)
        first = min(by_study[row["study_uid"]], key=lambda h: h.SeriesNumber)
        if truth.task == "cardiomegaly":
            assert (first.ViewPosition == "AP") == truth.flag
        elif truth.task == "glioma_grade":
            assert (float(first.MagneticFieldStrength) < 2) == truth.flag
        else:
            sharp = sites.SCANNERS[first.ManufacturerModelName].kernel_name("sharp")
            kernel = first.ConvolutionKernel
            kernel = tuple(kernel) if isinstance(kernel, pydicom.multival.MultiValue) else kernel
            assert (kernel == sharp) == truth.flag


def _flag_gap(truths) -> dict[int, float]:
    """Per site index: P(flag | positive) - P(flag | negative), over all tasks."""
    flags = defaultdict(lambda: ([], []))
    for plan, truth in truths:
        if truth.task:
            flags[plan.site][truth.label].append(truth.flag)
    return {site: np.mean(pos) - np.mean(neg) for site, (neg, pos) in flags.items()}


def test_shortcut_scales_an_association_that_points_the_same_way_at_every_site():
    gaps = {
        shortcut: _flag_gap(study_truths(SynthSettings(studies=3000, seed=11, shortcut=shortcut)))
        for shortcut in (0.0, 0.5, 1.0)
    }
    assert all(abs(g) < 0.1 for g in gaps[0.0].values())
    # The default sites, external site_d included: sicker patients get the flag more often.
    assert all(g > 0.15 for g in gaps[1.0].values())
    assert all(gaps[0.5][s] == pytest.approx(g / 2, abs=0.08) for s, g in gaps[1.0].items())


def test_only_the_reversal_site_reverses_the_view_and_case_mix_sets_prevalence():
    benchmark = sitefile.load_site_file(BENCHMARK)
    settings = SynthSettings(studies=4000, seed=0, modality_mix=(1, 0, 0, 0), sites=benchmark)
    truths = study_truths(settings)
    gaps = _flag_gap(truths)
    names = [s.name for s in benchmark]
    for i, name in enumerate(names):
        assert (gaps[i] < -0.2) if name == "ext_reversal" else (gaps[i] > 0.15), name
    prevalence = {
        names[i]: np.mean([t.label for p, t in truths if p.site == i]) for i in range(len(names))
    }
    assert prevalence["ext_casemix"] > max(prevalence[n] for n in names if n != "ext_casemix") + 0.1


# ---------------------------------------------------------------------------------------------
# Physics, measured on generated images

AS_PLUS = sites.SCANNERS["SOMATOM Definition AS+"]
ACQUISITION = sites.CTAcquisition(120.0, 400, 0.5, "OMNIPAQUE 350")
RECON = sites.CTRecon("standard", 5.0, 5.0, 3, 350.0, 64, 0.0)
WATER = [phantoms.Ellipsoid("muscle", (0.0, 0.0, 0.0), (120.0, 120.0, 1e4))]


def _ct(layers, iodine=0.0, acquisition=ACQUISITION, recon=RECON, seed=0):
    return physics.scan_ct(layers, iodine, acquisition, recon, AS_PLUS, np.random.default_rng(seed))


def _centre_std(image):
    c = image.shape[-1] // 2
    return float(image[:, c - 6 : c + 6, c - 6 : c + 6].std())


def test_ct_noise_falls_as_one_over_sqrt_mas():
    stds = [
        _centre_std(_ct(WATER, acquisition=dataclasses.replace(ACQUISITION, tube_current_ma=ma)))
        for ma in (100, 400)
    ]
    assert stds[0] / stds[1] == pytest.approx(2.0, rel=0.2)  # 4x the mAs, half the noise


def test_thin_ct_slices_are_noisier():
    thin = _centre_std(_ct(WATER, recon=dataclasses.replace(RECON, slice_thickness=1.25)))
    thick = _centre_std(_ct(WATER))
    assert thin / thick == pytest.approx(2.0, rel=0.2)  # noise ~ 1/sqrt(thickness)


def test_sharp_kernel_has_more_high_frequency_energy_than_smooth():
    chest = phantoms.sample_chest(np.random.default_rng(1), 0.45, False)
    layers = phantoms.chest_ct_layers(chest)

    def high_frequency_fraction(kernel):
        image = _ct(layers, 10.0, recon=dataclasses.replace(RECON, kernel_class=kernel))
        image = image - image.mean(axis=(-2, -1), keepdims=True)
        power = np.abs(np.fft.rfft2(image)) ** 2
        return power[..., physics.radial_frequency(64, 64) > 0.25].sum() / power.sum()

    assert high_frequency_fraction("sharp") > 5 * high_frequency_fraction("smooth")


def test_lower_kvp_enhances_iodine_more():
    vessel = WATER + [phantoms.Ellipsoid("pulmonary_artery", (0.0, 0.0, 0.0), (40.0, 40.0, 1e4))]

    def enhancement(kvp):
        image = _ct(vessel, 10.0, acquisition=dataclasses.replace(ACQUISITION, kvp=kvp))
        c = image.shape[-1] // 2
        return float(image[:, c - 3 : c + 3, c - 3 : c + 3].mean())

    assert enhancement(80.0) > 1.5 * enhancement(120.0) > 1.5 * 150


def test_pe_clot_is_a_low_attenuation_defect_in_a_few_slices():
    rng = np.random.default_rng(4)
    chest = phantoms.sample_chest(rng, 0.45, True)
    recon = sites.CTRecon("standard", 2.0, 2.0, 24, 350.0, 96, 0.0)
    clot = phantoms.sample_pe_clot(rng, chest, recon.z_range)
    with_clot = _ct(phantoms.chest_ct_layers(chest, clot), 12.0, recon=recon)
    without = _ct(phantoms.chest_ct_layers(chest), 12.0, recon=recon)
    difference = with_clot - without  # same noise: only the clot differs
    stack = physics.ct_stack(recon)
    k = int(np.argmin(np.abs(stack.slice_offsets - clot.center[2])))
    row, col = (
        int(round((clot.center[i] - stack.first_pixel(k)[i]) / recon.pixel_spacing)) for i in (1, 0)
    )
    assert difference[k, row, col] < -150  # contrast replaced by thrombus
    # The defect occupies the slices the clot spans, and no others.
    affected = np.flatnonzero((difference < -100).any(axis=(1, 2)))
    z = stack.slice_offsets[affected]
    clot_z = sorted((clot.clot.p0[2], clot.clot.p1[2]))
    assert len(affected) >= 1
    margin = clot.clot.radius + recon.slice_thickness
    assert clot_z[0] - margin <= z.min() and z.max() <= clot_z[1] + margin


def _brain_images(names, field=1.5):
    brain = phantoms.sample_brain(np.random.default_rng(2), 50, None)
    layers = phantoms.brain_layers(brain)
    base = dict(
        field_strength=field, slice_thickness=5.0, slice_spacing=5.0, n_slices=3, rows=64,
        columns=64, pixel_spacing=3.5, tilt_deg=0.0, averages=1, z_center=20.0,
    )  # fmt: skip
    params = {"T1": (500, 10, None), "T2": (4000, 100, None), "FLAIR": (9000, 120, 2450)}
    images, masks = {}, None
    for name in names:
        tr, te, ti = params[name]
        seq = sites.MR_SEQUENCES[name]
        protocol = sites.MRSeriesProtocol(seq, tr=tr, te=te, ti=ti, flip=90, **base)
        images[name] = physics.scan_mr(
            layers, protocol, sites.SCANNERS["Avanto"], np.random.default_rng(0)
        )
        if masks is None:
            stack = physics.mr_stack(protocol)
            x, y, z = stack.points(stack.slice_offsets)
            masks = {t: phantoms.tissue_fraction(layers, x, y, z, t, 0.5) > 0.99
                     for t in ("wm", "gm", "csf")}  # fmt: skip
    return {n: {t: float(img[m].mean()) for t, m in masks.items()} for n, img in images.items()}


def test_t1_and_t2_weighting_flip_tissue_contrast():
    means = _brain_images(["T1", "T2", "FLAIR"])
    t1, t2, flair = means["T1"], means["T2"], means["FLAIR"]
    assert t1["wm"] > t1["gm"] > t1["csf"]  # T1: short T1 is bright
    assert t2["csf"] > t2["gm"] > t2["wm"]  # T2: long T2 is bright
    assert flair["csf"] < 0.5 * flair["wm"]  # FLAIR nulls CSF


def test_mr_signal_equations():
    # Inversion recovery nulls a tissue at TI = T1 ln 2 (with TR >> T1).
    assert (
        physics.inversion_recovery_signal(1.0, 1000.0, 100.0, 1e6, 1.0, 1000.0 * np.log(2)) < 1e-6
    )
    # T1 lengthens with the field; gadolinium shortens it.
    assert physics.t1_at_field(1000.0, 3.0, 0.35) > 1200.0
    assert physics.gadolinium_t1(1000.0, 0.3) < 500.0
    wm = physics.RELAXATION["wm"]
    proto = sites.MRSeriesProtocol(
        sites.MR_SEQUENCES["T1"], 1.5, 500, 10, None, 90, 5.0, 5.0, 3, 64, 64, 3.0, 0.0, 1, 0.0
    )
    assert physics.mr_tissue_signal(wm, dataclasses.replace(proto, tr=3000)) > (
        physics.mr_tissue_signal(wm, proto)
    )


def test_mr_snr_grows_with_field_strength():
    assert physics.mr_snr(3.0, 16.0, 1, "2D") == pytest.approx(
        2 * physics.mr_snr(1.5, 16.0, 1, "2D")
    )


def test_radiograph_contrast_falls_with_kvp():
    chest = phantoms.sample_chest(np.random.default_rng(3), 0.45, False)
    scanner = sites.SCANNERS["Ysio Max"]

    def contrast(kvp):
        protocol = sites.RadiographProtocol("PA", kvp, 320, 8, 1800.0, 430.0, 128, True)
        image = physics.expose_radiograph(chest, protocol, scanner, np.random.default_rng(0))
        lo, hi = np.percentile(image[32:96, 32:96].astype(float), [10, 90])
        return hi - lo

    assert contrast(70.0) > 1.15 * contrast(120.0)


def test_quantum_noise_falls_with_exposure():
    rng = np.random.default_rng(0)
    relative = [
        float(np.std(physics.quantum_noise(np.full((64, 64), n, np.float32), rng)) / n)
        for n in (100.0, 400.0)
    ]
    assert relative[0] / relative[1] == pytest.approx(2.0, rel=0.1)


def test_ap_view_magnifies_the_heart_more_than_the_chest_wall():
    chest = phantoms.sample_chest(np.random.default_rng(0), 0.5, False)
    pa = physics.chest_magnifications(chest, "PA", 1800.0)
    ap = physics.chest_magnifications(chest, "AP", 1000.0)
    assert ap["heart"] / ap["thorax"] > pa["heart"] / pa["thorax"]


def _apparent_ctr(chest, view: str, sid_mm: float) -> float:
    """The cardiothoracic ratio as it appears on the projection: the width of the heart's
    shadow in the lung fields (the air it displaces: the projection with the heart minus one
    without) over the widest extent of the lungs."""
    mag = physics.chest_magnifications(chest, view, sid_mm)
    step = 1.0
    x = np.arange(-250, 250, step)[None, :]
    z = np.arange(-250, 100, step)[:, None]  # the lungs' widest rows and the heart
    lung = phantoms.chest_projection_paths(chest, x, z, mag)["lung"]
    no_heart = dataclasses.replace(chest, heart_radii=(1e-3, 1e-3, 1e-3))
    shadow = phantoms.chest_projection_paths(no_heart, x, z, mag)["lung"] - lung > 0.5

    def width(mask):
        columns = np.flatnonzero(mask.any(axis=0))
        return (columns.max() - columns.min()) * step

    return width(shadow) / width(lung > 0.5)


@pytest.mark.parametrize("ctr", [0.44, 0.5, 0.56])
def test_ap_films_show_a_larger_cardiothoracic_ratio(ctr):
    chest = phantoms.sample_chest(np.random.default_rng(int(ctr * 100)), ctr, False)
    pa, ap = _apparent_ctr(chest, "PA", 1800.0), _apparent_ctr(chest, "AP", 1000.0)
    assert pa == pytest.approx(ctr, abs=0.03)  # PA is the reference projection
    assert ap > pa * 1.05  # the confounder: an image-only reader over-calls on AP


def test_habitus_varies_the_body_but_not_the_thorax():
    chests = [phantoms.sample_chest(np.random.default_rng(i), 0.5, False) for i in range(300)]
    habitus = np.array([c.habitus for c in chests])
    body = np.array([c.body_radii[0] / c.scale for c in chests])
    thorax = np.array([c.thoracic_width / c.scale for c in chests])
    assert habitus.min() < 0.95 and habitus.max() > 1.25
    assert np.corrcoef(habitus, body)[0, 1] > 0.8
    assert np.ptp(thorax) < 1e-6  # the ratio's denominator does not depend on build
    # A deeper body puts the heart further from an AP detector: more magnification.
    slim, heavy = (c for c in (chests[int(np.argmin(habitus))], chests[int(np.argmax(habitus))]))
    ratio = [physics.chest_magnifications(c, "AP", 1000.0) for c in (slim, heavy)]
    assert ratio[1]["heart"] / ratio[1]["thorax"] > ratio[0]["heart"] / ratio[0]["thorax"]


def test_glioma_features_grow_with_aggressiveness():
    radii = (66.0, 84.0, 58.0)

    def features(a):
        gliomas = [phantoms.sample_glioma(np.random.default_rng(i), radii, a) for i in range(200)]
        return (
            np.mean([g.radius_mm for g in gliomas]),
            np.mean([g.edema_radius_mm / g.radius_mm for g in gliomas]),
            np.mean([g.necrosis_radius_mm > 0 for g in gliomas]),
            np.mean([g.rim_mm > 0 for g in gliomas]),
        )

    low, high = features(0.2), features(0.85)
    assert all(h > lo for h, lo in zip(high, low, strict=True))


# ---------------------------------------------------------------------------------------------
# RLE encoder


def _decode_rle(frames: np.ndarray, signed: bool, rgb: bool) -> np.ndarray:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = frames.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate([rle_encode_frame(f) for f in frames])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    buffer.seek(0)
    decoded = pydicom.dcmread(buffer, force=True).pixel_array
    return decoded if len(frames) > 1 else decoded[None]


@pytest.mark.parametrize("cols", [1, 2, 3, 127, 128, 129, 130, 257, 300])
def test_rle_encoder_round_trips_runs_of_every_length(cols):
    rng = np.random.default_rng(cols)
    runs = np.repeat(rng.integers(0, 3, (2, 4, cols)), rng.integers(1, 200), axis=-1)
    frames = runs[..., :cols].astype(np.uint8)
    frames[0, 0] = rng.integers(0, 256, cols)  # a literal-only row
    frames[0, 1] = 9  # a replicate-only row
    assert np.array_equal(_decode_rle(frames, False, False), frames)
    signed = (frames.astype(np.int16) - 1) * 700
    assert np.array_equal(_decode_rle(signed, True, False), signed)


def test_rle_encoder_round_trips_rgb_frames():
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3)).astype(np.uint8)
    assert np.array_equal(_decode_rle(frames, False, True), frames)
