"""Phase 1 of preprocessing: read every file's header once and keep what later phases need.

A scan record holds the allow-listed protocol values, salted identity keys, geometry and the
file's path. It lives only in the private work folder (beside the salt, never in the store):
paths and rare free-text values can identify a patient until the vocabulary filter has run.

Pixels are not decoded here; the header read defers large values, so scanning a file costs
about a millisecond whatever its size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

from pgjax.data.deid import hash_key, patient_identity, quiet_pydicom
from pgjax.data.pixels import frame_geometry
from pgjax.data.protocol import ascii_text_safe, normalize_text, read_protocol
from pgjax.data.redaction import header_redactor
from pgjax.data.schema import Schema

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Stored pixel bytes per sample are only predictable for native (uncompressed) encodings.
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_SINGLE_TEXT_VRS = frozenset({"CS", "LO", "SH"})


@dataclasses.dataclass
class ScanRecord:
    """One input file after the header scan. `reason` is set when the file is skipped."""

    path: str
    reason: str | None = None
    site: str = ""
    patient_key: str = ""
    study_key: str = ""
    series_key: str = ""
    instance_key: str = ""
    modality: str = ""
    manufacturer: str | None = None
    n_frames: int = 1
    protocol: dict = dataclasses.field(default_factory=dict)
    geometry: list = dataclasses.field(default_factory=list)  # FrameGeometry.to_json() per frame
    instance_number: int | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict:
        # A plain dict of the fields, not dataclasses.asdict: that deep-copies every protocol
        # value and geometry list, which cost more than reading the header. The values are
        # already JSON types; callers serialise the dict, they do not mutate it.
        return {f: getattr(self, f) for f in _RECORD_FIELDS}

    @classmethod
    def from_json(cls, obj: dict) -> ScanRecord:
        return cls(**obj)


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(ScanRecord))


def list_files(inputs: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(input root, file path) for every file under the inputs, in a stable sorted order.

    Every file is listed, whatever its name: DICOM files often have no extension, and a file
    that is not DICOM is reported as skipped rather than silently ignored. Hidden files and
    folders (names starting with '.') are the exception: they are tool debris (.DS_Store, .git).
    """
    out = []
    for root in inputs:
        root = Path(root)
        if root.is_file():
            out.append((str(root.parent), str(root)))
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such file or folder")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    out.append((str(root), os.path.join(dirpath, name)))
    return out


def site_of(root: str, path: str, ds, site_from: str, salt: bytes) -> str:
    if site_from.startswith("fixed:"):
        return site_from.split(":", 1)[1]
    if site_from == "header":
        name = str(ds.get("InstitutionName", "") or "").strip()
        # The institution name is an identifier in DICOM PS3.15; only its hash is kept.
        return "site_" + hash_key(salt, "site", normalize_text(name))[:8] if name else "unknown"
    rel = Path(os.path.relpath(path, root))
    return rel.parts[0] if len(rel.parts) > 1 else Path(root).name


def _read_header(path: str):
    """The dataset without pixel bytes, or a skip reason."""
    try:
        # defer_size keeps PixelData as a placeholder (its presence and length are known,
        # its bytes are not read), which is what distinguishes an image from, say, an SR.
        return pydicom.dcmread(path, defer_size=4096), None
    except InvalidDicomError:
        pass
    except Exception as e:  # pydicom raises many types on damaged files
        return None, f"unreadable DICOM header: {type(e).__name__}: {e}"
    # Files without the 128-byte preamble are legal (older exports); accept them only if the
    # forced parse finds real image attributes, so random files are not taken for DICOM.
    try:
        ds = pydicom.dcmread(path, defer_size=4096, force=True)
    except Exception:
        return None, "not a DICOM file"
    if "SOPInstanceUID" in ds and ("Rows" in ds or "SOPClassUID" in ds):
        return ds, None
    return None, "not a DICOM file"


def _expected_native_bytes(ds) -> int | None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
        n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
    except (AttributeError, TypeError, ValueError):
        return None
    return (n * bits + 7) // 8


def _pixel_problem(path: str, ds) -> str | None:
    """Why the pixel data of this header cannot be used, or None."""
    if not any(k in ds for k in PIXEL_KEYWORDS):
        sop = str(ds.get("SOPClassUID", "") or "")
        name = pydicom.uid.UID(sop).name if sop else "unknown SOP class"
        return f"no pixel data: not an image ({name})"
    if "Rows" not in ds or "Columns" not in ds:
        return "no image geometry (Rows/Columns missing)"
    meta = getattr(ds, "file_meta", None) or {}
    tsuid = str(meta.get("TransferSyntaxUID", ""))
    if tsuid and tsuid not in NATIVE_SYNTAXES:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(tsuid)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            name = pydicom.uid.UID(tsuid).name
            known = f" ({name})" if name != tsuid else ""
            return f"unsupported transfer syntax {tsuid}{known}: no decoder installed"
    if tsuid in NATIVE_SYNTAXES or not tsuid:
        expected = _expected_native_bytes(ds)
        elem = next((ds.get_item(k, keep_deferred=True) for k in PIXEL_KEYWORDS if k in ds), None)
        tell = getattr(elem, "value_tell", None)
        if expected is not None and tell is not None:
            # A truncated file keeps its declared length: compare with what the file holds.
            available = os.path.getsize(path) - tell
            if available < expected:
                return f"truncated pixel data: expected {expected} bytes, found {available}"
    return None


def single_text(ds, keyword: str, text_ok: bool) -> str:
    """str(ds.get(keyword, "") or "").strip(), straight from the raw bytes when they hold one
    printable ASCII value of a string VR (pydicom's conversion, which validates every UID with a
    regex, cost more than the rest of the identity); through pydicom otherwise. text_ok: the
    character set leaves ASCII alone (protocol.ascii_text_safe); UIDs are ASCII by definition.
    """
    tag = tag_for_keyword(keyword)
    elem = ds.get_item(tag, keep_deferred=True)
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        vr = elem.VR or dictionary_VR(tag)
        if (vr == "UI" or (text_ok and vr in _SINGLE_TEXT_VRS)) and elem.value.isascii():
            text = elem.value.decode("ascii")
            # A backslash makes pydicom's value a list, whose str() is another string.
            if text.isprintable() and "\\" not in text:
                return text.strip()
    return str(ds.get(keyword, "") or "").strip()


def scan_file(root: str, path: str, schema: Schema, salt: bytes, site_from: str) -> ScanRecord:
    """Read one file's header into a ScanRecord (never raises on bad input)."""
    with quiet_pydicom():
        return _scan_file(root, path, schema, salt, site_from)


def _scan_file(root, path, schema, salt, site_from) -> ScanRecord:
    ds, reason = _read_header(path)
    if ds is None:
        return ScanRecord(path=path, reason=reason)
    if str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
        return ScanRecord(path=path, reason="DICOMDIR (a media index, not an image)")
    try:
        reason = _pixel_problem(path, ds)
        if reason:
            return ScanRecord(path=path, reason=reason)
        text_ok = ascii_text_safe(ds)
        sop = single_text(ds, "SOPInstanceUID", text_ok)
        if not sop:
            return ScanRecord(path=path, reason="no SOPInstanceUID (cannot identify the instance)")
        study = single_text(ds, "StudyInstanceUID", text_ok)
        series = single_text(ds, "SeriesInstanceUID", text_ok)
        # Missing identity degrades to the next level up, each in its own namespace.
        study = study or f"no-study:{series or sop}"
        series = series or f"no-series:{sop}"
        patient = single_text(ds, "PatientID", text_ok)
        name = "" if patient else str(ds.get("PatientName", "") or "")
        patient_kind, patient = patient_identity(patient, name)
        geometry = [g.to_json() for g in frame_geometry(ds)]
        redactor = header_redactor(ds)
        protocol = redactor.redact(read_protocol(ds, schema), schema)
        # The modality goes to the table as it is (no K): one that repeats an identifier is OT.
        modality = normalize_text(single_text(ds, "Modality", text_ok))
        if not modality or redactor.identifying(modality, freetext=False):
            modality = "OT"
        try:
            instance_number = int(ds.get("InstanceNumber")) if "InstanceNumber" in ds else None
        except (TypeError, ValueError):
            instance_number = None
        return ScanRecord(
            path=path,
            site=site_of(root, path, ds, site_from, salt),
            patient_key=hash_key(salt, patient_kind, patient),
            study_key=hash_key(salt, "study", study),
            series_key=hash_key(salt, "series", series),
            instance_key=hash_key(salt, "instance", sop),
            modality=modality,
            manufacturer=protocol.get("Manufacturer"),
            n_frames=max(1, len(geometry)),
            protocol=protocol,
            geometry=geometry,
            instance_number=instance_number,
        )
    except Exception as e:  # a malformed header must cost one file, not the run
        return ScanRecord(path=path, reason=f"malformed header: {type(e).__name__}: {e}")


def scan_chunk(
    files: Sequence[tuple[str, str]], schema: Schema, salt: bytes, site_from: str
) -> Iterator[ScanRecord]:
    for root, path in files:
        yield scan_file(root, path, schema, salt, site_from)
