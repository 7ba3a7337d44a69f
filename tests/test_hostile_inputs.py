"""Hostile inputs: symlink loops, dangling links, names that are not UTF-8, and files that
declare far more pixels than they hold. Each is skipped with its reason in the private skip
list; none stops the run, prints a path, or costs memory that the data does not back."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from dicom_corpus import copy_with_identity
from pydicom.data import get_testdata_file

from pgjax.data import store as st
from pgjax.data.config import PreprocessConfig
from pgjax.data.pixels import PixelError, decode_frames, encapsulated_extent
from pgjax.data.preprocess import printable_text
from pgjax.data.scan import scan_file
from pgjax.data.schema import Schema

SALT = b"s" * 32


def _scan(path: Path, **kw):
    return scan_file(str(path.parent), str(path), Schema(), SALT, "fixed:x", **kw)


def rle_declaring(dst: Path, **attrs) -> Path:
    """MR_small_RLE.dcm (64 x 64, 16 bit, one frame, about 6 kB of RLE data) with `attrs`."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    for k, v in attrs.items():
        setattr(ds, k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def native_short(dst: Path) -> Path:
    """MR_small.dcm (64 x 64, 16 bit) declaring 512 x 512: its 8 kB hold an eighth of a frame."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows = ds.Columns = 512
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def test_rle_declaring_20000_squared_is_skipped_by_the_cap_and_by_its_length(tmp_path):
    path = rle_declaring(tmp_path / "big.dcm", Rows=20000, Columns=20000)
    r = _scan(path)
    assert r.reason.startswith("image too large: 20000 x 20000 pixels x 1 samples per frame, over")
    # Under a cap that allows it, the RLE data is still far too short for it.
    r = _scan(path, max_pixels=10**9)
    assert r.reason.startswith("truncated pixel data: ") and "RLE data cannot hold" in r.reason
    ds = pydicom.dcmread(path)  # the pixel phase checks again before decoding
    with pytest.raises(PixelError, match="^image too large"):
        decode_frames(ds, [0])
    with pytest.raises(PixelError, match="RLE data cannot hold"):
        decode_frames(ds, [0], max_pixels=10**9)


def test_rle_declaring_200000_frames_is_skipped_without_per_frame_records(tmp_path):
    path = rle_declaring(tmp_path / "frames.dcm", NumberOfFrames=200000)
    r = _scan(path)
    assert r.reason == (
        "truncated pixel data: fewer compressed fragments than frames (1 fragments, 200000 "
        "frames declared)"
    )
    assert r.geometry == [] and len(json.dumps(r.to_json())) < 1000
    with pytest.raises(PixelError, match="fewer compressed fragments than frames"):
        decode_frames(pydicom.dcmread(path), [0])


def test_native_data_shorter_than_declared_is_skipped(tmp_path):
    r = _scan(native_short(tmp_path / "short.dcm"))
    assert r.reason == "truncated pixel data: expected 524288 bytes, found 8192"


def test_max_pixels_cap_skips_a_good_file_over_it(tmp_path):
    path = copy_with_identity(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm", 1, "ct")
    assert _scan(path).ok and _scan(path, max_pixels=128 * 128).ok
    r = _scan(path, max_pixels=128 * 128 - 1)
    assert r.reason == "image too large: 128 x 128 pixels x 1 samples per frame, over " + (
        "max_pixels=16383"
    )
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        PreprocessConfig(max_pixels=0)


def test_encapsulated_extent_counts_fragments_from_item_headers():
    ds = pydicom.dcmread(get_testdata_file("emri_small_RLE.dcm"))
    value = ds.PixelData
    fragments, size = encapsulated_extent(io.BytesIO(value), len(value))
    assert fragments == 10 and 0 < size < len(value)
    # Cut short: the fragments present are counted, the cut one with the bytes it has.
    half = len(value) // 2
    fragments, size_half = encapsulated_extent(io.BytesIO(value[:half]), half)
    assert 4 <= fragments <= 6 and size_half < size


def test_links_that_cannot_be_followed_are_skipped_with_a_reason(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert _scan(tmp_path / "loop").reason == "cannot open: symbolic link loop"
    assert _scan(tmp_path / "dangling").reason == "cannot open: dangling symbolic link"
    os.mkfifo(tmp_path / "fifo")  # would block a reader forever
    assert _scan(tmp_path / "fifo").reason == "not a regular file (FIFO, socket or device)"


def test_printable_text_escapes_bytes_that_are_not_utf8():
    name = os.fsdecode(b"/x/caf\xe9.dcm")
    assert printable_text(name) == "/x/caf\\xe9.dcm"
    assert printable_text("/x/plain é.dcm") == "/x/plain é.dcm"


# ---------------------------------------------------------------------------------------------
# One run over all of them plus good real files.

GOOD = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "SC_rgb.dcm", "emri_small.dcm")
# Strings planted in paths; none may reach the output or the store.
MARKERS = ("DOE_JOHN_QX", "LOOPMARK", "DANGLEMARK", "NOWHEREMARK", "UTFMARK", "HUGEMARK",
           "HUGERMARK", "FRAMEMARK", "MOREMARK", "SHORTMARK")  # fmt: skip


def hostile_corpus(root: Path) -> tuple[list[str], dict[str, str]]:
    """(good paths, {bad path: expected reason}) under root."""
    good = []
    for n, src in enumerate(GOOD):
        good.append(str(copy_with_identity(get_testdata_file(src), root / "a" / f"{n}.dcm", n,
                                           f"g{n}")))  # fmt: skip
    d = root / "DOE_JOHN_QX"  # a patient-named folder: its site must be a salted key
    d.mkdir()
    odd = d / os.fsdecode(b"UTFMARK_good_\xe9.dcm")  # a good file whose name is not UTF-8
    good.append(str(copy_with_identity(get_testdata_file("CT_small.dcm"), odd, 9, "odd")))
    bad = {}
    (d / "LOOPMARK_1").symlink_to("LOOPMARK_2")
    (d / "LOOPMARK_2").symlink_to("LOOPMARK_1")
    (d / "DANGLEMARK").symlink_to(root / "NOWHEREMARK")
    bad[str(d / "LOOPMARK_1")] = bad[str(d / "LOOPMARK_2")] = "cannot open: symbolic link loop"
    bad[str(d / "DANGLEMARK")] = "cannot open: dangling symbolic link"
    (d / "LOOPMARK_dir").symlink_to(d)  # a folder link back to its parent: not followed
    bad[str(d / "LOOPMARK_dir")] = "symbolic link to a folder (not followed)"
    text = d / os.fsdecode(b"UTFMARK_\xff\xfe.txt")
    text.write_text("not DICOM\n")
    bad[str(text)] = "not a DICOM file"
    huge = rle_declaring(d / "HUGEMARK.dcm", Rows=20000, Columns=20000, SOPInstanceUID="1.2.3.1")
    frames = rle_declaring(d / "FRAMEMARK.dcm", NumberOfFrames=200000, SOPInstanceUID="1.2.3.2")
    huger = rle_declaring(d / "HUGERMARK.dcm", Rows=65535, Columns=65535, SOPInstanceUID="1.2.3.3")
    more = rle_declaring(d / "MOREMARK.dcm", NumberOfFrames=3000000, SOPInstanceUID="1.2.3.4")
    bad[str(huge)] = bad[str(huger)] = "image too large"
    bad[str(frames)] = bad[str(more)] = "truncated pixel data"
    bad[str(native_short(d / "SHORTMARK.dcm"))] = "truncated pixel data"
    return good, bad


def _run(root: Path, store: Path):
    cmd = [sys.executable, "-m", "pgjax.cli", "preprocess", str(root), "--out", str(store),
           "--workers", "1", "--min-patients", "1", "--set", "image_size=16,16",
           "--set", "volume_shape=8,8,8"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, capture_output=True, env=env)


def test_a_run_over_hostile_inputs_stores_the_good_files_and_lists_the_bad(tmp_path):
    root = tmp_path / "in"
    good, bad = hostile_corpus(root)
    store = tmp_path / "store"
    done = _run(root, store)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    output = done.stdout + done.stderr
    everything = b"".join(p.read_bytes() for p in store.rglob("*") if p.is_file())
    for marker in MARKERS:
        assert marker.encode() not in output, marker
        assert marker.encode() not in everything, marker

    private = tmp_path / "store.private"
    skipped = st.read_csv_columns(private / "skipped.csv")
    listed = dict(zip(skipped["path"], skipped["reason"], strict=True))
    for path, reason in bad.items():
        assert listed[printable_text(path)].startswith(reason), (path, listed)
    stored = {
        row.get("path") or p
        for plan in (private / "plan").glob("*-*.json")
        for row in json.loads(plan.read_text())["rows"]
        for p in row.get("paths", [None])
    }
    assert set(good) <= stored
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["state"] == "complete"
    table = st.read_csv_columns(store / "images" / "table.csv")
    assert set(table["ok"]) == {"1"} and len(table["ok"]) >= len(good)

    # A rerun of the same command works and changes nothing.
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert _run(root, store).returncode == 0
    assert before == {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}


def test_a_file_without_read_permission_is_skipped_without_its_path(tmp_path):
    path = copy_with_identity(get_testdata_file("CT_small.dcm"), tmp_path / "p.dcm", 1, "p")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who can read any file (root)")
        assert _scan(path).reason == "cannot open: Permission denied"
    finally:
        path.chmod(0o600)
