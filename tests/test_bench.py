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
    path = bench_preprocess([tmp_path / "dicom"], 0, [1, 2], results, rounds=2)
    record = json.loads(Path(path).read_text())
    assert record["benchmark"] == "preprocess"
    assert record["machine"]["cores"] >= 1 and record["machine"]["versions"]["pydicom"]
    w1 = record["figures"]["workers_1"]
    assert w1["decode_only_files_per_s"] > 0 and w1["pipeline_files_per_s"] > 0
    assert set(w1["pipeline_s"]) == {"start", "scan", "plan", "pixels", "finalize", "total"}
    assert len(w1["ratio_per_round"]) == 2 and len(w1["pipeline_s_per_round"]) == 2
    w2 = record["figures"]["workers_2"]
    phases = set(w1["pipeline_s"]) - {"start"}
    assert set(w2["speedup_over_1_worker"]) == phases | {"after_start"}
    assert (
        w2["speedup_over_1_worker"]["total"]
        == w1["pipeline_s"]["total"] / w2["pipeline_s"]["total"]
    )
    for w in (w1, w2):  # start-up is reported on its own, and left out of the steady rate
        assert all(0 < t["start"] < t["total"] for t in w["pipeline_s_per_round"])
        assert w["pipeline_files_per_s_after_start"] > w["pipeline_files_per_s"]
    report = write_report(results).read_text()
    assert "| 1 |" in report and record["time_utc"] in report


def test_clinical_preset_records_each_syntax_and_what_the_mix_lacks(tmp_path, capsys):
    from pgjax.synth.clinical import ClinicalSettings

    tiny = ClinicalSettings(
        patients=2, ct_size=32, ct_slices=8, enhanced_frames=8, radiograph_shape=(60, 48),
        mr_sizes=(32,), mr_slices=8,
    )  # fmt: skip
    results = tmp_path / "results"
    path = bench_preprocess(
        None, 0, [1], results, rounds=1, preset="clinical", clinical_settings=tiny
    )
    record = json.loads(Path(path).read_text())
    figures = record["figures"]
    assert record["settings"]["preset"] == "clinical"
    assert record["settings"]["clinical_corpus"]["ct_size"] == 32
    syntaxes = figures["by_syntax"]
    assert {"explicit_le", "rle", "deflated"} <= set(syntaxes)
    assert set(syntaxes) | set(figures["syntaxes_lacking"]) == {
        "explicit_le", "jpeg_lossless_sv1", "jpeg_ls", "jpeg2000_lossless", "rle", "deflated",
    }  # fmt: skip
    assert sum(s["files"] for s in syntaxes.values()) == figures["files"]
    for part in [figures, *syntaxes.values()]:
        f = part["workers_1"]
        assert f["decode_only_mb_per_s"] > 0 and f["pipeline_mb_per_s"] > 0
        assert set(f["pipeline_s"]) == {"start", "scan", "plan", "pixels", "finalize", "total"}
        assert len(f["load_average_1min_per_round"]) == 1
    printed = capsys.readouterr().out
    for name in figures["syntaxes_lacking"]:
        assert f"not in the mix: {name}" in printed
    report = write_report(results).read_text()
    assert "| clinical: rle |" in report and "| clinical |" in report


def test_preprocess_bench_on_an_empty_folder_says_so_and_writes_no_record(tmp_path, capsys):
    from pgjax.cli import main

    (tmp_path / "empty").mkdir()
    results = tmp_path / "results"
    argv = ["bench", "preprocess", str(tmp_path / "empty"), "--rounds", "1", "--out", str(results)]
    assert main(argv) == 2
    assert f"no files under {tmp_path / 'empty'}" in capsys.readouterr().err
    assert not list(results.glob("*.json"))


@pytest.mark.slow
def test_train_bench_on_a_store(tmp_path):
    from dicom_corpus import copy_with_identity
    from pydicom.data import get_testdata_file

    from pgjax.bench.train import run_bench as bench_train
    from pgjax.data.config import PreprocessConfig
    from pgjax.data.preprocess import preprocess

    for n in range(24):
        copy_with_identity(
            get_testdata_file("CT_small.dcm"),
            tmp_path / "d" / "s" / f"{n}.dcm",
            patient=n,
            tag=f"b{n}",
            Manufacturer=["A", "B"][n % 2],
        )
    cfg = PreprocessConfig(image_size=(32, 32), min_patients=2, split_fractions=(1.0, 0.0, 0.0))
    preprocess([tmp_path / "d"], tmp_path / "store", cfg=cfg, workers=1)
    repo = Path(__file__).resolve().parents[1]
    path = bench_train(
        f"{repo}/configs/pg.py:tiny",
        [f"input.store={tmp_path / 'store'}"],
        steps=2,
        batches=[16],
        device_counts=[8],
        image_sizes=[16],
        out_dir=tmp_path / "results",
    )
    record = json.loads(Path(path).read_text())
    run, small = record["figures"]["runs"]
    assert record["settings"]["overrides"] == ["input.store=(given)"]
    assert str(tmp_path) not in Path(path).read_text()
    assert run["devices"] == 8 and run["steps_per_s"] > 0 and run["flops_per_step"] > 0
    assert run["host_overhead_share"] <= 1 and run["mfu"] is None  # no CPU peak
    assert run["mfu_model"] is None and "no MFU" in record["settings"]["mfu_note"]
    assert 0 < run["model_flops_per_step"] < 10 * run["flops_per_step"]
    assert len(run["loop_step_s_per_round"]) == len(run["resident_step_s_per_round"]) == 5
    assert run["input_s_per_batch"] > 0 and run["input_share_of_step"] > 0
    # The image-size sweep: a quarter of the pixels, fewer FLOPs; no store loop at that size.
    assert small["image_shape"] == [16, 16] and "host_overhead_share" not in small
    assert small["flops_per_step"] < run["flops_per_step"]


def test_loader_bench_writes_a_record_and_the_report_reads_it(tmp_path):
    from pgjax.bench.loader import run_bench as bench_loader
    from pgjax.bench.loader import write_reference_store

    store = write_reference_store(
        tmp_path / "store", 48, 16, compression="zstd", images_per_shard=16
    )
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    from pgjax.bench.record import write_record

    run = {
        "devices": 1,
        "global_batch": 8,
        "images_per_s": 50.0,
        "steps_per_s": 6.25,
        "flops_per_step": 1e9,
        "mfu": None,
    }
    write_record(
        "train", {"runs": [run]}, {"config": "configs/pg.py:tiny", "device_kind": "cpu"}, results
    )
    repo = Path(__file__).resolve().parents[1]
    path = bench_loader(
        str(store),
        config_path=f"{repo}/configs/pg.py:tiny",
        batch=8,
        workers=[0, 1],
        steps=2,
        rounds=1,
        out_dir=results,
    )
    record = json.loads(Path(path).read_text())
    assert record["benchmark"] == "loader" and record["settings"]["image_shape"] == [16, 16]
    f = record["figures"]
    assert f["memmap_images_per_s"] > 0 and f["tensorstore_images_per_s"] > 0
    assert f["augment_alone_images_per_s"] > 0
    for w in (0, 1):
        row = f[f"workers_{w}"]
        assert row["delivered_images_per_s"] > 0 and row["augmented_images_per_s"] > 0
        assert row["ratio_to_tensorstore"] == pytest.approx(
            row["delivered_images_per_s"] / f["tensorstore_images_per_s"]
        )
    # No train record for configs/pg.py:tiny under this path's name: the same file's is used.
    assert f["needed"]["images_per_s"] == 50.0 and f["needed"]["match"] != "same config"
    report = write_report(results).read_text()
    assert "Input pipeline" in report and record["time_utc"] in report


def test_train_sweep_is_one_factor_at_a_time():
    from pgjax.bench.train import sweep_points

    points = sweep_points(8, 32, [128, 128], [1, 8], [16, 32], [64])
    assert points == [
        (8, 32, (128, 128)),  # the base point first, never repeated
        (1, 32, (128, 128)),
        (8, 16, (128, 128)),
        (8, 32, (64, 64)),
    ]
    # A volume store: the image side applies to the in-plane axes only.
    assert sweep_points(1, 4, [16, 64, 64], [], [], [32])[1] == (1, 4, (16, 32, 32))
