"""`pgjax preprocess`: DICOM files to a store, in four resumable phases.

    scan      read every header once (shardable)        -> PRIVATE/scan/
    plan      dedup, volumes, splits, vocabulary, tokens  -> STORE tables+tokens, PRIVATE/plan/
    pixels    decode, normalise, resize by store shard (shardable) -> STORE pixels
    finalize  collect unit results, `ok` column, skip report  -> STORE state "complete"

Running without --phase does all four on this machine with --workers processes. On a cluster,
run `--phase scan --shard I/N` as an array job, then `--phase plan` once, then
`--phase pixels --shard I/N` as another array job, then `--phase finalize` once; the shards of
a phase write disjoint files, so nothing is merged or copied.

Two folders: the STORE (de-identified, shareable) and the PRIVATE work folder (default
STORE.private; holds the salt, file paths and raw header values; keep it with the source data).
Every phase skips work already done, so a killed run restarted with the same command finishes
the job without duplicates; work is committed in whole units by atomic renames.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import heapq
import importlib
import json
import math
import multiprocessing
import os
import queue
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pgjax import __version__
from pgjax.data import store as st
from pgjax.data.config import PreprocessConfig
from pgjax.data.deid import load_or_create_salt
from pgjax.data.earlier import fill_reusing, merge_records
from pgjax.data.protocol import check_schema
from pgjax.data.redaction import words_redactor
from pgjax.data.scan import ScanRecord, file_state, list_files, scan_chunk
from pgjax.data.schema import Schema
from pgjax.data.sites import load_site_names
from pgjax.data.tokenizer import MISSING
from pgjax.progress import Progress

# A scan chunk is one process task and one JSON file: at most 128 files, so a million files
# make a few thousand chunk files; fewer in a small corpus, so that it still makes about
# SCAN_CHUNKS_AT_LEAST chunks for the workers to share (128-file chunks left the 124 files of
# the clinical preset in one chunk: one worker scanned while the other waited).
FILES_PER_SCAN_CHUNK = 128
SCAN_CHUNKS_AT_LEAST = 32


def files_per_scan_chunk(n_files: int) -> int:
    """A function of the file count alone, so every `--shard` of one scan cuts the same chunks."""
    return max(1, min(FILES_PER_SCAN_CHUNK, math.ceil(n_files / SCAN_CHUNKS_AT_LEAST)))


PHASES = ("scan", "plan", "pixels", "finalize")


@dataclasses.dataclass(frozen=True)
class Workspace:
    """Where everything goes. `private` must not be inside `store`."""

    store: Path
    private: Path

    def __post_init__(self):
        store, private = self.store.resolve(), self.private.resolve()
        if private == store or store in private.parents:
            raise ValueError(
                f"the private folder {self.private} is inside the store {self.store}: it holds "
                "the salt and file paths, which must never travel with the store"
            )

    @property
    def scan_dir(self) -> Path:
        return self.private / "scan"

    @property
    def plan_dir(self) -> Path:
        return self.private / "plan"

    @property
    def units_dir(self) -> Path:
        return self.private / "units"


def default_private(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".private")


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard wants I/N (e.g. 3/16), not {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Worker pool. Spawn, never fork: TensorStore aborts a process that forks after importing it.


def _ping() -> bool:
    return True


def _import_modules(modules: Sequence[str], ready) -> None:
    """Pool initializer: import what the units need, then say so."""
    for name in modules:
        importlib.import_module(name)
    ready.put(os.getpid())


# What the units of each phase import: about a second of CPU per process in all (pydicom,
# its pixel handlers, TensorStore), paid once when the pool starts.
WORKER_MODULES = {
    "scan": ("pgjax.data.preprocess",),
    "pixels": ("pgjax.data.preprocess", "pgjax.data.pixel_units", "tensorstore"),
}


class WorkerPool:
    """Spawned worker processes shared by the phases of one run: started on first use (or
    by `get()` up front, so start-up can be timed on its own), started again after a worker
    crash broke it.

    `modules`: imported in every worker before `get()` returns. Otherwise each worker imports
    them inside its first unit, which puts a second of start-up into whichever phase that is
    and makes a phase's time with N workers look like more than its work divided by N.
    """

    def __init__(self, workers: int, modules: Sequence[str] = ()):
        self.workers = workers
        self.modules = tuple(modules)
        self._pool = None

    def get(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            ready = ctx.Queue()
            self._pool = cf.ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_import_modules,
                initargs=(self.modules, ready),
            )  # fmt: skip
            try:  # a pool that cannot start is not a bad file: say so instead of blaming the data
                # One ping per worker: each submit to a pool with no idle worker spawns one.
                for fut in [self._pool.submit(_ping) for _ in range(self.workers)]:
                    fut.result()
                started = 0
                while started < self.workers:  # the pings may all have run in one worker
                    try:
                        ready.get(timeout=0.5)
                        started += 1
                    except queue.Empty:
                        self._pool.submit(_ping).result()  # raises if a worker died starting
            except cf.process.BrokenProcessPool as e:
                self.close()
                raise RuntimeError(
                    "cannot start worker processes (spawn). From a script, put the call under "
                    "`if __name__ == '__main__':`; or use --workers 1"
                ) from e
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def discard(self, executor: cf.ProcessPoolExecutor) -> None:
        """Close `executor` if it is still this pool's (it broke); the next `get()` starts a
        new one. An executor already replaced is left to its replacement."""
        if executor is self._pool:
            self.close()


def _bottom_levels(waits: list[set[int]], cost: list[float]) -> list[float]:
    """Per unit, its cost plus the costliest chain of units waiting on it: at best, the time
    from its start to the end of the run. `waits` must have no cycles."""
    n = len(waits)
    dependents = [[] for _ in range(n)]
    for i, w in enumerate(waits):
        for j in w:
            dependents[j].append(i)
    level = [0.0] * n
    for i in reversed(_topological(waits, dependents)):
        level[i] = cost[i] + max((level[j] for j in dependents[i]), default=0.0)
    return level


def _topological(waits: list[set[int]], dependents: list[list[int]]) -> list[int]:
    left = [len(w) for w in waits]
    order = [i for i, k in enumerate(left) if k == 0]
    for i in order:  # grows while it is walked
        for j in dependents[i]:
            left[j] -= 1
            if left[j] == 0:
                order.append(j)
    if len(order) != len(waits):
        raise ValueError("run_units: `after` has a cycle")
    return order


def run_units(
    fn: Callable,
    units: Sequence,
    args: tuple,
    workers: int,
    progress: Progress,
    pool: WorkerPool | None = None,
    after: Callable | None = None,
    cost: Callable | None = None,
) -> list[tuple[object, str]]:
    """Run fn(unit, *args) for every unit; return (unit, reason) for units that crashed a worker.

    `after(unit)`: the units (of `units`) it must start after; others are taken as done. With
    1 worker units run in the order given, which must already respect `after`.
    `cost(unit)`: its estimated work. Among the units free to start, the one with the costliest
    chain of work ahead of it (its cost plus that of the units waiting on it) starts first, so
    a long unit neither starts last nor holds back its dependents while other workers idle.
    `pool`: the run's workers (default: a pool of `workers` started and closed here).
    A decoder can crash its process on a hostile file (a segfault is not an exception). When
    the pool breaks, the units that were in flight are re-run one by one in their own process,
    so one bad file costs its unit, not the run; the others go on in a new pool.
    """
    units = list(units)
    if workers <= 1:
        for u in units:
            fn(u, *args)
            progress.update()
        return []
    index = {u: i for i, u in enumerate(units)} if after else {}
    waits = [{index[d] for d in after(u) if d in index} if after else set() for u in units]
    level = _bottom_levels(waits, [float(cost(u)) if cost else 0.0 for u in units])
    dependents = [[] for _ in units]
    for i, w in enumerate(waits):
        for j in w:
            dependents[j].append(i)
    left = [len(w) for w in waits]
    free = [(-level[i], i) for i, k in enumerate(left) if k == 0]  # ties keep the order given
    heapq.heapify(free)
    own = pool is None
    pool = pool or WorkerPool(workers)
    suspects, crashed, running = [], [], {}
    # With an order to keep, one unit in flight per worker: one queued in the pool would start
    # in the order submitted, not in the order of the units free when a worker comes free.
    # Without, two per worker, so a worker never waits for the next (short) unit to be sent.
    in_flight = workers if after or cost else 2 * workers
    try:
        while free or running:
            while free and len(running) < in_flight:
                i = heapq.heappop(free)[1]
                executor = pool.get()
                try:
                    running[executor.submit(fn, units[i], *args)] = i, executor
                except cf.process.BrokenProcessPool:  # broke since the last result came in
                    pool.discard(executor)
                    heapq.heappush(free, (-level[i], i))
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                i, executor = running.pop(fut)
                try:
                    fut.result()
                    progress.update()
                except cf.process.BrokenProcessPool:
                    suspects.append(units[i])  # run alone below; its dependents need not wait
                    pool.discard(executor)  # every unit in flight fails with it
                for j in dependents[i]:
                    left[j] -= 1
                    if left[j] == 0:
                        heapq.heappush(free, (-level[j], j))
    finally:
        if own:
            pool.close()
    ctx = multiprocessing.get_context("spawn")
    for u in suspects:
        with cf.ProcessPoolExecutor(1, mp_context=ctx) as alone:
            try:
                alone.submit(fn, u, *args).result()
            except cf.process.BrokenProcessPool:
                crashed.append((u, "worker crashed (hostile or corrupt file)"))
        progress.update()
    return crashed


# ---------------------------------------------------------------------------------------------
# Phase 1: scan.


def _scan_unit(job, schema_json, salt, site_from, site_names, max_pixels, out_dir) -> None:
    chunk, files = job
    schema = Schema.from_json(schema_json)
    records = scan_chunk(files, schema, salt, site_from, site_names, max_pixels)
    records = [r.to_json() for r in records]
    st.write_json_atomic(Path(out_dir) / f"chunk-{chunk:06d}.json", records)


# Bump when the scan's output for the same file changes (redaction, identity, skip rules), so a
# rerun over an earlier private folder scans again instead of reusing records.
SCAN_VERSION = 2


def phase_scan(
    inputs, ws: Workspace, schema: Schema, cfg, salt, *, workers=1, shard=(0, 1),
    site_names=None, pool: WorkerPool | None = None,
):  # fmt: skip
    files = list_files(inputs)
    if not files:
        raise ValueError(f"no files under {', '.join(map(str, inputs))}")
    listing = [(r, p, *file_state(p)) for r, p in files]
    per_chunk = files_per_scan_chunk(len(files))
    # The chunk size is part of the digest: chunk files of another size are other files' records.
    # So is SCAN_VERSION: records of an older scan hold what its redaction let through.
    digest = _digest(
        [listing, schema.to_json(), cfg.site_from, sorted((site_names or {}).items()),
         cfg.max_pixels, per_chunk, SCAN_VERSION]
    )  # fmt: skip
    listing_path = ws.scan_dir / "listing.json"
    if listing_path.exists() and json.loads(listing_path.read_text()).get("digest") != digest:
        # Inputs or settings changed: earlier chunks describe other files. Start over.
        shutil.rmtree(ws.scan_dir)
    n_chunks = (len(files) + per_chunk - 1) // per_chunk
    st.write_json_atomic(listing_path, {"digest": digest, "files": len(files), "chunks": n_chunks})
    todo = [
        c
        for c in range(shard[0], n_chunks, shard[1])
        if not (ws.scan_dir / f"chunk-{c:06d}.json").exists()
    ]
    progress = Progress(len(todo), "scan", "chunks")
    jobs = [(c, files[c * per_chunk : (c + 1) * per_chunk]) for c in todo]
    args = (schema.to_json(), salt, cfg.site_from, site_names, cfg.max_pixels, str(ws.scan_dir))
    # A crash in header parsing is as possible as in decoding: the chunk's files are listed.
    for (c, chunk_files), reason in run_units(_scan_unit, jobs, args, workers, progress, pool=pool):
        records = [ScanRecord(path=p, reason=reason).to_json() for _, p in chunk_files]
        st.write_json_atomic(ws.scan_dir / f"chunk-{c:06d}.json", records)


def load_scan(ws: Workspace, earlier: Path | None = None) -> list[ScanRecord]:
    meta_path = ws.scan_dir / "listing.json"
    if not meta_path.exists():
        raise ValueError(f"{ws.private}: no scan found; run `--phase scan` first")
    meta = json.loads(meta_path.read_text())
    missing = [
        c for c in range(meta["chunks"]) if not (ws.scan_dir / f"chunk-{c:06d}.json").exists()
    ]
    if missing:
        raise ValueError(
            f"scan incomplete: {len(missing)} of {meta['chunks']} chunks missing "
            f"(first: {missing[0]}); run the remaining `--phase scan --shard I/N` jobs"
        )
    records = []
    for c in range(meta["chunks"]):
        chunk = json.loads((ws.scan_dir / f"chunk-{c:06d}.json").read_text())
        records.extend(ScanRecord.from_json(r) for r in chunk)
    return merge_records(records, earlier)


# ---------------------------------------------------------------------------------------------
# Phase 2: plan. Writes every store file except pixels and the final `ok` column.


def _unit_ranges(n: int, per_unit: int) -> list[tuple[int, int]]:
    return [(s, min(s + per_unit, n)) for s in range(0, n, per_unit)]


def phase_plan(
    ws: Workspace,
    schema: Schema,
    cfg: PreprocessConfig,
    salt,
    *,
    labels=None,
    compression="zstd",
    overwrite=False,
    earlier: Path | None = None,
    redact_words: Sequence[str] = (),
) -> dict:
    from pgjax.data.plan import build_plan, read_labels

    records = load_scan(ws, earlier)
    if redact_words:
        # The user's names go before anything is counted or encoded; the scan records (and
        # so the fingerprint below) hold the redacted values, so another word list replans.
        redactor = words_redactor(redact_words)
        for r in records:
            if r.ok:
                r.protocol = redactor.redact(r.protocol, schema)
                r.manufacturer = r.protocol.get("Manufacturer")
    label_map = read_labels(labels, salt) if labels else {}
    fingerprint = _digest(
        [
            [r.to_json() for r in records],
            cfg.to_json(),
            schema.to_json(),
            sorted(label_map.items()),
            compression,
        ]
    )
    manifest_path = ws.store / "manifest.json"
    if manifest_path.exists():
        old = st.read_manifest(ws.store)
        if old.get("plan_fingerprint") == fingerprint:
            return old  # same inputs, same settings: the plan on disk is this plan
        if not overwrite:
            raise ValueError(
                f"{ws.store} was made from other inputs or settings; pass --overwrite to "
                "rebuild it, or write to a new store"
            )
    plan = build_plan(records, cfg, schema, label_map)
    if ws.store.exists():
        shutil.rmtree(ws.store)
    for d in (ws.plan_dir, ws.units_dir):
        if d.exists():
            shutil.rmtree(d)
    ws.store.mkdir(parents=True)

    st.write_json_atomic(ws.store / "schema.json", schema.to_json())
    plan.vocab.save(ws.store / "vocab.json")
    groups = {
        "images": [(it.record, [it.frame]) for it in plan.images],
        "volumes": [(v.records[0], None) for v in plan.volumes],
    }
    shapes = {
        "images": list(cfg.image_size),
        "volumes": list(cfg.volume_shape),
    }
    per_shard = {"images": cfg.images_per_shard, "volumes": cfg.volumes_per_shard}
    arrays, units = {}, {}
    for group, rows in groups.items():
        n = len(rows)
        root = ws.store / group
        root.mkdir()
        st.create_array(
            root / "pixels",
            [n, *shapes[group]],
            cfg.dtype,
            rows_per_shard=per_shard[group],
            compression=compression,
        )
        protocols = [records[i].protocol for i, _ in rows]
        encoded = plan.vocab.encode_many(protocols) if rows else None
        vendor = _vendors(plan.vocab, schema, encoded[0] if rows else None)
        for k, (name, dtype) in enumerate(st.TOKEN_ARRAYS.items()):
            arr = st.create_array(
                root / name,
                [n, len(schema.fields)],
                dtype,
                rows_per_shard=st.TOKEN_ROWS_PER_CHUNK,
                compression=compression,
            )
            if n:
                arr.write(np.asarray(encoded[k], dtype=dtype)).result()
        st.write_csv_atomic(root / "table.csv", _table(group, plan, records, rows, vendor))
        arrays[f"{group}/pixels"] = {"shape": [n, *shapes[group]], "dtype": cfg.dtype}
        for name, dtype in st.TOKEN_ARRAYS.items():
            arrays[f"{group}/{name}"] = {"shape": [n, len(schema.fields)], "dtype": dtype}
        units[group] = _unit_ranges(n, per_shard[group])
    handover = _slice_handover(plan, units["images"])
    for group in groups:
        _write_unit_plans(ws, group, plan, records, units[group], handover, per_shard["volumes"])
    st.write_json_atomic(
        ws.plan_dir / "schedule.json", _schedule(plan, records, units, handover, cfg)
    )

    st.write_json_atomic(ws.plan_dir / "skipped.json", plan.skipped)
    manifest = {
        "format": st.STORE_FORMAT,
        "version": st.STORE_VERSION,
        "state": "planned",
        "written_by": f"pgjax {__version__}",
        "plan_fingerprint": fingerprint,
        "config": cfg.to_json(),
        "compression": compression,
        "schema_version": schema.version,
        "schema_sha256": hashlib.sha256((ws.store / "schema.json").read_bytes()).hexdigest(),
        "vocab_sha256": hashlib.sha256((ws.store / "vocab.json").read_bytes()).hexdigest(),
        "vocab_size": plan.vocab.size,
        "fields": schema.keywords,
        "redact_words": len(redact_words),  # how many, never which: they are names
        "arrays": arrays,
        "units": {g: len(u) for g, u in units.items()},
        "counts": {
            "files": len(records),
            "images": len(plan.images),
            "volumes": len(plan.volumes),
        },
    }
    st.write_json_atomic(manifest_path, manifest)
    return manifest


def _table(group: str, plan, records, rows, vendor) -> dict[str, list]:
    cols = defaultdict(list)
    for row, (i, _) in enumerate(rows):
        r = records[i]
        cols["row"].append(row)
        cols["ok"].append("")  # filled by finalize
        cols["site"].append(r.site)
        cols["vendor"].append(vendor[row])
        cols["modality"].append(r.modality)
        cols["patient_key"].append(r.patient_key)
        cols["study_key"].append(r.study_key)
        cols["series_key"].append(r.series_key)
        if group == "images":
            item = plan.images[row]
            cols["instance_key"].append(r.instance_key)
            cols["frame"].append(item.frame)
            cols["slice_index"].append(item.slice_index)
            cols["volume"].append(item.volume)
        else:
            cols["n_slices"].append(len(plan.volumes[row].records))
        cols["split"].append(str(plan.splits[i]))
        task, label, score = plan.labels.get(r.study_key, ("", "", ""))
        cols["task"].append(task)
        cols["label"].append(label)
        cols["score"].append(score)
    if not rows:  # keep the header of an empty table
        names = [
            "row",
            "ok",
            "site",
            "vendor",
            "modality",
            "patient_key",
            "study_key",
            "series_key",
            "split",
            "task",
            "label",
            "score",
        ]
        return {n: [] for n in names}
    return dict(cols)


def _vendors(vocab, schema: Schema, tokens) -> list[str]:
    """Per row, the manufacturer as the vocabulary knows it ("" missing, "<unk>" unknown)."""
    if tokens is None:
        return []
    if "Manufacturer" not in schema.keywords:
        return [""] * len(tokens)
    names = {}
    for t in np.unique(tokens[:, schema.index("Manufacturer")]):
        _, value = vocab.decode(int(t))
        names[int(t)] = value if t >= len(vocab.specials) else ("" if t == MISSING else "<unk>")
    return [names[int(t)] for t in tokens[:, schema.index("Manufacturer")]]


def _slice_handover(plan, image_ranges) -> dict[int, int]:
    """Image rows that a volume unit makes (see "slice hand-over" below): {image row: volume}.

    An image unit normalises the frames it takes from one file together (one multi-frame
    object: one scale), so the rows of one file in one image unit are handed over as a group
    or not at all: when every one of them is a slice of the same volume, whose unit decodes
    those frames anyway and makes the group the same way.
    """
    out = {}
    for start, stop in image_ranges:
        groups = defaultdict(list)
        for k in range(start, stop):
            groups[plan.images[k].record].append(k)
        for rows in groups.values():
            volumes = {plan.images[k].volume for k in rows}
            if len(volumes) == 1 and min(volumes) >= 0:
                out.update((k, plan.images[k].volume) for k in rows)
    return out


def _frame_pixels(record: ScanRecord, frame: int) -> int:
    geometry = record.geometry[frame] if frame < len(record.geometry) else None
    return geometry["rows"] * geometry["cols"] if geometry else 0


def _schedule(plan, records, units, handover, cfg) -> dict:
    """Per pixel unit, the work it will do (pixels decoded plus pixels made, a stand-in for
    seconds) and, for image units, the volume units whose hand-over files it reads: the pixel
    phase starts the costliest chains first and each image unit after its volume units."""
    image_px, volume_px = math.prod(cfg.image_size), math.prod(cfg.volume_shape)
    cost = {"images": [], "volumes": []}
    after = []
    for start, stop in units["images"]:
        work, made_by = 0, set()
        for k in range(start, stop):
            if k in handover:  # made (and so costed) by the volume unit
                made_by.add(handover[k] // cfg.volumes_per_shard)
            else:
                it = plan.images[k]
                work += _frame_pixels(records[it.record], it.frame) + image_px
        cost["images"].append(work)
        after.append(sorted(made_by))
    handed = Counter(v for v in handover.values())
    for start, stop in units["volumes"]:
        work = 0
        for v in range(start, stop):
            item = plan.volumes[v]
            slices = zip(item.records, item.frames, strict=True)
            work += sum(_frame_pixels(records[i], f) for i, f in slices)
            work += volume_px + handed[v] * image_px
        cost["volumes"].append(work)
    return {"cost": cost, "images_after_volumes": after}


def _write_unit_plans(ws, group, plan, records, ranges, handover, volumes_per_unit):
    """The private per-unit work list: which file and frames fill each row."""
    by_volume = defaultdict(list)
    for k, v in sorted(handover.items()):
        it = plan.images[k]
        by_volume[v].append([k, records[it.record].path, it.frame])
    consumers = defaultdict(set)  # volume unit -> the image units that take rows from it
    for u, (start, stop) in enumerate(ranges if group == "images" else ()):
        for k in range(start, stop):
            if k in handover:
                consumers[handover[k] // volumes_per_unit].add(u)
    for u, (start, stop) in enumerate(ranges):
        extra = {}
        if group == "images":
            rows = [
                {
                    "path": records[it.record].path,
                    "frame": it.frame,
                    "key": records[it.record].instance_key,
                }
                for it in plan.images[start:stop]
            ]
            for k in range(start, stop):
                if k in handover:
                    rows[k - start]["made_by"] = handover[k] // volumes_per_unit
            used = sorted({r["made_by"] for r in rows if "made_by" in r})
            extra = {"slice_consumers": {str(v): sorted(consumers[v]) for v in used}}
        else:
            rows = [
                {
                    "paths": [records[i].path for i in v.records],
                    "frames": v.frames,
                    "plan": v.plan,
                    "key": records[v.records[0]].series_key,
                    "images": by_volume.get(start + j, []),
                }
                for j, v in enumerate(plan.volumes[start:stop])
            ]
        st.write_json_atomic(
            ws.plan_dir / f"{group}-{u:06d}.json",
            {"start": start, "stop": stop, "rows": rows, **extra},
        )


# ---------------------------------------------------------------------------------------------
# Phase 3: pixels. One unit = one shard of one array, written whole.


def _unit_done_path(ws: Workspace, group: str, u: int) -> Path:
    return ws.units_dir / f"{group}-{u:06d}.json"


# Slice hand-over. Most 2D rows of a CT/MR series are slices of its volume, and the volume
# unit reads and decodes every slice anyway: it makes those 2D rows too and leaves them in
# PRIVATE/units/slices-UNIT.npy, and the image unit takes them from there instead of reading
# and decoding the file a second time (a pydicom parse and decode cost about as much as
# everything else done to a small slice). The side file is a cache, not a dependency: an
# image unit makes any row it does not find there itself, by the same code, so the store is
# the same whatever ran where or first (--shard on machines without a shared folder, a unit
# that crashed, a resumed run). Volume units run first for this; finalize removes the files.
# (The alternative, recording pixel offsets in the scan and reading frames with NumPy, would
# still need the header in the pixel phase for normalisation, so it would save the decode
# only, and duplicate pydicom's pixel handling.)


def _slices_path(ws: Workspace, u: int) -> Path:
    return ws.units_dir / f"slices-{u:06d}.npy"


def _save_slices(ws: Workspace, u: int, made: dict[int, np.ndarray]) -> None:
    path = _slices_path(ws, u)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    rows = sorted(made)
    with open(tmp, "wb") as f:  # two plain .npy records (an .npz would checksum every byte)
        np.save(f, np.asarray(rows, dtype=np.int64))
        np.save(f, np.stack([made[r] for r in rows]))
    os.replace(tmp, path)


def _load_slices(ws: Workspace, rows: list[dict], start: int) -> dict[int, np.ndarray]:
    """{row in unit: image} for this image unit's rows that a volume unit has already made."""
    wanted = {start + r: row["made_by"] for r, row in enumerate(rows) if "made_by" in row}
    found = {}
    for u in sorted(set(wanted.values())):
        try:
            with open(_slices_path(ws, u), "rb") as f:
                found.update(zip(np.load(f).tolist(), np.load(f), strict=True))
        except (OSError, ValueError, EOFError):
            continue  # not made (yet, or here): the image unit makes those rows itself
    return {k - start: found[k] for k in wanted if k in found}


def _pixels_unit(job, store, private, cfg_json, earlier=None) -> None:
    group, u = job
    from pgjax.data.pixel_units import fill_image_unit, fill_volume_unit

    ws = Workspace(Path(store), Path(private))
    cfg = PreprocessConfig.from_json(cfg_json)
    work = json.loads((ws.plan_dir / f"{group}-{u:06d}.json").read_text())
    start = work["start"]
    fill = fill_image_unit if group == "images" else fill_volume_unit
    made = {}
    if earlier:  # appending: rows whose files are gone come from the earlier store
        block, failures, facts = fill_reusing(fill, work["rows"], cfg, group, Path(earlier))
    elif group == "volumes":
        block, failures, facts = fill_volume_unit(work["rows"], cfg, made)
    else:
        block, failures, facts = fill_image_unit(
            work["rows"], cfg, _load_slices(ws, work["rows"], start)
        )
    arr = st.open_array(ws.store / group / "pixels", write=True)
    arr[start : work["stop"]].write(block).result()
    if made:
        _save_slices(ws, u, made)
    # Fault injection for the kill-and-resume test: widen the window between the pixel write
    # and the unit's completion marker, the worst moment to be killed.
    time.sleep(float(os.environ.get("PGJAX_TEST_UNIT_DELAY_S", "0")))
    result = {
        "failures": [[start + r, reason] for r, reason in failures],
        "facts": {str(start + r): f for r, f in facts.items()},
    }
    st.write_json_atomic(_unit_done_path(ws, group, u), result)
    _release_slices(ws, work.get("slice_consumers", {}))


def _release_slices(ws: Workspace, consumers: dict[str, list[int]]) -> None:
    """Delete a hand-over file once every image unit that takes rows from it is done, so the
    private folder holds only the files still needed (finalize removes any left over)."""
    for v, image_units in consumers.items():
        if all(_unit_done_path(ws, "images", i).exists() for i in image_units):
            _slices_path(ws, int(v)).unlink(missing_ok=True)


def phase_pixels(
    ws: Workspace, *, workers=1, shard=(0, 1), earlier=None, pool: WorkerPool | None = None
) -> None:
    manifest = st.read_manifest(ws.store)
    cfg = PreprocessConfig.from_json(manifest["config"])
    every = [(g, u) for g in st.GROUPS for u in range(manifest["units"][g])]
    jobs = [
        job
        for k, job in enumerate(every)
        if k % shard[1] == shard[0] and not _unit_done_path(ws, *job).exists()
    ]
    progress = Progress(len(jobs), "pixels", "shards")
    args = (str(ws.store), str(ws.private), cfg.to_json(), str(earlier) if earlier else None)
    # Volume units first: they make most CT/MR 2D rows for the image units (slice hand-over).
    # With workers, an image unit waits only for the volume units it takes rows from.
    jobs.sort(key=lambda job: job[0] != "volumes")
    try:
        schedule = json.loads((ws.plan_dir / "schedule.json").read_text())
        cost = {(g, u): c for g, costs in schedule["cost"].items() for u, c in enumerate(costs)}
        waits = {("images", u): [("volumes", v) for v in vs]
                 for u, vs in enumerate(schedule["images_after_volumes"])}  # fmt: skip
    except FileNotFoundError:  # planned by a version without it: every volume unit first
        cost, volume_jobs = {}, [job for job in jobs if job[0] == "volumes"]
        waits = {job: volume_jobs for job in jobs if job[0] == "images"}
    crashed = run_units(
        _pixels_unit, jobs, args, workers, progress, pool=pool,
        after=lambda job: waits.get(job, ()), cost=lambda job: cost.get(job, 0),
    )  # fmt: skip
    for (g, u), reason in crashed:
        work = json.loads((ws.plan_dir / f"{g}-{u:06d}.json").read_text())
        failures = [[row, reason] for row in range(work["start"], work["stop"])]
        st.write_json_atomic(_unit_done_path(ws, g, u), {"failures": failures, "facts": {}})


# ---------------------------------------------------------------------------------------------
# Phase 4: finalize.


def _category(reason: str) -> str:
    """The part of a reason that is safe in the store: exception text may quote header values."""
    return reason.split(":", 1)[0].strip()


def printable_text(text: str) -> str:
    """`text` as valid UTF-8: the bytes of a file name that is not UTF-8 (which Python carries
    as surrogates) become \\xNN escapes, so the skip list can always be written and read."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an undecodable byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def phase_finalize(ws: Workspace) -> dict:
    manifest = st.read_manifest(ws.store)
    missing = [
        f"{g}-{u}"
        for g in st.GROUPS
        for u in range(manifest["units"][g])
        if not _unit_done_path(ws, g, u).exists()
    ]
    if missing:
        raise ValueError(
            f"{len(missing)} pixel units not done (first: {missing[0]}); run the remaining "
            "`--phase pixels --shard I/N` jobs"
        )
    skipped = [tuple(x) for x in json.loads((ws.plan_dir / "skipped.json").read_text())]
    failed_counts = {}
    for g in st.GROUPS:
        table = st.read_csv_columns(ws.store / g / "table.csv")
        ok = np.ones(len(table["row"]), dtype=np.int64)
        facts_by_row = {}
        for u in range(manifest["units"][g]):
            result = json.loads(_unit_done_path(ws, g, u).read_text())
            work = json.loads((ws.plan_dir / f"{g}-{u:06d}.json").read_text())
            for row, reason in result["failures"]:
                ok[row] = 0
                rel = row - work["start"]
                paths = work["rows"][rel].get("path") or work["rows"][rel]["paths"][0]
                skipped.append((paths, f"{g[:-1]} not decoded: {reason}"))
            facts_by_row.update({int(k): v for k, v in result.get("facts", {}).items()})
        table["ok"] = ok
        for name in sorted({k for f in facts_by_row.values() for k in f}):
            table[name] = [facts_by_row.get(i, {}).get(name, "") for i in range(len(ok))]
        st.write_csv_atomic(ws.store / g / "table.csv", {k: list(v) for k, v in table.items()})
        failed_counts[g] = int((ok == 0).sum())

    skipped.sort()
    st.write_csv_atomic(
        ws.private / "skipped.csv",
        {
            "path": [printable_text(p) for p, _ in skipped],
            "reason": [printable_text(r) for _, r in skipped],
        },
    )
    report = {
        "skipped_by_reason": dict(sorted(Counter(_category(r) for _, r in skipped).items())),
        "skipped_total": len(skipped),
        "failed_items": failed_counts,
    }
    st.write_json_atomic(ws.store / "report.json", report)
    for path in ws.units_dir.glob("slices-*.npy"):  # the slice hand-over is done
        path.unlink()
    manifest["state"] = "complete"
    manifest["counts"].update(
        {f"{g}_ok": manifest["counts"][g] - failed_counts[g] for g in st.GROUPS}
    )
    manifest["counts"]["skipped"] = len(skipped)
    st.write_json_atomic(ws.store / "manifest.json", manifest)
    return {"manifest": manifest, "report": report}


# ---------------------------------------------------------------------------------------------


def preprocess(
    inputs: Sequence[str | Path],
    store: str | Path,
    *,
    cfg: PreprocessConfig | None = None,
    schema: Schema | None = None,
    private: str | Path | None = None,
    salt: bytes | None = None,
    salt_file: str | Path | None = None,
    labels: str | Path | None = None,
    workers: int = 1,
    phases: Sequence[str] = PHASES,
    shard: tuple[int, int] = (0, 1),
    compression: str = "zstd",
    overwrite: bool = False,
    earlier: str | Path | None = None,
    site_names: dict[str, str] | str | Path | None = None,
    redact_words: Sequence[str] = (),
    timings: dict[str, float] | None = None,
) -> dict | None:
    """Run the given phases; returns finalize's summary when it ran.

    With workers > 1 the scan and pixel phases share one pool of worker processes.
    `timings`: receives the seconds each phase took, by phase name (for benchmarks), and
    "start": starting the workers and importing what they need, before the first phase.
    `earlier`: append to an earlier run whose source files are gone (see pgjax/data/earlier.py).
    `site_names`: {folder: site name}, or a JSON/CSV file of them (pgjax/data/sites.py), for
    `site_from="dir"`; folders not listed get a salted key. Kept in the private folder only.
    `redact_words`: names or phrases (pgjax/data/redaction.py `read_redact_words`) whose
    categorical values become <REDACTED> before the vocabulary is fitted.
    """
    earlier = Path(earlier) if earlier else None
    cfg = cfg or PreprocessConfig()
    if isinstance(site_names, str | Path):
        site_names = load_site_names(site_names)
    if site_names and cfg.site_from != "dir":
        raise ValueError(f"--site-names maps input folders: it needs --site-from dir, not "
                         f"{cfg.site_from}")  # fmt: skip
    schema = schema or Schema()
    check_schema(schema)  # a schema naming an identifier is refused before any file is read
    store = Path(store)
    ws = Workspace(store, Path(private) if private else default_private(store))
    ws.private.mkdir(parents=True, exist_ok=True)
    if salt is None and ("scan" in phases or "plan" in phases):
        salt = load_or_create_salt(salt_file or ws.private / "salt", forbidden_root=store)
    if shard != (0, 1) and set(phases) - {"scan", "pixels"}:
        raise ValueError("--shard applies to the scan and pixels phases only")
    summary = None
    timings = {} if timings is None else timings
    pool = None
    try:
        if "scan" in phases or "pixels" in phases:
            # Start-up, timed on its own: the worker processes and their imports (with 1
            # worker, the same imports here), a cost per run and process, not per file.
            start = time.perf_counter()
            modules = dict.fromkeys(m for p in phases for m in WORKER_MODULES.get(p, ()))
            if workers > 1:
                pool = WorkerPool(workers, modules)
                pool.get()
            else:
                for name in modules:
                    importlib.import_module(name)
            timings["start"] = time.perf_counter() - start
        if "scan" in phases:
            start = time.perf_counter()
            phase_scan(
                inputs, ws, schema, cfg, salt, workers=workers, shard=shard,
                site_names=site_names, pool=pool,
            )  # fmt: skip
            timings["scan"] = time.perf_counter() - start
        if "plan" in phases:
            start = time.perf_counter()
            phase_plan(
                ws,
                schema,
                cfg,
                salt,
                labels=labels,
                compression=compression,
                overwrite=overwrite,
                earlier=earlier,
                redact_words=tuple(redact_words),
            )
            timings["plan"] = time.perf_counter() - start
        if "pixels" in phases:
            start = time.perf_counter()
            phase_pixels(ws, workers=workers, shard=shard, earlier=earlier, pool=pool)
            timings["pixels"] = time.perf_counter() - start
        if "finalize" in phases:
            start = time.perf_counter()
            summary = phase_finalize(ws)
            timings["finalize"] = time.perf_counter() - start
    finally:
        if pool is not None:
            pool.close()
    return summary
