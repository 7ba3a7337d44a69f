"""Patient-level data splits.

Every item of a patient lands in the same split, chosen by a hash of the (salted) patient key:
no list of assignments is stored, and a patient keeps its split when the corpus grows. Whole
external sites form the "external" split; an internal-site item of a patient who also appears
at an external site is "quarantine", so the external test never sees a patient the model
trained on.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test", "external", "quarantine")
SPLIT_DTYPE = "<U10"


def patient_unit(patient_key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, patient_key)."""
    digest = hashlib.sha256(f"pgjax-split\0{seed}\0{patient_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    patient_keys: Sequence[str],
    sites: Sequence[str],
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    external_sites: Sequence[str] = (),
) -> np.ndarray:
    """The split of each item: "train", "val", "test", "external" or "quarantine".

    Items at internal sites: the patient's `patient_unit` against the cumulative (train, val,
    test) fractions. Items at external sites: "external". Internal-site items of a patient
    also seen at an external site: "quarantine".
    """
    if len(patient_keys) != len(sites):
        raise ValueError(f"{len(patient_keys)} patient keys but {len(sites)} sites")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be (train, val, test), >= 0, summing to 1: {fractions}")
    for i, (patient, site) in enumerate(zip(patient_keys, sites, strict=True)):
        if not patient or not site:
            raise ValueError(f"item {i} has an empty {'patient key' if not patient else 'site'}")
    known = sorted(set(sites))
    unknown = sorted(set(external_sites) - set(known))
    if unknown:
        raise ValueError(f"external sites {unknown} are not among the sites {known}")

    external = set(external_sites)
    seen_external = {p for p, s in zip(patient_keys, sites, strict=True) if s in external}
    train_end, val_end = fractions[0], fractions[0] + fractions[1]
    by_patient: dict[str, str] = {}
    out = np.empty(len(patient_keys), dtype=SPLIT_DTYPE)
    for i, (patient, site) in enumerate(zip(patient_keys, sites, strict=True)):
        if site in external:
            out[i] = "external"
        elif patient in seen_external:
            out[i] = "quarantine"
        else:
            split = by_patient.get(patient)
            if split is None:
                u = patient_unit(patient, seed)
                split = "train" if u < train_end else "val" if u < val_end else "test"
                by_patient[patient] = split
            out[i] = split
    return out


def split_summary(splits: Sequence[str], patient_keys: Sequence[str], sites: Sequence[str]) -> dict:
    """Counts of items and distinct patients per split, overall and per site:
    {"items": {split: n}, "patients": {split: n}, "sites": {site: {split: {"items", "patients"}}}}.
    """
    if not len(splits) == len(patient_keys) == len(sites):
        raise ValueError("splits, patient_keys and sites differ in length")
    items: Counter = Counter()
    patients: dict[str, set] = defaultdict(set)
    site_items: dict[str, Counter] = defaultdict(Counter)
    site_patients: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for split, patient, site in zip(splits, patient_keys, sites, strict=True):
        split = str(split)
        items[split] += 1
        patients[split].add(patient)
        site_items[site][split] += 1
        site_patients[site][split].add(patient)
    return {
        "items": dict(sorted(items.items())),
        "patients": {s: len(p) for s, p in sorted(patients.items())},
        "sites": {
            site: {
                s: {"items": n, "patients": len(site_patients[site][s])}
                for s, n in sorted(site_items[site].items())
            }
            for site in sorted(site_items)
        },
    }
