"""`pgjax export`: a training checkpoint -> a PyTorch model folder, with proven parity.

    OUT/model.safetensors     float32 weights of the image encoder, protocol encoder and
                              projection heads (torch names; BatchNorm running statistics)
    OUT/config.json           architecture, input shape, preprocessing settings, the protocol
                              vocabulary and schema version, the timm arguments (2D ViT)
    OUT/modeling_pgjax.py     the PyTorch modules, torch + numpy only, `from_pretrained(OUT)`
    OUT/timm_vit.safetensors  (2D ViT only) the image encoder in timm's VisionTransformer layout
    OUT/parity.json           JAX vs PyTorch differences on random and real inputs

The folder is written under a temporary name and renamed to OUT only when parity passes; a
failed export is left as OUT.failed (with its parity.json) and raises ParityError.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pgjax.export import parity
from pgjax.export.convert import model_rules, timm_state_dict, to_torch
from pgjax.export.source import (
    EXPORT_FORMAT,
    ExportError,
    load_workdir,
    open_training_store,
    read_training_config,
)

MODELING_FILE = Path(__file__).with_name("modeling_pgjax.py")


def timm_arguments(architecture: dict, input_shape) -> dict | None:
    """Keyword arguments for `timm.create_model` that build the 2D ViT's layout, or None."""
    vit = architecture["image_encoder"]
    if vit["kind"] != "vit" or len(vit["patch_size"]) != 2:
        return None
    cls = vit.get("pool", "cls") == "cls"
    kw = {
        "model_name": "vit_base_patch16_224",  # the class; every size below is overridden
        "pretrained": False,
        "in_chans": 1,
        "num_classes": 0,
        "img_size": list(input_shape),
        "patch_size": list(vit["patch_size"]),
        "embed_dim": vit["width"],
        "depth": vit["depth"],
        "num_heads": vit["num_heads"],
        "mlp_ratio": vit["mlp_dim"] / vit["width"],
        "class_token": cls,
        "global_pool": "token" if cls else "avg",
        "fc_norm": False,  # pgjax normalises the tokens, then pools
    }
    if vit.get("gelu_approximate"):
        kw["act_layer"] = "gelu_tanh"
    return kw


def _save_safetensors(path: Path, state: dict) -> None:
    from safetensors.numpy import save_file

    save_file(state, str(path), metadata={"format": "pt"})


def _check_replaceable(dst: Path) -> None:
    """An existing OUT may be replaced only if it is an earlier export."""
    if dst.exists():
        try:
            ok = json.loads((dst / "config.json").read_text()).get("format") == EXPORT_FORMAT
        except (OSError, json.JSONDecodeError):
            ok = False
        if not ok:
            raise ExportError(f"{dst} exists and is not a pgjax export; refusing to replace it")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder into place."""
    _check_replaceable(dst)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def write_export(
    config: dict,
    variables: dict,
    out: str | Path,
    store_root: str | Path | None,
    tolerance: float = parity.TOLERANCE,
) -> dict:
    """Write the export folder of (config.json dict, Flax variables) and check its parity;
    returns the parity report (ParityError, leaving OUT.failed, when it fails)."""
    from pgjax.inference import JaxEncoder

    out = Path(out)
    _check_replaceable(out)  # before any work
    config = dict(config)
    state = to_torch(variables, model_rules(config["architecture"]))
    timm = timm_arguments(config["architecture"], config["input"]["shape"])
    if timm is not None:
        config["timm"] = {"weights": "timm_vit.safetensors", "create_model": timm}

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _save_safetensors(tmp / "model.safetensors", state)
    if timm is not None:
        _save_safetensors(tmp / "timm_vit.safetensors", timm_state_dict(state))
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    shutil.copyfile(MODELING_FILE, tmp / "modeling_pgjax.py")

    encoder = JaxEncoder(config, variables)
    report = parity.check(tmp, encoder, store_root, tolerance)
    if not report["passed"]:
        failed = out.with_name(out.name + ".failed")
        if failed.exists():
            shutil.rmtree(failed)
        os.replace(tmp, failed)
        raise parity.ParityError(
            f"export parity failed: max |torch - jax| = {report['max_abs']:.3g} > {tolerance:g}; "
            f"see {failed / 'parity.json'}"
        )
    _replace_dir(tmp, out)
    return report


def export(
    workdir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    store: str | Path | None = None,
    tolerance: float = parity.TOLERANCE,
) -> dict:
    """Export a checkpoint to OUT; returns the parity report. Raises ExportError for bad input
    and ParityError when PyTorch and JAX disagree beyond `tolerance` (float32 max abs)."""
    workdir = Path(workdir)
    _check_replaceable(Path(out))
    config, variables = load_workdir(workdir, step, store)
    store_root = open_training_store(read_training_config(workdir), workdir, store).root
    return write_export(config, variables, out, store_root, tolerance)
