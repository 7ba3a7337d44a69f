"""Patient-level splits: no patient in two splits, external sites, quarantine, stability."""

from collections import defaultdict

import numpy as np
import pytest

from pgjax.data.splits import assign_splits, split_summary


def corpus(n_patients=2000, seed=0, sites=("a", "b", "c")):
    """(patient_keys, sites) with 1-4 items per patient, each patient at one site."""
    rng = np.random.default_rng(seed)
    patients, where = [], []
    for p in range(n_patients):
        site = sites[p % len(sites)]
        for _ in range(int(rng.integers(1, 5))):
            patients.append(f"key{p:06d}")
            where.append(site)
    return patients, where


def splits_by_patient(splits, patients):
    seen = defaultdict(set)
    for s, p in zip(splits, patients, strict=True):
        seen[p].add(str(s))
    return seen


def test_a_patient_never_appears_in_two_splits():
    patients, sites = corpus()
    splits = assign_splits(patients, sites)
    assert splits.dtype == np.dtype("<U10")
    assert set(splits) == {"train", "val", "test"}
    assert all(len(s) == 1 for s in splits_by_patient(splits, patients).values())


def test_external_holds_exactly_the_external_sites_items():
    patients, sites = corpus()
    splits = assign_splits(patients, sites, external_sites=["c"])
    at_c = np.array(sites) == "c"
    assert (splits[at_c] == "external").all()
    assert not (splits[~at_c] == "external").any()


def test_patient_seen_at_an_external_site_is_quarantined():
    patients = ["p1", "p1", "p1", "p2", "p3"]
    sites = ["a", "a", "ext", "a", "ext"]
    splits = assign_splits(patients, sites, external_sites=["ext"])
    assert splits.tolist()[:3] == ["quarantine", "quarantine", "external"]
    assert splits[3] in ("train", "val", "test") and splits[4] == "external"


def test_unknown_external_site_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"\['x'\] are not among the sites \['a', 'b'\]"):
        assign_splits(["p1", "p2"], ["a", "b"], external_sites=["x"])


def test_bad_input():
    with pytest.raises(ValueError, match="2 patient keys but 1 sites"):
        assign_splits(["p1", "p2"], ["a"])
    with pytest.raises(ValueError, match="item 1 has an empty patient key"):
        assign_splits(["p1", ""], ["a", "a"])
    with pytest.raises(ValueError, match="summing to 1"):
        assign_splits(["p1"], ["a"], fractions=(0.8, 0.1, 0.2))


def test_existing_patients_keep_their_split_when_patients_are_added():
    patients, sites = corpus(1000)
    before = assign_splits(patients, sites)
    more_patients, more_sites = corpus(3000, seed=1)
    after = assign_splits(patients + more_patients, sites + more_sites)
    np.testing.assert_array_equal(after[: len(patients)], before)
    # a new seed reshuffles
    assert (assign_splits(patients, sites, seed=1) != before).any()


def test_fractions_are_respected_on_10000_patients():
    patients = [f"{i:08x}" for i in range(10_000)]
    splits = assign_splits(patients, ["a"] * len(patients), fractions=(0.7, 0.2, 0.1))
    share = {s: np.mean(splits == s) for s in ("train", "val", "test")}
    # binomial standard deviation at n=1e4 is at most 0.005: allow four of them
    assert share["train"] == pytest.approx(0.7, abs=0.02)
    assert share["val"] == pytest.approx(0.2, abs=0.02)
    assert share["test"] == pytest.approx(0.1, abs=0.02)


def test_zero_fraction_split_is_empty():
    patients = [f"p{i}" for i in range(500)]
    splits = assign_splits(patients, ["a"] * 500, fractions=(0.9, 0.1, 0.0))
    assert set(splits) == {"train", "val"}


def test_split_summary_counts_items_and_patients():
    patients = ["p1", "p1", "p2", "p3", "p3"]
    sites = ["a", "a", "a", "ext", "ext"]
    splits = assign_splits(patients, sites, external_sites=["ext"])
    summary = split_summary(splits, patients, sites)
    assert summary["items"]["external"] == 2 and summary["patients"]["external"] == 1
    assert sum(summary["items"].values()) == 5
    assert summary["sites"]["ext"] == {"external": {"items": 2, "patients": 1}}
    assert sum(v["patients"] for v in summary["sites"]["a"].values()) == 2
