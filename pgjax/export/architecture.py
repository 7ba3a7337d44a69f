"""The architecture of an export: what `config.json` says about the models, and the Flax modules
it rebuilds.

The description is taken from the trained objective's Flax modules (their dataclass fields),
so it cannot drift from what was trained; `flax_modules` rebuilds them in float32 for the JAX
side of inference and parity (a bf16-trained model is exported and compared in float32).
"""

from __future__ import annotations

import numpy as np

# Fields of each module kind that change the function computed at inference. Training-only
# fields (dropout, remat, attention_impl, momentum, axis_name, dtypes) are left out.
VIT_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "pool", "gelu_approximate")
RESNET_FIELDS = ("stage_sizes", "block", "width", "norm", "group_norm_groups")
PROTOCOL_FIELDS = ("num_fields", "vocab_size", "width", "depth", "num_heads", "mlp_dim",
                   "pad_id", "gelu_approximate")  # fmt: skip
PROJECTION_FIELDS = ("embed_dim", "hidden_dim", "activation", "normalize")
EXPORTED_PARTS = ("image_encoder", "protocol_encoder", "image_proj", "protocol_proj")


def _plain(v):
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def _fields(module, names) -> dict:
    return {n: _plain(getattr(module, n)) for n in names}


def describe(parts: dict, params: dict) -> dict:
    """{part: description} of the exported parts of an objective (`Objective.parts`)."""
    from pgjax.models import ProjectionHead, ResNet, ViT

    image = parts["image_encoder"]
    if isinstance(image, ViT):
        out = {"image_encoder": {"kind": "vit", **_fields(image, VIT_FIELDS)}}
    elif isinstance(image, ResNet):
        out = {"image_encoder": {"kind": "resnet", **_fields(image, RESNET_FIELDS)}}
    else:
        raise ValueError(f"cannot export image encoder {type(image).__name__}")
    out["protocol_encoder"] = None
    if "protocol_encoder" in parts:
        out["protocol_encoder"] = _fields(parts["protocol_encoder"], PROTOCOL_FIELDS)
    for name in ("image_proj", "protocol_proj"):
        out[name] = None
        if name in parts:
            head = parts[name]
            if not isinstance(head, ProjectionHead):
                raise ValueError(f"cannot export {name} of type {type(head).__name__}")
            first = "proj" if head.hidden_dim is None else "fc1"
            in_dim = int(np.shape(params[name][first]["kernel"])[0])
            out[name] = {"in_dim": in_dim, **_fields(head, PROJECTION_FIELDS)}
    return out


def flax_modules(architecture: dict) -> dict:
    """The Flax modules of a description, float32, keyed by part."""
    import jax.numpy as jnp

    from pgjax.models import ProjectionHead, ProtocolEncoder, ResNet, ViT

    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    image = dict(architecture["image_encoder"])
    kind = image.pop("kind")
    for key in ("patch_size", "stage_sizes"):
        if key in image:
            image[key] = tuple(image[key])
    modules = {"image_encoder": (ViT if kind == "vit" else ResNet)(**image, **f32)}
    if architecture.get("protocol_encoder"):
        modules["protocol_encoder"] = ProtocolEncoder(**architecture["protocol_encoder"], **f32)
    for name in ("image_proj", "protocol_proj"):
        if architecture.get(name):
            kw = {k: v for k, v in architecture[name].items() if k != "in_dim"}
            modules[name] = ProjectionHead(**kw, **f32)
    return modules
