"""The clinical-size benchmark corpus (pgjax/synth/clinical.py), shrunk, and the preprocessing
speed-ups checked on it: the store they write equals the one written without them."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pgjax.data import pixels
from pgjax.data import preprocess as pp
from pgjax.data.config import PreprocessConfig
from pgjax.synth.clinical import SYNTAXES, ClinicalSettings, encoder_problem, write_clinical_corpus

TINY = ClinicalSettings(
    patients=3, ct_size=48, ct_slices=8, enhanced_frames=9, radiograph_shape=(90, 70),
    mr_sizes=(32, 40), mr_slices=8,
)  # fmt: skip
# Small shards: a multi-frame object's 2D rows fall into two image units, each normalising
# its own frames together, which the hand-over must repeat group by group.
CFG = PreprocessConfig(
    image_size=(32, 32), volume_shape=(8, 16, 16), min_patients=2, images_per_shard=6,
    volumes_per_shard=2,
)  # fmt: skip


def _compare_stores():
    path = Path(__file__).resolve().parents[1] / "tools" / "compare_stores.py"
    spec = importlib.util.spec_from_file_location("compare_stores", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compare


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("clinical")
    return out, write_clinical_corpus(out, TINY)


def test_corpus_holds_every_writable_syntax_and_names_the_rest(corpus):
    out, summary = corpus
    assert json.loads((out / "clinical.json").read_text()) == summary
    for name, uid in SYNTAXES.items():
        assert (name in summary["syntaxes"]) == (encoder_problem(uid) is None)
        assert (name in summary["lacking"]) == (encoder_problem(uid) is not None)
    assert {"explicit_le", "rle", "deflated"} <= set(summary["syntaxes"])
    kinds = {"CT", "EnhancedCT", "DX", "MR", "EnhancedMR"}
    written = Counter()  # series per kind of object, over every syntax
    for tally in summary["syntaxes"].values():
        written.update(tally["objects"])
    assert written == {k: TINY.patients for k in kinds}
    for name, tally in summary["syntaxes"].items():
        files = list((out / "dicom" / name).rglob("*.dcm"))
        assert (
            len(files) == tally["files"] and sum(f.stat().st_size for f in files) == tally["bytes"]
        )
        for f in files:
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == tally["uid"]
            frames = pixels.decode_frames(ds)
            assert frames.shape[0] == pixels.number_of_frames(ds) and frames.std() > 0


def test_corpus_is_deterministic(corpus, tmp_path):
    out, _ = corpus
    write_clinical_corpus(tmp_path, TINY)
    mine = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.dcm"))
    assert mine == sorted(p.relative_to(out) for p in out.rglob("*.dcm"))
    for rel in mine[:: max(1, len(mine) // 10)]:
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="patients must be >= 2"):
        ClinicalSettings(patients=1)
    with pytest.raises(ValueError, match="syntaxes must be some of"):
        ClinicalSettings(syntaxes=("jpeg_xl",))
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        write_clinical_corpus(tmp_path, TINY)


def _build(corpus_dir: Path, store: Path, salt: Path, workers: int = 1) -> Path:
    inputs = sorted((corpus_dir / "dicom").iterdir())
    pp.preprocess(inputs, store, cfg=CFG, salt_file=salt, workers=workers)
    return store


def test_fast_paths_write_the_store_the_plain_path_writes(corpus, tmp_path, monkeypatch):
    """Hand-over of multi-frame rows and one pool per run (2 workers) against every image unit
    decoding its own rows, one process: the same store."""
    out, _ = corpus
    salt = tmp_path / "salt"
    fast = _build(out, tmp_path / "fast", salt, workers=2)
    plans = (tmp_path / "fast.private" / "plan").glob("images-*.json")
    handed = [r for p in plans for r in json.loads(p.read_text())["rows"] if "made_by" in r]
    multi = [r for r in handed if r["frame"] > 0]  # rows of enhanced multi-frame objects
    assert multi and len({r["path"] for r in multi}) >= 2
    # The schedule: each image unit waits for exactly the volume units that make its rows.
    schedule = json.loads((tmp_path / "fast.private" / "plan" / "schedule.json").read_text())
    for u, waits in enumerate(schedule["images_after_volumes"]):
        plan = json.loads((tmp_path / "fast.private" / "plan" / f"images-{u:06d}.json").read_text())
        assert waits == sorted({r["made_by"] for r in plan["rows"] if "made_by" in r})
    assert all(c > 0 for c in schedule["cost"]["volumes"])
    monkeypatch.setattr(pp, "_load_slices", lambda *args: {})
    plain = _build(out, tmp_path / "plain", salt)
    assert _compare_stores()(plain, fast) == []
    report = json.loads((fast / "report.json").read_text())
    assert report["skipped_total"] == 0 and report["failed_items"] == {"images": 0, "volumes": 0}
    table = pp.st.read_csv_columns(fast / "images" / "table.csv")
    assert len(table["row"]) > 0 and all(int(v) == 1 for v in table["ok"])
    assert np.asarray(pp.st.open_array(fast / "images" / "pixels").read().result()).std() > 0


def test_synth_command_refuses_bad_clinical_settings(tmp_path, capsys):
    from pgjax.cli import main

    assert main(["synth", "--out", str(tmp_path / "c"), "--clinical", "1"]) == 2
    assert "patients must be >= 2" in capsys.readouterr().err


def test_one_pool_per_run_survives_a_crashed_worker(tmp_path):
    """The pool the phases share: a unit that kills its worker is reported, the units in flight
    with it are run again, and the next phase gets a working pool."""
    from crashing_unit import crash_on_three

    from pgjax.progress import Progress

    pool = pp.WorkerPool(2)
    try:
        crashed = pp.run_units(
            crash_on_three, range(6), (str(tmp_path),), 2, Progress(6, "test", "units"),
            pool=pool,
        )  # fmt: skip
        assert crashed == [(3, "worker crashed (hostile or corrupt file)")]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2", "4", "5"]
        crashed = pp.run_units(
            crash_on_three, [6, 7], (str(tmp_path),), 2, Progress(2, "test", "units"),
            pool=pool,
        )  # fmt: skip
        assert crashed == [] and (tmp_path / "6").exists() and (tmp_path / "7").exists()
    finally:
        pool.close()


def test_units_start_after_what_they_wait_for_and_the_costliest_chain_first(tmp_path):
    """The pixel phase's scheduler: an image unit starts only once the volume units whose
    hand-over rows it takes are done, and a long unit that waits on nothing (a radiograph
    unit) starts first instead of after every volume unit."""
    from crashing_unit import log_unit

    from pgjax.progress import Progress

    after = {"i0": ["v2"], "i1": ["v1", "v0"], "i2": [], "x": ["gone"]}
    cost = {"v0": 1, "v1": 1, "v2": 1, "i0": 1, "i1": 1, "i2": 10, "x": 0}
    units = ["i0", "i1", "v0", "v1", "v2", "i2", "x"]  # waiting units listed first
    log = tmp_path / "log"
    crashed = pp.run_units(
        log_unit, units, (str(log),), 2, Progress(len(units), "test", "units"),
        after=lambda u: after.get(u, ()), cost=cost.get,
    )  # fmt: skip
    assert crashed == []
    events = [line.split() for line in log.read_text().splitlines()]
    at = {(kind, u): float(t) for kind, u, t in events}
    assert {u for kind, u, _ in events if kind == "end"} == set(units)
    for u, waits in after.items():
        assert all(at["start", u] >= at["end", w] for w in waits if w in units)
    first_two = [u for kind, u, _ in events if kind == "start"][:2]
    assert sorted(first_two) == ["i2", "v0"]  # costliest chains; ties in the order given
    with pytest.raises(ValueError, match="cycle"):
        pp.run_units(
            log_unit, ["a", "b"], (str(log),), 2, Progress(2, "test", "units"),
            after={"a": ["b"], "b": ["a"]}.get,
        )  # fmt: skip


def test_pool_start_imports_what_the_units_need_in_every_worker():
    """Start-up is done before the first unit: each worker has imported the modules."""
    from crashing_unit import modules_loaded

    for modules, expected in (((), False), (("colorsys",), True)):
        pool = pp.WorkerPool(2, modules)
        try:
            executor = pool.get()
            futures = [executor.submit(modules_loaded, ["colorsys"]) for _ in range(4)]
            answers = dict(f.result() for f in futures)
        finally:
            pool.close()
        assert set(answers.values()) == {expected}
