"""The pgjax store: de-identified, tokenized, preprocessed arrays on disk.

Layout (every file here is de-identified; see docs in README "The store"):

    STORE/
      manifest.json            format, version, state, counts, shapes, dtypes, settings
      schema.json              the protocol schema (the allow-list) the store was made with
      vocab.json               the tokenizer, fitted on the training split only
      report.json              counts of skipped files and series by reason (no paths)
      images/                  2D items: one radiograph, CT/MR slice or frame per row
        pixels/                zarr v3 [N, H, W] uint8|uint16, one chunk per image,
                               sharded so a shard file holds `images_per_shard` images
        tokens/ values/ value_mask/    zarr v3 [N, F] int32 / float32 / uint8
        table.csv              one row per item: ok, site, vendor, modality, hashed keys,
                               split, task, label, ...
      volumes/                 3D items: one CT/MR series per row, same arrays with
                               pixels [M, D, H, W]

Arrays are written once per shard (a whole shard per write), so parallel writers on many
machines never touch the same file and an interrupted write leaves the old file whole
(TensorStore's file driver writes a temporary file and renames it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

STORE_FORMAT = "pgjax-store"
STORE_VERSION = 1
GROUPS = ("images", "volumes")
TOKEN_ARRAYS = {"tokens": "int32", "values": "float32", "value_mask": "uint8"}
TOKEN_ROWS_PER_CHUNK = 4096


class StoreError(ValueError):
    """A store that is missing, incomplete or of a format this reader does not understand."""


# ---------------------------------------------------------------------------------------------
# Small file helpers: every metadata file is written to a temporary name and renamed, so a kill
# mid-write leaves either the old file or the new one, never half of one.


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_csv_atomic(path: str | Path, columns: dict[str, list]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    names = list(columns)
    n = len(next(iter(columns.values()))) if columns else 0
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i in range(n):
            w.writerow(["" if columns[c][i] is None else columns[c][i] for c in names])
    os.replace(tmp, path)


def read_csv_columns(path: str | Path) -> dict[str, np.ndarray]:
    """A table as columns of strings (callers convert the numeric ones)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise StoreError(f"{path}: empty table")
    header, body = rows[0], rows[1:]
    return {name: np.array([r[i] for r in body], dtype=object) for i, name in enumerate(header)}


# ---------------------------------------------------------------------------------------------
# Zarr v3 arrays through TensorStore.


def array_spec(path: str | Path, shape, dtype: str, *, rows_per_shard: int, compression: str):
    """A zarr v3 spec with one chunk per item and `rows_per_shard` items per shard file.

    One chunk per item lets a loader read any item alone; sharding keeps the file count at
    N / rows_per_shard, so a million images are a few thousand files, not a million.
    """
    shape = [int(s) for s in shape]
    inner = [1, *shape[1:]]
    outer = [max(1, min(rows_per_shard, shape[0])), *shape[1:]]
    chunk_codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        chunk_codecs.append({"name": "zstd", "configuration": {"level": 1, "checksum": False}})
    elif compression != "none":
        raise ValueError(f"compression must be zstd or none, not {compression!r}")
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": shape,
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": outer}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": inner,
                        "codecs": chunk_codecs,
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                    },
                }
            ],
            "fill_value": 0,
        },
    }


def create_array(path, shape, dtype, *, rows_per_shard, compression="zstd"):
    import tensorstore as ts

    spec = array_spec(path, shape, dtype, rows_per_shard=rows_per_shard, compression=compression)
    spec.update(create=True, delete_existing=True)
    return ts.open(spec).result()


def open_array(path: str | Path, *, write: bool = False):
    import tensorstore as ts

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path}: no zarr v3 array here (zarr.json missing)")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    mode = {"open": True, "read": True, "write": write}
    return ts.open(spec, **mode).result()


# ---------------------------------------------------------------------------------------------
# Reading a finished store.


@dataclasses.dataclass
class ItemGroup:
    """One group of a store (images or volumes): lazily opened arrays plus the table."""

    root: Path
    count: int

    def array(self, name: str):
        return open_array(self.root / name)

    @property
    def pixels(self):
        return self.array("pixels")

    def table(self) -> dict[str, np.ndarray]:
        return read_csv_columns(self.root / "table.csv")


@dataclasses.dataclass
class Store:
    root: Path
    manifest: dict

    def group(self, name: str) -> ItemGroup:
        if name not in GROUPS:
            raise KeyError(f"no group {name!r}; groups are {GROUPS}")
        return ItemGroup(self.root / name, int(self.manifest["counts"][name]))

    @property
    def images(self) -> ItemGroup:
        return self.group("images")

    @property
    def volumes(self) -> ItemGroup:
        return self.group("volumes")

    def vocabulary(self):
        from pgjax.data.schema import Schema
        from pgjax.data.tokenizer import Vocabulary

        schema = Schema.from_json(json.loads((self.root / "schema.json").read_text()))
        return Vocabulary.load(self.root / "vocab.json", schema=schema)


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / "manifest.json"
    if not path.exists():
        raise StoreError(f"{root}: not a pgjax store (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: unreadable manifest: {e}") from e
    if manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: format {manifest.get('format')!r} is not {STORE_FORMAT!r}")
    if manifest.get("version") != STORE_VERSION:
        raise StoreError(
            f"{path}: store version {manifest.get('version')} but this pgjax reads version "
            f"{STORE_VERSION}; re-run `pgjax preprocess` with this version, or use the pgjax "
            "that wrote it"
        )
    return manifest


def open_store(root: str | Path, *, require_complete: bool = True) -> Store:
    """Open a store, refusing one this code does not understand or that is unfinished."""
    root = Path(root)
    manifest = read_manifest(root)
    if require_complete and manifest.get("state") != "complete":
        raise StoreError(
            f"{root}: store is {manifest.get('state')!r}, not complete; finish it with "
            "`pgjax preprocess` (it resumes) or its `--phase finalize`"
        )
    return Store(root, manifest)
