"""Phase 3's unit of work: decode the files behind one store shard into one array block.

Each function takes the private work list of a unit (file paths and frames per row) and returns
the block to write, the rows that failed with their reasons, and per-row facts for the table.
A file that fails costs its own rows only: they stay zero and are marked not ok.

The 2D rows of a CT/MR slice that is also in a volume are made by the volume unit, which has
the slice decoded anyway, and handed to the image unit through a private side file (see
preprocess.py, "slice hand-over"); the image unit makes any row it does not find there itself,
the same way, so the side files only save a second read and decode of the file.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pydicom

from pgjax.data.config import PreprocessConfig
from pgjax.data.deid import quiet_pydicom
from pgjax.data.pixels import (
    PixelError,
    decode_frames,
    images_from_frames,
    images_from_normalized,
    normalize_prepared,
    prepare_part,
    preprocess_frames,
    quantize,
)
from pgjax.data.volumes import VolumePlan, resample_volume


def _read(path: str):
    try:
        # force: the scan accepted this file, preamble or not (see scan._read_header).
        return pydicom.dcmread(path, force=True)
    except Exception as e:
        raise PixelError(f"cannot read file: {type(e).__name__}") from e


def _reason(e: Exception) -> str:
    if isinstance(e, PixelError):
        return str(e)
    # Only the type: a decoder's message may quote header values.
    return f"cannot decode: {type(e).__name__}"


@quiet_pydicom()
def fill_image_unit(rows: list[dict], cfg: PreprocessConfig, made: dict | None = None):
    """rows: [{"path", "frame"}] -> (uint block [n, H, W], [(row, reason)], {}).

    made: {row: image} for rows a volume unit has already made (indices into `rows`).
    """
    block = np.zeros((len(rows), *cfg.image_size), dtype=cfg.dtype)
    failures = []
    by_path = defaultdict(list)
    for r, row in enumerate(rows):
        if made and r in made:
            block[r] = made[r]
            continue
        by_path[row["path"]].append((r, row["frame"]))
    for path, items in by_path.items():
        try:
            ds = _read(path)
            frames = sorted({f for _, f in items})
            out = preprocess_frames(ds, frames, cfg)
            where = {f: k for k, f in enumerate(frames)}
            for r, f in items:
                block[r] = out[where[f]]
        except Exception as e:  # one file's failure must not stop the unit
            failures.extend((r, _reason(e)) for r, _ in items)
    return block, failures, {}


def _series_slices(paths, frames, cfg, images=(), made=None) -> np.ndarray:
    """Normalised float slices [S, rows, cols] of one series, in the plan's order.

    Normalised together: MR has no absolute scale, so percentiles pooled over the series keep
    its slices comparable (CT is windowed in Hounsfield units, per file's own rescale).
    images: [(image row, path, frame)] 2D rows to make on the way into `made`, from the same
    decoded frames and exactly as fill_image_unit would: the rows of one file in one image
    unit (row // cfg.images_per_shard) together, as one group (a group that fails makes none).
    """
    decoded = {}
    for p in dict.fromkeys(paths):
        ds = _read(p)
        wanted = sorted({f for q, f in zip(paths, frames, strict=True) if q == p})
        # Frame by frame: the same values as one at a time.
        out = decode_frames(ds, wanted, cfg.max_pixels)
        decoded[p] = (ds, {f: out[j] for j, f in enumerate(wanted)})
    prepared = {}

    def slice_values(p, f):  # one slice's normalisation up to the series statistics, once
        if (p, f) not in prepared:
            prepared[p, f] = prepare_part(decoded[p][1][f][None], decoded[p][0], cfg, [f])
        return prepared[p, f]

    groups = defaultdict(list)
    for row, p, f in images:
        groups[row // cfg.images_per_shard, p].append((row, f))
    for (_, p), items in groups.items():
        ds, pixels = decoded[p]
        wanted = sorted({f for _, f in items})
        try:
            values = [slice_values(p, f) for f in wanted]
            if any(needs_scaling for _, needs_scaling, _ in values):  # statistics of the group
                out = images_from_frames(np.stack([pixels[f] for f in wanted]), ds, wanted, cfg)
            else:  # final already (CT windows, radiograph VOI): normalised once for both
                images = np.concatenate([1.0 - v if invert else v for v, _, invert in values])
                out = images_from_normalized(images, ds, wanted, cfg)
        except Exception:
            continue  # the image unit makes these rows itself and records the reason
        where = {f: k for k, f in enumerate(wanted)}
        made.update((row, out[where[f]]) for row, f in items)
    return normalize_prepared([slice_values(p, f) for p, f in zip(paths, frames, strict=True)], cfg)


@quiet_pydicom()
def fill_volume_unit(rows: list[dict], cfg: PreprocessConfig, made: dict | None = None):
    """rows: [{"paths", "frames", "plan"[, "images"]}] -> (block [n, D, H, W], failures, facts).

    made: when given, receives {image row: 2D image} for the rows listed in each row's
    "images" ([image row, path, frame]), for the image units (see the module docstring).
    """
    block = np.zeros((len(rows), *cfg.volume_shape), dtype=cfg.dtype)
    failures, facts = [], {}
    for r, row in enumerate(rows):
        try:
            images = row.get("images", ()) if made is not None else ()
            slices = _series_slices(row["paths"], row["frames"], cfg, images, made)
            plan = VolumePlan.from_json(row["plan"])
            volume, spacing = resample_volume(slices, plan, tuple(cfg.volume_shape), cfg.resize)
            block[r] = quantize(volume, cfg.dtype)
            facts[r] = {k: _plain(v) for k, v in spacing.items()}
        except Exception as e:
            failures.append((r, _reason(e)))
    return block, failures, facts


def _plain(v):
    """Spacing facts as CSV-friendly scalars or 'a;b;c' strings."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return ";".join(f"{float(x):.6g}" for x in v)
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return v
