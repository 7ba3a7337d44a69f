"""JAX-side inference: `load(DIR_OR_OUT)` -> an encoder with `embed_images` and `embed_protocol`.

The PyTorch side of an export (`OUT/modeling_pgjax.py`, `from_pretrained(OUT)`) has the same
methods with the same inputs and outputs, so a user can compare the two on their own data:

    import pgjax.inference
    jax_model = pgjax.inference.load("workdir")          # a training workdir (a checkpoint)
    jax_model = pgjax.inference.load("OUT")              # or an export folder
    z = jax_model.embed_images(images)    # float32 [B, D]; images [B, H, W] in [0, 1] or uint8
    p = jax_model.embed_protocol(tokens, values, value_mask)   # float32 [B, W]

`embed_*` are the pooled encoder features (`Objective.embed_images` / `embed_protocol`),
`project_*` the L2-normalised contrastive embeddings where the model has projection heads.
Computation is float32 whatever dtype the model was trained in.

    n = jax_model.protocol_novelty(tokens, values, value_mask)
    n["novelty"], n["unusual"]   # Mahalanobis distance [B]; ["Field=value (unseen|rare)", ...]
    p = jax_model.predict_proba(images, tokens, values, value_mask)   # calibrated probe

The novelty statistics (`pgjax.novelty`) come from an export's protocol_stats.npz, or, for a
workdir, are recorded from its checkpoint and training store on first use (and cached there).
The probe and its calibration come from an export's calibration.json or, for a workdir,
`load(..., calibration=EVAL_DIR/calibration/MODEL__HEAD.json)`. `modeling_pgjax.py` has the
same methods and gives the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class JaxEncoder:
    """The exported parts of one model as jitted float32 functions of NumPy inputs."""

    def __init__(self, config: dict, variables: dict, *, stats=None, calibration=None,
                 stats_source=None):  # fmt: skip
        import jax

        from pgjax.export.architecture import flax_modules

        self.config = config
        self.input_shape = tuple(config["input"]["shape"])
        self.modules = flax_modules(config["architecture"])
        self.variables = {
            part: {
                col: jax.tree.map(lambda x: np.asarray(x, np.float32), tree[part])
                for col, tree in variables.items()
                if part in tree
            }
            for part in self.modules
        }
        self._apply = {}
        self._protocol_stats = stats
        self._stats_source = stats_source  # () -> ProtocolStats, called on first use
        self.calibration = calibration

    def _fn(self, name: str):
        """A jitted apply of `name`; train=False everywhere (running BatchNorm statistics)."""
        import jax

        if name not in self._apply:
            encoder = self.modules["image_encoder"]
            if name == "image":
                fn = lambda v, x: encoder.apply(v["image_encoder"], x, train=False)  # noqa: E731
            elif name == "protocol":
                protocol = self.modules["protocol_encoder"]

                def fn(v, t, vals, mask):
                    return protocol.apply(v["protocol_encoder"], t, vals, mask, train=False)
            else:  # "image_proj" / "protocol_proj"
                head = self.modules[name]
                fn = lambda v, x: head.apply(v[name], x)  # noqa: E731
            self._apply[name] = jax.jit(fn)
        return self._apply[name]

    # Inputs -----------------------------------------------------------------------------------

    def image_array(self, images) -> np.ndarray:
        """[B, *shape] (or [B, *shape, 1]) floats in [0, 1] or store integers -> float32
        [B, *shape, 1], the layout of training batches (`prepare_batch`)."""
        x = np.asarray(images)
        if x.dtype in (np.uint8, np.uint16):
            x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 65535.0)
        x = x.astype(np.float32)
        nd = len(self.input_shape)
        if x.ndim == nd + 1:
            x = x[..., None]
        if x.ndim != nd + 2 or x.shape[-1] != 1:
            raise ValueError(
                f"images must be [B, {', '.join(map(str, self.input_shape))}], got {x.shape}"
            )
        return x

    @staticmethod
    def protocol_arrays(tokens, values=None, value_mask=None):
        if isinstance(tokens, dict):
            tokens, values, value_mask = (tokens["tokens"], tokens.get("values"),
                                          tokens.get("value_mask"))  # fmt: skip
        tokens = np.asarray(tokens, np.int32)
        zeros = np.zeros(tokens.shape, np.float32)
        values = zeros if values is None else np.asarray(values, np.float32)
        value_mask = zeros if value_mask is None else np.asarray(value_mask, np.float32)
        return tokens, values, value_mask

    # Outputs ----------------------------------------------------------------------------------

    def _require(self, part: str, why: str):
        if part not in self.modules:
            raise ValueError(f"this model has no {part} ({why})")

    def embed_images(self, images) -> np.ndarray:
        out = self._fn("image")(self.variables, self.image_array(images))
        return np.asarray(out["pooled"], np.float32)

    def project_images(self, images) -> np.ndarray:
        self._require("image_proj", "no contrastive term")
        pooled = self._fn("image")(self.variables, self.image_array(images))["pooled"]
        return np.asarray(self._fn("image_proj")(self.variables, pooled), np.float32)

    def _protocol(self, tokens, values, value_mask):
        self._require("protocol_encoder", "no protocol term")
        arrays = self.protocol_arrays(tokens, values, value_mask)
        return self._fn("protocol")(self.variables, *arrays)

    def embed_protocol(self, tokens, values=None, value_mask=None) -> np.ndarray:
        return np.asarray(self._protocol(tokens, values, value_mask)["pooled"], np.float32)

    def project_protocol(self, tokens, values=None, value_mask=None) -> np.ndarray:
        self._require("protocol_proj", "no contrastive term")
        pooled = self._protocol(tokens, values, value_mask)["pooled"]
        return np.asarray(self._fn("protocol_proj")(self.variables, pooled), np.float32)

    # Protocol novelty and calibrated probabilities ------------------------------------------

    @property
    def protocol_stats(self):
        """The checkpoint's recorded protocol distribution (pgjax.novelty.ProtocolStats)."""
        if self._protocol_stats is None:
            if self._stats_source is None:
                raise ValueError("this model has no protocol statistics (protocol_stats.npz)")
            self._protocol_stats = self._stats_source()
        return self._protocol_stats

    def novelty_from_embedding(self, protocol_embedding) -> np.ndarray:
        stats = self.protocol_stats
        if not stats.has_embedding:
            return np.full(len(protocol_embedding), np.nan)
        return stats.distance(protocol_embedding)

    def unusual_values(self, tokens) -> list[list[str]]:
        return self.protocol_stats.unusual(tokens)

    def protocol_novelty(self, tokens, values=None, value_mask=None) -> dict:
        """{"novelty": float64 [B], "unusual": [[str]]} of protocol inputs."""
        tokens, values, value_mask = self.protocol_arrays(tokens, values, value_mask)
        if "protocol_encoder" in self.modules and self.protocol_stats.has_embedding:
            novelty = self.novelty_from_embedding(self.embed_protocol(tokens, values, value_mask))
        else:
            novelty = np.full(len(tokens), np.nan)
        return {"novelty": novelty, "unusual": self.unusual_values(tokens)}

    def calibrated_proba(self, image_embedding, protocol_embedding=None, tokens=None,
                         calibrated: bool = True) -> np.ndarray:  # fmt: skip
        """The probe's probabilities [B] (float64) from pooled embeddings, divided by the
        fitted temperature of each item's calibration group with `calibrated`."""
        from pgjax.eval import calibration as cal_lib

        rec = self.calibration
        if rec is None:
            raise ValueError("this model carries no probe (load with calibration=FILE)")
        parts = {"image": image_embedding, "protocol": protocol_embedding}
        missing = [k for k in rec["inputs"] if parts[k] is None]
        if missing:
            raise ValueError(f"the probe reads {rec['inputs']}; missing {missing}")
        x = np.concatenate([np.asarray(parts[k], np.float64) for k in rec["inputs"]], axis=1)
        p = rec["probe"]
        z = ((x - np.asarray(p["mean"])) / np.asarray(p["scale"])) @ np.asarray(p["w"]) + p["b"]
        cal = rec["calibration"] if calibrated else {"method": "none", "temperature": 1.0}
        keys = None
        if cal["method"] == "protocol":
            if tokens is None:
                raise ValueError("protocol calibration needs the items' tokens")
            keys = cal_lib.group_keys(np.asarray(tokens, np.int64)[:, rec["group_columns"]])
        return cal_lib.apply(cal, z, keys)

    def predict_proba(self, images, tokens=None, values=None, value_mask=None,
                      calibrated: bool = True) -> np.ndarray:  # fmt: skip
        """The probe's (calibrated) probability of the finding, per item."""
        if self.calibration is None:
            raise ValueError("this model carries no probe (load with calibration=FILE)")
        image = self.embed_images(images)
        protocol = None
        if "protocol" in self.calibration["inputs"]:
            protocol = self.embed_protocol(tokens, values, value_mask)
        return self.calibrated_proba(image, protocol, tokens, calibrated)


def read_calibration(path: str | Path) -> dict:
    """A probe with its calibration (`pgjax eval`'s calibration/*.json), checked."""
    import json

    from pgjax.eval.calibration import check_record

    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable calibration file: {e}") from e
    return check_record(record, str(path))


def load(path: str | Path, *, step: int | None = None, store: str | Path | None = None,
         calibration: str | Path | None = None):  # fmt: skip
    """A JaxEncoder from a training workdir (its latest checkpoint, or `step`; `store` overrides
    the store named in its config) or from an export folder written by `pgjax export`.
    `calibration`: a probe file to use instead of (or, for a workdir, as) the model's."""
    from pgjax.export.source import ExportError, load_workdir, read_export_config

    path = Path(path)
    probe = read_calibration(calibration) if calibration else None
    if (path / "checkpoints").is_dir():
        from pgjax import novelty

        config, variables = load_workdir(path, step, store)
        source = lambda: novelty.for_checkpoint(path, step=step, store=store)  # noqa: E731
        return JaxEncoder(config, variables, calibration=probe, stats_source=source)
    if (path / "model.safetensors").exists():
        from safetensors.numpy import load_file

        from pgjax.export.convert import from_torch, model_rules
        from pgjax.novelty import STATS_FILE, ProtocolStats

        config = read_export_config(path)
        state = load_file(str(path / "model.safetensors"))
        variables = from_torch(state, model_rules(config["architecture"]))
        stats = ProtocolStats.load(path / STATS_FILE) if (path / STATS_FILE).exists() else None
        if probe is None and (path / "calibration.json").exists():
            probe = read_calibration(path / "calibration.json")
        return JaxEncoder(config, variables, stats=stats, calibration=probe)
    raise ExportError(
        f"{path}: neither a training workdir (checkpoints/) nor an export (model.safetensors)"
    )
