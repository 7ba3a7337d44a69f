"""The device mesh and how arrays are laid out on it, as declarative rules.

Two named axes: "data" (pure data parallelism) and "fsdp" (data parallelism whose parameters
and optimizer state are also sharded). The batch is split over both. Parameters follow a list of
(regex, rule) pairs matched against their path ("image_encoder/blocks_3/mlp/fc1/kernel"); the
first match wins:

    "replicate"   every device holds the whole array
    "fsdp"        split the largest dimension that the fsdp axis divides; replicate if none
    a tuple       an explicit PartitionSpec, e.g. (None, "fsdp")
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch dimension is split over every device

DEFAULT_RULES = (
    # Small or awkward arrays: replicate (sharding them saves nothing and costs collectives).
    (r".*(bias|scale|cls|pos_embed|log_scale|temperature)$", "replicate"),
    (r".*", "fsdp"),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices; -1 means "the rest"."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {n} devices")
    auto = (jax.sharding.AxisType.Auto,) * 2  # jit propagates shardings through the model
    return jax.make_mesh((data, fsdp), AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(name: str, shape: Sequence[int], rules, mesh: Mesh) -> P:
    rule = next((r for pattern, r in rules if re.fullmatch(pattern, name)), "replicate")
    if rule == "replicate":
        return P()
    if rule == "fsdp":
        size = mesh.shape["fsdp"]
        if size == 1 or not shape:
            return P()
        for dim in np.argsort(shape)[::-1]:  # the largest dimension the axis divides
            if shape[dim] % size == 0:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
        return P()
    return P(*rule)


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs), by the rules."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_name(path), np.shape(x), rules, mesh)),
        tree,
    )
