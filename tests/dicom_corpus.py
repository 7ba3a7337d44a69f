"""Small corpora of real DICOM files for the data-plane tests.

Built from pydicom's bundled test files (and pydicom-data's where installed), copied into site
folders with planted identifiers, plus deliberately broken files. Every planted identifier
is listed in PLANTED so tests can prove none reaches a store.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

# Identifiers planted in every copied file; none may reach a store.
PLANTED_NAME = "ZORGLUBIA^QUENTINELLA"
PLANTED_DATE = "19230517"
PLANTED_ACCESSION = "ACCZ98765"
PLANTED_INSTITUTION = "ZORGLUB MEMORIAL HOSPITAL"


def planted_patient_id(n: int) -> str:
    return f"PLANTEDPID{n:04d}"


def _uid(tag: str) -> str:
    # Deterministic per name, so corpora (and stores built from them) are reproducible.
    return generate_uid(entropy_srcs=["pgjax-tests", tag])


def copy_with_identity(src: str | Path, dst: Path, patient: int, tag: str, **extra) -> Path:
    """Copy a DICOM file, giving it a planted identity and fresh UIDs; extra sets attributes."""
    ds = pydicom.dcmread(src)
    ds.PatientName = PLANTED_NAME
    ds.PatientID = planted_patient_id(patient)
    ds.PatientBirthDate = PLANTED_DATE
    ds.StudyDate = PLANTED_DATE
    ds.AccessionNumber = PLANTED_ACCESSION
    ds.InstitutionName = PLANTED_INSTITUTION
    ds.StudyInstanceUID = _uid(f"study-{patient}-{extra.pop('study', tag)}")
    ds.SeriesInstanceUID = _uid(f"series-{extra.pop('series', tag)}")
    ds.SOPInstanceUID = _uid(f"sop-{tag}")
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in extra.items():
        setattr(ds, k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def ct_series(dst_dir: Path, patient: int, n_slices: int = 10, tag: str = "ctser") -> list[Path]:
    """A CT series made from CT_small.dcm: slice k is a constant 10*k HU, written shuffled."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    slope, intercept = float(src.RescaleSlope), float(src.RescaleIntercept)
    order = np.random.default_rng(0).permutation(n_slices)
    paths = []
    for file_index, k in enumerate(order):
        hu = 10.0 * k
        stored = np.full((src.Rows, src.Columns), round((hu - intercept) / slope), np.int16)
        extra = {
            "ImagePositionPatient": [0.0, 0.0, 2.5 * float(k)],
            "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
            "InstanceNumber": int(file_index + 1),
            "study": f"{tag}-study",
            "series": tag,
        }
        p = dst_dir / f"slice_{file_index:03d}.dcm"
        copy_with_identity(get_testdata_file("CT_small.dcm"), p, patient, f"{tag}-{k}", **extra)
        ds = pydicom.dcmread(p)
        ds.PixelData = stored.astype(src.pixel_array.dtype).tobytes()
        ds.save_as(p)
        paths.append(p)
    return paths


# (pydicom test file, modality group) for the real-files corpus: several transfer syntaxes of
# one MR image (they must come out identical), a CT, RGB, a multi-frame MR.
REAL_FILES = {
    "mr_native": "MR_small.dcm",
    "mr_rle": "MR_small_RLE.dcm",
    "mr_j2k": "MR_small_jp2klossless.dcm",
    "mr_bigendian": "MR_small_bigendian.dcm",
    "mr_jpegls": "MR_small_jpeg_ls_lossless.dcm",
    "ct": "CT_small.dcm",
    "rgb": "SC_rgb.dcm",
    "rgb_rle": "SC_rgb_rle.dcm",
    "multiframe_mr": "emri_small.dcm",
}

# file name -> expected skip-reason category (the text before the first ':')
BROKEN = {
    "truncated.dcm": "truncated pixel data",
    "notes.txt": "not a DICOM file",
    "DICOMDIR": "DICOMDIR (a media index, not an image)",
    "plan.dcm": "no pixel data",
    "unknown_syntax.dcm": "unsupported transfer syntax 1.2.826.0.1.3680043.9.9999.1",
    "duplicate.dcm": "duplicate SOP Instance UID (an earlier file has it)",
}


def real_corpus(root: Path) -> dict:
    """site_a: real files of many syntaxes + broken files; site_b: a CT series. Returns facts."""
    site_a, site_b = root / "site_a", root / "site_b"
    paths = {}
    for n, (name, test_file) in enumerate(REAL_FILES.items()):
        src = get_testdata_file(test_file)
        if src is None:
            continue
        # The folder carries the planted patient ID: paths can identify, the store must not.
        dst = site_a / planted_patient_id(n) / f"{name}.dcm"
        paths[name] = copy_with_identity(
            src, dst, n, name, StudyDescription=f"BRAIN {PLANTED_NAME.split('^')[0]} 20230517"
        )
    broken = site_a / "broken"
    broken.mkdir(parents=True)
    raw = paths["ct"].read_bytes()
    (broken / "truncated.dcm").write_bytes(raw[: len(raw) - 5000])
    (broken / "notes.txt").write_text(f"patient {PLANTED_NAME} called\n")
    shutil.copy(get_testdata_file("DICOMDIR"), broken / "DICOMDIR")
    copy_with_identity(get_testdata_file("rtplan.dcm"), broken / "plan.dcm", 90, "rtplan")
    bad = copy_with_identity(
        get_testdata_file("MR_small.dcm"), broken / "unknown_syntax.dcm", 91, "badsyntax"
    )
    ds = pydicom.dcmread(bad)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
    ds.save_as(bad, enforce_file_format=False)
    shutil.copy(paths["mr_native"], broken / "duplicate.dcm")
    ct_series(site_b / planted_patient_id(50), patient=50)
    return {"paths": paths, "patients": [planted_patient_id(n) for n in (*range(9), 50, 90, 91)]}
