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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class JaxEncoder:
    """The exported parts of one model as jitted float32 functions of NumPy inputs."""

    def __init__(self, config: dict, variables: dict):
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


def load(path: str | Path, *, step: int | None = None, store: str | Path | None = None):
    """A JaxEncoder from a training workdir (its latest checkpoint, or `step`; `store` overrides
    the store named in its config) or from an export folder written by `pgjax export`."""
    from pgjax.export.source import ExportError, load_workdir, read_export_config

    path = Path(path)
    if (path / "checkpoints").is_dir():
        config, variables = load_workdir(path, step, store)
        return JaxEncoder(config, variables)
    if (path / "model.safetensors").exists():
        from safetensors.numpy import load_file

        from pgjax.export.convert import from_torch, model_rules

        config = read_export_config(path)
        state = load_file(str(path / "model.safetensors"))
        variables = from_torch(state, model_rules(config["architecture"]))
        return JaxEncoder(config, variables)
    raise ExportError(
        f"{path}: neither a training workdir (checkpoints/) nor an export (model.safetensors)"
    )
