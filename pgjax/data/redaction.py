"""Redaction of allow-listed protocol values that carry an identifier.

The vocabulary's distinct-patient rule (K) removes rare values, but a value that repeats an
identifier can be common: a technologist's name typed into every series, a station name copied
into ImageType, a date in a kernel name. So, before any value is counted, every categorical
value of every field (not only the free-text ones) is replaced by REDACTED when it

- holds one of the identifiers of its own header: every element of the PS3.15 Basic Profile and
  every element of an identifying value representation (names, IDs, station and institution
  names, addresses, dates, times, date-times, ages; see `header_identifiers`), or
- parses as a date (YYYYMMDD, also at the start of a longer digit run as in a date-time;
  YYYY-MM-DD, DD.MM.YYYY, MM/DD/YYYY and the like) or a DICOM age ("098Y"), or
- holds a phrase of the user's word list (`pgjax preprocess --redact-words FILE`).

Numeric fields: a value that reads as a date (an 8-digit integer YYYYMMDD) is dropped (None).

Values are compared as sequences of words (runs of letters and digits), so "DOE^JOHN",
"John Doe" and "DOE, JOHN" all hold the words of PatientName. A person name also matches by
each of its words of 3 or more characters; other identifiers match as a whole phrase (so an
institution "X MEDICAL CENTER" does not redact the manufacturer "GE MEDICAL SYSTEMS"), except in
free-text fields, where the words of IDs and InstitutionName match alone as well.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable
from pathlib import Path

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from pgjax.data.basic_profile import BASIC_PROFILE_TAGS, DESCRIPTOR_KEYWORDS
from pgjax.data.protocol import ascii_text_safe, dictionary_vr, normalize_text
from pgjax.data.schema import Schema

REDACTED = "<REDACTED>"

MIN_WORD_CHARS = 3  # a single word shorter than this is noise ("MR", "DR", initials)
MIN_NUMBER_CHARS = 6  # a shorter number inside a word ("B30", "V1015") is a version or kernel
# Sequences of the Basic Profile are searched this deep and this many items each: enough for
# the request, procedure-step and physician-identification sequences, bounded for a sequence
# of thousands of referenced images.
MAX_DEPTH = 4
MAX_ITEMS = 32

# Value representations read as identifying text. Code strings (PatientSex "M") and numbers
# (PatientWeight "70") are too short and too common to mark a value as identifying.
_TEXT_VRS = frozenset(
    {"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UI", "DA", "DT", "TM", "AS"}
)
_WORD_VRS = frozenset({"PN", "DA", "DT", "TM"})  # identifying wherever they are
_ASCII_VRS = frozenset({"UI", "DA", "DT", "TM", "AS"})
# Sequences of references to other objects (UIDs only) or of pixels: not searched, for speed.
_REFERENCE_SEQUENCES = frozenset(
    {
        "ReferencedImageSequence",
        "SourceImageSequence",
        "ReferencedStudySequence",
        "ReferencedPerformedProcedureStepSequence",
        "ReferencedSOPInstanceMACSequence",
        "IconImageSequence",
        "DigitalSignaturesSequence",
        "ReferencedDigitalSignatureSequence",
    }
)
_CHARSET_TAG = 0x00080005
# Besides person names, the words of these match alone in free text (as before the whole
# value rule; IDs and an institution's distinctive words are rarely description words).
_FREETEXT_WORD_KEYWORDS = frozenset(
    {"PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName"}
)

_WORD = re.compile(r"[^\W_]+")
_DIGIT_RUN = re.compile(r"\d+")
_COMPACT_DATE = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})")
_YMD = re.compile(r"(?<!\d)(\d{4})([-/.])(\d{1,2})\2(\d{1,2})(?!\d)")
_DMY = re.compile(r"(?<!\d)(\d{1,2})([-/.])(\d{1,2})\2(\d{4})(?!\d)")
_AGE = re.compile(r"(?<![^\W_])\d{3}[DWMY](?![^\W_])")
_TIME = re.compile(r"(\d{2})(\d{2})(\d{2})?")


def _is_date(year: str, month: str, day: str) -> bool:
    y, m, d = int(year), int(month), int(day)
    if not 1850 <= y <= 2150:  # DICOM dates of people and studies; "12345678" is no date
        return False
    try:
        datetime.date(y, m, d)
    except ValueError:
        return False
    return True


def holds_date(text: str) -> bool:
    """Whether `text` holds something that parses as a calendar date (see the module doc)."""
    if any(_is_date(*m.groups()) for m in _COMPACT_DATE.finditer(text)):
        return True
    if any(_is_date(m[1], m[3], m[4]) for m in _YMD.finditer(text)):
        return True
    # DD.MM.YYYY or MM/DD/YYYY: either reading makes it a date
    return any(
        _is_date(m[4], m[3], m[1]) or _is_date(m[4], m[1], m[3]) for m in _DMY.finditer(text)
    )


def holds_age(text: str) -> bool:
    """Whether `text` holds a DICOM age string (three digits and D, W, M or Y)."""
    return _AGE.search(text.upper()) is not None


def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text))


class Redactor:
    """Phrases (word sequences) that mark a protocol value as identifying.

    plain: matched in values of fields that are not free text (normalised like them);
    free: matched in free-text values (normalised the free-text way, digits gone).
    """

    def __init__(
        self,
        plain: Iterable[tuple[str, ...]] = (),
        free: Iterable[tuple[str, ...]] = (),
        min_chars: int = MIN_WORD_CHARS,
    ):
        self.plain = _phrase_index(plain, min_chars)
        self.free = _phrase_index(free, min_chars)
        # Numbers (times, numeric IDs) are found inside words too ("K174512"), as the audit
        # finds them: a run of digits is one number.
        self.numbers = frozenset(
            w for w in self.plain[0] if w.isdigit() and len(w) >= MIN_NUMBER_CHARS
        )

    def identifying(self, value: str, freetext: bool) -> bool:
        """Whether a normalised categorical value holds one of the phrases, a date or an age."""
        if not freetext and (holds_date(value) or holds_age(value)):
            return True
        singles, multis = self.free if freetext else self.plain
        words = _words(value)
        if singles.intersection(words):
            return True
        if self.numbers and not freetext and self.numbers.intersection(_DIGIT_RUN.findall(value)):
            return True
        if multis:
            padded = f" {' '.join(words)} "
            return any(f" {p} " in padded for p in multis)
        return False

    def redact(self, protocol: dict, schema: Schema) -> dict:
        """`protocol` (read_protocol's output) with identifying values replaced: REDACTED for
        categorical values, None for numeric values that read as dates."""
        out = dict(protocol)
        for field in schema.fields:
            value = out.get(field.keyword)
            if field.kind == "categorical" and isinstance(value, str):
                if self.identifying(value, field.freetext):
                    out[field.keyword] = REDACTED
            elif field.kind == "numeric" and isinstance(value, float) and _numeric_date(value):
                out[field.keyword] = None
        return out


def _phrase_index(
    phrases: Iterable[tuple[str, ...]], min_chars: int
) -> tuple[frozenset, frozenset]:
    """(single words, multi-word phrases joined by spaces), single words under min_chars
    dropped."""
    singles, multis = set(), set()
    for p in phrases:
        if len(p) == 1 and len(p[0]) >= min_chars:
            singles.add(p[0])
        elif len(p) > 1:
            multis.add(" ".join(p))
    return frozenset(singles), frozenset(multis)


def _numeric_date(value: float) -> bool:
    if not value.is_integer() or not 1e7 <= value < 1e8:
        return False
    text = str(int(value))
    return _is_date(text[:4], text[4:6], text[6:])


# ------------------------------------------------------------------------------ user words


def read_redact_words(path) -> list[str]:
    """The names and phrases of a word list file (`--redact-words FILE`): one a line, blank
    lines and lines starting with '#' ignored. A file with none is refused (a typo would
    otherwise redact nothing, silently)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the redact-words file: {e}") from e
    words = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not words:
        raise ValueError(f"{path}: no words to redact (one name or phrase a line)")
    return words


def words_redactor(words: Iterable[str]) -> Redactor:
    """A Redactor of the user's phrases, each matched whole (as a word sequence, case and
    punctuation ignored) in every categorical field, free text or not."""
    plain, free = set(), set()
    for w in words:
        plain.add(_words(normalize_text(w)))
        free.add(_words(normalize_text(w, freetext=True)))
    return Redactor({p for p in plain if p}, {p for p in free if p}, min_chars=1)


# ---------------------------------------------------------------------------- the header's own


def header_redactor(ds: Dataset) -> Redactor:
    """The phrases of every identifying element of one header (see the module doc)."""
    plain, free = set(), set()
    for keyword, vr, text in header_identifiers(ds):
        _add_forms(keyword, vr, text, plain, free)
    return Redactor(plain, free)


def header_identifiers(ds: Dataset, exhaustive: bool = False) -> list[tuple[str, str, str]]:
    """(keyword, VR, text) of every identifying element of a header: elements of the Basic
    Profile (descriptions excepted: they are what is checked) and of the identifying value
    representations, top level and inside the Basic Profile's sequences and the sequences they
    hold (MAX_DEPTH, MAX_ITEMS, references to other objects skipped; when `exhaustive`, as the
    audit reads, every sequence, whole).
    An element inside a sequence is named "Sequence.Keyword". Text of several values keeps
    DICOM's "\\" between them."""
    out: list[tuple[str, str, str]] = []
    _collect(ds, ascii_text_safe(ds), out, "", 0, exhaustive)
    return out


def _collect(ds: Dataset, text_ok: bool, out: list, prefix: str, depth: int, exhaustive: bool):
    for tag in list(ds.keys()):
        tag = int(tag)
        if tag >> 16 == 0x0002:  # file meta: only transfer details
            continue
        keyword = BASIC_PROFILE_TAGS.get(tag)
        vr = dictionary_vr(tag)
        # Sequences: those of the Basic Profile, and any sequence inside them. (Not the others
        # of the top level: functional groups can hold thousands of items.)
        sequence = vr == "SQ" and (keyword is not None or depth > 0 or exhaustive)
        if keyword is None and vr not in _WORD_VRS and not sequence:
            continue
        if keyword in DESCRIPTOR_KEYWORDS:
            continue
        keyword = keyword or keyword_for_tag(tag) or vr
        if vr == "SQ":
            if not sequence:
                continue
            if exhaustive or (depth + 1 < MAX_DEPTH and keyword not in _REFERENCE_SEQUENCES):
                value = _value(ds, tag)
                if isinstance(value, Sequence):
                    items = list(value) if exhaustive else list(value)[:MAX_ITEMS]
                    for item in items:
                        # An item with a character set of its own is left to pydicom.
                        ok = text_ok and _CHARSET_TAG not in item
                        _collect(item, ok, out, f"{prefix}{keyword}.", depth + 1, exhaustive)
            continue
        if vr not in _TEXT_VRS:
            continue
        text = _fast_text(ds, tag, vr, text_ok)
        if text is None:
            text = _as_text(_value(ds, tag))
        if text.strip(" \0"):
            out.append((prefix + keyword, vr, text))


def _fast_text(ds: Dataset, tag, vr: str, text_ok: bool) -> str | None:
    """The raw bytes as text when they are printable ASCII that pydicom would decode the same
    way (see protocol._fast_value: pydicom's conversion costs ~40 us an element); else None.
    UIDs, dates, times and ages are ASCII by definition; other text only where the character
    set leaves ASCII alone (`text_ok`, known for the top level only)."""
    elem = ds.get_item(tag, keep_deferred=True)
    if not isinstance(elem, RawDataElement) or not isinstance(elem.value, bytes):
        return None
    if not (text_ok or vr in _ASCII_VRS) or not elem.value.isascii():
        return None
    text = elem.value.decode("ascii")
    return text if text.isprintable() else None


def _value(ds: Dataset, tag):
    try:
        return ds[tag].value
    except Exception:  # a value pydicom cannot convert identifies nothing we could match
        return None


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _add_forms(keyword: str, vr: str, text: str, plain: set, free: set) -> None:
    for value in text.split("\\"):
        value = value.strip(" \0")
        if not value:
            continue
        if vr == "PN":
            value = value.replace("^", " ").replace("=", " ")
            for norm, out in ((normalize_text(value), plain), (normalize_text(value, True), free)):
                words = _words(norm)
                out.add(words)
                out.update((w,) for w in words)
        elif vr in ("DA", "DT", "TM", "AS"):
            plain.update(_date_time_forms(vr, value))
        else:
            plain.add(_words(normalize_text(value)))
            words = _words(normalize_text(value, freetext=True))
            if words:  # an ID of digits only has no free-text form: its digits are gone
                free.add(words)
                if keyword.rsplit(".", 1)[-1] in _FREETEXT_WORD_KEYWORDS:
                    free.update((w,) for w in words)


def _date_time_forms(vr: str, value: str) -> set[tuple[str, ...]]:
    """Word sequences of a date, time, date-time or age in their common written forms. (Any
    value holding a date is redacted anyway; these add the times and ages.)"""
    digits = value.split(".")[0].split("+")[0].split("-")[0].strip()
    forms = {_words(value.upper())}
    if vr == "TM" or (vr == "DT" and len(digits) > 8):
        time = digits[8:] if vr == "DT" else digits
        m = _TIME.fullmatch(time)
        if m:
            forms.add((time,))
            forms.add(tuple(g for g in m.groups() if g))
    if vr == "AS" and len(value) == 4:
        forms.add((value[:3].lstrip("0") + value[3],))
    return {f for f in forms if f}
