"""The synthetic corpus: valid DICOM, determinism, physics measured on generated images, ground
truth, the site shortcut, and fake PHI where a de-identifier must find it.

Corpora here use tiny images (32-64 px, a few slices) so the whole file runs in seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from pgjax.cli import main as cli_main
from pgjax.synth import phantoms, physics, sites
from pgjax.synth.corpus import SynthSettings, rle_encode_frame, study_truths, write_corpus

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
    summary = (corpus / "corpus.json").read_text()
    labels = (corpus / "labels.csv").read_text()
    leaked = sorted(i for i in identifiers if i in summary or i in labels)
    assert not leaked


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
# Ground truth and the shortcut


def test_labels_agree_with_their_scores_and_the_summary(corpus):
    rows = _labels(corpus)
    assert rows
    study_uids = {p.parts[-3] for p in _files(corpus)}
    counts = defaultdict(lambda: {"0": 0, "1": 0})
    for row in rows:
        assert row["study_uid"] in study_uids
        label, score = int(row["label"]), float(row["score"])
        if row["task"] in ("cardiomegaly", "glioma_grade"):
            assert label == int(score > 0.5)
        else:
            assert row["task"] == "pe" and label == int(score > 0)
        counts[row["task"]][row["label"]] += 1
    summary = json.loads((corpus / "corpus.json").read_text())
    assert summary["counts"]["label"] == dict(counts)


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


def _flag_gap(truths) -> dict[str, float]:
    """Per site: P(flag | positive) - P(flag | negative), over all tasks."""
    flags = defaultdict(lambda: ([], []))
    for plan, truth in truths:
        if truth.task:
            flags[plan.site][truth.label].append(truth.flag)
    return {site: np.mean(pos) - np.mean(neg) for site, (neg, pos) in flags.items()}


def test_shortcut_knob_sets_the_protocol_label_correlation():
    gaps = {}
    prevalence_spread = {}
    for shortcut in (0.0, 1.0):
        settings = SynthSettings(studies=3000, seed=11, shortcut=shortcut)
        truths = study_truths(settings)
        gaps[shortcut] = _flag_gap(truths)
        ctr = defaultdict(list)
        for plan, truth in truths:
            if truth.task == "cardiomegaly":
                ctr[plan.site].append(truth.label)
        prevalence_spread[shortcut] = np.ptp([np.mean(v) for v in ctr.values()])
    external = 3  # the last of 4 sites
    assert all(abs(g) < 0.1 for g in gaps[0.0].values())
    assert all(g > 0.6 for s, g in gaps[1.0].items() if s != external)
    assert gaps[1.0][external] < -0.6  # the external site breaks the shortcut
    assert prevalence_spread[1.0] > prevalence_spread[0.0] + 0.15


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
