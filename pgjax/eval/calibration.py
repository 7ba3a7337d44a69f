"""Post-hoc calibration of a probe's logits on the validation split: none, one temperature, or
one temperature per protocol group.

  temperature  p = sigmoid(z / T), T minimising the validation log-loss (Guo et al. 2017);
  protocol     one T per protocol group, the group being the item's tokens of GROUP_FIELDS
               (vendor x scanner model: what changes a detector's response). A group with fewer
               than `min_count` validation items, or without both classes, uses the global T;
               so does any group absent from validation (an unseen vendor at a new site).

Temperatures are bounded to [T_MIN, T_MAX]: a group whose logits separate it perfectly would
otherwise drive T to 0. The fitted calibration is plain JSON (`to_json`), written with the
probe it calibrates, so an export applies it in PyTorch (`modeling_pgjax.py`) exactly as here.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

METHODS = ("none", "temperature", "protocol")
GROUP_FIELDS = ("Manufacturer", "ManufacturerModelName")
T_MIN, T_MAX = 0.05, 20.0
MIN_COUNT = 20
CALIBRATION_FORMAT = "pgjax-calibration"
CALIBRATION_VERSION = 1


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"calibrate must be one of {', '.join(METHODS)}, not {method!r}")
    return method


def log_loss(y: np.ndarray, z: np.ndarray) -> float:
    """Mean log-loss of labels y under logits z (stable)."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits, labels) -> float:
    """The T in [T_MIN, T_MAX] minimising the log-loss of sigmoid(logits / T)."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    if z.shape != y.shape or z.ndim != 1 or len(z) == 0:
        raise ValueError(f"logits and labels must be equal-length vectors, got {z.shape}, "
                         f"{y.shape}")  # fmt: skip
    res = minimize_scalar(lambda t: log_loss(y, z / np.exp(t)), method="bounded",
                          bounds=(np.log(T_MIN), np.log(T_MAX)),
                          options={"xatol": 1e-8})  # fmt: skip
    return float(np.exp(res.x))


def group_keys(tokens: np.ndarray) -> np.ndarray:
    """One key string per item ("id,id": the token ids of GROUP_FIELDS) from tokens [N, G]."""
    tokens = np.asarray(tokens, np.int64)
    return np.array([",".join(str(int(t)) for t in row) for row in tokens], dtype=object)


def fit(method: str, logits, labels, keys=None, *, min_count: int = MIN_COUNT,
        names: dict | None = None) -> dict:  # fmt: skip
    """The calibration of `method` fitted on validation logits, labels and group keys; JSON-ready.
    `names` maps a key to a readable group name (the fields' token strings)."""
    check_method(method)
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    out: dict = {"method": method, "temperature": 1.0, "n": int(len(z))}
    if method == "none":
        return out
    if not (0 < y.sum() < len(y)):
        out["reason"] = "the validation split lacks a class: temperature 1"
        return out
    out["temperature"] = fit_temperature(z, y)
    if method == "temperature":
        return out
    if keys is None:
        raise ValueError("protocol calibration needs each validation item's group key")
    keys = np.asarray(keys, dtype=object)
    groups, fallback = {}, {}
    for key in sorted(set(keys)):
        k = keys == key
        n, n_pos = int(k.sum()), int(y[k].sum())
        entry = {"n": n, "n_pos": n_pos, "name": (names or {}).get(key, key)}
        if n < min_count:
            fallback[key] = {**entry, "reason": f"fewer than {min_count} validation items"}
        elif not 0 < n_pos < n:
            fallback[key] = {**entry, "reason": "one class only in validation"}
        else:
            groups[key] = {**entry, "temperature": fit_temperature(z[k], y[k])}
    out.update(fields=list(GROUP_FIELDS), min_count=int(min_count), groups=groups,
               fallback=fallback)  # fmt: skip
    return out


def temperatures(calibration: dict, keys=None) -> np.ndarray | float:
    """The temperature of each item (its group's, else the global one)."""
    t = float(calibration["temperature"])
    if calibration["method"] != "protocol":
        return t
    groups = calibration.get("groups", {})
    return np.array([groups[k]["temperature"] if k in groups else t for k in keys], np.float64)


def apply(calibration: dict, logits, keys=None) -> np.ndarray:
    """Calibrated probabilities of logits (with the items' group keys for `protocol`)."""
    from scipy.special import expit

    return expit(np.asarray(logits, np.float64) / temperatures(calibration, keys))


def group_of(calibration: dict, keys) -> np.ndarray:
    """The calibration group each item falls in: its key's readable name, or "global"."""
    groups = calibration.get("groups", {})
    return np.array([groups[k]["name"] if k in groups else "global" for k in keys], dtype=object)


def probe_record(*, probe, calibration: dict, inputs: list[str], group_columns: list[int],
                 provenance: dict) -> dict:  # fmt: skip
    """A fitted probe and its calibration as the JSON an export carries (OUT/calibration.json):
    logit = ((x - mean) / scale) . w + b on x = the pooled embeddings named by `inputs`
    (concatenated), then sigmoid(logit / T) with T from `calibration` and the item's tokens at
    `group_columns` (the token columns of GROUP_FIELDS)."""
    return {
        "format": CALIBRATION_FORMAT,
        "version": CALIBRATION_VERSION,
        **provenance,
        "inputs": list(inputs),
        "probe": {"mean": [float(v) for v in probe.mean], "scale": [float(v) for v in probe.scale],
                  "w": [float(v) for v in probe.w], "b": float(probe.b)},
        "group_columns": [int(c) for c in group_columns],
        "calibration": calibration,
    }


def check_record(record: dict, where: str) -> dict:
    """A probe record read from a file, checked enough to fail clearly (naming `where`)."""
    if record.get("format") != CALIBRATION_FORMAT or record.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"{where}: not a pgjax calibration file of version "
                         f"{CALIBRATION_VERSION}")  # fmt: skip
    for key in ("inputs", "probe", "group_columns", "calibration"):
        if key not in record:
            raise ValueError(f"{where}: no {key!r}")
    check_method(record["calibration"].get("method", ""))
    return record
