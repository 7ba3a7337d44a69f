"""`pgjax pull`: studies from a PACS into a store, through the same phases as `pgjax preprocess`.

    find      search the PACS (QIDO-RS or C-FIND): studies, their series, their instances
    fetch     retrieve the instances not yet here into PRIVATE/pull/staging/, one file per
              instance named by its salted SOP Instance UID key, written atomically
    store     `pgjax preprocess`'s scan, plan, pixels and finalize on the staged files
    clean     the staged files are removed once the store is complete

The staging folder is private (beside the salt, never inside the store): it holds the PACS's
files as received, identifiers and all. Resuming is by file: a killed pull, rerun, skips every
instance already staged or already in the store (the scan records of earlier runs name the
instances by key), then the preprocessing phases skip their own finished work.

Studies fail one at a time: a study whose retrieval failed is listed with its reason (salted
key on screen, UID in the private PRIVATE/pull/failed.csv) while the others continue. When the
PACS was unreachable or busy (after retries with back-off) the store is not built, so that a
rerun can finish the job; refused credentials or AE titles stop the pull at once with what to
fix.

Into an existing store (a later pull that finds new instances): the complete store, its scan
records and skip list are set aside in PRIVATE/pull/previous/, and the new files are
preprocessed with `earlier=` that folder (pgjax/data/earlier.py): one plan over every record,
earlier rows copied from the earlier store. A series that gained instances is fetched whole.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pgjax.data import store as st
from pgjax.data.config import PreprocessConfig
from pgjax.data.deid import hash_key, load_or_create_salt
from pgjax.data.earlier import load_records
from pgjax.data.preprocess import Workspace, default_private, load_scan, preprocess
from pgjax.data.protocol import check_schema
from pgjax.data.schema import Schema
from pgjax.pacs.source import (
    AssociationError,
    AuthError,
    InstanceRef,
    PacsError,
    TransientError,
    with_retries,
)
from pgjax.progress import Progress


@dataclasses.dataclass
class PullResult:
    studies: int = 0  # studies the search found
    instances: int = 0  # their instances
    already: int = 0  # instances in the store or staged before this run
    fetched: int = 0  # instances received in this run
    bytes: int = 0
    seconds: float = 0.0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (study key, why)
    incomplete: bool = False  # a transient failure: the store was not built; rerun
    store_summary: dict | None = None  # finalize's summary when the store was (re)built
    up_to_date: bool = False  # nothing new on the PACS and the store is complete


class Staging:
    """The private folder of received instances; thread-safe, atomic per file."""

    def __init__(self, root: Path, salt: bytes, delay_s: float = 0.0):
        self.root, self.salt, self.delay_s = root, salt, delay_s
        self.bytes = 0
        self.count = 0
        self._lock = threading.Lock()
        self.on_file = None  # progress callback(n_bytes)

    def key(self, sop: str) -> str:
        return hash_key(self.salt, "instance", sop)

    def path(self, sop: str) -> Path:
        return self.root / f"{self.key(sop)}.dcm"

    def has(self, sop: str) -> bool:
        return self.path(sop).exists()

    def files(self) -> list[Path]:
        return sorted(self.root.glob("*.dcm")) if self.root.exists() else []

    def __call__(self, sop: str, data: bytes) -> None:
        if not self.root.exists():  # made on the first instance, for its owner only
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        path = self.path(sop)
        tmp = path.with_name(f".{path.name}.tmp{threading.get_ident()}")  # hidden: never scanned
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        with self._lock:
            self.bytes += len(data)
            self.count += 1
        if self.on_file:
            self.on_file(len(data))
        if self.delay_s:  # test hook: widen the window for kill-and-resume tests
            time.sleep(self.delay_s)


def _known_keys(records) -> set[str]:
    """The instances these scan records came from: staged files are named by key, and a record
    of a file that was not staged (a store made by `pgjax preprocess`) has its key inside."""
    return {r.instance_key for r in records if r.instance_key} | {
        Path(r.path).stem for r in records
    }


def _same_settings(manifest: dict, cfg: PreprocessConfig) -> bool:
    return manifest["config"] == json.loads(json.dumps(cfg.to_json()))


def _set_aside(ws: Workspace, pull_dir: Path, records_path: Path, previous: Path) -> None:
    """Move the complete store, its scan records and skip list to PREVIOUS for an append.

    Built in a temporary folder and renamed: a kill in between leaves either the store where
    it was or PREVIOUS whole (`_recover` undoes a half-made temporary folder)."""
    tmp = pull_dir / "previous.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    records = [r.to_json() for r in load_records_file(records_path, ws)]
    st.write_json_atomic(tmp / "scan.json", records)
    if (ws.private / "skipped.csv").exists():
        shutil.copy2(ws.private / "skipped.csv", tmp / "skipped.csv")
    os.replace(ws.store, tmp / "store")
    os.replace(tmp, previous)
    for d in (ws.scan_dir, ws.plan_dir, ws.units_dir):  # the new run plans afresh
        shutil.rmtree(d, ignore_errors=True)


def _recover(ws: Workspace, pull_dir: Path) -> None:
    tmp = pull_dir / "previous.tmp"
    if tmp.exists():
        if (tmp / "store").exists() and not ws.store.exists():
            os.replace(tmp / "store", ws.store)
        shutil.rmtree(tmp)


def load_records_file(records_path: Path, ws: Workspace):
    """The scan records of every instance in the complete store: the pull's own list, or for a
    store made by `pgjax preprocess`, its scan."""
    from pgjax.data.scan import ScanRecord

    if records_path.exists():
        return [ScanRecord.from_json(r) for r in json.loads(records_path.read_text())]
    try:
        return load_scan(ws)
    except ValueError:
        return []


def _store_state(ws: Workspace) -> dict | None:
    try:
        return st.read_manifest(ws.store)
    except st.StoreError:
        return None


def _what_is_here(ws, cfg, overwrite, records_path: Path, previous: Path):
    """(is the store complete, keys of the instances it or a set-aside earlier store holds)."""
    _recover(ws, previous.parent)
    manifest = _store_state(ws)
    complete = manifest is not None and manifest.get("state") == "complete"
    if previous.exists():
        manifest, complete = st.read_manifest(previous / "store"), False
    if manifest is not None and manifest.get("state") == "complete":
        if not _same_settings(manifest, cfg):
            if not overwrite:
                raise ValueError(
                    f"{ws.store} was made with other settings; pass --overwrite to fetch "
                    "everything again and rebuild it, or write to a new store"
                )
            complete = False
            shutil.rmtree(previous, ignore_errors=True)
            records_path.unlink(missing_ok=True)
            shutil.rmtree(ws.scan_dir, ignore_errors=True)
    if previous.exists():
        return complete, _known_keys(load_records(previous))
    if complete:
        return complete, _known_keys(load_records_file(records_path, ws))
    return complete, set()


def pull(
    source,
    query: dict[str, str],
    store: str | Path,
    *,
    cfg: PreprocessConfig | None = None,
    schema: Schema | None = None,
    private: str | Path | None = None,
    salt_file: str | Path | None = None,
    labels: str | Path | None = None,
    workers: int = 1,
    concurrency: int = 4,
    overwrite: bool = False,
    compression: str = "zstd",
    log=print,
    redact_words: Sequence[str] = (),
) -> PullResult:
    cfg = cfg or PreprocessConfig(site_from="fixed:pacs")
    schema = schema or Schema()
    check_schema(schema)
    if cfg.site_from == "dir":
        raise ValueError(
            "--site-from dir names sites by input folder, which a pull does not have; use "
            "fixed:NAME (default fixed:pacs) or header"
        )
    store = Path(store)
    ws = Workspace(store, Path(private) if private else default_private(store))
    ws.private.mkdir(parents=True, exist_ok=True)
    os.chmod(ws.private, 0o700)
    salt = load_or_create_salt(salt_file or ws.private / "salt", forbidden_root=store)
    pull_dir = ws.private / "pull"
    staging = Staging(
        pull_dir / "staging", salt, float(os.environ.get("PGJAX_TEST_PULL_DELAY_S", "0"))
    )

    records_path = pull_dir / "scan.json"  # every instance of the complete store
    previous = pull_dir / "previous"  # an append under way: the earlier store, set aside
    undeliverable_path = pull_dir / "undeliverable.txt"
    complete, known = _what_is_here(ws, cfg, overwrite, records_path, previous)
    if known and undeliverable_path.exists():  # reported when the store was built
        known |= set(undeliverable_path.read_text().split())
    if complete:  # files left by a run killed after its store was complete
        for path in staging.files():
            if path.stem in known:
                path.unlink()

    result = PullResult()
    t0 = time.monotonic()
    source.check()  # bad credentials or AE titles fail here, before any work
    studies = source.find(query)
    result.studies = len(studies)
    result.instances = sum(len(s.instances) for s in studies)
    todo: list[tuple[object, list[InstanceRef]]] = []
    for study in studies:
        new = {r.sop for r in study.instances if staging.key(r.sop) not in known}
        # A series that gains instances is fetched whole: its volume must be made again.
        grown = {r.series for r in study.instances if r.sop in new}
        wanted = [
            r
            for r in study.instances
            if (r.sop in new or r.series in grown) and not staging.has(r.sop)
        ]
        result.already += len(study.instances) - len(wanted)
        if wanted:
            todo.append((study, wanted))
    n_fetch = sum(len(w) for _, w in todo)
    log(
        f"pull from {source.name}: {result.studies} studies, {result.instances} instances; "
        f"{result.already} already here, {n_fetch} to fetch in {len(todo)} studies"
    )

    failed_uids: list[tuple[str, str]] = []
    if todo:
        _fetch(source, todo, staging, concurrency, result, failed_uids)
    result.fetched, result.bytes = staging.count, staging.bytes
    result.seconds = time.monotonic() - t0
    st.write_csv_atomic(
        pull_dir / "failed.csv",
        {"study_uid": [u for u, _ in failed_uids], "reason": [r for _, r in failed_uids]},
    )
    result.failed = [(hash_key(salt, "study", u), why) for u, why in failed_uids]
    if result.incomplete:
        return result

    staged = staging.files()
    if not staged and not previous.exists():
        if complete:
            result.up_to_date = True
            return result
        raise ValueError("the search found no instances to store; check --query")
    undelivered = [
        staging.key(r.sop) for _, wanted in todo for r in wanted if not staging.has(r.sop)
    ]
    old_undelivered = undeliverable_path.read_text().split() if known else []
    undeliverable_path.write_text(
        "".join(k + "\n" for k in sorted(set(undelivered) | set(old_undelivered)))
    )
    if complete:  # append: the earlier store is set aside and its rows reused
        _set_aside(ws, pull_dir, records_path, previous)
    earlier = previous if previous.exists() else None
    result.store_summary = preprocess(
        [staging.root],
        store,
        cfg=cfg,
        schema=schema,
        private=ws.private,
        salt=salt,
        labels=labels,
        workers=workers,
        compression=compression,
        redact_words=redact_words,
        overwrite=overwrite,
        earlier=earlier,
    )
    # The store is complete: the received files have done their job. The scan records (private)
    # name every instance by key, which is how the next pull knows what it has. In this order,
    # a kill at any point leaves a state the next pull finishes correctly.
    records = [r.to_json() for r in load_scan(ws, earlier)]
    if earlier:
        shutil.rmtree(earlier)
    st.write_json_atomic(records_path, records)
    shutil.rmtree(staging.root)
    return result


def _fetch(source, todo, staging: Staging, concurrency: int, result: PullResult, failed_uids):
    total = sum(len(w) for _, w in todo)
    progress = Progress(total, "fetch", "instances")
    studies_done = [0]
    t0 = time.monotonic()
    lock = threading.Lock()

    def extra() -> str:
        rate = staging.bytes / max(time.monotonic() - t0, 1e-9) / 1e6
        done = studies_done[0]
        return f"studies {done}/{len(todo)} ({len(todo) - done} left) {rate:.2f} MB/s"

    def on_file(_n):
        with lock:
            progress.update(1, extra())

    staging.on_file = on_file

    def one(study, wanted):
        # A study interrupted by a transient error (a C-MOVE aborted midway) is tried once more
        # for what it still lacks; single requests and associations have their own retries.
        note = with_retries(
            lambda: source.retrieve_study(
                study, [r for r in wanted if not staging.has(r.sop)], staging
            ),
            retries=1,
            backoff_s=source.backoff_s,
            what="retrieve",
        )
        missing = [r for r in wanted if not staging.has(r.sop)]
        if missing:
            why = note or "the PACS did not deliver them"
            return f"{len(missing)} of {len(wanted)} instances not received: {why}"
        return None

    fatal = None
    with cf.ThreadPoolExecutor(max(1, concurrency)) as pool:
        futures = {pool.submit(one, s, w): s for s, w in todo}
        for fut in cf.as_completed(futures):
            study = futures[fut]
            if fut.cancelled():  # after a fatal error
                continue
            try:
                why = fut.result()
            except (AuthError, AssociationError) as e:
                fatal = fatal or e  # the same for every study: stop asking
                for f in futures:
                    f.cancel()
                continue
            except TransientError as e:
                result.incomplete = True
                why = f"{e}; rerun the pull to resume"
            except PacsError as e:
                why = str(e)
            except OSError as e:  # the staging disk: full, say
                result.incomplete = True
                why = f"could not stage: {e.strerror or e}"
            with lock:
                studies_done[0] += 1
                if why:
                    failed_uids.append((study.uid, why))
    if total:  # the last line, with every study counted
        progress.update(0, extra())
    close = getattr(source, "close", None)
    if close:
        close()
    if fatal:
        raise fatal
