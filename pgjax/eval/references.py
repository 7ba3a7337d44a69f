"""Reference rows of every evaluation: features that bound what the models should reach.

Each reference is a feature provider beside `pgjax.eval.embed.Model`: it gives one feature
matrix for the evaluation's items, and those features then go through exactly the models' code
(the same items, label subsets, probe and penalty grid). Besides `random_init` (a `Model` with
random weights, built by `evaluate`), they are:

- `oracle`: the finding's true latent score (the store table's `score` column, or the labels
  file's `score` column with --labels). One feature, so the probe is a 1-D logistic fit and its
  probabilities are calibrated like any other row's. The ceiling for a model.
- `thumbnail`: an 8x8 area-downsample of the stored image (volumes: averaged over depth first).
  A pixel baseline with no learning at all: an encoder below it has learned less than nothing.
- `protocol_only`: the item's protocol tokens, one-hot, no pixels. What the acquisition alone
  says about the label (e.g. AP films of sicker patients): a shortcut's size.

A reference that cannot be computed raises `Unavailable` with the reason; `evaluate` records it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pgjax.data.store import open_array

REFERENCES = ("oracle", "thumbnail", "protocol_only", "random_init")
DESCRIPTIONS = {
    "oracle": "the true latent score (1-D logistic fit): the ceiling",
    "thumbnail": "logistic regression on an 8x8 area-downsample of the stored image",
    "protocol_only": "logistic regression on the protocol (header) tokens, one-hot, no pixels",
    "random_init": "the reference encoder's architecture with random weights",
}
THUMBNAIL_SIZE = 8
_READ_CHUNK = 256  # rows per read: bounds memory whatever the store's size


class Unavailable(Exception):
    """This reference cannot be computed here; the message says why."""


def check_names(names) -> tuple[str, ...]:
    bad = [n for n in names if n not in REFERENCES]
    if bad:
        raise ValueError(f"references must be among {REFERENCES}, not {list(names)}")
    return tuple(names)


def features(name: str, store: str | Path, group: str, rows: np.ndarray,
             scores: np.ndarray | None, scores_reason: str = "") -> np.ndarray:  # fmt: skip
    """[N, D] float64 features of store rows for a reference (not random_init, a Model)."""
    if name == "oracle":
        return oracle_features(scores, scores_reason)
    if name == "thumbnail":
        return thumbnail_features(store, group, rows)
    if name == "protocol_only":
        return protocol_features(store, group, rows)
    raise ValueError(f"{name!r} is not a feature reference (known: oracle, thumbnail, "
                     "protocol_only)")  # fmt: skip


def oracle_features(scores: np.ndarray | None, reason: str = "") -> np.ndarray:
    if scores is None:
        raise Unavailable(f"no true latent score ({reason or 'no score column'})")
    missing = int(np.isnan(scores).sum())
    if missing:
        raise Unavailable(f"{missing} of {len(scores)} items have no score")
    return np.asarray(scores, np.float64)[:, None]


def area_downsample(images: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """[N, H, W] -> [N, size, size]: the mean of each of size x size near-equal blocks (block
    edges rounded, so any H, W >= size work)."""
    n, h, w = images.shape
    if h < size or w < size:
        raise Unavailable(f"images of {h}x{w} are smaller than the {size}x{size} thumbnail")
    rows = np.round(np.linspace(0, h, size + 1)).astype(int)
    cols = np.round(np.linspace(0, w, size + 1)).astype(int)
    x = np.add.reduceat(np.add.reduceat(images, rows[:-1], axis=1), cols[:-1], axis=2)
    return x / np.outer(np.diff(rows), np.diff(cols))[None]


def thumbnail_features(store: str | Path, group: str, rows: np.ndarray) -> np.ndarray:
    pixels = open_array(Path(store) / group / "pixels")
    scale = 255.0 if pixels.dtype.numpy_dtype == np.uint8 else 65535.0
    out = []
    rows = np.asarray(rows, np.int64)
    for start in range(0, len(rows), _READ_CHUNK):
        x = pixels[rows[start : start + _READ_CHUNK]].read().result().astype(np.float64) / scale
        if x.ndim == 4:  # volumes [N, D, H, W]: the depth average
            x = x.mean(axis=1)
        out.append(area_downsample(x).reshape(len(x), -1))
    return np.concatenate(out) if out else np.zeros((0, THUMBNAIL_SIZE**2))


def protocol_features(store: str | Path, group: str, rows: np.ndarray) -> np.ndarray:
    """One indicator per (token position, token id) seen among these rows; positions with one
    value only carry nothing and are dropped. Labels are not used, so encoding over all the
    evaluation's rows leaks nothing."""
    tokens = open_array(Path(store) / group / "tokens")
    t = tokens[np.asarray(rows, np.int64)].read().result()
    t = t.reshape(len(t), -1)
    blocks = []
    for j in range(t.shape[1]):
        values = np.unique(t[:, j])
        if len(values) > 1:
            blocks.append((t[:, j][:, None] == values[None, :]).astype(np.float64))
    if not blocks:
        raise Unavailable("every protocol token is the same for all items")
    return np.concatenate(blocks, axis=1)
