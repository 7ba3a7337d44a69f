"""The protocol schema: which DICOM header fields may leave the reader, and how each is tokenized.

The schema is the de-identification allow-list. A field that is not a row here never reaches a
token, a store, a log or a checkpoint. Each row says how the field is read (keyword, kind) and how
it is normalised. The default table below covers CT, MR, CR/DX and US; a user can pass another as
a JSON file (`pgjax preprocess --schema FILE`), a list of objects with the same keys as `Field`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

SCHEMA_FORMAT = "pgjax-protocol-schema"
SCHEMA_VERSION = 1

Kind = Literal["categorical", "numeric", "presence"]


@dataclasses.dataclass(frozen=True)
class Field:
    """One protocol field.

    keyword: the DICOM keyword (pydicom's name for the tag).
    kind: categorical (a string vocabulary), numeric (quantile bins plus a normalised value),
      or presence (only whether the element is present and non-empty, e.g. a contrast agent).
    freetext: the value is typed by people (descriptions, protocol names) and may carry
      identifiers; it is normalised and kept only if seen for enough distinct patients. Every
      categorical value is subject to that rule, and to the redaction of values that repeat an
      identifier of their header (pgjax/data/redaction.py); free-text ones are also normalised
      harder (digits and punctuation go) and checked word by word against the header's IDs.
    transform: numeric only; "identity" or "log" (log1p, for positive quantities spanning decades).
    multi: how a multi-valued element becomes one value: "join" (categorical, joined with '\\'),
      "first" or "mean" (numeric).
    unit: documentation only, for the model card.
    """

    keyword: str
    kind: Kind
    freetext: bool = False
    transform: Literal["identity", "log"] = "identity"
    multi: Literal["join", "first", "mean"] = "join"
    unit: str = ""

    def __post_init__(self):
        if self.kind not in ("categorical", "numeric", "presence"):
            raise ValueError(f"field {self.keyword}: unknown kind {self.kind!r}")
        if self.transform not in ("identity", "log"):
            raise ValueError(f"field {self.keyword}: unknown transform {self.transform!r}")
        if self.multi not in ("join", "first", "mean"):
            raise ValueError(f"field {self.keyword}: unknown multi rule {self.multi!r}")
        if self.kind == "numeric" and self.multi == "join":
            raise ValueError(f"field {self.keyword}: a numeric field needs multi 'first' or 'mean'")


def _cat(keyword, freetext=False, unit=""):
    return Field(keyword, "categorical", freetext=freetext, unit=unit)


def _num(keyword, unit, transform="identity", multi="first"):
    return Field(keyword, "numeric", transform=transform, multi=multi, unit=unit)


# The default protocol schema. Order matters: it is the order of the token columns in the store.
DEFAULT_FIELDS: tuple[Field, ...] = (
    _cat("Modality"),
    _cat("Manufacturer"),
    _cat("ManufacturerModelName"),
    _cat("SoftwareVersions"),
    _cat("BodyPartExamined"),
    _cat("StudyDescription", freetext=True),
    _cat("SeriesDescription", freetext=True),
    _cat("ProtocolName", freetext=True),
    _cat("ImageType"),
    _cat("ViewPosition"),
    _cat("PhotometricInterpretation"),
    _num("KVP", "kV"),
    _num("XRayTubeCurrent", "mA", transform="log"),
    _num("Exposure", "mAs", transform="log"),
    _cat("ConvolutionKernel"),
    _num("SliceThickness", "mm", transform="log"),
    _num("SpacingBetweenSlices", "mm", transform="log"),
    _num("PixelSpacing", "mm", multi="mean"),
    _num("Rows", "px", transform="log"),
    _num("Columns", "px", transform="log"),
    _num("BitsStored", "bit"),
    _num("RepetitionTime", "ms", transform="log"),
    _num("EchoTime", "ms", transform="log"),
    _num("InversionTime", "ms", transform="log"),
    _num("FlipAngle", "deg"),
    _num("MagneticFieldStrength", "T"),
    _cat("ScanningSequence"),
    _cat("SequenceVariant"),
    _cat("MRAcquisitionType"),
    Field("ContrastBolusAgent", "presence"),
    _cat("TransducerData", freetext=True),
)


@dataclasses.dataclass(frozen=True)
class Schema:
    fields: tuple[Field, ...] = DEFAULT_FIELDS
    version: int = SCHEMA_VERSION

    def __post_init__(self):
        names = [f.keyword for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"protocol schema lists fields twice: {dupes}")
        # A keyword unknown to pydicom would silently read as missing forever.
        from pydicom.datadict import tag_for_keyword

        unknown = [n for n in names if tag_for_keyword(n) is None]
        if unknown:
            raise ValueError(f"protocol schema names unknown DICOM keywords: {unknown}")

    @property
    def keywords(self) -> list[str]:
        return [f.keyword for f in self.fields]

    def index(self, keyword: str) -> int:
        return self.keywords.index(keyword)

    def to_json(self) -> dict:
        return {
            "format": SCHEMA_FORMAT,
            "version": self.version,
            "fields": [dataclasses.asdict(f) for f in self.fields],
        }

    @classmethod
    def from_json(cls, obj: dict | list, source: str = "<schema>") -> Schema:
        if isinstance(obj, list):  # a bare list of rows is accepted too
            obj = {"format": SCHEMA_FORMAT, "version": SCHEMA_VERSION, "fields": obj}
        if obj.get("format") != SCHEMA_FORMAT:
            raise ValueError(
                f"{source}: not a pgjax protocol schema (format={obj.get('format')!r})"
            )
        try:
            fields = tuple(Field(**row) for row in obj["fields"])
        except TypeError as e:
            raise ValueError(f"{source}: bad schema row: {e}") from e
        return cls(fields=fields, version=int(obj.get("version", SCHEMA_VERSION)))


def load_schema(path: str | Path | None) -> Schema:
    """The default schema, or the one in a JSON file."""
    if path is None:
        return Schema()
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read protocol schema: {e}") from e
    return Schema.from_json(obj, source=str(path))
