"""A training workdir as an export: its description (`config.json` of the export) and its Flax
variables, read from the checkpoint without building a mesh or an optimizer.

The store the model was trained on supplies the protocol vocabulary and schema and the
preprocessing settings; the workdir's config names it (`input.store`), or pass `store`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pgjax import __version__
from pgjax.export.architecture import EXPORTED_PARTS, describe

EXPORT_FORMAT = "pgjax-export"
EXPORT_VERSION = 1


class ExportError(ValueError):
    """A workdir, store or export folder that cannot be exported or loaded (names the path)."""


def read_training_config(workdir: Path) -> dict:
    path = workdir / "config.json"
    if not path.exists():
        raise ExportError(f"{workdir}: not a training workdir (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: unreadable training config: {e}") from e


def open_training_store(config: dict, workdir: Path, store: str | Path | None):
    from pgjax.data.store import StoreError, open_store

    path = Path(store) if store else Path(config.get("input", {}).get("store", ""))
    if not path.is_absolute() and not path.exists():
        path = (workdir / path).resolve() if (workdir / path).exists() else path
    try:
        return open_store(path)
    except StoreError as e:
        raise ExportError(
            f"{e}. The export needs the training store's vocabulary and preprocessing "
            "settings: pass --store STORE"
        ) from e


def build_objective_for(config: dict, st):
    """The training objective of a config (a dict, as in config.json) on a store's vocabulary."""
    import ml_collections

    from pgjax.objectives import ProtocolInfo, build_objective

    info = ProtocolInfo.from_vocabulary(st.vocabulary())
    return build_objective(ml_collections.ConfigDict(config), info, mesh=None)


def exported_variables(variables: dict) -> dict:
    """The exported parts' slices of {"params": ..., "batch_stats": ...}."""
    out = {
        col: {p: tree[p] for p in EXPORTED_PARTS if p in tree} for col, tree in variables.items()
    }
    return {col: tree for col, tree in out.items() if tree}


def describe_export(config: dict, objective, st, variables: dict, step: int) -> dict:
    """The export's config.json: architecture, input, preprocessing, vocabulary, provenance."""
    group = config.get("input", {}).get("group", "images")
    pre = st.manifest["config"]
    shape = pre["image_size"] if group == "images" else pre["volume_shape"]
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "written_by": f"pgjax {__version__}",
        "source": {
            "step": int(step),
            "objectives": sorted(objective.terms),
            "image_encoder": config.get("model", {}).get("image_encoder"),
            "trained_dtype": config.get("model", {}).get("dtype", "float32"),
            "exported_dtype": "float32",
        },
        "architecture": describe(objective.parts, variables["params"]),
        "input": {
            "group": group,
            "shape": list(shape),
            "pixel_dtype": pre["dtype"],
            "layout": "[B, *shape] floats in [0, 1] (store pixels / 255 or 65535)",
        },
        "preprocess": pre,
        "schema_version": st.manifest.get("schema_version"),
        "schema_sha256": st.manifest.get("schema_sha256"),
        "vocab_sha256": st.manifest.get("vocab_sha256"),
        "vocab": st.vocabulary().to_json(),
    }


def load_workdir(workdir: str | Path, step: int | None = None, store: str | Path | None = None):
    """(export config dict, Flax variables {"params": {part: ...}, "batch_stats": ...}) of a
    workdir's checkpoint (the latest unless `step`)."""
    from pgjax.train.checkpoint import load_state

    workdir = Path(workdir)
    config = read_training_config(workdir)
    st = open_training_store(config, workdir, store)
    objective = build_objective_for(config, st)
    try:
        state, step = load_state(workdir, step)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e
    variables = exported_variables({"params": state["params"], **state.get("model_state", {})})
    export_config = describe_export(config, objective, st, variables, step)
    check_against_checkpoint(export_config, variables["params"], st.root)
    return export_config, variables


def check_against_checkpoint(export_config: dict, params: dict, store_root) -> None:
    """The store's vocabulary and image shape must be the ones the checkpoint was trained on
    (a wrong --store would otherwise fail later, inside torch, with a shape error)."""
    import math

    import numpy as np

    arch = export_config["architecture"]
    proto = arch.get("protocol_encoder")
    if proto:
        trained = tuple(np.shape(params["protocol_encoder"]["token_embed"]["embedding"]))[0]
        fields = tuple(np.shape(params["protocol_encoder"]["field_embed"]))[0]
        if (trained, fields) != (proto["vocab_size"], proto["num_fields"]):
            raise ExportError(
                f"{store_root}: its vocabulary has {proto['vocab_size']} tokens and "
                f"{proto['num_fields']} fields, the checkpoint {trained} and {fields}; pass "
                "the store the model was trained on (--store)"
            )
    image = arch["image_encoder"]
    if image["kind"] == "vit":
        shape = export_config["input"]["shape"]
        patches = math.prod(s // p for s, p in zip(shape, image["patch_size"], strict=True))
        trained = tuple(np.shape(params["image_encoder"]["pos_embed"]))[1]
        expected = patches + (image.get("pool", "cls") == "cls")
        if trained != expected:
            raise ExportError(
                f"{store_root}: its items {shape} give {expected} ViT positions, the "
                f"checkpoint has {trained}; pass the store the model was trained on (--store)"
            )


def read_export_config(out: str | Path) -> dict:
    path = Path(out) / "config.json"
    if not path.exists():
        raise ExportError(f"{out}: not an export folder (no config.json)")
    config = json.loads(path.read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: format {config.get('format')!r} is not {EXPORT_FORMAT!r}")
    if config.get("version") != EXPORT_VERSION:
        raise ExportError(
            f"{path}: export version {config.get('version')}; this pgjax reads {EXPORT_VERSION}"
        )
    return config
