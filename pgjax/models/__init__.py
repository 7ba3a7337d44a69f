"""Flax (linen) models: image encoders, the protocol encoder and the pretraining heads.

Every model is used functionally (`init` / `apply`, parameters as pytrees). Image encoders map
[B, H, W, 1] images or [B, D, H, W, 1] volumes to {"pooled": [B, C], "tokens": [B, T, C]} (the
ResNet adds "feature_map"); the protocol encoder maps (tokens, values, value_mask) [B, F] to
{"pooled": [B, W], "fields": [B, F, W]}.
"""

from __future__ import annotations

import re

import flax.linen as nn

from pgjax.models.heads import (
    ContextEncoderDecoder,
    FieldPredictionHead,
    FusionHead,
    MAEDecoder,
    ProjectionDiscriminator,
    ProjectionHead,
    SimCLRProjection,
    mae_masking,
)
from pgjax.models.protocol_encoder import ProtocolEncoder, protocol_config
from pgjax.models.resnet import ResNet, resnet_config
from pgjax.models.vit import ViT, patchify, unpatchify, vit_config

__all__ = [
    "ContextEncoderDecoder",
    "FieldPredictionHead",
    "FusionHead",
    "MAEDecoder",
    "ProjectionDiscriminator",
    "ProjectionHead",
    "ProtocolEncoder",
    "ResNet",
    "SimCLRProjection",
    "ViT",
    "build_image_encoder",
    "build_protocol_encoder",
    "mae_masking",
    "patchify",
    "protocol_config",
    "resnet_config",
    "unpatchify",
    "vit_config",
]


def build_image_encoder(name: str, **kw) -> nn.Module:
    """An image encoder by name; keyword arguments override the named configuration.

    ViTs: "vit_SIZE/PATCH" with SIZE in mu, ti, s, b, l and PATCH like 16 or 16x16 (2D) or
    4x16x16 (3D), e.g. "vit_b/16", "vit_mu/8"; "vit3d_SIZE/P" or "vit3d_SIZE/DxHxW" for volumes
    ("vit3d_mu/4x8x8"; a single number means a cube). ResNets: "resnet_mu", "resnet18",
    "resnet34", "resnet50", "resnet101" (2D or 3D according to the input).
    """
    m = re.fullmatch(r"vit(3d)?_(.+)", name)
    if m:
        cfg = vit_config(m.group(2))
        if m.group(1):
            patch = cfg["patch_size"]
            if len(set(patch)) == 1 and len(patch) == 2:  # "vit3d_mu/8": a cube
                cfg["patch_size"] = (patch[0],) * 3
            elif len(patch) != 3:
                raise ValueError(f"{name}: a 3D ViT needs a cubic or DxHxW patch size")
        elif len(cfg["patch_size"]) == 3:
            raise ValueError(f"{name}: a DxHxW patch size needs the vit3d_ prefix")
        return ViT(**{**cfg, **kw})
    if name.startswith("resnet"):
        return ResNet(**{**resnet_config(name), **kw})
    raise ValueError(f"unknown image encoder {name!r}")


def build_protocol_encoder(size: str, num_fields: int, vocab_size: int, **kw) -> ProtocolEncoder:
    """A ProtocolEncoder of a named size ("mu", "ti", "s", "b", see `protocol_config`);
    keyword arguments override the sizes or set other attributes."""
    return ProtocolEncoder(
        num_fields=num_fields, vocab_size=vocab_size, **{**protocol_config(size), **kw}
    )
