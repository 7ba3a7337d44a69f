"""Benchmarks run and write valid records. No timing is asserted: figures live in records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dicom_corpus import real_corpus

from pgjax.bench.preprocess import run_bench as bench_preprocess
from pgjax.bench.report import write_report


def test_preprocess_bench_writes_a_record_and_the_report_reads_it(tmp_path):
    real_corpus(tmp_path / "dicom")
    results = tmp_path / "benchmarks" / "results"
    path = bench_preprocess([tmp_path / "dicom"], 0, [1], results)
    record = json.loads(Path(path).read_text())
    assert record["benchmark"] == "preprocess"
    assert record["machine"]["cores"] >= 1 and record["machine"]["versions"]["pydicom"]
    w1 = record["figures"]["workers_1"]
    assert w1["decode_only_files_per_s"] > 0 and w1["pipeline_files_per_s"] > 0
    assert set(w1["pipeline_s"]) == {"scan", "plan", "pixels", "finalize", "total"}
    report = write_report(results).read_text()
    assert "| 1 |" in report and record["time_utc"] in report


@pytest.mark.slow
def test_train_bench_on_a_store(tmp_path):
    from dicom_corpus import copy_with_identity
    from pydicom.data import get_testdata_file

    from pgjax.bench.train import run_bench as bench_train
    from pgjax.data.config import PreprocessConfig
    from pgjax.data.preprocess import preprocess

    for n in range(24):
        copy_with_identity(get_testdata_file("CT_small.dcm"), tmp_path / "d" / "s" / f"{n}.dcm",
                           patient=n, tag=f"b{n}", Manufacturer=["A", "B"][n % 2])  # fmt: skip
    cfg = PreprocessConfig(image_size=(32, 32), min_patients=2, split_fractions=(1.0, 0.0, 0.0))
    preprocess([tmp_path / "d"], tmp_path / "store", cfg=cfg, workers=1)
    repo = Path(__file__).resolve().parents[1]
    path = bench_train(
        f"{repo}/configs/pg.py:tiny", [f"input.store={tmp_path / 'store'}"], steps=2,
        batches=[16], device_counts=[8], out_dir=tmp_path / "results",
    )  # fmt: skip
    run = json.loads(Path(path).read_text())["figures"]["runs"][0]
    assert run["devices"] == 8 and run["steps_per_s"] > 0 and run["flops_per_step"] > 0
    assert 0 <= run["host_overhead_share"] <= 1 and run["mfu"] is None  # no CPU peak
