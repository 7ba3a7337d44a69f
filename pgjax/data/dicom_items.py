"""DICOM files -> model inputs, exactly as a store would hold them, for inference.

The same code as `pgjax preprocess`: the header scan (`scan_file`: allow-listed protocol
fields, free text redacted against the header's own names and IDs), the tokenizer of the
training store (rare values become UNK), and the pixel units (`fill_image_unit`,
`fill_volume_unit`). Nothing but the protocol fields and the pixels reaches the arrays;
identity is hashed with a random per-run salt and used only to group a volume's slices.

2D items: each file gives its selected frames (CT/MR: up to `slices_per_series` evenly spaced
frames of a multi-frame object, others `frames_per_instance`), normalised per file as in the
store. Volumes: files are grouped by series, and each series with at least
`min_volume_slices` consistent slices is assembled and resampled as in the store.

No JAX here: `python -m pgjax.torch_infer` uses this module on machines without JAX.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pgjax.data.config import PreprocessConfig
from pgjax.data.pixel_units import fill_image_unit, fill_volume_unit
from pgjax.data.pixels import FrameGeometry
from pgjax.data.plan import VOLUME_MODALITIES, evenly_spaced
from pgjax.data.scan import ScanRecord, list_files, scan_file
from pgjax.data.tokenizer import Vocabulary
from pgjax.data.volumes import InconsistentSeries, plan_volume


@dataclasses.dataclass
class Items:
    """Model inputs for a list of DICOM files, and what was left out.

    pixels: [N, *shape] of the store's dtype. tokens / values / value_mask: [N, F].
    sources: per row, (path, frame) for 2D items or (first path of the series, -1) for volumes.
    skipped: (path, reason) for every file that gave no row.
    """

    pixels: np.ndarray
    tokens: np.ndarray
    values: np.ndarray
    value_mask: np.ndarray
    sources: list[tuple[str, int]]
    skipped: list[tuple[str, str]]


def expand_inputs(inputs: Sequence[str | Path]) -> list[str]:
    """Files named, and every file under folders named (hidden ones excluded), sorted."""
    return [path for _, path in list_files(inputs)]


def _scan(
    paths: Sequence[str], schema, cfg: PreprocessConfig
) -> tuple[list[ScanRecord], list[tuple[str, str]]]:
    salt = secrets.token_bytes(32)  # identity only groups slices here; nothing keeps the keys
    records, skipped = [], []
    for p in paths:
        r = scan_file(os.path.dirname(p), p, schema, salt, "fixed:inference",
                      max_pixels=cfg.max_pixels)  # fmt: skip
        (records.append(r) if r.ok else skipped.append((p, r.reason)))
    return records, skipped


def _empty(cfg: PreprocessConfig, shape, n_fields: int, skipped) -> Items:
    z = np.zeros((0, n_fields))
    return Items(np.zeros((0, *shape), cfg.dtype), z.astype(np.int32), z.astype(np.float32),
                 z.astype(np.uint8), [], skipped)  # fmt: skip


def encode_images(paths: Sequence[str], cfg: PreprocessConfig, vocab: Vocabulary) -> Items:
    """2D items of the files, in file order then frame order."""
    records, skipped = _scan(paths, vocab.schema, cfg)
    rows, protocols = [], []
    for r in records:
        per = cfg.slices_per_series if r.modality in VOLUME_MODALITIES else cfg.frames_per_instance
        for f in evenly_spaced(r.n_frames, per):
            rows.append({"path": r.path, "frame": f})
            protocols.append(r.protocol)
    if not rows:
        return _empty(cfg, cfg.image_size, len(vocab.fields), skipped)
    block, failures, _ = fill_image_unit(rows, cfg)
    tokens, values, mask = vocab.encode_many(protocols)
    failed = {r for r, _ in failures}
    reasons = {rows[r]["path"]: reason for r, reason in failures}  # one entry per file
    skipped.extend((p, f"image not decoded: {reason}") for p, reason in reasons.items())
    keep = [i for i in range(len(rows)) if i not in failed]
    sources = [(rows[i]["path"], rows[i]["frame"]) for i in keep]
    return Items(block[keep], tokens[keep], values[keep], mask[keep], sources, skipped)


def encode_volumes(paths: Sequence[str], cfg: PreprocessConfig, vocab: Vocabulary) -> Items:
    """One volume per series (files grouped by SeriesInstanceUID), in first-path order."""
    records, skipped = _scan(paths, vocab.schema, cfg)
    by_series = defaultdict(list)
    for r in records:
        by_series[r.series_key].append(r)
    rows, protocols, firsts = [], [], []
    for series in sorted(by_series.values(), key=lambda rs: min(r.path for r in rs)):
        series.sort(key=lambda r: (r.instance_number or 0, r.path))
        frames = [(r, f, g) for r in series for f, g in enumerate(r.geometry or [None])]
        first = min(r.path for r in series)
        try:
            if len(frames) < cfg.min_volume_slices:
                raise InconsistentSeries(
                    f"{len(frames)} slices, fewer than min_volume_slices={cfg.min_volume_slices}"
                )
            if any(g is None for _, _, g in frames):
                raise InconsistentSeries("missing slice geometry")
            plan = plan_volume([FrameGeometry.from_json(g) for _, _, g in frames],
                               cfg.min_volume_slices)  # fmt: skip
        except InconsistentSeries as e:
            skipped.extend((r.path, f"series not assembled into a volume: {e}") for r in series)
            continue
        ordered = [frames[j] for j in plan.order]
        rows.append({"paths": [r.path for r, _, _ in ordered], "frames": [f for _, f, _ in ordered],
                     "plan": plan.to_json()})  # fmt: skip
        protocols.append(ordered[0][0].protocol)  # the store tokenises a volume's first slice
        firsts.append(first)
    if not rows:
        return _empty(cfg, cfg.volume_shape, len(vocab.fields), skipped)
    block, failures, _ = fill_volume_unit(rows, cfg)
    tokens, values, mask = vocab.encode_many(protocols)
    failed = {r for r, _ in failures}
    skipped.extend((firsts[r], f"volume not decoded: {reason}") for r, reason in failures)
    keep = [i for i in range(len(rows)) if i not in failed]
    sources = [(firsts[i], -1) for i in keep]
    return Items(block[keep], tokens[keep], values[keep], mask[keep], sources, skipped)


def encode_files(paths: Sequence[str], cfg: PreprocessConfig, vocab: Vocabulary, group: str):
    """`encode_images` or `encode_volumes`, by the store group the model was trained on."""
    if group == "images":
        return encode_images(paths, cfg, vocab)
    if group == "volumes":
        return encode_volumes(paths, cfg, vocab)
    raise ValueError(f"group must be images or volumes, not {group!r}")
