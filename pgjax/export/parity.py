"""Parity of an export: the JAX model and the exported PyTorch model on the same inputs.

Input sets: "random" (uniform images, random token ids from every field's range plus the
specials, random z-scores) and, where the training store is readable, "store" (its first usable
preprocessed items and their header tokens). The PyTorch side runs in a subprocess where JAX
cannot be imported (`pgjax.export.torch_side`). Per output, `parity.json` records

    max_abs   max |torch - jax| over all elements
    max_rel   max_abs / max |jax|  (relative to the output's scale, which stays defined where an
              element is near 0)

and the export fails when any embedding's float32 max_abs exceeds the tolerance (1e-4). The
derived outputs, the protocol-novelty score and the probe's calibrated probability (where the
export has them), are recorded under "derived": they are float64 functions of the embeddings,
so their differences are the embeddings' carried through (a Mahalanobis distance amplifies them
along directions of small training variance), reported, not gated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pgjax.data.tokenizer import MISSING, PAD, UNK

TOLERANCE = 1e-4
DERIVED = ("novelty", "proba")  # outputs computed from the embeddings (see above)


class ParityError(RuntimeError):
    pass


def random_inputs(config: dict, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = tuple(config["input"]["shape"])
    out = {"images": rng.uniform(0.0, 1.0, (batch, *shape)).astype(np.float32)}
    proto = config["architecture"].get("protocol_encoder")
    if proto:
        fields = config["vocab"]["fields"]
        tokens = np.empty((batch, len(fields)), np.int32)
        for j, f in enumerate(fields):
            # Specials too: PAD exercises the attention mask, MISSING/UNK the special embeddings.
            choices = [PAD, MISSING, UNK, *range(f["start"], f["stop"])]
            tokens[:, j] = rng.choice(choices, batch)
        numeric = np.array([f["kind"] == "numeric" for f in fields])
        out["tokens"] = tokens
        out["values"] = rng.normal(0.0, 1.5, tokens.shape).astype(np.float32)
        out["value_mask"] = (numeric & (rng.uniform(size=tokens.shape) < 0.7)).astype(np.float32)
    return out


def store_inputs(config: dict, store_root: str | Path, limit: int = 8) -> dict | None:
    """Up to `limit` usable items of the store group the model was trained on, or None."""
    from pgjax.data.store import StoreError, open_store

    try:
        group = open_store(store_root).group(config["input"]["group"])
        table = group.table()
    except (StoreError, OSError, KeyError):
        return None
    rows = table["row"][table["ok"] == "1"].astype(np.int64)[:limit]
    if len(rows) == 0:
        return None
    out = {"images": group.array("pixels")[rows].read().result()}  # uint8/uint16, as stored
    if config["architecture"].get("protocol_encoder"):
        out["tokens"] = group.array("tokens")[rows].read().result().astype(np.int32)
        out["values"] = group.array("values")[rows].read().result().astype(np.float32)
        out["value_mask"] = group.array("value_mask")[rows].read().result().astype(np.float32)
    return out


def jax_outputs(encoder, inputs: dict[str, dict]) -> dict[str, np.ndarray]:
    out = {}
    for s, x in inputs.items():
        out[f"{s}__image_pooled"] = encoder.embed_images(x["images"])
        if "image_proj" in encoder.modules:
            out[f"{s}__image_proj"] = encoder.project_images(x["images"])
        if "tokens" in x and "protocol_encoder" in encoder.modules:
            args = (x["tokens"], x["values"], x["value_mask"])
            out[f"{s}__protocol_pooled"] = encoder.embed_protocol(*args)
            if "protocol_proj" in encoder.modules:
                out[f"{s}__protocol_proj"] = encoder.project_protocol(*args)
        out.update(_derived(encoder, x, s, encoder._protocol_stats))
    return out


def _derived(model, x: dict, s: str, stats) -> dict:
    """The novelty score and calibrated probability of an input set, where the model (JAX or
    PyTorch: the same method names) has their statistics and probe."""
    out = {}
    if "tokens" not in x:
        return out
    args = (x["tokens"], x["values"], x["value_mask"])
    if stats is not None:
        out[f"{s}__novelty"] = np.nan_to_num(model.protocol_novelty(*args)["novelty"], nan=-1.0)
    if model.calibration is not None:
        out[f"{s}__proba"] = model.predict_proba(x["images"], *args)
    return out


def torch_outputs(out_dir: Path, inputs: dict[str, dict]) -> dict[str, np.ndarray]:
    """The export's PyTorch outputs, computed in a JAX-free subprocess."""
    flat = {f"{s}__{k}": v for s, x in inputs.items() for k, v in x.items()}
    with tempfile.TemporaryDirectory(prefix="pgjax-parity-") as tmp:
        src, dst = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(src, **flat)
        repo_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.run(
            [sys.executable, "-m", "pgjax.export.torch_side", str(out_dir), str(src), str(dst)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ParityError(f"{out_dir}: the PyTorch model failed to run:\n{proc.stderr[-3000:]}")
        with np.load(dst) as f:
            return {k: f[k] for k in f.files}


def compare(reference: dict, candidate: dict, tolerance: float = TOLERANCE) -> dict:
    missing = sorted(set(reference) ^ set(candidate))
    if missing:
        raise ParityError(f"outputs present on one side only: {missing}")
    outputs = {}
    for key in sorted(reference):
        a = np.asarray(reference[key], np.float64)
        b = np.asarray(candidate[key], np.float64)
        if a.shape != b.shape:
            raise ParityError(f"{key}: JAX shape {a.shape}, PyTorch shape {b.shape}")
        diff = float(np.max(np.abs(a - b)))
        scale = float(np.max(np.abs(a)))
        outputs[key.replace("__", "/")] = {
            "shape": list(a.shape),
            "max_abs": diff,
            "max_rel": diff / scale if scale > 0 else diff,
            "max_abs_reference": scale,
            "finite": bool(np.isfinite(a).all() and np.isfinite(b).all()),
        }
    worst = max(o["max_abs"] for o in outputs.values())
    passed = all(o["finite"] and o["max_abs"] <= tolerance for o in outputs.values())
    return {"dtype": "float32", "tolerance_max_abs": tolerance, "max_abs": worst,
            "passed": passed, "outputs": outputs}  # fmt: skip


def check(out_dir: Path, encoder, store_root: str | Path | None, tolerance: float = TOLERANCE):
    """Run both sides, write OUT/parity.json, return the report (ParityError if it failed)."""
    inputs = {"random": random_inputs(encoder.config)}
    if store_root is not None:
        real = store_inputs(encoder.config, store_root)
        if real is not None:
            inputs["store"] = real
    jax_out, torch_out = jax_outputs(encoder, inputs), torch_outputs(out_dir, inputs)

    def part(d, derived):
        return {k: v for k, v in d.items() if (k.split("__")[1] in DERIVED) == derived}

    report = compare(part(jax_out, False), part(torch_out, False), tolerance)
    if part(jax_out, True) or part(torch_out, True):
        derived = compare(part(jax_out, True), part(torch_out, True), np.inf)
        report["derived"] = derived["outputs"]
    report["inputs"] = {s: int(len(x["images"])) for s, x in inputs.items()}
    (Path(out_dir) / "parity.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report
