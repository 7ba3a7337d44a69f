"""Series partners for cross-series protocol translation: the loader pairs each item with an
item of another series of the same study, as a pure function of (seed, step)."""

import collections

import numpy as np
import pytest

from pgjax.data.config import PreprocessConfig
from pgjax.data.preprocess import preprocess
from pgjax.data.store import open_store
from pgjax.synth.corpus import write_corpus
from pgjax.train.input_pipeline import BatchSource, InputConfig, SeriesPartners


def test_partners_are_other_series_of_the_same_study():
    rng = np.random.default_rng(0)
    # 200 items: studies with 1-4 series of 1-5 items each, shuffled.
    study, series = [], []
    for s in range(40):
        for k in range(rng.integers(1, 5)):
            n = rng.integers(1, 6)
            study += [f"st{s}"] * n
            series += [f"se{s}-{k}"] * n
    order = rng.permutation(len(study))
    study, series = np.array(study)[order], np.array(series)[order]
    partners = SeriesPartners(study, series)
    positions = np.arange(len(study))
    expected_count = np.array(
        [np.sum((study == study[i]) & (series != series[i])) for i in positions]
    )
    np.testing.assert_array_equal(partners.count(positions), expected_count)

    seen = collections.defaultdict(set)
    for draw in range(300):
        u = np.random.default_rng(draw).random(len(positions))
        partner, has = partners.draw(positions, u)
        np.testing.assert_array_equal(has, expected_count > 0)
        assert np.all(study[partner] == study)
        assert np.all((series[partner] != series) == has)
        assert np.all(partner[~has] == positions[~has])  # stands in for itself, unused
        for i, p in zip(positions[has], partner[has], strict=True):
            seen[i].add(p)
    # Every candidate gets drawn: the two ranges around an item's own series are both used.
    for i in positions[expected_count > 0]:
        assert len(seen[i]) == expected_count[i], i
    # Extreme draws stay in range.
    for u in (np.zeros(len(positions)), np.full(len(positions), np.nextafter(1.0, 0.0))):
        partner, has = partners.draw(positions, u)
        assert np.all(study[partner] == study) and np.all((series[partner] != series) == has)


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory):
    """A small synthetic corpus: CT studies with two reconstructions, MR with 2-3 sequences."""
    root = tmp_path_factory.mktemp("partners")
    write_corpus(root / "corpus", studies=16, seed=3, workers=1)
    cfg = PreprocessConfig(image_size=(16, 16), min_patients=1, split_fractions=(1.0, 0.0, 0.0))
    preprocess([root / "corpus" / "dicom"], root / "store", cfg=cfg, workers=1)
    return root / "store"


def test_batches_carry_a_partner_series_protocol(synth_store):
    cfg = InputConfig(store=str(synth_store), global_batch=8, partners=True, seed=5)
    source = BatchSource(cfg)
    table = open_store(synth_store).group("images").table()
    tokens = open_store(synth_store).group("images").array("tokens")
    multi = 0
    for step in range(source.steps_per_epoch):
        batch = source[step]
        rows, has = batch["row"], batch["has_partner"].astype(bool)
        partner, has_again = source.partner_rows(step)
        np.testing.assert_array_equal(has, has_again)
        assert np.all(table["study_key"][partner] == table["study_key"][rows])
        assert np.all((table["series_key"][partner] != table["series_key"][rows]) == has)
        np.testing.assert_array_equal(batch["partner_tokens"], tokens[partner].read().result())
        multi += has.sum()
    assert multi > 0  # the corpus has multi-series studies
    # A pure function of (seed, step); another seed draws other partners.
    again = BatchSource(cfg)[3]
    np.testing.assert_array_equal(again["partner_tokens"], source[3]["partner_tokens"])
    assert "partner_tokens" not in BatchSource(InputConfig(str(synth_store), global_batch=8))[0]


def test_two_processes_share_the_global_draw(synth_store):
    cfg = InputConfig(store=str(synth_store), global_batch=8, partners=True)
    whole = BatchSource(cfg)
    halves = [BatchSource(cfg, process_index=p, process_count=2) for p in (0, 1)]
    for step in (0, 1, 7):
        joined = np.concatenate([h.partner_rows(step)[0] for h in halves])
        np.testing.assert_array_equal(joined, whole.partner_rows(step)[0])


def test_a_table_without_study_keys_is_a_clear_error(synth_store, tmp_path):
    import shutil

    from pgjax.data.store import read_csv_columns, write_csv_atomic

    store = tmp_path / "store"
    shutil.copytree(synth_store, store)
    table = read_csv_columns(store / "images" / "table.csv")
    kept = {k: list(v) for k, v in table.items() if k not in ("study_key", "series_key")}
    write_csv_atomic(store / "images" / "table.csv", kept)
    with pytest.raises(ValueError, match="table.csv: no study_key/series_key"):
        BatchSource(InputConfig(str(store), global_batch=8, partners=True))
    BatchSource(InputConfig(str(store), global_batch=8))  # without partners it is not needed
