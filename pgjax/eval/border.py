"""Protocol-border cases: test items whose acquisition protocol is rare or unseen in training.

A protocol is the combination of manufacturer, scanner model, CT reconstruction kernel and MR
scanning sequence, read from the item's (de-identified) tokens. It is "border" when fewer than
`min_patients` distinct training patients had it, or when any of its fields is the tokenizer's
`<unk>` (a value too rare at the training sites to get a token of its own). Counts come from
every training-split item of the store group, labelled or not: that is what pretraining saw.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pgjax.data.store import open_array, open_store

PROTOCOL_FIELDS = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel",
                   "ScanningSequence")  # fmt: skip
UNKNOWN = "<unk>"


class ProtocolDecoder:
    """Readable protocol fields of store rows, from the tokens and the store's vocabulary."""

    def __init__(self, store, group: str = "images", fields=PROTOCOL_FIELDS):
        self.store = open_store(store)
        self.vocab = self.store.vocabulary()
        self.group = group
        keywords = list(self.vocab.keywords)
        self.columns = {f: keywords.index(f) for f in fields if f in keywords}

    def fields(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        if len(rows) == 0:
            return {f: np.zeros(0, dtype=object) for f in self.columns}
        tokens = open_array(self.store.root / self.group / "tokens")
        cols = sorted(self.columns.values())
        ids = tokens[np.asarray(rows, np.int64)].read().result()[:, cols]
        decode = {}
        out = {}
        for j, (field, _) in enumerate(sorted(self.columns.items(), key=lambda kv: kv[1])):
            values = []
            for t in ids[:, j]:
                t = int(t)
                if t not in decode:
                    decode[t] = self.vocab.decode(t)[1]
                values.append(decode[t])
            out[field] = np.array(values, dtype=object)
        return out


def protocol_strings(fields: dict[str, np.ndarray]) -> np.ndarray:
    """'Manufacturer | Model | Kernel | Sequence' per row ("<missing>" where absent)."""
    parts = [fields[f] for f in PROTOCOL_FIELDS if f in fields]
    return np.array([" | ".join(str(v) for v in vals) for vals in zip(*parts, strict=True)])


def border_flags(
    store, group: str, test_rows: np.ndarray, *, min_patients: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(border bool [N], protocol string [N], scanner model [N], summary) of test rows."""
    table = open_store(store).group(group).table()
    decoder = ProtocolDecoder(store, group)
    train = np.flatnonzero((table["split"] == "train") & (table["ok"] == "1"))
    train_protocols = protocol_strings(decoder.fields(table["row"][train].astype(np.int64)))
    patients: dict[str, set] = defaultdict(set)
    for proto, patient in zip(train_protocols, table["patient_key"][train], strict=True):
        patients[proto].add(patient)
    fields = decoder.fields(test_rows)
    protocols = protocol_strings(fields)
    has_unknown = np.array([UNKNOWN in p for p in protocols], dtype=bool)
    counts = np.array([len(patients.get(p, ())) for p in protocols])
    border = has_unknown | (counts < min_patients)
    model = fields.get("ManufacturerModelName", np.array(["<missing>"] * len(test_rows)))
    summary = {
        "definition": (
            f"protocol ({' + '.join(PROTOCOL_FIELDS)}) seen for fewer than {min_patients} "
            "training patients, or with a field too rare to have a token (<unk>)"
        ),
        "min_patients": min_patients,
        "training_protocols": len(patients),
        "border_items": int(border.sum()),
        "unseen_items": int((counts == 0).sum()),
    }
    return border, protocols, np.asarray(model, dtype=str), summary
