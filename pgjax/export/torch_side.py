"""The PyTorch side of an export, run in a process where JAX cannot be imported.

    python -m pgjax.export.torch_side OUT INPUTS.npz OUTPUTS.npz

Loads OUT/modeling_pgjax.py by path (the file users get, not a package module), runs every
input set of INPUTS.npz (keys "<set>__images", "<set>__tokens", "<set>__values",
"<set>__value_mask") and writes the embeddings as "<set>__<output>". Any import of jax, jaxlib,
flax, optax or orbax raises ImportError here, so a PyTorch side that needed JAX would fail.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

BLOCKED = ("jax", "jaxlib", "flax", "optax", "orbax")


class JaxBlocker(importlib.abc.MetaPathFinder):
    """A meta path finder that refuses JAX and its libraries."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"import of {fullname!r} blocked: the PyTorch side must not need JAX")
        return None


def block_jax() -> None:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if loaded:
        raise RuntimeError(f"JAX already imported in this process: {loaded[:5]}")
    sys.meta_path.insert(0, JaxBlocker())


def load_modeling(out: str | Path):
    """OUT/modeling_pgjax.py as a module."""
    path = Path(out) / "modeling_pgjax.py"
    if not path.exists():
        raise FileNotFoundError(f"{out}: no modeling_pgjax.py (not a pgjax export)")
    spec = importlib.util.spec_from_file_location("modeling_pgjax", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_pgjax"] = module
    spec.loader.exec_module(module)
    return module


def run_sets(model, inputs: dict) -> dict:
    """Every output of the model on every input set ({"<set>__<output>": array}), the novelty
    score and calibrated probability included where the export has them."""
    import numpy as np

    sets = sorted({k.split("__")[0] for k in inputs})
    out = {}
    for s in sets:
        images = inputs.get(f"{s}__images")
        if images is not None:
            out[f"{s}__image_pooled"] = model.embed_images(images)
            if model.image_proj is not None:
                out[f"{s}__image_proj"] = model.project_images(images)
        tokens = inputs.get(f"{s}__tokens")
        if tokens is not None and model.protocol_encoder is not None:
            args = (tokens, inputs[f"{s}__values"], inputs[f"{s}__value_mask"])
            out[f"{s}__protocol_pooled"] = model.embed_protocol(*args)
            if model.protocol_proj is not None:
                out[f"{s}__protocol_proj"] = model.project_protocol(*args)
        if tokens is not None:
            args = (tokens, inputs[f"{s}__values"], inputs[f"{s}__value_mask"])
            if model.protocol_stats is not None:
                novelty = model.protocol_novelty(*args)["novelty"]
                out[f"{s}__novelty"] = np.nan_to_num(novelty, nan=-1.0)
            if model.calibration is not None:
                out[f"{s}__proba"] = model.predict_proba(images, *args)
    return out


def main(argv: list[str] | None = None) -> int:
    block_jax()
    import numpy as np

    out_dir, inputs_path, outputs_path = (sys.argv[1:] if argv is None else argv)[:3]
    model = load_modeling(out_dir).from_pretrained(out_dir)
    with np.load(inputs_path) as f:
        inputs = {k: f[k] for k in f.files}
    np.savez(outputs_path, **run_sets(model, inputs))
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if leaked:  # cannot happen with the blocker in place; checked so the claim is proven
        raise RuntimeError(f"JAX modules were imported: {leaked[:5]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
