"""The protocol tokenizer: one global token id space for every protocol field.

Ids 0-3 are specials (PAD, MISSING, UNK, MASK); then each schema field owns a contiguous range,
in schema order, so one embedding table serves all fields and a per-field softmax is a slice:

  categorical  one token per value seen for at least `min_patients` distinct training patients,
               ordered by (-patients, value). Rarer values encode as UNK: this is the
               de-identification rule that keeps a name typed into a description out of the
               vocabulary however often that one patient's series repeat it.
  numeric      one token per quantile bin of the (transformed) training values, plus a z-scored
               value and a mask for the model's numeric head.
  presence     two tokens, ABSENT and PRESENT.

The vocabulary is fitted on the training split only and saved as canonical JSON, so the same
records (in any order) give the same bytes.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pgjax.data.schema import Field, Schema

PAD, MISSING, UNK, MASK = 0, 1, 2, 3
SPECIALS = {"PAD": PAD, "MISSING": MISSING, "UNK": UNK, "MASK": MASK}
_SPECIAL_VALUES = {PAD: "<pad>", MISSING: "<missing>", UNK: "<unk>", MASK: "<mask>"}
ABSENT, PRESENT = "<absent>", "<present>"

VOCAB_FORMAT = "pgjax-vocabulary"
VOCAB_VERSION = 1

# A constant field has std 0; the floor keeps the z-score finite (it is 0 for the constant).
STD_FLOOR = 1e-6
# z-scores are clipped: one absurd header value (SliceThickness 1e6) must not blow up a loss.
Z_CLIP = 8.0


@dataclasses.dataclass(frozen=True)
class FieldVocab:
    """The tokens of one field: ids start .. start + len(values) - 1.

    values: categorical values, the bin labels of a numeric field, or (ABSENT, PRESENT).
    patients: distinct training patients per token (aggregate counts).
    edges: numeric only, the merged quantile bin edges in transformed units.
    """

    field: Field
    start: int
    values: tuple[str, ...]
    patients: tuple[int, ...]
    edges: tuple[float, ...] = ()
    mean: float = 0.0
    std: float = 1.0

    @property
    def stop(self) -> int:
        return self.start + len(self.values)


def transform(field: Field, value: float) -> float | None:
    """A numeric value in the field's fitting units: log1p for "log" fields (negative values of
    those positive quantities are malformed: None)."""
    if field.transform == "log":
        return math.log1p(value) if value >= 0 else None
    return value


def _inverse(field: Field, value: float) -> float:
    return math.expm1(value) if field.transform == "log" else value


def _bin_labels(field: Field, edges: tuple[float, ...]) -> tuple[str, ...]:
    """Human-readable bins in the field's own units, e.g. '[0.8, 1.5)'."""
    shown = [f"{_inverse(field, e):.4g}" for e in edges]
    if len(edges) == 1:
        return (f"[{shown[0]}]",)
    labels = [f"[{lo}, {hi})" for lo, hi in zip(shown[:-1], shown[1:], strict=True)]
    labels[-1] = labels[-1][:-1] + "]"
    return tuple(labels)


class Vocabulary:
    """Token ids of the protocol fields of one schema. Build with `fit` or `load`."""

    def __init__(
        self, schema: Schema, fields: Iterable[FieldVocab], *, min_patients: int, numeric_bins: int
    ):
        self.schema = schema
        self.fields = tuple(fields)
        self.min_patients = int(min_patients)
        self.numeric_bins = int(numeric_bins)
        if [fv.field for fv in self.fields] != list(schema.fields):
            raise ValueError("vocabulary fields do not match the schema's fields")
        start = len(SPECIALS)
        for fv in self.fields:
            if fv.start != start or len(fv.patients) != len(fv.values):
                raise ValueError(f"field {fv.field.keyword}: token range is not contiguous")
            start = fv.stop
        self._starts = [fv.start for fv in self.fields]
        self._lookup = [
            {v: fv.start + j for j, v in enumerate(fv.values)}
            if fv.field.kind == "categorical"
            else {}
            for fv in self.fields
        ]
        self._inner_edges = [np.asarray(fv.edges[1:-1], dtype=np.float64) for fv in self.fields]
        self._checker = _RecordChecker(schema)

    # ----------------------------------------------------------------------------- fitting

    @classmethod
    def fit(
        cls,
        schema: Schema,
        records: Iterable[tuple[str, dict]],
        *,
        min_patients: int,
        numeric_bins: int,
    ) -> Vocabulary:
        """Fit on (patient_key, read_protocol output) pairs of the TRAINING split only.

        categorical: keep values seen for >= min_patients distinct patients.
        numeric: up to `numeric_bins` quantile bins of the transformed values, counted per
          record (a constant field has one bin), each holding at least min_patients patients,
          with edges that are never one patient's value (see _fit_numeric), and their mean
          and std.
        Memory grows with the distinct (field, value, patient) triples and numeric values.
        """
        if min_patients < 1:
            raise ValueError(f"min_patients must be >= 1, not {min_patients}")
        if numeric_bins < 1:
            raise ValueError(f"numeric_bins must be >= 1, not {numeric_bins}")
        fields = schema.fields
        patient_ids: dict[str, int] = {}
        value_patients: list[dict] = [{} for _ in fields]  # categorical/presence: value -> set
        numbers: list[list[float]] = [[] for _ in fields]
        number_patients: list[list[int]] = [[] for _ in fields]
        checker = _RecordChecker(schema)
        for n, (patient_key, record) in enumerate(records):
            if not isinstance(patient_key, str) or not patient_key:
                raise ValueError(f"training record {n}: empty or non-string patient key")
            checker.check(record, f"training record {n}")
            pid = patient_ids.setdefault(patient_key, len(patient_ids))
            for i, f in enumerate(fields):
                value = record.get(f.keyword)
                if value is None:
                    continue
                if f.kind == "numeric":
                    t = transform(f, float(value))
                    if t is not None:
                        numbers[i].append(t)
                        number_patients[i].append(pid)
                else:
                    key = (PRESENT if value else ABSENT) if f.kind == "presence" else value
                    value_patients[i].setdefault(key, set()).add(pid)

        out, start = [], len(SPECIALS)
        for i, f in enumerate(fields):
            if f.kind == "categorical":
                counts = [(len(p), v) for v, p in value_patients[i].items()]
                kept = sorted((-c, v) for c, v in counts if c >= min_patients)
                fv = FieldVocab(f, start, tuple(v for _, v in kept), tuple(-c for c, _ in kept))
            elif f.kind == "presence":
                counts = tuple(len(value_patients[i].get(v, ())) for v in (ABSENT, PRESENT))
                fv = FieldVocab(f, start, (ABSENT, PRESENT), counts)
            else:
                fv = _fit_numeric(
                    f, start, numbers[i], number_patients[i], numeric_bins, min_patients
                )
            out.append(fv)
            start = fv.stop
        return cls(schema, out, min_patients=min_patients, numeric_bins=numeric_bins)

    # ---------------------------------------------------------------------------- encoding

    def encode(self, record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids int32 [F], z-scored numeric values float32 [F], value mask uint8 [F]).

        A missing value is MISSING; a categorical value outside the vocabulary is UNK; a
        numeric value goes to its bin (values beyond the fitted range to the end bins), with
        its z-score (clipped to +-Z_CLIP) and mask 1. A numeric field fitted on no values at
        all encodes present values as UNK with mask 0.
        """
        self._checker.check(record, "record")
        n = len(self.fields)
        ids = np.empty(n, dtype=np.int32)
        values = np.zeros(n, dtype=np.float32)
        mask = np.zeros(n, dtype=np.uint8)
        for i, fv in enumerate(self.fields):
            value = record.get(fv.field.keyword)
            if value is None:
                ids[i] = MISSING
            elif fv.field.kind == "categorical":
                ids[i] = self._lookup[i].get(value, UNK)
            elif fv.field.kind == "presence":
                ids[i] = fv.start + (1 if value else 0)
            else:
                t = transform(fv.field, float(value))
                if t is None:
                    ids[i] = MISSING
                elif not fv.values:
                    ids[i] = UNK
                else:
                    ids[i] = fv.start + int(np.searchsorted(self._inner_edges[i], t, "right"))
                    z = (t - fv.mean) / fv.std
                    values[i] = min(max(z, -Z_CLIP), Z_CLIP)
                    mask[i] = 1
        return ids, values, mask

    def encode_many(self, records: Iterable[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`encode` for many records, stacked: ids [N, F], values [N, F], mask [N, F]."""
        encoded = [self.encode(r) for r in records]
        n = len(self.fields)
        if not encoded:
            return (
                np.zeros((0, n), np.int32),
                np.zeros((0, n), np.float32),
                np.zeros((0, n), np.uint8),
            )
        ids, values, mask = zip(*encoded, strict=True)
        return np.stack(ids), np.stack(values), np.stack(mask)

    def decode(self, token_id: int) -> tuple[str, str]:
        """(field keyword, value) of a token id; specials give ("", "<missing>") etc."""
        token_id = int(token_id)
        if not 0 <= token_id < self.size:
            raise ValueError(f"token id {token_id} outside the vocabulary (size {self.size})")
        if token_id in _SPECIAL_VALUES:
            return "", _SPECIAL_VALUES[token_id]
        fv = self.fields[bisect.bisect_right(self._starts, token_id) - 1]
        # Empty ranges share their start with the next field; bisect lands on the last of them.
        return fv.field.keyword, fv.values[token_id - fv.start]

    # ---------------------------------------------------------------------------- geometry

    @property
    def size(self) -> int:
        """Total number of token ids, specials included."""
        return self.fields[-1].stop if self.fields else len(SPECIALS)

    @property
    def field_ranges(self) -> list[tuple[int, int]]:
        """(start, stop) of each field's ids, in schema order. Specials are in no range, and a
        categorical field with no frequent value has an empty range."""
        return [(fv.start, fv.stop) for fv in self.fields]

    @property
    def field_kinds(self) -> list[str]:
        return [fv.field.kind for fv in self.fields]

    @property
    def specials(self) -> dict[str, int]:
        return dict(SPECIALS)

    @property
    def keywords(self) -> list[str]:
        return self.schema.keywords

    # ------------------------------------------------------------------------- persistence

    def to_json(self) -> dict:
        schema_json = self.schema.to_json()
        body = {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "schema": schema_json,
            "schema_sha256": _sha256_json(schema_json),
            "min_patients": self.min_patients,
            "numeric_bins": self.numeric_bins,
            "specials": dict(SPECIALS),
            "size": self.size,
            "fields": [
                {
                    "keyword": fv.field.keyword,
                    "kind": fv.field.kind,
                    "start": fv.start,
                    "stop": fv.stop,
                    "values": list(fv.values),
                    "patients": list(fv.patients),
                    **(
                        {"edges": list(fv.edges), "mean": fv.mean, "std": fv.std}
                        if fv.field.kind == "numeric"
                        else {}
                    ),
                }
                for fv in self.fields
            ],
        }
        return {**body, "content_sha256": _sha256_json(body)}

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as canonical JSON (sorted keys, shortest float repr), atomically."""
        path = Path(path)
        text = json.dumps(self.to_json(), sort_keys=True, indent=1, ensure_ascii=True) + "\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, schema: Schema | None = None) -> Vocabulary:
        """Read a saved vocabulary; with `schema`, refuse one fitted for another schema."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read vocabulary: {e}") from e
        return cls.from_json(obj, schema=schema, source=str(path))

    @classmethod
    def from_json(
        cls, obj: dict, schema: Schema | None = None, source: str = "<vocabulary>"
    ) -> Vocabulary:
        if not isinstance(obj, dict) or obj.get("format") != VOCAB_FORMAT:
            found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{source}: not a pgjax vocabulary (format={found!r})")
        if obj.get("version") != VOCAB_VERSION:
            raise ValueError(
                f"{source}: vocabulary version {obj.get('version')!r}; this pgjax reads "
                f"version {VOCAB_VERSION} (refit the vocabulary with this version)"
            )
        body = {k: v for k, v in obj.items() if k != "content_sha256"}
        if obj.get("content_sha256") != _sha256_json(body):
            raise ValueError(f"{source}: vocabulary content hash mismatch (edited or damaged)")
        stored = Schema.from_json(obj["schema"], source=f"{source} (schema)")
        if schema is not None and _sha256_json(schema.to_json()) != obj["schema_sha256"]:
            changed = _schema_difference(schema, stored)
            raise ValueError(
                f"{source}: vocabulary was fitted for another protocol schema "
                f"(differs in: {changed}); refit it or pass the schema it was fitted for"
            )
        try:
            fields = []
            for f, row in zip(stored.fields, obj["fields"], strict=True):
                if row["keyword"] != f.keyword:
                    raise ValueError(f"field {row['keyword']} is out of schema order")
                fields.append(
                    FieldVocab(
                        f,
                        int(row["start"]),
                        tuple(str(v) for v in row["values"]),
                        tuple(int(c) for c in row["patients"]),
                        tuple(float(e) for e in row.get("edges", ())),
                        float(row.get("mean", 0.0)),
                        float(row.get("std", 1.0)),
                    )
                )
            return cls(
                schema if schema is not None else stored,
                fields,
                min_patients=obj["min_patients"],
                numeric_bins=obj["numeric_bins"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed vocabulary: {e}") from e


def _fit_numeric(
    f: Field, start: int, numbers: list[float], patients: list[int], bins: int, min_patients: int
) -> FieldVocab:
    """Quantile bins that are k-anonymous: every bin holds at least `min_patients` distinct
    patients, and no edge is a value that fewer than max(min_patients, 2) patients had.

    Bins are cut at the quantiles of the values, as np.quantile would (counted per record), but
    a cut waits until its bin has enough patients, and a last bin short of them joins the one
    before. The edge between two neighbouring values a < b is b when b is a shared value, else
    the roundest number in (a, b) (e.g. 100 between 80 and 231.7), so a lone patient's weight
    of 231.7 never appears as an edge. The outer edges (bin labels only) are rounded outwards
    to one significant digit the same way. A field with fewer than `min_patients` patients in
    all gets no bins at all (its values encode as UNK): its mean would be theirs.
    """
    n_patients = len(set(patients))
    if not numbers or n_patients < min_patients:
        return FieldVocab(f, start, (), ())
    x = np.asarray(numbers, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    # Sorted first, so mean and cuts do not depend on record order (float sums do).
    x, pid = x[order], np.asarray(patients, dtype=np.int64)[order]
    values, first, counts = np.unique(x, return_index=True, return_counts=True)
    # Distinct patients per distinct value.
    value_index = np.repeat(np.arange(len(values)), counts)
    n_pid = int(pid.max()) + 1
    holders = np.bincount(_sorted_unique(value_index * n_pid + pid) // n_pid, minlength=len(values))
    shared = max(min_patients, 2)
    # Candidate cuts (indices into `values` where a bin starts): the first value at or after
    # each quantile position. A cut is taken when the bin it closes has enough patients.
    targets = [-(-(j + 1) * len(x) // bins) for j in range(bins - 1)]
    candidates = sorted({int(i) for i in np.searchsorted(first, targets)} - {0, len(values)})
    cuts: list[int] = []
    for c in candidates:
        lo = first[cuts[-1]] if cuts else 0
        if len(_sorted_unique(pid[lo : first[c]])) >= min_patients:
            cuts.append(c)
    if cuts and len(_sorted_unique(pid[first[cuts[-1]] :])) < min_patients:
        cuts.pop()  # the last bin is short of patients: it joins the one before
    inner = [
        values[i] if holders[i] >= shared else _round_between(f, values[i - 1], values[i])
        for i in cuts
    ]
    lo = values[0] if holders[0] >= shared else _round_outward(f, values[0], -1)
    hi = values[-1] if holders[-1] >= shared else _round_outward(f, values[-1], +1)
    edges = tuple(float(e) for e in (lo, *inner, hi)) if hi != lo or inner else (float(lo),)
    token = np.searchsorted(np.asarray(edges[1:-1]), x, side="right")
    n_tokens = max(len(edges) - 1, 1)
    pairs = _sorted_unique(token * n_pid + pid)
    counts = np.bincount(pairs // n_pid, minlength=n_tokens)
    return FieldVocab(
        f,
        start,
        _bin_labels(f, edges),
        tuple(int(c) for c in counts),
        edges,
        float(np.mean(x)),
        max(float(np.std(x)), STD_FLOOR),
    )


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique of integers by sorting (numpy's hash-based unique is slower on 1e6 values)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def _round_between(f: Field, a: float, b: float) -> float:
    """The roundest number strictly between a < b (transformed units), in the field's own units:
    the first multiple of 10^e, e falling, that lies in (a, b); their midpoint if none does."""
    lo, hi = _inverse(f, a), _inverse(f, b)
    if lo < hi:
        top = math.floor(math.log10(max(abs(lo), abs(hi)))) + 1
        for e in range(top, top - 17, -1):
            step = 10.0**e
            c = math.floor(hi / step) * step
            if c >= hi:
                c -= step
            t = transform(f, c) if c > lo else None
            if t is not None and a < t < b:
                return t
    return (a + b) / 2


def _round_outward(f: Field, v: float, direction: int) -> float:
    """v (transformed units) rounded to one significant digit away from the data, strictly
    (direction -1: down, +1: up); 0 for a log field's lower bound (its domain starts there)."""
    x = _inverse(f, v)
    step = 10.0 ** math.floor(math.log10(abs(x))) if x else 1.0
    c = (math.floor(x / step) if direction < 0 else math.ceil(x / step)) * step
    if c == x:
        c += direction * step
    if f.transform == "log" and c < 0:
        c = 0.0
    t = transform(f, c)
    return t if t is not None else v


class _RecordChecker:
    """Type checks of one record against the schema; messages name fields, never values."""

    _TYPES = {"categorical": (str,), "numeric": (int, float), "presence": (bool,)}

    def __init__(self, schema: Schema):
        self.schema = schema
        self.keywords = frozenset(schema.keywords)

    def check(self, record: dict, what: str) -> None:
        if not isinstance(record, dict):
            raise ValueError(f"{what}: a protocol record must be a dict, not {type(record)}")
        extra = record.keys() - self.keywords
        if extra:
            # Only schema fields may reach the tokenizer: anything else bypassed the allow-list.
            raise ValueError(f"{what}: fields outside the protocol schema: {sorted(extra)}")
        for f in self.schema.fields:
            value = record.get(f.keyword)
            if value is None:
                continue
            ok = isinstance(value, self._TYPES[f.kind])
            if f.kind == "numeric":
                ok = ok and not isinstance(value, bool) and math.isfinite(value)
            if not ok:
                raise ValueError(
                    f"{what}: field {f.keyword} ({f.kind}) holds a {type(value).__name__}"
                    + (" that is not finite" if isinstance(value, float) else "")
                )


def _sha256_json(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _schema_difference(a: Schema, b: Schema) -> str:
    ka, kb = {f.keyword: f for f in a.fields}, {f.keyword: f for f in b.fields}
    changed = sorted(k for k in ka.keys() & kb.keys() if ka[k] != kb[k])
    parts = []
    if ka.keys() - kb.keys():
        parts.append(f"fields added {sorted(ka.keys() - kb.keys())}")
    if kb.keys() - ka.keys():
        parts.append(f"fields removed {sorted(kb.keys() - ka.keys())}")
    if changed:
        parts.append(f"fields changed {changed}")
    if not parts:
        parts.append("field order" if a.keywords != b.keywords else "schema version")
    return "; ".join(parts)
