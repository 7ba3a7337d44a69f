"""End-to-end tests of `pgjax preprocess` on real DICOM files (pydicom's test data)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tensorstore as ts
from dicom_corpus import BROKEN, PLANTED_ACCESSION, PLANTED_DATE, PLANTED_NAME, real_corpus

from pgjax.data import store as st
from pgjax.data.audit import audit_store, collect_identifiers
from pgjax.data.config import PreprocessConfig
from pgjax.data.preprocess import preprocess

# min_patients=2: the planted name in StudyDescription is on one patient only, so it must go.
CFG = PreprocessConfig(
    image_size=(64, 64),
    volume_shape=(12, 32, 32),
    min_patients=2,
    images_per_shard=4,
    volumes_per_shard=2,
    external_sites=("site_b",),
)
# The corpus's folders are site names, said so explicitly (by default a site is a salted key).
SITES = {"site_a": "site_a", "site_b": "site_b"}


def tree_bytes(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    facts = real_corpus(root)
    return root, facts


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    root, facts = corpus
    out = tmp_path_factory.mktemp("stores")
    salt = out / "salt"
    summary = preprocess(
        [root], out / "store", cfg=CFG, site_names=SITES, salt_file=salt, workers=1
    )
    return out / "store", summary, salt


def read_table(group_root: Path) -> dict:
    return st.read_csv_columns(group_root / "table.csv")


def test_store_is_complete_and_opens_with_plain_tensorstore(built):
    store, summary, _ = built
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["state"] == "complete"
    n = manifest["counts"]["images"]
    pixels = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / "images/pixels")}}
    ).result()
    assert pixels.shape == (n, 64, 64) and pixels.dtype == ts.uint8
    tokens = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / "images/tokens")}}
    ).result()
    assert tokens.shape == (n, len(manifest["fields"]))
    table = read_table(store / "images")
    assert len(table["row"]) == n and set(table["ok"]) == {"1"}
    # Every MR/CT/RGB file gives at least one image; the multi-frame MR gives its frames.
    assert n == 8 + 10 + 10  # 8 single-frame files, emri_small's 10 frames, 10 CT slices


def test_broken_files_are_listed_with_reasons(built, corpus):
    store, summary, _ = built
    private = store.with_name("store.private")
    rows = st.read_csv_columns(private / "skipped.csv")
    by_name = {Path(p).name: r for p, r in zip(rows["path"], rows["reason"], strict=True)}
    for name, reason in BROKEN.items():
        assert name in by_name, f"{name} not listed as skipped"
        assert by_name[name].startswith(reason), (name, by_name[name])
    report = json.loads((store / "report.json").read_text())
    assert report["skipped_total"] == len(rows["path"])
    # The store's report has counts by reason only: no paths.
    assert "broken" not in json.dumps(report)


def _row_of(store: Path, corpus_paths: dict, name: str) -> int:
    """Store row of a single-frame file, found through its salted instance key."""
    from pgjax.data.deid import hash_key, load_or_create_salt

    salt = load_or_create_salt(store.parent / "salt")
    sop = pydicom.dcmread(corpus_paths[name], stop_before_pixels=True).SOPInstanceUID
    table = read_table(store / "images")
    (rows,) = np.nonzero(table["instance_key"] == hash_key(salt, "instance", sop))
    assert len(rows) == 1
    return int(rows[0])


def test_lossless_transfer_syntaxes_give_identical_pixels(built, corpus):
    store, _, _ = built
    _, facts = corpus
    pixels = st.open_array(store / "images/pixels")
    names = ["mr_native", "mr_rle", "mr_j2k", "mr_bigendian", "mr_jpegls"]
    images = {n: pixels[_row_of(store, facts["paths"], n)].read().result() for n in names}
    for n in names[1:]:
        np.testing.assert_array_equal(images[n], images["mr_native"], err_msg=n)
    assert images["mr_native"].std() > 10  # a real image, not zeros
    rgb = [pixels[_row_of(store, facts["paths"], n)].read().result() for n in ("rgb", "rgb_rle")]
    np.testing.assert_array_equal(rgb[0], rgb[1])


def test_ct_pixels_match_an_independent_computation(built, corpus):
    """CT: stored -> HU with slope/intercept -> window 40/400 -> resize, computed here with
    pydicom and Pillow directly, must match the store within rounding."""
    from PIL import Image

    store, _, _ = built
    _, facts = corpus
    ds = pydicom.dcmread(facts["paths"]["ct"])
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = np.clip((hu - (40 - 200)) / 400, 0, 1).astype(np.float32)
    expected = np.asarray(Image.fromarray(img, mode="F").resize((64, 64), Image.BILINEAR))
    expected = np.round(np.clip(expected, 0, 1) * 255)
    got = st.open_array(store / "images/pixels")[_row_of(store, facts["paths"], "ct")]
    diff = np.abs(got.read().result().astype(float) - expected)
    assert diff.max() <= 1.0, diff.max()


def test_ct_series_becomes_a_sorted_volume(built):
    store, _, _ = built
    volumes = read_table(store / "volumes")
    assert len(volumes["row"]) == 1 and volumes["n_slices"][0] == "10"
    vol = st.open_array(store / "volumes/pixels")[0].read().result().astype(float)
    profile = vol[:, 16, 16]
    # Slice k holds 10*k HU, written to disk shuffled: sorted along the normal it is a ramp
    # from window(0 HU) to window(90 HU).
    assert np.all(np.diff(profile) >= 0) and profile[0] < profile[-1]
    assert abs(profile[0] - 255 * 160 / 400) <= 1 and abs(profile[-1] - 255 * 250 / 400) <= 1
    images = read_table(store / "images")
    in_volume = images["volume"] == "0"
    assert in_volume.sum() == 10
    # 2D slices of the series come out in position order too.
    means = [
        st.open_array(store / "images/pixels")[int(r)].read().result().mean()
        for r in images["row"][in_volume]
    ]
    assert means == sorted(means)


def test_splits_are_patient_level_and_external_sites_whole(built):
    store, _, _ = built
    for group in ("images", "volumes"):
        table = read_table(store / group)
        for patient in set(table["patient_key"]):
            assert len(set(table["split"][table["patient_key"] == patient])) == 1
        assert set(table["split"][table["site"] == "site_b"]) == {"external"}
        assert "external" not in set(table["split"][table["site"] != "site_b"])


def test_no_planted_identifier_reaches_the_store(built, corpus):
    store, _, _ = built
    root, _ = corpus
    identifiers = collect_identifiers([root])
    values = {i.value for i in identifiers}
    assert PLANTED_NAME in values and PLANTED_DATE in values and PLANTED_ACCESSION in values
    report = audit_store(store, identifiers)
    assert report.files_scanned > 10 and report.arrays_scanned >= 8
    assert report.hits == [], report.hits
    # The planted free text ("BRAIN ZORGLUBIA 20230517") did not become a vocabulary entry.
    vocab = (store / "vocab.json").read_text()
    assert "ZORGLUBIA" not in vocab.upper() and "PLANTEDPID" not in vocab


def test_rerun_is_idempotent(built, corpus):
    store, _, salt = built
    root, _ = corpus
    before = tree_bytes(store)
    preprocess([root], store, cfg=CFG, site_names=SITES, salt_file=salt, workers=1)
    assert tree_bytes(store) == before


def test_changed_inputs_are_refused_without_overwrite(built, corpus, tmp_path):
    store, _, salt = built
    root, _ = corpus
    other = PreprocessConfig(**{**CFG.to_json(), "image_size": (32, 32)})
    with pytest.raises(ValueError, match="other inputs or settings"):
        preprocess([root], store, cfg=other, site_names=SITES, salt_file=salt, workers=1)


def test_reader_refuses_unknown_versions(built, tmp_path):
    store, _, _ = built
    copy = tmp_path / "store"
    copy.mkdir()
    manifest = json.loads((store / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(st.StoreError, match="version 99"):
        st.open_store(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "state": "planned"}))
    with pytest.raises(st.StoreError, match="not complete"):
        st.open_store(copy)
    assert st.open_store(store).images.count == manifest["counts"]["images"]


def test_private_folder_inside_store_is_refused(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(ValueError, match="inside the store"):
        preprocess([root], tmp_path / "s", private=tmp_path / "s" / "p", cfg=CFG)


def test_sharded_phases_equal_one_run(built, corpus, tmp_path):
    """Scan and pixels split over 3 'machines', plan and finalize once: same store."""
    store, _, salt = built
    root, _ = corpus
    out = tmp_path / "store"
    for i in range(3):
        preprocess(
            [root], out, cfg=CFG, site_names=SITES, salt_file=salt, phases=["scan"], shard=(i, 3)
        )
    preprocess([root], out, cfg=CFG, salt_file=salt, phases=["plan"])
    for i in (2, 0, 1):
        preprocess([root], out, cfg=CFG, phases=["pixels"], shard=(i, 3))
    preprocess([root], out, cfg=CFG, phases=["finalize"])
    assert tree_bytes(out) == tree_bytes(store)


def test_slice_handover_gives_the_store_image_units_make_alone(
    built, corpus, tmp_path, monkeypatch
):
    """Volume units make most CT/MR 2D rows for the image units (a private side file); with
    the hand-over off, the image units make every row themselves: the store is the same."""
    from pgjax.data import preprocess as pp

    store, _, salt = built
    root, _ = corpus
    plans = store.with_name("store.private") / "plan"
    handed = [r for p in plans.glob("images-*.json") for r in json.loads(p.read_text())["rows"]]
    assert sum("made_by" in r for r in handed) >= 5  # the fixture's CT series slices
    assert not list((store.with_name("store.private") / "units").glob("slices-*"))  # finalized
    # Each image unit deletes a hand-over file once all its takers are done: none is left
    # after the pixel phase, before finalize.
    staged = tmp_path / "staged"
    preprocess(
        [root], staged, cfg=CFG, site_names=SITES, salt_file=salt,
        phases=["scan", "plan", "pixels"],
    )  # fmt: skip
    assert not list((tmp_path / "staged.private" / "units").glob("slices-*"))
    monkeypatch.setattr(pp, "_load_slices", lambda *args: {})
    out = tmp_path / "store"
    preprocess([root], out, cfg=CFG, site_names=SITES, salt_file=salt, workers=1)
    assert tree_bytes(out) == tree_bytes(store)


def test_finalize_refuses_missing_units(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "store"
    preprocess(
        [root], out, cfg=CFG, site_names=SITES, salt_file=tmp_path / "salt",
        phases=["scan", "plan"],
    )  # fmt: skip
    preprocess([root], out, cfg=CFG, phases=["pixels"], shard=(0, 2))
    with pytest.raises(ValueError, match="pixel units not done"):
        preprocess([root], out, cfg=CFG, phases=["finalize"])


def test_killed_run_resumes_to_the_same_store(built, corpus, tmp_path):
    """SIGKILL a real `pgjax preprocess` mid-pixels, run the same command again: same store."""
    store, _, salt = built
    root, _ = corpus
    out = tmp_path / "store"
    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps(SITES))
    cmd = [
        sys.executable, "-m", "pgjax.cli", "preprocess", str(root), "--out", str(out),
        "--salt-file", str(salt), "--workers", "1", "--min-patients", "2",
        "--external-sites", "site_b", "--site-names", str(sites), "--set", "image_size=64,64",
        "--set", "volume_shape=12,32,32", "--set", "images_per_shard=4",
        "--set", "volumes_per_shard=2",
    ]  # fmt: skip
    env = {**os.environ, "PGJAX_TEST_UNIT_DELAY_S": "0.5"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    units = out.with_name("store.private") / "units"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(units.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(units.glob("*.json")))
    assert 2 <= done < 8, f"kill landed at {done} units; the test needs a mid-run kill"
    assert json.loads((out / "manifest.json").read_text())["state"] == "planned"
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    assert tree_bytes(out) == tree_bytes(store)


def test_every_pydicom_test_file_is_stored_or_listed(tmp_path, capfd):
    """All of pydicom's test files (and pydicom-data's, where cached): each file becomes items
    or is listed with a reason, the run never stops, and no header value reaches stderr."""
    import shutil

    from pydicom.data import get_testdata_files

    root = tmp_path / "all" / "site"
    root.mkdir(parents=True)
    files = [f for f in get_testdata_files() if Path(f).is_file()]
    for i, f in enumerate(files):
        shutil.copy(f, root / f"{i:04d}_{Path(f).name}")
    cfg = PreprocessConfig(image_size=(32, 32), volume_shape=(8, 16, 16), min_patients=1)
    summary = preprocess([root.parent], tmp_path / "store", cfg=cfg, workers=1)
    assert summary["manifest"]["counts"]["images_ok"] > 50

    private = tmp_path / "store.private"
    listed = set(st.read_csv_columns(private / "skipped.csv")["path"])
    stored = {
        row.get("path") or p
        for plan in (private / "plan").glob("*-*.json")
        for row in json.loads(plan.read_text())["rows"]
        for p in row.get("paths", [None])
    }
    every = {str(p) for p in root.iterdir()}
    assert every == (listed | stored) & every, sorted(every - listed - stored)[:5]

    err = capfd.readouterr().err
    uids = [i.value for i in collect_identifiers([root]) if i.kind.endswith("UID")]
    assert uids and not [u for u in uids if u in err]
