"""The store's site column: salted keys by default, readable names only from --site-names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dicom_corpus import copy_with_identity
from pydicom.data import get_testdata_file

from pgjax.data import store as st
from pgjax.data.config import PreprocessConfig
from pgjax.data.preprocess import preprocess
from pgjax.data.sites import load_site_names, site_key

# Every patient of a training site in the train split: with two or three patients and a fresh
# random salt, the patient-level split would now and then leave none to fit the vocabulary on.
CFG = PreprocessConfig(image_size=(16, 16), volume_shape=(8, 8, 8), min_patients=1,
                       split_fractions=(1.0, 0.0, 0.0))
# Folder names that name a patient: none may reach the store.
PATIENT_FOLDER = "DOE_JOHN"
LOOSE_ROOT = "Smith_19250314"  # an input folder with files directly inside it


def _corpus(root: Path) -> None:
    for n, src in enumerate(("CT_small.dcm", "MR_small.dcm")):
        copy_with_identity(get_testdata_file(src), root / PATIENT_FOLDER / f"{n}.dcm", n, f"a{n}")
        copy_with_identity(get_testdata_file(src), root / "MRN4417" / f"{n}.dcm", 10 + n, f"b{n}")


def _store_bytes(store: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file())


def _sites(store: Path) -> set[str]:
    return set(st.read_csv_columns(store / "images" / "table.csv")["site"])


def test_folder_names_become_salted_keys_by_default(tmp_path):
    _corpus(tmp_path / "in")
    loose = tmp_path / LOOSE_ROOT
    copy_with_identity(get_testdata_file("CT_small.dcm"), loose / "x.dcm", 20, "c0")
    store = tmp_path / "store"
    preprocess([tmp_path / "in", loose], store, cfg=CFG, workers=1)
    sites = _sites(store)
    assert len(sites) == 3 and all(re.fullmatch(r"site_[0-9a-f]{8}", s) for s in sites), sites
    everything = _store_bytes(store)
    for name in (PATIENT_FOLDER, "MRN4417", LOOSE_ROOT, "DOE", "Smith"):
        assert name.encode() not in everything, name


def test_site_names_map_folders_and_the_rest_get_keys(tmp_path):
    _corpus(tmp_path / "in")
    mapping = tmp_path / "sites.csv"
    mapping.write_text("folder,site\nMRN4417,north\n")
    store = tmp_path / "store"
    salt = tmp_path / "salt"
    cfg = PreprocessConfig(**{**CFG.to_json(), "external_sites": ("north",)})
    preprocess([tmp_path / "in"], store, cfg=cfg, workers=1, salt_file=salt, site_names=mapping)
    table = st.read_csv_columns(store / "images" / "table.csv")
    unmapped = site_key(bytes.fromhex(salt.read_text().strip()), PATIENT_FOLDER)
    assert set(table["site"]) == {"north", unmapped}
    assert set(table["split"][table["site"] == "north"]) == {"external"}
    assert PATIENT_FOLDER.encode() not in _store_bytes(store)


def test_external_site_by_unmapped_folder_name_says_what_to_do(tmp_path):
    _corpus(tmp_path / "in")
    cfg = PreprocessConfig(**{**CFG.to_json(), "external_sites": ("MRN4417",)})
    with pytest.raises(ValueError, match="salted key unless --site-names maps the folder"):
        preprocess([tmp_path / "in"], tmp_path / "store", cfg=cfg, workers=1)


def test_site_names_need_site_from_dir(tmp_path):
    cfg = PreprocessConfig(site_from="header")
    with pytest.raises(ValueError, match="needs --site-from dir"):
        preprocess([tmp_path], tmp_path / "s", cfg=cfg, site_names={"a": "b"})


def test_load_site_names_json_and_csv(tmp_path):
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"site_a": "Alpha", " b ": "Beta "}))
    assert load_site_names(j) == {"site_a": "Alpha", "b": "Beta"}
    c = tmp_path / "s.csv"
    c.write_text("folder,site\nsite_a,Alpha\n\nb,Beta\n")
    assert load_site_names(c) == {"site_a": "Alpha", "b": "Beta"}


@pytest.mark.parametrize(
    "text, error",
    [
        ("{not json", "invalid JSON"),
        ('{"a": 3}', "entry 1: names must be strings"),
        ('{"a": ""}', "entry 1: an empty folder or site name"),
        ('{"a": "x,y"}', "printable, no commas"),
        ("{}", "no folders listed"),
        ("dir,name\na,b\n", "the first row is not 'folder,site'"),
        ("folder,site\na,b,c\n", "row 2 has 3 columns"),
        ("folder,site\nDOE_JOHN,x\nDOE_JOHN,y\n", "entry 2: the folder is listed twice"),
    ],
)
def test_load_site_names_refuses_bad_files_without_quoting_folders(tmp_path, text, error):
    path = tmp_path / "sites"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(error)) as e:
        load_site_names(path)
    assert str(path) in str(e.value) and "DOE_JOHN" not in str(e.value)


def test_cli_site_names(tmp_path):
    _corpus(tmp_path / "in")
    mapping = tmp_path / "sites.json"
    mapping.write_text(json.dumps({PATIENT_FOLDER: "east", "MRN4417": "west"}))
    cmd = [sys.executable, "-m", "pgjax.cli", "preprocess", str(tmp_path / "in"),
           "--out", str(tmp_path / "store"), "--workers", "1", "--min-patients", "1",
           "--set", "image_size=16,16", "--set", "split_fractions=1,0,0",
           "--site-names", str(mapping),
           "--external-sites", "west"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert _sites(tmp_path / "store") == {"east", "west"}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    done = subprocess.run([*cmd[:-4], "--site-names", str(bad)], capture_output=True, text=True,
                          env=env)  # fmt: skip
    assert done.returncode == 2 and "--site-names" in done.stderr


def test_pull_never_names_sites_by_folder(tmp_path):
    """A pull's files sit in a private staging folder named by salted keys; its site is
    fixed:pacs by default, and --site-from dir is refused before anything is fetched."""
    from pgjax.pacs.pull import pull

    with pytest.raises(ValueError, match="--site-from dir names sites by input folder"):
        pull(None, {}, tmp_path / "store", cfg=PreprocessConfig(site_from="dir"))
    assert not (tmp_path / "store").exists()
