"""Audit a store for identifiers taken from the source DICOM files.

`collect_identifiers` reads the identifying attributes of the sources (every element of the
PS3.15 Basic Profile and of the identifying value representations: names, IDs, dates, times,
ages, UIDs, station and institution names...) in the forms they are likely to leak in, including
unsalted hashes. `audit_store`
then searches every file of the store: zarr v3 arrays are decoded with TensorStore and their
data searched (compression would hide an identifier from a byte grep of the chunk files); every
other file is searched as raw bytes, as is every file and folder name. The report names only
redacted identifiers, so it can be shared and kept by CI.

One regex holds every identifier, built as a trie of escaped literals so each byte position costs
a few steps however many identifiers there are (10-30 MB/s on one core). It is sized for an
audit sample (up to ~1e5 identifiers); audit a big corpus against a sample of its sources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import tensorstore as ts

from pgjax.data.deid import redact, redact_pydicom_logs
from pgjax.data.redaction import header_identifiers

MIN_CHARS = 4  # shorter values hit by chance everywhere
# In decoded arrays (pixels, token ids, numbers) a value shorter than this, or a single name
# part, can turn up by chance: such hits are weak. Anywhere else every hit is strong.
WEAK_IN_ARRAYS_BELOW = 6
# Digits alone are weak in arrays below this length: grey levels 48-57 are the bytes "0"-"9",
# so a smooth image holds long digit runs, and a 6-digit time is one of a million strings.
# A date (8 digits) stays strong.
WEAK_DIGITS_IN_ARRAYS_BELOW = 8
BLOCK_BYTES = 8 << 20  # files and arrays are searched in blocks of this size

# Unsalted hashes of these are searched too (naive hashing of IDs and UIDs).
HASHED_KEYWORDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

_DIGITS = frozenset(b"0123456789")
_DATE = re.compile(r"(1[89]|2[01])\d\d(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])")
_ALNUM = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NUMERIC_PATTERN = re.compile(rb"[0-9.]+")
_HEX = frozenset(b"0123456789abcdef")
_HEX_LETTERS = frozenset(b"abcdef")
# A run of at least this many hex characters with a letter among them is a key or digest (the
# store's salted keys are 16): the digit runs inside it are random, and a 6-digit time or a
# short ID turns up in them by chance among thousands of keys.
HEX_KEY_MIN = 16


@dataclasses.dataclass(frozen=True)
class Identifier:
    """A string that must not appear in a store.

    weak: a single name component or a short value, which random bytes can hold by chance: its
      hits inside decoded arrays are weak (reported apart, accepted by `--weak-ok`); its hits
      in any file (a token in vocab.json, a table value, a JSON string) or name are strong.
    embedded: a date, found inside longer digit strings too (20230917 in 20230917101530).
    """

    kind: str
    value: str
    weak: bool = False
    embedded: bool = False


@dataclasses.dataclass(frozen=True)
class Hit:
    """One occurrence. path: relative to the store, with identifiers in it redacted. where:
    "file" (offset: byte offset), "array" (offset: byte offset in the array's C-order data,
    index: the element where the match starts) or "name" (the file or folder name itself)."""

    path: str
    kind: str
    redacted: str
    where: str
    offset: int | None = None
    index: tuple[int, ...] | None = None
    weak: bool = False


@dataclasses.dataclass
class AuditReport:
    store: str
    identifiers: int
    files_scanned: int = 0
    bytes_scanned: int = 0
    arrays_scanned: int = 0
    hits: list[Hit] = dataclasses.field(default_factory=list)
    hits_total: int = 0  # may exceed len(hits), which is capped
    weak_hits_total: int = 0
    hits_by_kind: Counter = dataclasses.field(default_factory=Counter)
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def strong_hits_total(self) -> int:
        return self.hits_total - self.weak_hits_total

    def to_json(self) -> dict:
        return {
            "format": "pgjax-audit",
            "version": 1,
            "store": self.store,
            "identifiers": self.identifiers,
            "files_scanned": self.files_scanned,
            "bytes_scanned": self.bytes_scanned,
            "arrays_scanned": self.arrays_scanned,
            "hits_total": self.hits_total,
            "weak_hits_total": self.weak_hits_total,
            "hits_by_kind": dict(sorted(self.hits_by_kind.items())),
            "hits": [
                {
                    k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(h).items()
                }
                for h in self.hits
            ],
            "errors": [{"path": p, "reason": r} for p, r in self.errors],
        }


# ---------------------------------------------------------------------------------- sources


def collect_identifiers(paths: Iterable[str | Path]) -> list[Identifier]:
    """The identifiers of every DICOM (part 10) file under `paths` (files or folders).

    Every element of the PS3.15 Basic Profile the sources hold, and every element of an
    identifying value representation (names, dates, times, date-times, UIDs), top level and
    nested in sequences (`redaction.header_identifiers`, exhaustive): patient and staff names,
    IDs, station, institution and department names, addresses, ages, dates and times in their
    common written forms, UIDs and unsalted hashes of IDs and UIDs. The descriptions a store
    keeps by design (study and series descriptions, protocol names) are not identifiers here.

    Files that are not DICOM, or too damaged to read, are skipped silently. Values shorter than
    4 characters, or with fewer than 2 distinct letters or digits ("----", "000000"), are left
    out. Each identifier appears once (compared case-insensitively).
    """
    redact_pydicom_logs()
    found: dict[str, tuple[set[str], str, bool, bool]] = {}
    for path in _walk_sources(paths):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warnings quote header values
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                pairs = list(_identifiers_of(ds))
        except Exception:  # not DICOM (InvalidDicomError), or too damaged to read: skipped
            continue
        for kind, value, weak in pairs:
            value = value.strip(" \0")
            if len(value) < MIN_CHARS or len({c for c in value.lower() if c.isalnum()}) < 2:
                continue
            weak = (weak or len(value) < WEAK_IN_ARRAYS_BELOW
                    or (value.isdigit() and len(value) < WEAK_DIGITS_IN_ARRAYS_BELOW))  # fmt: skip
            embedded = bool(_DATE.fullmatch(value))
            kinds, first, was_weak, was_embedded = found.get(
                value.lower(), (set(), value, True, False)
            )
            kinds.add(kind)
            found[value.lower()] = (kinds, first, was_weak and weak, was_embedded or embedded)
    return [Identifier(", ".join(sorted(k)), v, w, e) for k, v, w, e in found.values()]


def _walk_sources(paths: Iterable[str | Path]) -> Iterator[str]:
    for root in paths:
        root = Path(root)
        if root.is_file():
            yield str(root)
        elif root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    yield os.path.join(dirpath, name)
        else:
            raise FileNotFoundError(f"{root}: no such source file or folder")


def _identifiers_of(ds) -> Iterator[tuple[str, str, bool]]:
    """(kind, value, weak) for one header."""
    for keyword, vr, text in header_identifiers(ds, exhaustive=True):
        for value in text.split("\\"):
            value = value.strip(" \0")
            if not value:
                continue
            if vr == "PN":
                yield from _name_forms(keyword, value)
            elif vr in ("DA", "DT", "TM"):
                yield from _date_time_forms(keyword, vr, value)
            else:
                yield keyword, value, False
            if keyword in HASHED_KEYWORDS:
                data = value.encode("utf-8")
                if len(data) >= MIN_CHARS:
                    for algorithm in ("sha256", "sha1", "md5"):
                        digest = hashlib.new(algorithm, data).hexdigest()
                        yield f"{keyword} {algorithm}", digest, False


def _date_time_forms(keyword: str, vr: str, value: str) -> Iterator[tuple[str, str, bool]]:
    """A date as stored and as YYYY-MM-DD, YYYY/MM/DD, DD.MM.YYYY, DD/MM/YYYY, MM/DD/YYYY; a
    time as HHMMSS and HH:MM:SS; a date-time as stored and as its date and its time."""
    yield keyword, value, False
    digits = value.split(".")[0].split("+")[0].split("-")[0]
    date = digits if vr == "DA" else digits[:8] if vr == "DT" else ""
    time = digits if vr == "TM" else digits[8:] if vr == "DT" else ""
    if _DATE.fullmatch(date):
        y, m, d = date[:4], date[4:6], date[6:]
        yield f"{keyword} (date)" if vr == "DT" else keyword, date, False
        for form, text in (
            ("YYYY-MM-DD", f"{y}-{m}-{d}"),
            ("YYYY/MM/DD", f"{y}/{m}/{d}"),
            ("DD.MM.YYYY", f"{d}.{m}.{y}"),
            ("DD/MM/YYYY", f"{d}/{m}/{y}"),
            ("MM/DD/YYYY", f"{m}/{d}/{y}"),
        ):
            yield f"{keyword} ({form})", text, False
    if re.fullmatch(r"\d{6}", time):  # HHMM alone is too common a number to search for
        yield f"{keyword} (time)" if vr == "DT" else keyword, time, False
        yield f"{keyword} (HH:MM:SS)", f"{time[:2]}:{time[2:4]}:{time[4:]}", False


def _name_forms(keyword: str, pn) -> Iterator[tuple[str, str, bool]]:
    """A person name as stored ("DOE^JOHN"), as "JOHN DOE", "DOE JOHN" and "DOE, JOHN", and
    each name component of 4 or more letters as a weak identifier."""
    text = str(pn)
    yield keyword, text, False
    for group in text.split("="):  # alphabetic, ideographic, phonetic representations
        group = group.rstrip("^")
        parts = [p.strip() for p in group.split("^")]
        family, given = parts[0], " ".join(p for p in parts[1:3] if p)
        yield keyword, group, False
        if family and given:
            yield keyword, f"{given} {family}", False
            yield keyword, f"{family} {given}", False
            yield keyword, f"{family}, {given}", False
        for word in re.split(r"[\s^]+", group):
            if sum(c.isalpha() for c in word) >= MIN_CHARS:
                yield f"{keyword} (name part)", word, True


# ------------------------------------------------------------------------------- matching


class IdentifierMatcher:
    """Finds any of many identifiers in bytes, case-insensitively.

    Case: patterns and data are ASCII-lowercased (bytes.lower keeps every offset) and the
    regex is compiled without re.IGNORECASE, because the engine can only skip ahead to
    possible first bytes of a case-sensitive pattern: 2 to 5 times faster.

    Boundary rules against chance hits: an identifier made of digits and dots (a numeric ID, a
    UID, a time) must not touch another digit, nor a dot that touches one (so "1.2.3" is not
    found in "1.2.34" nor a time in the fraction of "0.174512"), and a weak name part must not
    touch a letter or digit (so a name part is not found inside a word or a hex key). A date
    (`Identifier.embedded`) may be followed by more digits: a date-time or a timestamp starts
    with it (20230917 in 20230917101530).
    """

    def __init__(self, identifiers: Sequence[Identifier]):
        self.patterns: dict[bytes, tuple[Identifier, str]] = {}
        for ident in identifiers:
            for pattern in _byte_forms(ident.value):
                numeric = _NUMERIC_PATTERN.fullmatch(pattern) is not None
                if ident.embedded:
                    rule = "date"
                elif numeric:
                    rule = "number"
                elif ident.weak:
                    rule = "word"
                else:
                    rule = ""
                self.patterns.setdefault(pattern.lower(), (ident, rule))
        self.longest = max(map(len, self.patterns), default=0)
        self.regex = re.compile(_trie_regex(sorted(self.patterns))) if self.patterns else None

    def find(self, data: bytes, start: int = 0, stop: int | None = None):
        """(position, end, identifier) of the matches in `data` starting in [start, stop)."""
        return self._find(data.lower(), start, len(data) if stop is None else stop)

    def _find(self, low: bytes, start: int, stop: int):
        if self.regex is None:
            return
        pos = start
        while True:
            m = self.regex.search(low, pos)
            if m is None or m.start() >= stop:
                return
            s, e = m.span()
            ident, rule = self.patterns[m.group()]
            if rule and not _bounded(low, s, e, rule):
                pos = s + 1
                continue
            yield s, e, ident
            pos = e

    def scan(self, blocks: Iterable[bytes]) -> Iterator[tuple[int, Identifier]]:
        """(offset, identifier) of the matches in a stream of blocks, found across block
        boundaries without holding more than a block and the longest identifier."""
        if self.regex is None:
            for _ in blocks:
                pass
            return
        # A match starting before len - margin ends 2 bytes before the end: the boundary rules
        # look 2 bytes past it.
        margin = self.longest + 1
        buf, base, lo = b"", 0, 0
        for block in blocks:
            buf += block.lower()
            hi = len(buf) - margin
            if hi <= lo:
                continue
            end = lo
            for s, e, ident in self._find(buf, lo, hi):
                yield base + s, ident
                end = e
            # Keep two bytes before the next search start: the boundary rules look at them.
            keep = max(hi - 2, 0)
            buf, base = buf[keep:], base + keep
            lo = max(hi, end) - keep
        for s, _, ident in self._find(buf, lo, len(buf)):
            yield base + s, ident

    def redact_text(self, text: str) -> str:
        """`text` with every identifier in it replaced by '<redacted>'."""
        data = text.encode("utf-8", "surrogateescape")
        if self.regex is None:
            return text
        out, pos = [], 0
        for m in self.regex.finditer(data.lower()):
            out += [data[pos : m.start()], b"<redacted>"]
            pos = m.end()
        return b"".join([*out, data[pos:]]).decode("utf-8", "replace")


def _bounded(low: bytes, s: int, e: int, rule: str) -> bool:
    """Whether the match low[s:e] stands apart from its neighbours as `rule` needs."""
    if rule == "word":
        return not (s > 0 and low[s - 1] in _ALNUM) and not (e < len(low) and low[e] in _ALNUM)
    before = s > 0 and (
        low[s - 1] in _DIGITS or (low[s - 1] == 0x2E and s > 1 and low[s - 2] in _DIGITS)
    )
    if before:
        return False
    if rule != "date":
        after = e < len(low) and (
            low[e] in _DIGITS or (low[e] == 0x2E and e + 1 < len(low) and low[e + 1] in _DIGITS)
        )
        if after:
            return False
    return not _inside_hex_key(low, s, e)


def _inside_hex_key(low: bytes, s: int, e: int) -> bool:
    """Whether low[s:e] lies inside a hex key or digest (HEX_KEY_MIN hex characters or more,
    at least one a letter)."""
    i, j = s, e
    while i > 0 and low[i - 1] in _HEX:
        i -= 1
    while j < len(low) and low[j] in _HEX:
        j += 1
    return j - i >= HEX_KEY_MIN and any(b in _HEX_LETTERS for b in low[i:j])


def _byte_forms(value: str) -> list[bytes]:
    """UTF-8 bytes, plus the \\u-escaped form JSON writers use for non-ASCII text."""
    forms = [value.encode("utf-8")]
    escaped = json.dumps(value)[1:-1].encode("ascii")
    if not value.isascii() and escaped not in forms:
        forms.append(escaped)
    return forms


def _trie_regex(words: Sequence[bytes]) -> bytes:
    """A regex matching any of `words` (longest first at each position), as a trie:
    "ab(?:c|d)" rather than "abc|abd", so the engine follows one path per position."""
    trie: dict = {}
    for word in words:
        node = trie
        for byte in word:
            node = node.setdefault(byte, {})
        node[-1] = {}  # end of a word

    def emit(node: dict) -> bytes:
        branches = []
        for byte, child in sorted(node.items()):
            if byte < 0:
                continue
            # Follow a chain of single children without recursing: identifiers are long.
            literal = bytearray([byte])
            while len(child) == 1 and -1 not in child:
                ((byte, child),) = child.items()
                literal.append(byte)
            branches.append(re.escape(bytes(literal)) + emit(child))
        if not branches:
            return b""
        body = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
        if -1 in node:  # a word ends here: the rest is optional (greedy: longest match first)
            body = (b"(?:" + body + b")" if len(branches) == 1 else body) + b"?"
        return body

    return emit(trie)


# ---------------------------------------------------------------------------------- store


def audit_store(
    store_dir: str | Path, identifiers: Sequence[Identifier], *, max_hits: int = 1000
) -> AuditReport:
    """Search every file and name under `store_dir` for `identifiers`.

    zarr v3 arrays are read through TensorStore in blocks along axis 0 and their decoded data
    searched; their chunk files are not searched again. Everything else is searched as raw
    bytes. Files that cannot be read are listed in `errors` (the audit is then incomplete).
    At most `max_hits` hits are listed; `hits_total` counts them all.
    """
    store = Path(store_dir)
    if not store.is_dir():
        raise FileNotFoundError(f"{store}: no such store folder")
    matcher = IdentifierMatcher(identifiers)
    report = AuditReport(store=matcher.redact_text(str(store)), identifiers=len(identifiers))

    def add(rel: str, ident: Identifier, where: str, offset=None, index=None) -> None:
        # Only decoded arrays (pixels, numbers) hold bytes that can match by chance; a hit in
        # a file (a token, a table value, a JSON string) or a name is strong, whatever it is.
        weak = ident.weak and where == "array"
        report.hits_total += 1
        report.weak_hits_total += weak
        report.hits_by_kind[ident.kind] += 1
        if len(report.hits) < max_hits:
            path = matcher.redact_text(rel)
            report.hits.append(
                Hit(path, ident.kind, redact(ident.value), where, offset, index, weak)
            )

    def counted(blocks: Iterable[bytes]) -> Iterator[bytes]:
        for block in blocks:
            report.bytes_scanned += len(block)
            yield block

    def scan_file(path: Path) -> None:
        rel = path.relative_to(store).as_posix()
        try:
            with open(path, "rb") as f:
                blocks = iter(lambda: f.read(BLOCK_BYTES), b"")
                for offset, ident in matcher.scan(counted(blocks)):
                    add(rel, ident, "file", offset)
        except OSError as e:
            report.errors.append((matcher.redact_text(rel), f"unreadable: {e.strerror or e}"))
        else:
            report.files_scanned += 1

    arrays: dict[Path, re.Pattern] = {}  # array folder -> its chunk key pattern
    for dirpath, dirnames, filenames in os.walk(store):
        dirnames.sort()
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            for _, _, ident in matcher.find(name.encode("utf-8", "surrogateescape")):
                add((here / name).relative_to(store).as_posix(), ident, "name")
        chunk_keys = _zarr_array_chunk_keys(here, filenames)
        if chunk_keys is not None:
            rel = here.relative_to(store).as_posix()
            try:
                array = _open_zarr3(here)
                for offset, ident in matcher.scan(counted(_array_blocks(array))):
                    add(rel, ident, "array", offset, _element_index(array, offset))
                report.arrays_scanned += 1
                arrays[here] = chunk_keys
            except Exception as e:  # TensorStore raises ValueError and others on broken arrays
                # Its chunk files are then searched as raw bytes: better than nothing.
                reason = matcher.redact_text(f"array not readable: {e}")
                report.errors.append((matcher.redact_text(rel), reason))
        for name in sorted(filenames):
            path = here / name
            if not _is_chunk(path, arrays, store):
                scan_file(path)
    return report


def _is_chunk(path: Path, arrays: dict[Path, re.Pattern], store: Path) -> bool:
    """Whether `path` is a chunk (or shard) file of an array whose decoded data was searched."""
    for folder in path.parents:
        if folder in arrays:
            return arrays[folder].fullmatch(path.relative_to(folder).as_posix()) is not None
        if folder == store:
            return False
    return False


def _zarr_array_chunk_keys(folder: Path, filenames: list[str]) -> re.Pattern | None:
    """A regex of the chunk keys when `folder` is a zarr v3 array, else None."""
    if "zarr.json" not in filenames:
        return None
    try:
        meta = json.loads((folder / "zarr.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # searched as a plain file
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        return None
    encoding = meta.get("chunk_key_encoding") or {}
    name = encoding.get("name", "default")
    default_separator = "/" if name == "default" else "."
    sep = re.escape((encoding.get("configuration") or {}).get("separator", default_separator))
    if name == "v2":
        return re.compile(rf"\d+(?:{sep}\d+)*")
    return re.compile(rf"c(?:{sep}\d+)*")


def _open_zarr3(folder: Path):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder)}}
    return ts.open(spec, open=True, read=True).result()


def _array_blocks(array) -> Iterator[bytes]:
    """The array's data in C order, read in blocks of whole rows along axis 0."""
    if array.rank == 0:
        yield np.asarray(array.read().result()).tobytes()
        return
    itemsize = array.dtype.numpy_dtype.itemsize
    row_bytes = itemsize * math.prod(array.shape[1:])
    rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
    lo, n = array.domain.inclusive_min[0], array.shape[0]
    for start in range(0, n, rows):
        block = array[lo + start : lo + min(start + rows, n)].read().result()
        yield np.ascontiguousarray(block).tobytes()


def _element_index(array, offset: int) -> tuple[int, ...]:
    if array.rank == 0:
        return ()
    flat = offset // array.dtype.numpy_dtype.itemsize
    index = np.unravel_index(flat, array.shape)
    return tuple(int(i) + int(o) for i, o in zip(index, array.domain.inclusive_min, strict=True))
