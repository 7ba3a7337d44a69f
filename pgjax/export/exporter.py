"""`pgjax export`: a training checkpoint -> a PyTorch model folder, with proven parity.

    OUT/model.safetensors     float32 weights of the image encoder, protocol encoder and
                              projection heads (torch names; BatchNorm running statistics)
    OUT/config.json           architecture, input shape, preprocessing settings, the protocol
                              vocabulary and schema version, the timm arguments (2D ViT)
    OUT/modeling_pgjax.py     the PyTorch modules, torch + numpy only, `from_pretrained(OUT)`
    OUT/timm_vit.safetensors  (2D ViT only) the image encoder in timm's VisionTransformer layout
    OUT/protocol_stats.npz    the training split's protocol distribution (pgjax.novelty): token
                              frequencies per field, mean and shrunk covariance of the pooled
                              protocol embedding, for the novelty score
    OUT/calibration.json      (with --calibration FILE) an evaluation's linear probe and its
                              fitted calibration, for calibrated probabilities
    OUT/parity.json           JAX vs PyTorch differences on random and real inputs (and of the
                              novelty score and probabilities, recorded beside them)

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
    *,
    stats=None,
    calibration: dict | None = None,
) -> dict:
    """Write the export folder of (config.json dict, Flax variables, optionally the protocol
    statistics and a calibrated probe) and check its parity; returns the parity report
    (ParityError, leaving OUT.failed, when it fails)."""
    from pgjax.inference import JaxEncoder
    from pgjax.novelty import STATS_FILE

    out = Path(out)
    _check_replaceable(out)  # before any work
    config = dict(config)
    state = to_torch(variables, model_rules(config["architecture"]))
    timm = timm_arguments(config["architecture"], config["input"]["shape"])
    if timm is not None:
        config["timm"] = {"weights": "timm_vit.safetensors", "create_model": timm}
    if stats is not None:
        config["protocol_stats"] = {"file": STATS_FILE, "recorded_on": stats.source.get("items"),
                                    "train_quantiles": stats.train_quantiles}  # fmt: skip
    if calibration is not None:
        config["calibration"] = {"file": "calibration.json",
                                 **{k: calibration.get(k) for k in ("task", "label", "model",
                                                                    "head", "label_fraction")},
                                 "method": calibration["calibration"]["method"]}  # fmt: skip

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _save_safetensors(tmp / "model.safetensors", state)
    if timm is not None:
        _save_safetensors(tmp / "timm_vit.safetensors", timm_state_dict(state))
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    shutil.copyfile(MODELING_FILE, tmp / "modeling_pgjax.py")
    if stats is not None:
        stats.save(tmp / STATS_FILE)
    if calibration is not None:
        (tmp / "calibration.json").write_text(json.dumps(calibration, indent=1) + "\n")

    encoder = JaxEncoder(config, variables, stats=stats, calibration=calibration)
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
    calibration: str | Path | None = None,
) -> dict:
    """Export a checkpoint to OUT; returns the parity report. Raises ExportError for bad input
    and ParityError when PyTorch and JAX disagree beyond `tolerance` (float32 max abs).
    `calibration`: a probe file of `pgjax eval` (EVAL_DIR/calibration/MODEL__HEAD.json) fitted
    on this checkpoint, carried into the export."""
    from pgjax import novelty

    workdir = Path(workdir)
    _check_replaceable(Path(out))
    config, variables = load_workdir(workdir, step, store)
    store_root = open_training_store(read_training_config(workdir), workdir, store).root
    record = _read_probe(calibration, config) if calibration else None
    stats = novelty.for_checkpoint(workdir, step=config["source"]["step"], store=store_root)
    return write_export(config, variables, out, store_root, tolerance, stats=stats,
                        calibration=record)  # fmt: skip


def _read_probe(path, config: dict) -> dict:
    """A calibration file, checked against the export: the same checkpoint step, vocabulary and
    embedding widths as the probe was fitted on."""
    from pgjax.inference import read_calibration

    try:
        record = read_calibration(path)
    except ValueError as e:
        raise ExportError(str(e)) from e
    step = config["source"]["step"]
    if record.get("step") != step:
        raise ExportError(f"{path}: the probe was fitted on the embeddings of step "
                          f"{record.get('step')}, the export is of step {step}")  # fmt: skip
    if record.get("vocab_sha256") != config.get("vocab_sha256"):
        raise ExportError(f"{path}: fitted on a store with another protocol vocabulary "
                          "(its group token ids would mean other values)")  # fmt: skip
    arch = config["architecture"]
    widths = {"image": arch["image_encoder"]["width"] * _expansion(arch["image_encoder"]),
              "protocol": (arch.get("protocol_encoder") or {}).get("width")}  # fmt: skip
    if any(widths[k] is None for k in record["inputs"]):
        raise ExportError(f"{path}: the probe reads {record['inputs']}; the model has no "
                          "protocol encoder")  # fmt: skip
    expected = sum(widths[k] for k in record["inputs"])
    if len(record["probe"]["w"]) != expected:
        raise ExportError(f"{path}: the probe has {len(record['probe']['w'])} weights, the "
                          f"model's {' + '.join(record['inputs'])} embedding {expected}")
    return record


def _expansion(image_encoder: dict) -> int:
    """Pooled width / width: a ResNet's last stage is width * 2^(stages-1) (x4 bottleneck)."""
    if image_encoder["kind"] != "resnet":
        return 1
    n = len(image_encoder["stage_sizes"])
    return 2 ** (n - 1) * (1 if image_encoder.get("block") == "basic" else 4)
