"""Vision Transformer (Dosovitskiy et al. 2021) for 1-channel 2D images and 3D volumes.

Parameter names follow timm's VisionTransformer (patch_embed, cls_token, pos_embed,
blocks_i/{norm1,attn/{qkv,proj},norm2,mlp/{fc1,fc2}}, norm) so that the PyTorch exporter can map
them one to one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from pgjax.models.layers import Dtype, transformer_stack

# name -> (width, depth, num_heads, mlp_dim). "mu" is a toy size for CPU tests.
VIT_SIZES = {
    "mu": (64, 2, 2, 256),
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
}


def vit_config(name: str) -> dict:
    """ViT constructor arguments for a name like "b/16" (2D, 16x16 patches), "mu/8x8" or
    "mu/4x8x8" (3D: depth x height x width patches).

    A single patch number means square 2D patches.
    """
    m = re.fullmatch(r"(\w+)/(\d+(?:x\d+){0,2})", name)
    if m is None or m.group(1) not in VIT_SIZES:
        raise ValueError(
            f"unknown ViT name {name!r}; expected SIZE/PATCH with SIZE in "
            f"{sorted(VIT_SIZES)} and PATCH like 16, 16x16 or 4x16x16"
        )
    width, depth, heads, mlp = VIT_SIZES[m.group(1)]
    patch = tuple(int(p) for p in m.group(2).split("x"))
    if len(patch) == 1:
        patch = patch * 2
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=patch)


class ViT(nn.Module):
    """Vision Transformer over non-overlapping patches of a [B, H, W, C] image or, when
    `patch_size` has three entries, a [B, D, H, W, C] volume.

    Learned position embeddings are sized from the input at init (one per patch, plus one for the
    cls token); applying the model to another input size is an error.

    Attributes:
      width, depth, num_heads, mlp_dim: transformer sizes (see `vit_config`).
      patch_size: patch shape, 2 or 3 entries.
      pool: "cls" (pooled = the cls token after the final norm, timm's default) or "gap" (no cls
        token; pooled = mean of the normed patch tokens, big_vision's choice).
      dropout: dropout on the embeddings and inside every block (0: MAE/SimCLR pretraining).
      gelu_approximate: tanh GELU; False (exact) matches torch.
      attention_impl: `implementation` for `jax.nn.dot_product_attention`.
      remat: recompute each block in the backward pass (less memory for ViT-L and 3D inputs).
      dtype: compute dtype (e.g. jnp.bfloat16); param_dtype: parameter dtype.
    """

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: Sequence[int] = (16, 16)
    pool: str = "cls"
    dropout: float = 0.0
    gelu_approximate: bool = False
    attention_impl: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False, keep_indices=None):
        """Encode images.

        x: [B, H, W, C] or [B, D, H, W, C]. keep_indices: optional int [B, K], the patches to
        keep (MAE), picked after the position embeddings are added so that each kept patch keeps
        its position. Returns {"pooled": [B, width], "tokens": [B, T, width]} where `tokens` are
        the (kept) patch tokens after the final norm, without the cls token.
        """
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', not {self.pool!r}")
        patch = tuple(self.patch_size)
        nd = len(patch)
        if x.ndim != nd + 2:
            raise ValueError(
                f"patch_size {patch} needs {nd + 2}D input [B, ..., C], got shape {x.shape}"
            )
        if any(s % p for s, p in zip(x.shape[1:-1], patch, strict=True)):
            raise ValueError(f"input spatial shape {x.shape[1:-1]} is not divisible by {patch}")

        x = nn.Conv(
            self.width,
            kernel_size=patch,
            strides=patch,
            padding="VALID",
            # MAE initialises the patch projection like a Linear layer on the flattened patch.
            kernel_init=nn.initializers.xavier_uniform(in_axis=tuple(range(nd + 1)), out_axis=-1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embed",
        )(x.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)  # row-major over the patch grid, like torch's flatten(2)

        use_cls = self.pool == "cls"
        prefix = 1 if use_cls else 0
        pos = self.param(
            "pos_embed",
            nn.initializers.normal(0.02),
            (1, prefix + x.shape[1], self.width),
            self.param_dtype,
        ).astype(self.dtype)
        x = x + pos[:, prefix:]
        if keep_indices is not None:
            x = jnp.take_along_axis(x, keep_indices[..., None].astype(jnp.int32), axis=1)
        if use_cls:
            cls = self.param(
                "cls_token", nn.initializers.normal(1e-6), (1, 1, self.width), self.param_dtype
            )
            cls = (cls.astype(self.dtype) + pos[:, :1]).repeat(b, axis=0)
            x = jnp.concatenate([cls, x], axis=1)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        x = transformer_stack(self, x, None, train, prefix="blocks", norm="norm")
        tokens = x[:, prefix:]
        pooled = x[:, 0] if use_cls else tokens.mean(axis=1)
        return {"pooled": pooled, "tokens": tokens}


def patchify(x, patch_size: Sequence[int]):
    """Cut [B, *spatial, C] into [B, T, prod(patch_size) * C] patches, in the ViT's token order
    (row-major over the patch grid; within a patch, row-major pixels then channels)."""
    patch = tuple(patch_size)
    nd = len(patch)
    b, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
    if len(spatial) != nd or any(s % p for s, p in zip(spatial, patch, strict=True)):
        raise ValueError(f"image size {tuple(spatial)} is not divisible by the patch size {patch}")
    grid = tuple(s // p for s, p in zip(spatial, patch, strict=True))
    # [B, g1, p1, g2, p2, ..., C] -> [B, g1, g2, ..., p1, p2, ..., C]
    x = x.reshape(b, *[d for gp in zip(grid, patch, strict=True) for d in gp], c)
    order = [0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1]
    return x.transpose(order).reshape(b, math.prod(grid), math.prod(patch) * c)


def unpatchify(patches, patch_size: Sequence[int], spatial_shape: Sequence[int]):
    """Inverse of `patchify`: [B, T, prod(patch_size) * C] -> [B, *spatial_shape, C]."""
    patch = tuple(patch_size)
    nd = len(patch)
    b = patches.shape[0]
    c = patches.shape[-1] // math.prod(patch)
    grid = tuple(s // p for s, p in zip(spatial_shape, patch, strict=True))
    x = patches.reshape(b, *grid, *patch, c)
    order = [0, *[i for g in range(nd) for i in (1 + g, 1 + nd + g)], 2 * nd + 1]
    return x.transpose(order).reshape(b, *spatial_shape, c)
