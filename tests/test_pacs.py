"""`pgjax pull` against a real Orthanc, over DICOMweb and DIMSE, compared with `pgjax preprocess`.

Orthanc runs inside a private network namespace with only loopback (tests/pacs_orthanc.py,
started with `unshare -n`). Each pulled store must equal a local `pgjax preprocess` of the same
files (those Orthanc accepted), item by item: tables, tokens, values and pixels, vocabulary,
report and manifest. Row order may differ within a series, where it follows file paths.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from pgjax.data import store as st
from pgjax.data.config import PreprocessConfig
from pgjax.data.deid import load_or_create_salt
from pgjax.data.preprocess import preprocess
from pgjax.pacs.credentials import load_auth
from pgjax.pacs.dicomweb import parse_multipart, split_query
from pgjax.pacs.dimse import parse_address
from pgjax.pacs.source import InstanceRef, PacsError, StudyRef, TransientError

DRIVER = Path(__file__).with_name("pacs_orthanc.py")
sys.path.insert(0, str(DRIVER.parent))
import pacs_orthanc as orthanc  # noqa: E402

# pydicom test files with distinct SOP Instance UIDs: CT, MR, US, NM, SC, SEG, RT dose, in
# native, big-endian, deflated, RLE, JPEG, JPEG-LS and JPEG 2000 encodings; an RT plan and an
# SR are the studies with an unsupported object type (no pixel data).
PYDICOM_FILES = (
    "CT_small.dcm", "MR_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "US1_J2KR.dcm", "OBXXXX1A_rle_2frame.dcm",
    "ExplVR_BigEnd.dcm", "image_dfl.dcm", "rtdose.dcm", "liver_1frame.dcm",
    "SC_rgb_small_odd.dcm", "693_J2KI.dcm", "rtplan.dcm", "test-SR.dcm",
)  # fmt: skip
UNSUPPORTED = ("rtplan.dcm", "test-SR.dcm")
SITE = "fixed:pacs"
WEB = f"http://127.0.0.1:{orthanc.HTTP_PORT}/dicom-web"
DIMSE = f"{orthanc.AET}@127.0.0.1:{orthanc.DICOM_PORT}"
CREDS = {"PGJAX_PACS_USER": orthanc.USER, "PGJAX_PACS_PASSWORD": orthanc.PASSWORD}


def _why_no_orthanc() -> str | None:
    if not Path(orthanc.ORTHANC).exists():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb orthanc-gdcm)"
    if not Path(orthanc.PLUGINS, "libOrthancDicomWeb.so").exists():
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip missing: cannot make a private network namespace for Orthanc"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        return "cannot make a private network namespace (unshare -n needs root or user namespaces)"
    return None


NO_ORTHANC = _why_no_orthanc()
needs_orthanc = pytest.mark.skipif(NO_ORTHANC is not None, reason=NO_ORTHANC or "")


# ---------------------------------------------------------------------------------------------
# Units without a PACS.


def test_multipart_parts_are_split_on_the_boundary():
    body = (
        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nAB\r\n--XyZ\r\nCD--\r\n"
        b"Content-Type: application/dicom\r\n\r\nEF\r\n--XyZ--\r\n"
    )
    ctype = 'multipart/related; type="application/dicom"; boundary=XyZ'
    assert parse_multipart(ctype, body) == [b"AB", b"EF"]


def test_query_splits_into_study_and_series_filters():
    study, series = split_query({"StudyDate": "20240101-20240131", "Modality": "CT"})
    assert study == {"StudyDate": "20240101-20240131", "ModalitiesInStudy": "CT"}
    assert series == {"Modality": "CT"}


def test_addresses_and_credentials_are_checked(tmp_path):
    assert parse_address("ORTHANC@pacs.local:4242") == ("ORTHANC", "pacs.local", 4242)
    with pytest.raises(ValueError, match="AET@HOST:PORT"):
        parse_address("pacs.local:4242")
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"user": "u", "password": "p"}))
    creds.chmod(0o644)
    with pytest.raises(ValueError, match="readable by other users"):
        load_auth(creds)
    creds.chmod(0o600)
    assert load_auth(creds).username == "u"
    assert "s3cr3t" not in repr(load_auth(environ={"PGJAX_PACS_TOKEN": "s3cr3t"}))
    assert load_auth(environ={}) is None


def test_credentials_in_the_url_are_refused():
    from pgjax.pacs.dicomweb import DicomwebSource

    with pytest.raises(ValueError, match="credentials in the URL"):
        DicomwebSource("https://user:secret@pacs/dicom-web")


class FolderSource:
    """A PACS stand-in serving files from disk, for the pull's logic without a network."""

    kind, name, retries, backoff_s = "folder", "folder", 0, 0.0

    def __init__(self, files, fail=None):
        self.path, self.fail = {}, fail or {}  # fail: SOP Instance UID -> exception
        self.studies = {}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            ref = InstanceRef(
                str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            )
            self.path[ref.sop] = f
            self.studies.setdefault(ref.study, []).append(ref)
        self.fetched = []

    def check(self):
        pass

    def find(self, query):
        return [StudyRef(uid, refs) for uid, refs in sorted(self.studies.items())]

    def retrieve_study(self, study, wanted, sink):
        failed = 0
        for ref in wanted:
            if ref.sop in self.fail:
                if isinstance(self.fail[ref.sop], TransientError):
                    raise self.fail[ref.sop]
                failed += 1
                continue
            self.fetched.append(ref.sop)
            sink(ref.sop, Path(self.path[ref.sop]).read_bytes())
        return f"{failed} instance(s): the server cannot send it" if failed else None


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """pydicom files (one per study) and a synthetic CT series split in two halves."""
    from pgjax.synth.corpus import write_corpus

    root = tmp_path_factory.mktemp("pull_logic")
    write_corpus(
        root / "synth", studies=2, radiograph_size=32, ct_size=32, ct_slices=(10, 10),
        modality_mix=(0.0, 1.0, 0.0, 0.0),
    )  # fmt: skip
    synth = sorted(str(p) for p in (root / "synth" / "dicom").rglob("*.dcm"))
    files = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small_RLE.dcm", "rtplan.dcm")]
    salt_file = root / "salt"
    load_or_create_salt(salt_file)
    return {"root": root, "files": files + synth, "synth": synth, "salt_file": salt_file}


def _pull(source, store, salt_file):
    from pgjax.pacs.pull import pull

    return pull(
        source, {}, store, cfg=PreprocessConfig(site_from=SITE), salt_file=salt_file,
        log=lambda *a: None,
    )  # fmt: skip


def test_pull_logic_appends_and_resumes_without_a_pacs(small_corpus, tmp_path):
    files, salt = small_corpus["files"], small_corpus["salt_file"]
    half = small_corpus["synth"][:5]  # half of the first CT series: too few for a volume
    first = files[:2] + half
    store = tmp_path / "store"
    # A transient failure: nothing is built, what arrived stays staged for the rerun.
    ct_sop = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    sick = FolderSource(first, fail={ct_sop: TransientError("folder: busy")})
    result = _pull(sick, store, salt)
    assert result.incomplete and len(result.failed) == 1 and "busy" in result.failed[0][1]
    assert not (store / "manifest.json").exists()
    healthy = FolderSource(first)
    result = _pull(healthy, store, salt)
    assert not result.incomplete and len(healthy.fetched) == 1  # only what was missing
    # The rest arrives: an append, fetching the new instances and the half series again.
    everything = FolderSource(files)
    result = _pull(everything, store, salt)
    assert sorted(everything.fetched) == sorted(
        sop for sop, f in everything.path.items() if f not in files[:2]
    )
    local = tmp_path / "local"
    preprocess(files, local, cfg=PreprocessConfig(site_from=SITE), salt_file=salt)
    assert_same_store(store, local)
    assert _pull(FolderSource(files), store, salt).up_to_date


def test_an_append_killed_while_preprocessing_resumes(small_corpus, tmp_path, monkeypatch):
    import pgjax.pacs.pull as pull_module

    files, salt = small_corpus["files"], small_corpus["salt_file"]
    store = tmp_path / "store"
    _pull(FolderSource(files[:4]), store, salt)
    real = pull_module.preprocess

    def killed_after_plan(*args, **kwargs):  # the store half made, the earlier one set aside
        real(*args, **{**kwargs, "phases": ("scan", "plan")})
        raise KeyboardInterrupt

    monkeypatch.setattr(pull_module, "preprocess", killed_after_plan)
    with pytest.raises(KeyboardInterrupt):
        _pull(FolderSource(files), store, salt)
    assert (tmp_path / "store.private" / "pull" / "previous" / "store").exists()
    monkeypatch.setattr(pull_module, "preprocess", real)
    resumed = FolderSource(files)
    _pull(resumed, store, salt)
    assert resumed.fetched == []  # everything was staged before the kill
    local = tmp_path / "local"
    preprocess(files, local, cfg=PreprocessConfig(site_from=SITE), salt_file=salt)
    assert_same_store(store, local)


def test_an_undeliverable_instance_is_listed_and_not_asked_for_again(small_corpus, tmp_path):
    files, salt = small_corpus["files"], small_corpus["salt_file"]
    bad_sop = str(pydicom.dcmread(files[1], stop_before_pixels=True).SOPInstanceUID)
    source = FolderSource(files, fail={bad_sop: PacsError("HTTP 406")})
    result = _pull(source, tmp_path / "store", salt)
    assert len(result.failed) == 1 and "1 of 1 instances not received" in result.failed[0][1]
    failed_csv = st.read_csv_columns(tmp_path / "store.private" / "pull" / "failed.csv")
    assert list(failed_csv["study_uid"]) == [
        str(pydicom.dcmread(files[1], stop_before_pixels=True).StudyInstanceUID)
    ]
    manifest = st.read_manifest(tmp_path / "store")
    assert manifest["counts"]["files"] == len(files) - 1
    again = FolderSource(files, fail={bad_sop: PacsError("HTTP 406")})
    assert _pull(again, tmp_path / "store", salt).up_to_date and again.fetched == []


# ---------------------------------------------------------------------------------------------
# Against Orthanc.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """pydicom's files and a small synthetic corpus; the salt all stores share."""
    from pgjax.synth.corpus import write_corpus

    root = tmp_path_factory.mktemp("pacs_corpus")
    write_corpus(
        root / "synth", studies=4, radiograph_size=64, ct_size=32, ct_slices=(8, 10),
        mr_size=32, mr_slices=(8, 9), us_size=32, us_frames=3,
        modality_mix=(0.25, 0.25, 0.25, 0.25),
    )  # fmt: skip
    files = [get_testdata_file(n) for n in PYDICOM_FILES]
    files += sorted(str(p) for p in (root / "synth" / "dicom").rglob("*.dcm"))
    salt_file = root / "salt"
    load_or_create_salt(salt_file)
    return {"root": root, "files": files, "salt_file": salt_file}


def run_job(work: Path, steps: list[dict], orthanc_settings: dict | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    job = work / "job.json"
    job.write_text(
        json.dumps({"work": str(work), "steps": steps, "orthanc": orthanc_settings or {}})
    )
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, str(DRIVER), str(job)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    assert "error" not in results, results["error"] + (work / "orthanc.log").read_text()[-3000:]
    results["by_name"] = {s["name"]: s for s in results["steps"]}
    return results


def pull_step(name, source_args, store, salt_file, *, env=None, extra=(), **kw) -> dict:
    args = [*source_args, "--out", str(store), "--salt-file", str(salt_file), "--workers", "1"]
    return {"op": "pull", "name": name, "args": [*args, *extra], "env": env or {}, **kw}


def web(*extra):
    return ["--dicomweb", WEB, *extra]


def dimse(*extra):
    return ["--dimse", DIMSE, "--calling-aet", orthanc.OUR_AET, *extra]


def local_store(corpus, files, out: Path) -> Path:
    """`pgjax preprocess` of the files Orthanc accepted, with the pull's settings and salt."""
    if not (out / "manifest.json").exists():
        preprocess(files, out, cfg=PreprocessConfig(site_from=SITE), salt_file=corpus["salt_file"])
    return out


def store_items(store: Path) -> dict:
    """Everything a store holds, keyed by item identity rather than row number."""
    manifest = json.loads((store / "manifest.json").read_text())
    for k in ("plan_fingerprint", "written_by"):  # the fingerprint covers file paths
        manifest.pop(k)
    out = {"manifest": manifest}
    for name in ("schema.json", "vocab.json", "report.json"):
        out[name] = (store / name).read_text()
    series_of_volume = {}
    for group in ("volumes", "images"):  # volumes first: images refer to them by row
        table = st.read_csv_columns(store / group / "table.csv")
        arrays = {
            name: st.open_array(store / group / name).read().result()
            for name in ("pixels", *st.TOKEN_ARRAYS)
        }
        items = {}
        for i in range(len(table["row"])):
            row = {c: str(v[i]) for c, v in table.items() if c not in ("row", "volume")}
            for name, arr in arrays.items():
                row[name] = hashlib.sha256(arr[i].tobytes()).hexdigest()
            if group == "volumes":
                key = row["series_key"]
                series_of_volume[str(i)] = key
            else:
                key = (row["instance_key"], row["frame"])
                row["volume"] = series_of_volume.get(str(table["volume"][i]), "")
            assert key not in items, f"{group}: {key} twice"
            items[key] = row
        out[group] = items
    return out


def skip_reasons(private: Path) -> Counter:
    return Counter(st.read_csv_columns(private / "skipped.csv")["reason"])


def assert_same_store(pulled: Path, local: Path):
    a, b = store_items(pulled), store_items(local)
    assert a["manifest"] == b["manifest"]
    for key in ("schema.json", "vocab.json", "report.json"):
        assert a[key] == b[key], key
    for group in ("images", "volumes"):
        assert a[group].keys() == b[group].keys(), group
        for key in a[group]:
            assert a[group][key] == b[group][key], (group, key)
    assert skip_reasons(Path(f"{pulled}.private")) == skip_reasons(Path(f"{local}.private"))


@pytest.fixture(scope="module")
def session(corpus):
    """One Orthanc, the corpus loaded, every pull of the default tests."""
    if NO_ORTHANC:
        pytest.skip(NO_ORTHANC)
    work = corpus["root"] / "orthanc"
    salt = corpus["salt_file"]
    bad = {"PGJAX_PACS_USER": orthanc.USER, "PGJAX_PACS_PASSWORD": "wrong-password-x"}
    steps = [
        {"op": "start"},
        {"op": "upload", "files": corpus["files"]},
        pull_step("web", web("--page-size", "5"), work / "web", salt, env=CREDS),
        pull_step("web_again", web(), work / "web", salt, env=CREDS),
        pull_step("web_ct", web("--query", "Modality=CT"), work / "web_ct", salt, env=CREDS),
        pull_step("move", dimse("--retrieve", "move"), work / "move", salt),
        pull_step("bad_password", web(), work / "bad", salt, env=bad),
        pull_step("no_credentials", web(), work / "bad", salt),
        pull_step("wrong_called_aet", ["--dimse", "NOTORTHANC@127.0.0.1:4242"], work / "bad", salt),
        pull_step(
            "unknown_destination",
            ["--dimse", DIMSE, "--calling-aet", "STRANGER", "--retrieve", "move"],
            work / "bad",
            salt,
        ),
        pull_step(
            "unknown_destination_auto",
            ["--dimse", DIMSE, "--calling-aet", "STRANGER"],
            work / "auto",
            salt,
        ),
    ]
    results = run_job(work, steps)
    results["work"] = work
    return results


@pytest.fixture(scope="module")
def local(corpus, session):
    return local_store(corpus, session["accepted"], corpus["root"] / "local")


@needs_orthanc
def test_orthanc_accepted_every_file(corpus, session):
    assert sorted(session["accepted"]) == sorted(corpus["files"])


@needs_orthanc
@pytest.mark.parametrize("name", ["web", "move"])
def test_pull_equals_local_preprocess(session, local, name):
    step = session["by_name"][name]
    assert step["rc"] == 0, step["stderr"]
    store = session["work"] / name
    assert_same_store(store, local)
    # Nothing identifying stays behind: the received files are gone once the store is complete.
    assert not (Path(f"{store}.private") / "pull" / "staging").exists()
    assert "fetch:" in step["stderr"] and "MB/s" in step["stderr"]


@needs_orthanc
def test_unsupported_objects_are_listed_like_local(session, local):
    reasons = skip_reasons(Path(f"{session['work'] / 'web'}.private"))
    no_pixels = sum(n for r, n in reasons.items() if r.startswith("no pixel data"))
    assert no_pixels == len(UNSUPPORTED)
    report = json.loads((session["work"] / "web" / "report.json").read_text())
    assert report["skipped_by_reason"]["no pixel data"] == len(UNSUPPORTED)


@needs_orthanc
def test_second_pull_fetches_nothing(session):
    step = session["by_name"]["web_again"]
    assert step["rc"] == 0, step["stderr"]
    assert "fetched 0 instances" in step["stdout"]
    assert "up to date" in step["stdout"]


@needs_orthanc
def test_query_filters_by_modality(session, corpus):
    step = session["by_name"]["web_ct"]
    assert step["rc"] == 0, step["stderr"]
    table = st.read_csv_columns(session["work"] / "web_ct" / "images" / "table.csv")
    assert set(table["modality"]) == {"CT"}
    ct = {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        for f in session["accepted"]
        if pydicom.dcmread(f, stop_before_pixels=True).get("Modality") == "CT"
    }
    manifest = st.read_manifest(session["work"] / "web_ct")
    assert manifest["counts"]["files"] == len(ct)


@needs_orthanc
@pytest.mark.parametrize("name", ["bad_password", "no_credentials"])
def test_authentication_failure_is_a_clear_error(session, name):
    step = session["by_name"][name]
    assert step["rc"] == 2
    assert "refused the credentials (HTTP 401)" in step["stderr"]
    assert "wrong-password-x" not in step["stdout"] + step["stderr"]
    assert not (session["work"] / "bad" / "manifest.json").exists()


@needs_orthanc
def test_wrong_called_ae_title_is_a_clear_error(session):
    step = session["by_name"]["wrong_called_aet"]
    assert step["rc"] == 2
    assert "Called AE title not recognised" in step["stderr"]


@needs_orthanc
def test_unknown_move_destination_is_a_clear_error_or_falls_back_to_c_get(session, local):
    step = session["by_name"]["unknown_destination"]
    assert step["rc"] == 2
    assert "AE title 'STRANGER'" in step["stderr"], step["stderr"]
    step = session["by_name"]["unknown_destination_auto"]
    assert step["rc"] == 0, step["stderr"]
    assert_same_store(session["work"] / "auto", local)


# ---------------------------------------------------------------------------------------------
# Kill and resume: the pull killed, Orthanc killed mid-pull and restarted.


@pytest.fixture(scope="module")
def interrupted(corpus):
    if NO_ORTHANC:
        pytest.skip(NO_ORTHANC)
    work = corpus["root"] / "orthanc_kill"
    salt = corpus["salt_file"]
    # A delay per staged instance widens the window; few retries make a dead PACS fail fast.
    slow = {**CREDS, "PGJAX_TEST_PULL_DELAY_S": "0.05"}
    fast_fail = ("--retries", "1", "--backoff", "0.1", "--timeout", "5")
    web_args, move_args = web(*fast_fail), dimse("--retrieve", "move", *fast_fail)
    web_stage = f"{work / 'web'}.private/pull/staging"
    move_stage = f"{work / 'move'}.private/pull/staging"
    steps = [
        {"op": "start"},
        {"op": "upload", "files": corpus["files"]},
        pull_step("web_pull_killed", web_args, work / "web", salt, env=slow,
                  kill_pull_at_staged=15, staging=web_stage),
        pull_step("web_orthanc_killed", web_args, work / "web", salt, env=slow,
                  kill_orthanc_at_staged=35, staging=web_stage),
        {"op": "start"},
        pull_step("web_resumed", web_args, work / "web", salt, env=CREDS, staging=web_stage),
        pull_step("move_orthanc_killed", move_args, work / "move", salt, env=slow,
                  kill_orthanc_at_staged=20, staging=move_stage),
        {"op": "start"},
        pull_step("move_resumed", move_args, work / "move", salt, staging=move_stage),
    ]  # fmt: skip
    results = run_job(work, steps)
    results["work"] = work
    return results


def identifiers(files) -> set[str]:
    """UIDs, names and IDs of the files: none may appear in what a pull prints."""
    out = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
            if str(ds.get(k, "") or "").strip():
                out.add(str(ds.get(k)).strip())
        name = str(ds.get("PatientName", "") or "").strip()
        out.update(p for p in name.split("^") if len(p) >= 4)
    return out


@needs_orthanc
@pytest.mark.parametrize("fixture", ["session", "interrupted"])
def test_no_identifier_in_pull_output(request, fixture):
    results = request.getfixturevalue(fixture)
    ids = identifiers(results["accepted"])
    for step in results["steps"]:
        text = step["stdout"] + step["stderr"]
        leaked = sorted(i for i in ids if i in text)
        assert not leaked, (step["name"], leaked[:3])


def _fetched(step) -> tuple[int, int]:
    """(fetched, already here) from a pull's summary line."""
    words = step["stdout"].split("fetched ", 1)[1].split()
    return int(words[0]), int(step["stdout"].split(" were already here")[0].split()[-1])


@needs_orthanc
@pytest.mark.parametrize("path", ["web", "move"])
def test_pull_resumes_after_kills_without_duplicates(interrupted, corpus, path):
    by = interrupted["by_name"]
    n = len(interrupted["accepted"])
    killed = [by["web_pull_killed"], by["web_orthanc_killed"]] if path == "web" else []
    killed.append(by[f"{path}_orthanc_killed"]) if path == "move" else None
    for step in killed:
        assert 0 < step["staged_at_kill"] < n, step
        assert step["staged_after"] < n, step  # the pull did not finish
    assert by["web_pull_killed"]["rc"] == -9
    orthanc_killed = by[f"{path}_orthanc_killed"]
    assert orthanc_killed["rc"] == 1, orthanc_killed["stderr"]
    assert "rerun to resume" in orthanc_killed["stderr"]
    resumed = by[f"{path}_resumed"]
    assert resumed["rc"] == 0, resumed["stderr"]
    fetched, already = _fetched(resumed)
    # Every instance staged before is reused, and only the rest is fetched: no duplicates.
    assert already == orthanc_killed["staged_after"] and fetched + already == n
    local = local_store(corpus, interrupted["accepted"], corpus["root"] / "local")
    assert_same_store(interrupted["work"] / path, local)


# ---------------------------------------------------------------------------------------------
# Into an existing store: a second pull adds the studies (and slices) the PACS gained.


@pytest.fixture(scope="module")
def appended(corpus):
    if NO_ORTHANC:
        pytest.skip(NO_ORTHANC)
    work = corpus["root"] / "orthanc_append"
    salt = corpus["salt_file"]
    files = corpus["files"]
    # The first batch holds half of one CT series (too few slices for a volume), the second
    # batch the rest of it: the series grows, its volume must be made, and the earlier
    # store's other rows are reused.
    ct = sorted(
        f
        for f in files
        if "/synth/" in f and pydicom.dcmread(f, stop_before_pixels=True).Modality == "CT"
    )
    first = files[:8] + ct[: len(ct) // 2]
    second = [f for f in files if f not in first]
    steps = [
        {"op": "start"},
        {"op": "upload", "files": first},
        pull_step("web_first", web(), work / "web", salt, env=CREDS),
        pull_step("move_first", dimse(), work / "move", salt),
        {"op": "upload", "files": second},
        pull_step("web_append", web(), work / "web", salt, env=CREDS),
        pull_step("move_append", dimse(), work / "move", salt),
        pull_step("web_again", web(), work / "web", salt, env=CREDS),
    ]
    results = run_job(work, steps)
    results["work"], results["first"], results["ct"] = work, first, ct
    return results


@pytest.mark.slow  # ~20 s; the append logic runs in the default suite without Orthanc
@needs_orthanc
@pytest.mark.parametrize("path", ["web", "move"])
def test_pull_appends_to_an_existing_store(appended, corpus, path):
    by = appended["by_name"]
    first, append = by[f"{path}_first"], by[f"{path}_append"]
    assert first["rc"] == 0 and append["rc"] == 0, first["stderr"] + append["stderr"]
    accepted = appended["accepted"]
    series = {
        f: str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in accepted
    }
    earlier = [f for f in accepted if f in appended["first"]]
    grown = {series[f] for f in accepted if f not in earlier} & {series[f] for f in earlier}
    assert series[appended["ct"][0]] in grown
    refetched = [f for f in earlier if series[f] in grown]
    n_all = len(accepted)
    # Only the new instances are fetched, plus the earlier instances of the series that grew.
    assert _fetched(append) == (
        n_all - len(earlier) + len(refetched),
        len(earlier) - len(refetched),
    )
    local = local_store(corpus, appended["accepted"], corpus["root"] / "local")
    assert_same_store(appended["work"] / path, local)
    private = Path(f"{appended['work'] / path}.private")
    assert not (private / "pull" / "previous").exists()
    assert not (private / "pull" / "staging").exists()
    if path == "web":
        assert _fetched(by["web_again"]) == (0, n_all)


# ---------------------------------------------------------------------------------------------
# TLS, a date range, and a study the PACS cannot send to us (a SOP class our SCP refuses).


def _copy_ct(src_dir: Path, name: str, patient: str, sop_class: str | None = None) -> str:
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if sop_class:  # a private SOP class: no standard Storage SCP accepts it
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    path = src_dir / name
    ds.save_as(path)
    return str(path)


@pytest.fixture(scope="module")
def extras(corpus):
    if NO_ORTHANC:
        pytest.skip(NO_ORTHANC)
    if shutil.which("openssl") is None:
        pytest.skip("openssl missing: cannot make a test certificate")
    work = corpus["root"] / "orthanc_extras"
    work.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(work / "key.pem"), "-out", str(work / "cert.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    private = [
        _copy_ct(work, "private_class.dcm", "PGJAXPRIVATE", "1.2.826.0.1.3680043.8.498.99"),
        _copy_ct(work, "ordinary.dcm", "PGJAXPRIVATE"),
    ]
    salt = corpus["salt_file"]
    https = "https://127.0.0.1:8443/dicom-web"
    dates = ("--query", "StudyDate=20150101-20191231")
    steps = [
        {"op": "start"},
        {"op": "upload", "files": corpus["files"] + private},
        {"op": "tls_proxy", "cert": str(work / "cert.pem"), "key": str(work / "key.pem"),
         "port": 8443},
        pull_step("tls", ["--dicomweb", https, "--ca-bundle", str(work / "cert.pem"), *dates],
                  work / "tls", salt, env=CREDS),
        pull_step("tls_unverified", ["--dicomweb", https], work / "bad", salt, env=CREDS),
        pull_step("private_class", dimse("--retrieve", "move", "--query", "PatientID=PGJAXPRIVATE"),
                  work / "private", salt),
    ]  # fmt: skip
    results = run_job(work, steps)
    results["work"], results["private"] = work, private
    return results


@pytest.mark.slow
@needs_orthanc
def test_dicomweb_over_tls_with_a_date_range(extras):
    by = extras["by_name"]
    assert by["tls"]["rc"] == 0, by["tls"]["stderr"]
    in_range = [
        f
        for f in extras["accepted"]
        if "20150101"
        <= str(pydicom.dcmread(f, stop_before_pixels=True).get("StudyDate", ""))
        <= "20191231"
    ]
    assert in_range and len(in_range) < len(extras["accepted"])
    assert st.read_manifest(extras["work"] / "tls")["counts"]["files"] == len(in_range)
    assert by["tls_unverified"]["rc"] == 2
    assert "TLS verification failed" in by["tls_unverified"]["stderr"]


@pytest.mark.slow
@needs_orthanc
def test_a_study_the_pacs_cannot_send_is_listed_and_the_rest_stored(extras):
    step = extras["by_name"]["private_class"]
    assert step["rc"] == 0, step["stderr"]
    # Orthanc refuses the whole move of a study holding a SOP class our SCP does not accept
    # (status 0xC000); other PACS report a failed sub-operation. Either way: listed, the rest kept.
    assert "C-MOVE failed, status 0xC000: the PACS could not process it" in step["stderr"]
    assert st.read_manifest(extras["work"] / "private")["counts"]["files"] == 1
    failed = st.read_csv_columns(Path(f"{extras['work'] / 'private'}.private/pull/failed.csv"))
    uid = str(pydicom.dcmread(extras["private"][0], stop_before_pixels=True).StudyInstanceUID)
    assert list(failed["study_uid"]) == [uid]
