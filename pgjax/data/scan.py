"""Phase 1 of preprocessing: read every file's header once and keep what later phases need.

A scan record holds the allow-listed protocol values, salted identity keys, geometry and the
file's path. It lives only in the private work folder (beside the salt, never in the store):
paths and rare free-text values can identify a patient until the vocabulary filter has run.

Pixels are not decoded here; the header read defers large values, so scanning a file costs
about a millisecond whatever its size.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

from pgjax.data.config import DEFAULT_MAX_PIXELS
from pgjax.data.deid import hash_key, patient_identity, quiet_pydicom
from pgjax.data.pixels import frame_geometry, size_problem
from pgjax.data.protocol import ascii_text_safe, normalize_text, read_protocol
from pgjax.data.redaction import header_redactor
from pgjax.data.schema import Schema
from pgjax.data.sites import site_of

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Stored pixel bytes per sample are only predictable for native (uncompressed) encodings.
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
}
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
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
    Symbolic links to folders are listed as files, not followed, so the scan reports them.
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
            # Links to folders are not followed (they can loop); listed, the scan says so.
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            dirnames[:] = [d for d in dirnames if d not in links]
            for name in sorted(filenames + links):
                if not name.startswith("."):
                    out.append((str(root), os.path.join(dirpath, name)))
    return out


def file_state(path: str) -> tuple[int, int]:
    """(size, mtime_ns) for the scan's listing; never raises. A link that cannot be followed (a
    loop, a dangling symlink) gives the link's own state: the scan skips it with the reason."""
    for stat_fn in (os.stat, os.lstat):
        try:
            s = stat_fn(path)
            return s.st_size, s.st_mtime_ns
        except OSError:
            continue
    return -1, -1


def _cannot_open(path: str) -> str | None:
    """Why `path` cannot be read as a file, or None. The reason never quotes the path (it can
    name a patient; OSError's text does)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "cannot open: symbolic link loop"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return "cannot open: dangling symbolic link"
        return _os_reason(e)
    if stat.S_ISDIR(mode):
        return "symbolic link to a folder (not followed)"
    if not stat.S_ISREG(mode):
        # A FIFO would block the reader forever; devices and sockets are not files either.
        return "not a regular file (FIFO, socket or device)"
    return None


def _os_reason(e: OSError) -> str:
    return f"cannot open: {os.strerror(e.errno) if e.errno else type(e).__name__}"


def _read_header(path: str):
    """The dataset without pixel bytes, or a skip reason."""
    try:
        # defer_size keeps PixelData as a placeholder (its presence and length are known,
        # its bytes are not read), which is what distinguishes an image from, say, an SR.
        return pydicom.dcmread(path, defer_size=4096), None
    except InvalidDicomError:
        pass
    except OSError as e:  # no permission, or gone since the listing: its text quotes the path
        return None, _os_reason(e)
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


def _pixel_problem(path: str, ds, max_pixels: int) -> str | None:
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
    if tsuid == DEFLATED:
        return None  # the data set is inflated on reading: the pixel phase checks its size
    elem = next(ds.get_item(k, keep_deferred=True) for k in PIXEL_KEYWORDS if k in ds)
    if isinstance(elem.value, bytes | bytearray):  # small enough to have been read
        return size_problem(ds, max_pixels, io.BytesIO(elem.value), len(elem.value))
    tell = getattr(elem, "value_tell", None)
    if tell is None:
        return None
    # Deferred: read from the file. A truncated file keeps its declared length, so what the
    # file holds bounds it; only item headers are read for encapsulated data.
    available = os.path.getsize(path) - tell
    if elem.length != 0xFFFFFFFF:
        available = min(available, elem.length)
    if not (tsuid and pydicom.uid.UID(tsuid).is_encapsulated):  # native: lengths suffice
        return size_problem(ds, max_pixels, io.BytesIO(), available)
    with open(path, "rb") as f:
        f.seek(tell)
        return size_problem(ds, max_pixels, f, available)


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


def scan_file(
    root: str,
    path: str,
    schema: Schema,
    salt: bytes,
    site_from: str,
    site_names=None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ScanRecord:
    """Read one file's header into a ScanRecord (never raises on bad input).

    site_names: {folder: site name} for site_from "dir" (see pgjax/data/sites.py).
    max_pixels: files declaring more per frame are skipped (PreprocessConfig.max_pixels).
    """
    with quiet_pydicom():
        return _scan_file(root, path, schema, salt, site_from, site_names, max_pixels)


def _scan_file(root, path, schema, salt, site_from, site_names, max_pixels) -> ScanRecord:
    reason = _cannot_open(path)
    if reason:
        return ScanRecord(path=path, reason=reason)
    ds, reason = _read_header(path)
    if ds is None:
        return ScanRecord(path=path, reason=reason)
    if str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
        return ScanRecord(path=path, reason="DICOMDIR (a media index, not an image)")
    try:
        reason = _pixel_problem(path, ds, max_pixels)
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
            site=site_of(root, path, ds, site_from, salt, site_names),
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
    files: Sequence[tuple[str, str]],
    schema: Schema,
    salt: bytes,
    site_from: str,
    site_names=None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[ScanRecord]:
    for root, path in files:
        yield scan_file(root, path, schema, salt, site_from, site_names, max_pixels)
