"""The clinical-size benchmark corpus (pgjax/synth/clinical.py), shrunk, and the preprocessing
speed-ups checked on it: the store they write equals the one written without them."""

from __future__ import annotations

import importlib.util
import json
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
    written = [k for s in summary["syntaxes"].values() for k in s["objects"]]
    assert set(written) == kinds and len(written) == 5 * TINY.patients
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
