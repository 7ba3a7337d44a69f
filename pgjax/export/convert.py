"""Flax parameters <-> PyTorch state dicts, one small rule-maker per module kind (timm style).

A rule maps one Flax leaf (collection, part, ..., name) to one torch key, with the layout change
of its kind:

  dense   Flax kernel [in, out]          <-> torch Linear weight [out, in]
  conv    Flax kernel [*k, in, out]      <-> torch ConvNd weight [out, in, *k]
  copy    same layout (biases, norm scales, embeddings, cls tokens, position embeddings)

The same rules convert both ways, so `to_torch` and `from_torch` are inverses (tested), and
every Flax leaf of an exported part must be claimed by exactly one rule: a parameter the
converter does not know is an error, not a silently dropped weight. NumPy only (no JAX).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    flax: Path  # (collection, part, ..., leaf name)
    torch: str
    kind: str  # "dense", "conv", "copy"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def dense(flax: Path, torch: str, bias: bool = True) -> list[Rule]:
    rules = [Rule((*flax, "kernel"), f"{torch}.weight", "dense")]
    return rules + ([Rule((*flax, "bias"), f"{torch}.bias", "copy")] if bias else [])


def conv(flax: Path, torch: str, bias: bool = True) -> list[Rule]:
    rules = [Rule((*flax, "kernel"), f"{torch}.weight", "conv")]
    return rules + ([Rule((*flax, "bias"), f"{torch}.bias", "copy")] if bias else [])


def layer_norm(flax: Path, torch: str) -> list[Rule]:
    return [Rule((*flax, "scale"), f"{torch}.weight", "copy"),
            Rule((*flax, "bias"), f"{torch}.bias", "copy")]  # fmt: skip


def batch_norm(flax: Path, torch: str) -> list[Rule]:
    """flax: ("params", part, ...); the running statistics live at ("batch_stats", part, ...)."""
    stats = ("batch_stats", *flax[1:])
    return layer_norm(flax, torch) + [
        Rule((*stats, "mean"), f"{torch}.running_mean", "copy"),
        Rule((*stats, "var"), f"{torch}.running_var", "copy"),
    ]


def param(flax: Path, torch: str) -> list[Rule]:
    return [Rule(flax, torch, "copy")]


def attention(flax: Path, torch: str) -> list[Rule]:
    # The fused qkv output axis is [3, heads, head_dim] on both sides: a plain transpose.
    return dense((*flax, "qkv"), f"{torch}.qkv") + dense((*flax, "proj"), f"{torch}.proj")


def mlp(flax: Path, torch: str) -> list[Rule]:
    return dense((*flax, "fc1"), f"{torch}.fc1") + dense((*flax, "fc2"), f"{torch}.fc2")


def transformer_block(flax: Path, torch: str) -> list[Rule]:
    return (
        layer_norm((*flax, "norm1"), f"{torch}.norm1")
        + attention((*flax, "attn"), f"{torch}.attn")
        + layer_norm((*flax, "norm2"), f"{torch}.norm2")
        + mlp((*flax, "mlp"), f"{torch}.mlp")
    )


def vit(arch: dict, part: str = "image_encoder", torch: str = "image_encoder") -> list[Rule]:
    """pgjax ViT (Flax) -> timm-named VisionTransformer keys under `torch`."""
    p = ("params", part)
    rules = conv((*p, "patch_embed"), _join(torch, "patch_embed.proj"))
    rules += param((*p, "pos_embed"), _join(torch, "pos_embed"))
    if arch.get("pool", "cls") == "cls":
        rules += param((*p, "cls_token"), _join(torch, "cls_token"))
    for i in range(arch["depth"]):
        rules += transformer_block((*p, f"blocks_{i}"), _join(torch, f"blocks.{i}"))
    return rules + layer_norm((*p, "norm"), _join(torch, "norm"))


def resnet(arch: dict, part: str = "image_encoder", torch: str = "image_encoder") -> list[Rule]:
    p = ("params", part)
    norm = batch_norm if arch.get("norm", "batch") == "batch" else layer_norm
    rules = conv((*p, "conv1"), _join(torch, "conv1"), bias=False)
    rules += norm((*p, "norm1"), _join(torch, "norm1"))
    expansion = 1 if arch["block"] == "basic" else 4
    convs = 2 if arch["block"] == "basic" else 3
    cin = arch["width"]
    for s, n_blocks in enumerate(arch["stage_sizes"]):
        features = arch["width"] * 2**s
        for i in range(n_blocks):
            f, t = (*p, f"layer{s + 1}_{i}"), _join(torch, f"layer{s + 1}.{i}")
            for c in range(1, convs + 1):
                rules += conv((*f, f"conv{c}"), f"{t}.conv{c}", bias=False)
                rules += norm((*f, f"norm{c}"), f"{t}.norm{c}")
            stride = 2 if s > 0 and i == 0 else 1
            if stride != 1 or cin != features * expansion:
                rules += conv((*f, "downsample_conv"), f"{t}.downsample_conv", bias=False)
                rules += norm((*f, "downsample_norm"), f"{t}.downsample_norm")
            cin = features * expansion
    return rules


def protocol_encoder(arch: dict, part: str = "protocol_encoder") -> list[Rule]:
    p = ("params", part)
    rules = [Rule((*p, "token_embed", "embedding"), f"{part}.token_embed.weight", "copy")]
    for name in ("field_embed", "value_kernel", "value_bias", "cls_token"):
        rules += param((*p, name), f"{part}.{name}")
    for i in range(arch["depth"]):
        rules += transformer_block((*p, f"blocks_{i}"), f"{part}.blocks.{i}")
    return rules + layer_norm((*p, "norm"), f"{part}.norm")


def projection_head(arch: dict, part: str) -> list[Rule]:
    p = ("params", part)
    if arch.get("hidden_dim") is None:
        return dense((*p, "proj"), f"{part}.proj")
    return dense((*p, "fc1"), f"{part}.fc1") + dense((*p, "fc2"), f"{part}.fc2")


def model_rules(architecture: dict) -> list[Rule]:
    """Every rule of an export's architecture (see `pgjax.export.architecture`)."""
    image = architecture["image_encoder"]
    rules = vit(image) if image["kind"] == "vit" else resnet(image)
    if architecture.get("protocol_encoder"):
        rules += protocol_encoder(architecture["protocol_encoder"])
    for part in ("image_proj", "protocol_proj"):
        if architecture.get(part):
            rules += projection_head(architecture[part], part)
    return rules


# ---------------------------------------------------------------------------------------------
# Applying rules


def _to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "dense":
        return x.T
    if kind == "conv":  # [*k, in, out] -> [out, in, *k]
        nd = x.ndim - 2
        return x.transpose(nd + 1, nd, *range(nd))
    return x


def _to_flax_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "dense":
        return x.T
    if kind == "conv":  # [out, in, *k] -> [*k, in, out]
        nd = x.ndim - 2
        return x.transpose(*range(2, nd + 2), 1, 0)
    return x


def _leaves(tree, prefix: Path = ()) -> Iterable[tuple[Path, object]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*prefix, str(k)))
    else:
        yield prefix, tree


def _get(tree: dict, path: Path):
    node = tree
    for k in path:
        if not isinstance(node, dict) or k not in node:
            raise KeyError("/".join(path))
        node = node[k]
    return node


def to_torch(variables: dict, rules: list[Rule]) -> dict[str, np.ndarray]:
    """Flax variables {"params": {part: ...}, "batch_stats": {...}} -> float32 torch state dict.

    Raises KeyError for a rule whose leaf is missing, and ValueError for a leaf of an exported
    part that no rule claims. BatchNorm's `num_batches_tracked` buffers (unused in eval mode)
    are added as 0 so that torch loads the state dict strictly.
    """
    parts = {r.flax[1] for r in rules}
    claimed = {r.flax for r in rules}
    unclaimed = [
        "/".join(path)
        for collection, tree in variables.items()
        for path, _ in _leaves({p: t for p, t in tree.items() if p in parts}, (collection,))
        if path not in claimed
    ]
    if unclaimed:
        raise ValueError(f"parameters with no export rule: {unclaimed[:10]}")
    state = {}
    for r in rules:
        x = np.asarray(_get(variables, r.flax), dtype=np.float32)  # bf16-trained -> float32
        state[r.torch] = np.ascontiguousarray(_to_torch_layout(x, r.kind))
        if r.torch.endswith(".running_mean"):
            state[r.torch[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return state


def from_torch(state: dict, rules: list[Rule]) -> dict:
    """The inverse of `to_torch`: a torch state dict (NumPy or tensors) -> Flax variables."""
    out: dict = {}
    for r in rules:
        if r.torch not in state:
            raise KeyError(f"state dict has no {r.torch!r}")
        x = np.asarray(state[r.torch], dtype=np.float32)
        node = out
        for k in r.flax[:-1]:
            node = node.setdefault(k, {})
        node[r.flax[-1]] = np.ascontiguousarray(_to_flax_layout(x, r.kind))
    return out


def timm_state_dict(state: dict[str, np.ndarray], prefix: str = "image_encoder.") -> dict:
    """The 2D ViT's keys as timm's VisionTransformer names them (the export already uses timm's
    names; only the model prefix goes)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
