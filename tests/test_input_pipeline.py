"""The input pipeline's batches: what a step holds does not depend on how it is read."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorstore as ts

from pgjax.bench.loader import write_reference_store
from pgjax.train.input_pipeline import ARRAYS, BatchSource, InputConfig, aligned_empty


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_reference_store(
        tmp_path_factory.mktemp("ref") / "store", 96, 16, compression="zstd", images_per_shard=32
    )


def direct(store, rows):
    """Each array's rows, read one by one with plain TensorStore (the meaning of a batch)."""
    out = {}
    for name in ARRAYS:
        arr = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{store}/images/{name}"}}
        ).result()
        out[name] = np.stack([arr[int(r)].read().result() for r in rows])
    return out


@pytest.mark.parametrize("token_cache_mb", [512, 0])
def test_batch_is_its_rows_in_order(store, token_cache_mb):
    cfg = InputConfig(store=str(store), global_batch=16, seed=3, token_cache_mb=token_cache_mb)
    source = BatchSource(cfg)
    for step in (0, 5, 6, 13):  # 6 steps per epoch: 6 and 13 are in later epochs
        batch = source[step]
        rows = source.global_rows(step)
        assert len(set(rows.tolist())) == 16 and (batch["row"] == rows).all()
        expected = direct(store, rows)
        for name in ARRAYS:
            np.testing.assert_array_equal(batch[name], expected[name])
            assert batch[name].dtype == expected[name].dtype
        assert batch["pixels"].ctypes.data % 64 == 0
    assert bool(source._token_cache) == (token_cache_mb > 0)
    # Pure function of (seed, step): another source, another order of requests, same batch.
    again = BatchSource(cfg)
    np.testing.assert_array_equal(again[13]["pixels"], source[13]["pixels"])
    # An epoch visits every row once.
    seen = np.concatenate([source.global_rows(s) for s in range(6)])
    assert sorted(seen.tolist()) == list(range(96))


def test_processes_split_the_global_batch(store):
    cfg = InputConfig(store=str(store), global_batch=16)
    whole = BatchSource(cfg)[4]
    halves = [BatchSource(cfg, p, 2)[4] for p in range(2)]
    for name in ARRAYS:
        np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), whole[name])


def test_aligned_empty():
    for shape, dtype in [((3, 5, 7), np.uint8), ((4, 31), np.float32)]:
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.ctypes.data % 64 == 0


def test_iterator_with_a_worker_matches_the_source(store):
    from pgjax.train.input_pipeline import make_iterator

    cfg = InputConfig(store=str(store), global_batch=16, workers=1)
    it, source = make_iterator(cfg, 2)
    try:
        for step in (2, 3, 4):
            batch = next(it)
            assert int(batch["step"]) == step
            np.testing.assert_array_equal(batch["pixels"], source[step]["pixels"])
    finally:
        it.close()
    plain, _ = make_iterator(dataclasses.replace(cfg, workers=0), 2)
    np.testing.assert_array_equal(next(plain)["tokens"], source[2]["tokens"])
