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
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path

from pgjax.data import store as st
from pgjax.data.config import PreprocessConfig
from pgjax.data.deid import hash_key, load_or_create_salt
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


def _earlier_instance_keys(ws: Workspace) -> set[str]:
    """Keys of the instances a complete store was built from (skipped ones included)."""
    try:
        records = load_scan(ws)
    except ValueError:
        return set()
    return {Path(r.path).stem for r in records}


def _store_state(ws: Workspace) -> dict | None:
    try:
        return st.read_manifest(ws.store)
    except st.StoreError:
        return None


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

    manifest = _store_state(ws)
    complete = manifest is not None and manifest.get("state") == "complete"
    if complete and manifest["config"] != json.loads(json.dumps(cfg.to_json())):
        if not overwrite:
            raise ValueError(
                f"{store} was made with other settings; pass --overwrite to fetch everything "
                "again and rebuild it, or write to a new store"
            )
        complete = False
        shutil.rmtree(ws.scan_dir, ignore_errors=True)
    undeliverable_path = pull_dir / "undeliverable.txt"
    earlier = set()
    if complete:
        earlier = _earlier_instance_keys(ws)
        if undeliverable_path.exists():  # reported when the store was built; not asked again
            earlier |= set(undeliverable_path.read_text().split())

    result = PullResult()
    t0 = time.monotonic()
    source.check()  # bad credentials or AE titles fail here, before any work
    studies = source.find(query)
    result.studies = len(studies)
    result.instances = sum(len(s.instances) for s in studies)
    todo: list[tuple[object, list[InstanceRef]]] = []
    for study in studies:
        wanted = [
            r
            for r in study.instances
            if staging.key(r.sop) not in earlier and not staging.has(r.sop)
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
    if complete and not staged:
        result.up_to_date = True
        return result
    if complete:
        raise ValueError(
            f"{store} is complete and the PACS has {len(staged)} new instances; a pull adds "
            "to a store only while it is being built: pull into a new store (--out), or pass "
            "--overwrite to fetch everything again and rebuild this one"
        )
    if not staged:
        raise ValueError("the search found no instances to store; check --query")
    undelivered = [
        staging.key(r.sop) for _, wanted in todo for r in wanted if not staging.has(r.sop)
    ]
    undeliverable_path.write_text("".join(k + "\n" for k in sorted(undelivered)))
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
        overwrite=overwrite,
    )
    # The store is complete: the received files have done their job. The scan records (private)
    # still name them by key, which is how the next pull knows what it has.
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
    close = getattr(source, "close", None)
    if close:
        close()
    if fatal:
        raise fatal
