"""Phase 2 of preprocessing: from scan records to the store's rows, splits and tokens.

Pure functions over scan records: which files are duplicates, which series become volumes,
which slices and frames become 2D items, each item's split and tokens, and the row order.
Nothing here reads pixels or writes files (preprocess.py does), so the rules can be read and
tested on their own.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pgjax.data.config import PreprocessConfig
from pgjax.data.deid import hash_key
from pgjax.data.pixels import FrameGeometry
from pgjax.data.scan import ScanRecord
from pgjax.data.schema import Schema
from pgjax.data.splits import assign_splits
from pgjax.data.tokenizer import Vocabulary
from pgjax.data.volumes import InconsistentSeries, plan_volume

VOLUME_MODALITIES = ("CT", "MR")


@dataclasses.dataclass
class ImageItem:
    record: int  # index into the records list
    frame: int
    slice_index: int = -1  # position order within its series, -1 when it has none
    volume: int = -1  # the volume row holding this slice, -1 when none


@dataclasses.dataclass
class VolumeItem:
    records: list[int]  # one entry per slice, in slice order (a record repeats per frame)
    frames: list[int]
    plan: dict  # VolumePlan.to_json()


@dataclasses.dataclass
class Plan:
    images: list[ImageItem]
    volumes: list[VolumeItem]
    splits: np.ndarray  # per record
    vocab: Vocabulary
    skipped: list[tuple[str, str]]  # (path, reason): files and series left out
    labels: dict[str, tuple[str, str, str]]  # study_key -> (task, label, score)


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices spread over range(n), centred (k=1 gives the middle); k=0 or k>=n gives all."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def read_labels(path: str | Path, salt: bytes) -> dict[str, tuple[str, str, str]]:
    """labels.csv (study_uid, task, label[, score]) keyed by the salted study key."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"study_uid", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: labels file lacks columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            uid = (row.get("study_uid") or "").strip()
            if not uid:
                raise ValueError(f"{path}:{line}: empty study_uid")
            key = hash_key(salt, "study", uid)
            out[key] = (row.get("task") or "", row.get("label") or "", row.get("score") or "")
    return out


def dedup_instances(records: Sequence[ScanRecord]) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices of usable records, the first file of each SOP Instance UID by path order."""
    keep, skipped, seen = [], [], {}
    for i in sorted(range(len(records)), key=lambda i: records[i].path):
        r = records[i]
        if not r.ok:
            skipped.append((r.path, r.reason))
        elif r.instance_key in seen:
            skipped.append((r.path, "duplicate SOP Instance UID (an earlier file has it)"))
        else:
            seen[r.instance_key] = i
            keep.append(i)
    return keep, skipped


def _series_frames(records, idxs):
    """(record, frame, geometry) for every frame of a series, in instance order."""
    frames = []
    for i in sorted(idxs, key=lambda i: (records[i].instance_number or 0, records[i].path)):
        geoms = records[i].geometry or [None]
        for f, g in enumerate(geoms):
            frames.append((i, f, FrameGeometry.from_json(g) if g else None))
    return frames


def build_plan(
    records: Sequence[ScanRecord],
    cfg: PreprocessConfig,
    schema: Schema,
    labels: dict[str, tuple[str, str, str]] | None = None,
) -> Plan:
    keep, skipped = dedup_instances(records)
    by_series = defaultdict(list)
    for i in keep:
        by_series[records[i].series_key].append(i)

    images: list[ImageItem] = []
    volumes: list[VolumeItem] = []
    for series_key in sorted(by_series):
        idxs = by_series[series_key]
        first = records[idxs[0]]
        if first.modality not in VOLUME_MODALITIES:
            for i in sorted(idxs, key=lambda i: records[i].path):
                for f in evenly_spaced(records[i].n_frames, cfg.frames_per_instance):
                    images.append(ImageItem(i, f))
            continue
        frames = _series_frames(records, idxs)
        volume = -1
        if len(frames) >= cfg.min_volume_slices:
            try:
                if any(g is None for _, _, g in frames):
                    raise InconsistentSeries("missing slice geometry")
                vplan = plan_volume([g for _, _, g in frames], cfg.min_volume_slices)
                frames = [frames[j] for j in vplan.order]
                if cfg.store_volumes:
                    volume = len(volumes)
                    volumes.append(
                        VolumeItem(
                            [i for i, _, _ in frames], [f for _, f, _ in frames], vplan.to_json()
                        )
                    )
            except InconsistentSeries as e:
                skipped.append((first.path, f"series not assembled into a volume: {e}"))
        ordered = volume >= 0 or len(frames) == 1
        for j in evenly_spaced(len(frames), cfg.slices_per_series):
            i, f, _ = frames[j]
            images.append(ImageItem(i, f, slice_index=j if ordered else -1, volume=volume))

    patient = [r.patient_key for r in records]
    site = [r.site for r in records]
    splits = np.full(len(records), "", dtype="<U10")
    if keep:
        try:
            splits[keep] = assign_splits(
                [patient[i] for i in keep],
                [site[i] for i in keep],
                fractions=cfg.split_fractions,
                seed=cfg.split_seed,
                external_sites=cfg.external_sites,
            )
        except ValueError as e:
            if cfg.site_from != "dir" or not cfg.external_sites:
                raise
            raise ValueError(
                f"{e}: a site named by its input folder is a salted key unless --site-names "
                "maps the folder to a name"
            ) from None
    train = [i for i in keep if splits[i] == "train"]
    if not train:
        raise ValueError(
            "no training items: the vocabulary is fitted on the training split only "
            f"({len(keep)} usable files; check --external-sites and the split fractions)"
        )
    vocab = Vocabulary.fit(
        schema,
        ((patient[i], records[i].protocol) for i in train),
        min_patients=cfg.min_patients,
        numeric_bins=cfg.numeric_bins,
    )

    # Row order is a pure function of the records' keys, so a rerun (or a scan in another
    # order) yields the same store; grouping a patient's rows keeps shards study-local.
    def image_key(it: ImageItem):
        r = records[it.record]
        return (r.site, r.patient_key, r.study_key, r.series_key, it.slice_index, r.path, it.frame)

    images.sort(key=image_key)
    order = sorted(range(len(volumes)), key=lambda v: _volume_key(records, volumes[v]))
    new_index = {old: new for new, old in enumerate(order)}
    volumes = [volumes[v] for v in order]
    for it in images:
        if it.volume >= 0:
            it.volume = new_index[it.volume]
    return Plan(images, volumes, splits, vocab, skipped, labels or {})


def _volume_key(records, v: VolumeItem):
    r = records[v.records[0]]
    return (r.site, r.patient_key, r.study_key, r.series_key)
