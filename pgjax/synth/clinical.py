"""A clinical-size corpus for preprocessing benchmarks: archive-sized files in the transfer
syntaxes archives hold.

`pgjax synth` draws small images with a disease model; this draws none, only what decides the
cost of preprocessing: image sizes (CT 512x512, radiographs 2,500x2,048, MR 256-384), classic
and enhanced multi-frame objects, and the transfer syntax of each series. Pixels are smooth
anatomy-like shapes plus noise, so lossless codecs compress them about as much as real images.

Layout under OUT:
  dicom/<syntax>/<site>/<PatientID>/<StudyInstanceUID>/<SeriesNumber>/<InstanceNumber>.dcm
  clinical.json  settings, files and bytes per syntax, and the syntaxes the mix lacks (no
                 encoder installed), with the reason

Per patient: a CT study (a classic 512x512 series and an enhanced multi-frame CT), a
radiograph study (one DX image) and an MR study (a classic series and an enhanced multi-frame
MR, side 256, 320 or 384 by patient). Series take the available syntaxes in turn, shifted by
one per patient, so over as many patients as syntaxes every syntax holds every kind of object.
Deterministic for a seed (UIDs included).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pgjax.synth import ljpeg
from pgjax.synth.corpus import rle_encode_frame

# The syntaxes of the mix, in the order series take them; short names are the folder names.
SYNTAXES = {
    "explicit_le": ExplicitVRLittleEndian,
    "jpeg_lossless_sv1": JPEGLosslessSV1,
    "jpeg_ls": JPEGLSLossless,
    "jpeg2000_lossless": JPEG2000Lossless,
    "rle": RLELossless,
    "deflated": DeflatedExplicitVRLittleEndian,
}
# Written without pydicom's pixel encoders: native data (deflate is of the whole data set) or
# ours (RLE: pgjax/synth/corpus.py; JPEG lossless SV1, which pydicom cannot encode: ljpeg.py).
_NO_ENCODER_NEEDED = {
    ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGLosslessSV1,
}  # fmt: skip

SOP = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "EnhancedCT": "1.2.840.10008.5.1.4.1.1.2.1",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "EnhancedMR": "1.2.840.10008.5.1.4.1.1.4.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}
_UID_ROOT = "1.2.826.0.1.3680043.10.1317."  # entropy-derived, never a real UID


@dataclasses.dataclass(frozen=True)
class ClinicalSettings:
    patients: int = 4
    seed: int = 0
    ct_size: int = 512
    ct_slices: int = 16
    enhanced_frames: int = 16
    radiograph_shape: tuple[int, int] = (2500, 2048)
    mr_sizes: tuple[int, ...] = (256, 320, 384)
    mr_slices: int = 12
    syntaxes: tuple[str, ...] = tuple(SYNTAXES)

    def __post_init__(self):
        problems = []
        if self.patients < 2:
            problems.append(f"patients must be >= 2 (the plan needs two), not {self.patients}")
        for name in ("ct_slices", "enhanced_frames", "mr_slices"):
            if not 1 <= getattr(self, name) <= 1000:
                problems.append(f"{name} must be 1..1000, not {getattr(self, name)}")
        sides = [self.ct_size, *self.radiograph_shape, *self.mr_sizes]
        if not self.mr_sizes or not all(16 <= s <= 8192 for s in sides):
            problems.append(f"image sides must be 16..8192 pixels, not {sides}")
        unknown = [s for s in self.syntaxes if s not in SYNTAXES]
        if unknown or not self.syntaxes:
            problems.append(f"syntaxes must be some of {', '.join(SYNTAXES)}, not {unknown}")
        if problems:
            raise ValueError("bad clinical corpus settings: " + "; ".join(problems))


def encoder_problem(syntax: UID) -> str | None:
    """Why this installation cannot write `syntax`, or None when it can."""
    if syntax in _NO_ENCODER_NEEDED:
        return None
    try:
        encoder = get_encoder(syntax)
    except NotImplementedError:
        return "pydicom has no encoder for it"
    if not encoder.is_available:
        return "no encoding plugin installed: " + "; ".join(encoder.missing_dependencies)
    return None


def _uid(settings: ClinicalSettings, *parts) -> str:
    return generate_uid(_UID_ROOT, entropy_srcs=["clinical", str(settings.seed), *map(str, parts)])


def _phantom(rng, rows: int, cols: int, n: int, values: dict[str, float], noise: float):
    """[n, rows, cols] float slices: a body ellipse with two lungs and a spine that change
    along the stack, plus Gaussian noise."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y, x = (y - rows / 2) / (rows / 2), (x - cols / 2) / (cols / 2)
    out = np.empty((n, rows, cols), dtype=np.float32)
    for k in range(n):
        t = k / max(n - 1, 1)
        img = np.full((rows, cols), values["air"], dtype=np.float32)
        img[(x / 0.85) ** 2 + (y / 0.65) ** 2 < 1] = values["body"]
        lung = 0.22 + 0.06 * np.sin(np.pi * t)
        for side in (-1, 1):
            img[((x - side * 0.38) / lung) ** 2 + (y / (lung * 1.8)) ** 2 < 1] = values["lung"]
        img[(x / 0.08) ** 2 + ((y - 0.45) / 0.08) ** 2 < 1] = values["bone"]
        out[k] = img + rng.normal(0.0, noise, (rows, cols)).astype(np.float32)
    return out


def _stored(values: np.ndarray, intercept: float, bits: int) -> np.ndarray:
    return np.clip(np.rint(values - intercept), 0, (1 << bits) - 1).astype(np.uint16)


def _base(settings, kind: str, patient: int, study: str, series: int, number: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP[kind]
    ds.SOPInstanceUID = _uid(settings, patient, study, series, number)
    ds.PatientName = f"CLINICAL^PATIENT{patient:03d}"
    ds.PatientID = f"CLIN{settings.seed:02d}{patient:04d}"
    ds.PatientSex = "MF"[patient % 2]
    ds.StudyInstanceUID = _uid(settings, patient, study)
    ds.StudyDate = f"2024{1 + patient % 12:02d}{1 + patient % 28:02d}"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"A{settings.seed:02d}{patient:04d}{study}"
    ds.StudyDescription = {"ct": "CT CHEST", "xr": "XR CHEST", "mr": "MR BRAIN"}[study]
    ds.SeriesInstanceUID = _uid(settings, patient, study, series)
    ds.SeriesNumber = series
    ds.InstanceNumber = number
    ds.Manufacturer = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips")[patient % 3]
    ds.ManufacturerModelName = ("SOMATOM", "Revolution", "Ingenia")[patient % 3]
    ds.Modality = {"EnhancedCT": "CT", "EnhancedMR": "MR"}.get(kind, kind)
    ds.FrameOfReferenceUID = _uid(settings, patient, study, "frame")
    return ds


def _pixel_module(ds: Dataset, rows: int, cols: int, bits: int) -> None:
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0


def _encode(ds: Dataset, pixels: np.ndarray, syntax: UID) -> None:
    """Pixel Data for `pixels` ([F, rows, cols] uint16) in `syntax`."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    native = np.ascontiguousarray(pixels, dtype="<u2")
    if syntax == RLELossless:
        ds.add_new(0x7FE00010, "OB", encapsulate([rle_encode_frame(f) for f in native]))
    elif syntax == JPEGLosslessSV1:
        frames = [ljpeg.encode(f, int(ds.BitsStored)) for f in native]
        ds.add_new(0x7FE00010, "OB", encapsulate(frames))
    else:
        ds.add_new(0x7FE00010, "OW", native.tobytes())
        if syntax.is_encapsulated:
            ds.compress(syntax, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = syntax


def _save(ds: Dataset, path: Path) -> int:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)  # deflated: pydicom deflates the data set
    return path.stat().st_size


def _phantom_stack(rng, ct: bool, side: int, n: int):
    """n stored 12-bit slices of a CT (HU, intercept -1024) or MR phantom, and the intercept."""
    values = (
        {"air": -1000, "body": 40, "lung": -850, "bone": 700}
        if ct
        else {"air": 0, "body": 600, "lung": 250, "bone": 1100}
    )
    intercept = -1024.0 if ct else 0.0
    stack = _stored(_phantom(rng, side, side, n, values, 12.0 if ct else 25.0), intercept, 12)
    return stack, intercept


def _classic_series(settings, rng, kind, patient, study, series, side, n, spacing, syntax, out):
    ct = kind == "CT"
    stack, intercept = _phantom_stack(rng, ct, side, n)
    sizes = []
    for k in range(n):
        ds = _base(settings, kind, patient, study, series, k + 1)
        _pixel_module(ds, side, side, 12)
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = 2.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-side * spacing / 2, -side * spacing / 2, -2.0 * k]
        if ct:
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1, "HU"
            ds.KVP, ds.ConvolutionKernel = 120, "B30f"
        else:
            ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = 500, 15, 1.5
        _encode(ds, stack[k : k + 1], syntax)
        sizes.append(_save(ds, out / f"{k + 1}.dcm"))
    return sizes


def _enhanced(settings, rng, kind, patient, study, series, side, n, spacing, syntax, out):
    ct = kind == "EnhancedCT"
    stack, intercept = _phantom_stack(rng, ct, side, n)
    ds = _base(settings, kind, patient, study, series, 1)
    _pixel_module(ds, side, side, 12)
    ds.NumberOfFrames = n
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [spacing, spacing]
    measures.SliceThickness = 2.0
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    if ct:
        transform = Dataset()
        transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -1024, 1, "HU"
        shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in range(n):
        position = Dataset()
        position.ImagePositionPatient = [-side * spacing / 2, -side * spacing / 2, -2.0 * k]
        group = Dataset()
        group.PlanePositionSequence = DicomSequence([position])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _encode(ds, stack, syntax)
    return [_save(ds, out / "1.dcm")]


def _radiograph(settings, rng, kind, patient, study, series, shape, syntax, out):
    rows, cols = shape
    values = {"air": 3600, "body": 1800, "lung": 2600, "bone": 900}
    image = _stored(_phantom(rng, rows, cols, 1, values, 30.0), 0.0, 12)
    ds = _base(settings, kind, patient, study, series, 1)
    _pixel_module(ds, rows, cols, 12)
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.ViewPosition = "PA"
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ds.KVP = 120
    _encode(ds, image, syntax)
    return [_save(ds, out / "1.dcm")]


def write_clinical_corpus(out_dir, settings: ClinicalSettings | None = None) -> dict:
    """Write the corpus under out_dir (which must not hold files); returns clinical.json's
    contents: settings, files and bytes per syntax written, and the syntaxes lacking."""
    settings = settings or ClinicalSettings()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: folder is not empty; choose a new folder")
    lacking = {}
    usable = []
    for name in settings.syntaxes:
        problem = encoder_problem(SYNTAXES[name])
        if problem:
            lacking[name] = f"{SYNTAXES[name].name}: {problem}"
        else:
            usable.append(name)
    if not usable:
        raise ValueError("no syntax of the mix can be written here: " + "; ".join(lacking.values()))
    per_syntax = {name: {"files": 0, "bytes": 0, "objects": {}} for name in usable}
    for patient in range(settings.patients):
        rng = np.random.default_rng([settings.seed, patient])
        site = f"site_{'ab'[patient % 2]}"
        mr_side = settings.mr_sizes[patient % len(settings.mr_sizes)]
        jobs = [  # (object, study, series, maker, its size arguments)
            ("CT", "ct", 1, _classic_series, (settings.ct_size, settings.ct_slices, 0.7)),
            ("EnhancedCT", "ct", 2, _enhanced, (settings.ct_size, settings.enhanced_frames, 0.7)),
            ("DX", "xr", 1, _radiograph, (settings.radiograph_shape,)),
            ("MR", "mr", 1, _classic_series, (mr_side, settings.mr_slices, 230.0 / mr_side)),
            ("EnhancedMR", "mr", 2, _enhanced, (mr_side, settings.mr_slices, 230.0 / mr_side)),
        ]
        for k, (kind, study, series, make, sizes_args) in enumerate(jobs):
            # Shifted by one per patient: with as many syntaxes as objects (or a divisor of
            # it), taking them in plain turn would give each kind of object one syntax only.
            name = usable[(k + patient) % len(usable)]
            folder = (out / "dicom" / name / site / f"CLIN{settings.seed:02d}{patient:04d}"
                      / _uid(settings, patient, study) / str(series))  # fmt: skip
            sizes = make(
                settings, rng, kind, patient, study, series, *sizes_args, SYNTAXES[name], folder
            )
            tally = per_syntax[name]
            tally["files"] += len(sizes)
            tally["bytes"] += sum(sizes)
            tally["objects"][kind] = tally["objects"].get(kind, 0) + 1
    summary = {
        "format": "pgjax-clinical-corpus",
        "settings": dataclasses.asdict(settings),
        "syntaxes": {name: {"uid": str(SYNTAXES[name]), **per_syntax[name]} for name in usable},
        "lacking": lacking,
    }
    text = json.dumps(summary, indent=1, sort_keys=True)
    (out / "clinical.json").write_text(text + "\n")
    return json.loads(text)  # as written: lists, not tuples
