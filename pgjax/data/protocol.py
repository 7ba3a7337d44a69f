"""Reading the allow-listed protocol fields of one DICOM header.

`read_protocol` is the only way header values enter the store: it looks up the schema's keywords
one by one (it never iterates over the dataset, so nothing outside the allow-list is touched) and
returns plain Python values: normalised strings, floats, booleans, or None for a missing value.
Malformed values never raise: a protocol field is a hint for pretraining, and one odd header
must not cost the file.
"""

from __future__ import annotations

import functools
import math
import re
import struct
import unicodedata
import warnings

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from pgjax.data.basic_profile import BASIC_PROFILE_KEYWORDS, DESCRIPTOR_KEYWORDS, IDENTIFYING_VRS
from pgjax.data.deid import redact_pydicom_logs
from pgjax.data.schema import Field, Schema

ProtocolValue = str | float | bool | None

# Enhanced multi-frame objects (Enhanced CT/MR, ...) move some attributes into functional group
# macros. keyword -> (macro sequence, attribute inside the macro item), tried in order.
FUNCTIONAL_GROUP_PATHS: dict[str, tuple[tuple[str, str], ...]] = {
    "SliceThickness": (("PixelMeasuresSequence", "SliceThickness"),),
    "PixelSpacing": (("PixelMeasuresSequence", "PixelSpacing"),),
    "SpacingBetweenSlices": (("PixelMeasuresSequence", "SpacingBetweenSlices"),),
    "RepetitionTime": (("MRTimingAndRelatedParametersSequence", "RepetitionTime"),),
    "FlipAngle": (("MRTimingAndRelatedParametersSequence", "FlipAngle"),),
    "EchoTime": (("MREchoSequence", "EffectiveEchoTime"),),
    "InversionTime": (("MRModifierSequence", "InversionTimes"),),
    "KVP": (("CTXRayDetailsSequence", "KVP"),),
    "XRayTubeCurrent": (("CTExposureSequence", "XRayTubeCurrentInmA"),),
    "Exposure": (("CTExposureSequence", "ExposureInmAs"),),
    "ConvolutionKernel": (("CTReconstructionSequence", "ConvolutionKernel"),),
}

# Enhanced objects describe contrast in the Enhanced Contrast/Bolus module, a top-level sequence,
# instead of the Contrast/Bolus Agent string of the classic objects.
PRESENCE_ALIASES: dict[str, tuple[str, ...]] = {
    "ContrastBolusAgent": ("ContrastBolusAgentSequence",),
}

# Value representations without a scalar value (sequences, byte and word streams): only a
# presence field may name one.
OPAQUE_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT"})
# Binary value representations: their bytes are not text, so a value that pydicom cannot convert
# is dropped rather than decoded.
BINARY_VRS = OPAQUE_VRS | {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}

# The decimal/integer string grammar of DICOM (DS, IS): float() alone would also take "nan",
# "inf" and "1_000".
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_DIGITS = re.compile(r"\d+")
_REPEATED_SYMBOL = re.compile(r"([-_+/.#])\1+")
_FREETEXT_KEEP = frozenset("-_+/.# ")
# Step b of normalize_text for uppercased ASCII: what is not a letter or kept becomes a space.
_FREETEXT_DROP_ASCII = re.compile(r"[^A-Z\-_+/.# ]")

_ABSENT = object()
_SLOW = object()  # the fast reader declines: use pydicom's conversion

# The fast reader (`_fast_value`): most header values are short printable ASCII strings, and
# pydicom's general conversion (hooks, validation, value classes) costs ~40 us per element,
# more than the rest of the scan together. For the value representations below, the fast
# reader turns the raw bytes into what the protocol rules would derive from pydicom's value:
# text as one string (the rules split it on "\\" and normalise each part, so pydicom's padding
# removal does not matter), binary numbers as a list. Anything else (another VR, a byte that is
# not printable ASCII, a deferred value, an odd length) goes through pydicom, as before.
# tests/test_protocol.py checks both paths agree on pydicom's test files and malformed values.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
# DS/IS: only these characters, where Python's float() (pydicom's DS/IS) and the DICOM number
# grammar of _to_float agree on what a component is, so which path parses it cannot matter.
_NUMBER_CHARS = frozenset("0123456789+-.eE\\ ")
_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
# Character sets under which printable ASCII bytes decode to themselves. ISO 2022 sets with
# escape sequences never reach the fast path (ESC is not printable); Japanese sets are left to
# pydicom, since JIS X 0201 puts a yen sign where ASCII has the backslash.
_ASCII_SAFE_CHARSETS = frozenset(
    {"", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 192", "GB18030", "GBK"}
    | {f"ISO_IR {n}" for n in (100, 101, 109, 110, 126, 127, 138, 144, 148, 166, 203)}
    | {f"ISO 2022 IR {n}" for n in (100, 101, 109, 110, 126, 127, 138, 144, 148, 166, 203)}
)
_CHARSET_TAG = 0x00080005


def normalize_text(value: str, freetext: bool = False) -> str:
    """Normalise a categorical string so spelling variants of one value become one token.

    Always, in this order:
      1. Unicode NFKC (full-width and compatibility forms become their plain letters);
      2. every whitespace character becomes a space; other control and format characters
         (Unicode categories Cc, Cf, e.g. NUL padding) are dropped;
      3. uppercase;
      4. runs of spaces become one space; leading and trailing spaces go.

    Free-text fields (`Field.freetext`: descriptions typed by people), after step 3:
      a. every run of decimal digits becomes "#" (dates, times, accession-like numbers and
         patient counters vanish before values are counted);
      b. every character that is not a letter, "#", a space or one of "- _ + / ." becomes a
         space (so "T1,POST" and "T1 (POST)" both read "T# POST");
      c. a run of one repeated symbol among "- _ + / . #" becomes one ("A--B" -> "A-B");
    then step 4. Example: "  Ax T1 post 3.0mm 12/03/2021 " -> "AX T# POST #.#MM #/#/#".
    """
    if value.isascii() and value.isprintable():
        # Printable ASCII (nearly every header value): NFKC, the whitespace and the control
        # character rules change nothing, and step b is one regex.
        text = value.upper()
        if freetext:
            text = _FREETEXT_DROP_ASCII.sub(" ", _DIGITS.sub("#", text))
            text = _REPEATED_SYMBOL.sub(r"\1", text)
        return " ".join(text.split())
    text = unicodedata.normalize("NFKC", value)
    text = "".join(
        " " if c.isspace() else c for c in text if c.isspace() or not _is_control(c)
    ).upper()
    if freetext:
        text = _DIGITS.sub("#", text)
        text = "".join(c if c.isalpha() or c in _FREETEXT_KEEP else " " for c in text)
        text = _REPEATED_SYMBOL.sub(r"\1", text)
    return " ".join(text.split())


def _is_control(c: str) -> bool:
    return unicodedata.category(c) in ("Cc", "Cf")


def read_protocol(ds: Dataset, schema: Schema) -> dict[str, ProtocolValue]:
    """The allow-listed protocol values of one header, keyed by keyword in schema order.

    categorical: the normalised string (`normalize_text`, harder for free-text fields); the
      components of a multi-valued element (ImageType, ScanningSequence, ...) are normalised
      one by one, empty ones dropped, and joined with "\\" in stored order (multi "first" keeps
      the first). None when absent or empty.
    numeric: a finite float, from the first component or the mean of all (the field's multi
      rule). None when absent, empty, malformed ("5 mm"), or not finite.
    presence: True when the element exists and is non-empty, else False (never None).

    Enhanced multi-frame objects: when a top-level element is absent or empty, the functional
    group macros of FUNCTIONAL_GROUP_PATHS are read, shared groups first, then the first
    per-frame group.
    """
    check_schema(schema)
    redact_pydicom_logs()
    # pydicom warns about invalid values with the value in the message; a free-text field may
    # hold a name, which must not reach stderr or a log.
    text_ok = ascii_text_safe(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {f.keyword: _read_field(ds, f, text_ok) for f in schema.fields}


@functools.lru_cache(maxsize=16)
def check_schema(schema: Schema) -> None:
    """Refuse (ValueError) a schema that would let an identifier through or that names a field
    its kind cannot read. `read_protocol` calls it; call it at startup too, so a bad schema
    fails once rather than per file.

    Refused: every element of an identifying value representation (names, dates, times, UIDs)
    and every attribute of the PS3.15 Basic Profile (IDs, addresses, telephone numbers, age,
    weight, size, occupation, station and institution names, comments...), whatever the kind;
    except that the Basic Profile's descriptions (DESCRIPTOR_KEYWORDS: study and series
    descriptions, protocol names...) may be read as free text or as presence, and any other
    Basic Profile attribute that is not of an identifying VR as presence (a yes/no holds no
    identity). There is no flag that admits age or weight: they would need top-coding and
    binning to be k-anonymous, which this reader does not do.
    """
    refused = []
    for f in schema.fields:
        vr = dictionary_VR(tag_for_keyword(f.keyword))
        if vr in IDENTIFYING_VRS:
            refused.append(f"{f.keyword} (VR {vr})")
        elif f.keyword in BASIC_PROFILE_KEYWORDS and f.kind != "presence":
            if not (f.keyword in DESCRIPTOR_KEYWORDS and f.freetext):
                refused.append(f"{f.keyword} (PS3.15 Basic Profile)")
    if refused:
        raise ValueError(
            f"protocol schema fields {', '.join(refused)} hold identifiers and may not be read "
            "as protocol fields (descriptions of the Basic Profile only as free text: "
            f"{', '.join(sorted(DESCRIPTOR_KEYWORDS))})"
        )
    for f in schema.fields:
        vr = dictionary_VR(tag_for_keyword(f.keyword))
        if f.kind != "presence" and vr in OPAQUE_VRS:
            raise ValueError(
                f"protocol schema field {f.keyword} has VR {vr}: only a presence field can read it"
            )
        if f.kind == "categorical" and f.multi == "mean":
            raise ValueError(f"protocol schema field {f.keyword}: categorical with multi 'mean'")


def _read_field(ds: Dataset, field: Field, text_ok: bool = False) -> ProtocolValue:
    if field.kind == "presence":
        keywords = (field.keyword, *PRESENCE_ALIASES.get(field.keyword, ()))
        return any(_non_empty(_element_value(ds, k, text_ok)) for k in keywords)
    numeric = field.kind == "numeric"
    convert = _numeric if numeric else _categorical
    value = convert(_element_value(ds, field.keyword, text_ok, numeric), field)
    if value is None:
        for macro, keyword in FUNCTIONAL_GROUP_PATHS.get(field.keyword, ()):
            for item in _functional_group_items(ds, macro):
                value = convert(_element_value(item, keyword), field)
                if value is not None:
                    return value
    return value


def _functional_group_items(ds: Dataset, macro: str):
    """The first item of `macro` in the shared group, then in the first per-frame group."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = _first_item(_element_value(ds, groups))
        item = _first_item(_element_value(group, macro)) if group is not None else None
        if item is not None:
            yield item


def _first_item(value) -> Dataset | None:
    if isinstance(value, Sequence) and len(value) and isinstance(value[0], Dataset):
        return value[0]
    return None


def ascii_text_safe(ds: Dataset) -> bool:
    """Whether printable ASCII text in `ds` decodes to itself under its character set."""
    elem = ds.get_item(_CHARSET_TAG, keep_deferred=True)
    if elem is None:
        return True
    value = elem.value
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return False
    if value is None:
        return True
    terms = value.split("\\") if isinstance(value, str) else list(value)
    return all(str(t).strip(" \0") in _ASCII_SAFE_CHARSETS for t in terms)


@functools.cache
def _tag(keyword: str) -> int | None:
    return tag_for_keyword(keyword)


@functools.cache
def dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


def _fast_value(elem: RawDataElement, tag: int, text_ok: bool, numbers_ok: bool):
    """The protocol-equivalent value of a raw element, or _SLOW (see _TEXT_VRS above).

    text_ok: the data set's character set leaves ASCII alone. numbers_ok: the caller is a
    numeric field (pydicom's DS/IS value classes print differently from the stored text, e.g.
    IS "14E-2" as "0.14", so other kinds take pydicom's value).
    """
    raw = elem.value
    if raw is None or not isinstance(raw, bytes):  # deferred, or not raw bytes
        return _SLOW
    vr = elem.VR or dictionary_vr(tag)  # implicit VR files: the dictionary's VR, as pydicom
    fmt = _BINARY_FORMATS.get(vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        if len(raw) % size:
            return _SLOW
        order = "<" if elem.is_little_endian else ">"
        return list(struct.unpack(f"{order}{len(raw) // size}{fmt}", raw))
    if vr in _TEXT_VRS:
        if not text_ok:
            return _SLOW
    elif vr not in ("DS", "IS") or not numbers_ok:
        return _SLOW
    if not raw.isascii():
        return _SLOW
    text = raw.decode("ascii")
    if not text.isprintable():
        return _SLOW
    if vr in ("DS", "IS") and not _NUMBER_CHARS.issuperset(text):
        return _SLOW
    return text


def _element_value(ds: Dataset, keyword: str, text_ok: bool = False, numbers_ok: bool = False):
    """The element's value; _ABSENT when it is not there; raw bytes when pydicom cannot convert
    them (e.g. DS "5 mm"); None when those bytes are binary. With the fast reader (only for the
    top-level data set, whose character set `text_ok` describes), a plain string or list may
    stand in for pydicom's value (see _fast_value)."""
    tag = _tag(keyword)
    if tag is None:
        return _ABSENT
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return _ABSENT
    if isinstance(elem, RawDataElement):  # text only when text_ok; numbers are ASCII always
        value = _fast_value(elem, tag, text_ok, numbers_ok)
        if value is not _SLOW:
            return value
    try:
        return ds[tag].value
    except Exception:  # pydicom raises ValueError, TypeError, ... on values it cannot convert
        raw = ds.get_item(tag)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and getattr(raw, "VR", None) not in BINARY_VRS:
            return value
        return None


def _non_empty(value) -> bool:
    if value is _ABSENT or value is None:
        return False
    if isinstance(value, bytes):
        return bool(value.strip(b" \0"))
    if isinstance(value, str):
        return bool(value.strip(" \0"))
    try:
        return len(value) > 0  # MultiValue, Sequence
    except TypeError:
        return True  # a number


def _components(value) -> list:
    """The values of a possibly multi-valued element, as a list."""
    if value is _ABSENT or value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value.split("\\")
    if isinstance(value, Sequence):
        return []  # a sequence has no scalar value
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _categorical(value, field: Field) -> str | None:
    parts = [normalize_text(str(v), field.freetext) for v in _components(value)]
    parts = [p for p in parts if p]
    if field.multi == "first":
        parts = parts[:1]
    return "\\".join(parts) or None


def _numeric(value, field: Field) -> float | None:
    parts = _components(value)
    if not parts:
        return None
    if field.multi == "first":
        return _to_float(parts[0])
    numbers = [_to_float(v) for v in parts]
    if any(x is None for x in numbers):
        return None  # one malformed component makes the whole value malformed
    return math.fsum(numbers) / len(numbers)


def _to_float(value) -> float | None:
    # pydicom's DS/IS accept what Python's float() and int() do ("1_000"); keep the DICOM grammar.
    value = getattr(value, "original_string", value)
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, str):
        text = value.strip(" \0")
        if not _NUMBER.fullmatch(text):
            return None
        x = float(text)
    elif isinstance(value, bool):
        return None
    else:
        try:
            x = float(value)  # int, float, DSfloat, IS, DSdecimal
        except (TypeError, ValueError):
            return None
    return x if math.isfinite(x) else None
