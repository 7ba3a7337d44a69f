"""Image-only losses of the baselines: MAE, SimCLR (NT-Xent), and CE+DCM (inpainting + hinge GAN).

Images are channels-last, 2D [B, H, W, C] or 3D [B, D, H, W, C]. Patch order is raster order over
the patch grid, and a patch vector is its pixels in raster order with channels last, as in MAE.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from pgjax.losses.contrastive import MASKED_LOGIT, AxisName, masked_mean, ring_logsumexp

# ---------------------------------------------------------------------------------------------
# Patches and masking (MAE)


def _patch_tuple(patch_size: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(patch_size, int):
        return (patch_size,) * ndim
    patch = tuple(patch_size)
    if len(patch) != ndim:
        raise ValueError(f"patch size {patch} does not match {ndim} spatial dimensions")
    return patch


def patchify(images: jax.Array, patch_size: int | Sequence[int]) -> jax.Array:
    """Cut images into non-overlapping patches.

    images: [B, H, W, C] or [B, D, H, W, C]; each spatial size divisible by the patch size.
    patch_size: an int for a cube/square, or one per spatial dimension.
    Returns [B, T, prod(patch) * C], T the number of patches.
    """
    spatial = images.shape[1:-1]
    patch = _patch_tuple(patch_size, len(spatial))
    if any(s % p for s, p in zip(spatial, patch, strict=True)):
        raise ValueError(f"image size {spatial} is not divisible by the patch size {patch}")
    grid = [s // p for s, p in zip(spatial, patch, strict=True)]
    b, c, k = images.shape[0], images.shape[-1], len(spatial)
    # [B, g1, p1, g2, p2, ..., C] -> [B, g1, g2, ..., p1, p2, ..., C]
    x = images.reshape(b, *[v for gp in zip(grid, patch, strict=True) for v in gp], c)
    x = x.transpose(0, *range(1, 2 * k, 2), *range(2, 2 * k + 1, 2), 2 * k + 1)
    return x.reshape(b, -1, _prod(patch) * c)


def unpatchify(
    patches: jax.Array, patch_size: int | Sequence[int], spatial_shape: Sequence[int]
) -> jax.Array:
    """Inverse of `patchify`: [B, T, prod(patch) * C] -> [B, *spatial_shape, C].

    spatial_shape: (H, W) or (D, H, W) of the images the patches came from.
    """
    k = len(spatial_shape)
    patch = _patch_tuple(patch_size, k)
    grid = [s // p for s, p in zip(spatial_shape, patch, strict=True)]
    b, t, dim = patches.shape
    if t != _prod(grid) or dim % _prod(patch):
        raise ValueError(f"{t} patches of size {dim} do not tile {tuple(spatial_shape)}")
    c = dim // _prod(patch)
    x = patches.reshape(b, *grid, *patch, c)
    # [B, g1, g2, ..., p1, p2, ..., C] -> [B, g1, p1, g2, p2, ..., C]
    x = x.transpose(0, *[a for i in range(k) for a in (1 + i, 1 + k + i)], 2 * k + 1)
    return x.reshape(b, *spatial_shape, c)


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def random_masking(
    rng: jax.Array, batch: int, num_tokens: int, ratio: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MAE's per-item random masking of `ratio` of the tokens.

    Returns (keep_indices [B, K] int: the visible tokens, in shuffled order, K =
    int(T * (1 - ratio)); mask [B, T] bool, True (1) = masked, in the original token order;
    restore_indices [B, T] int: gathering [visible tokens, mask tokens] with it restores the
    original order).
    """
    keep = int(num_tokens * (1 - ratio))
    if not 1 <= keep <= num_tokens:
        raise ValueError(f"mask ratio {ratio} keeps {keep} of {num_tokens} tokens; need >= 1")
    noise = jax.random.uniform(rng, (batch, num_tokens))
    shuffle = jnp.argsort(noise, axis=1)
    restore = jnp.argsort(shuffle, axis=1)
    mask = restore >= keep  # a token is masked iff its place in the shuffle is past the kept ones
    return shuffle[:, :keep], mask, restore


def mae_loss(
    pred_patches: jax.Array,
    target_patches: jax.Array,
    mask: jax.Array,
    norm_pix: bool = True,
    *,
    eps: float = 1e-6,
    axis_name: AxisName | None = None,
) -> jax.Array:
    """MAE reconstruction loss (He et al. 2022), on the masked patches only.

    pred_patches, target_patches: [B, T, P] (`patchify`). mask: [B, T], true = masked.
    norm_pix: regress each target patch normalised by its own mean and std. The variance is the
    unbiased one, as in the reference code (torch's default). Returns the mean over masked
    patches of the per-patch mean squared error, a scalar.
    """
    target = target_patches.astype(jnp.float32)
    if norm_pix:
        mean = jnp.mean(target, axis=-1, keepdims=True)
        var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + eps)
    per_patch = jnp.mean(jnp.square(pred_patches.astype(jnp.float32) - target), axis=-1)
    return masked_mean(per_patch, mask, axis_name)


# ---------------------------------------------------------------------------------------------
# SimCLR


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-12))


def nt_xent_loss(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
    """NT-Xent of SimCLR (Chen et al. 2020) on one device.

    z1, z2: [N, D] projections of two views of the same N items (normalised here: the loss is on
    cosine similarities). Each of the 2N views has its other view as the positive and the other
    2N - 2 views as negatives. Returns the mean over the 2N anchors, a scalar.
    """
    n = z1.shape[0]
    z = _l2_normalize(jnp.concatenate([z1, z2]))
    # Full float32, as the ring version's blocks (contrastive.PRECISION).
    logits = jnp.matmul(z, z.T, precision=lax.Precision.HIGHEST) / temperature
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), MASKED_LOGIT, logits)
    pos = jnp.concatenate([jnp.diagonal(logits, n), jnp.diagonal(logits, -n)])
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)


def nt_xent_loss_sharded(
    z1_local: jax.Array, z2_local: jax.Array, temperature: float, axis_name: AxisName
) -> jax.Array:
    """`nt_xent_loss` over the global batch, by the ring of `ring_logsumexp`.

    Call inside shard_map. z1_local, z2_local: this device's [b, D] shards of the two views of
    the global [n*b, D] batch. Returns the global loss, the same scalar on every device. Memory
    per device: one [2b, 2b] block of similarities at a time.
    """
    z = _l2_normalize(jnp.concatenate([z1_local, z2_local]))
    scale = 1.0 / temperature
    rows, _ = ring_logsumexp(z, z, scale, axis_name, exclude_self=True)
    b = z1_local.shape[0]
    pos = scale * jnp.sum(z[:b] * z[b:], axis=-1)  # both views of an item share one positive
    local = jnp.sum(rows) - 2 * jnp.sum(pos)
    return lax.psum(local, axis_name) / (2 * b * lax.axis_size(axis_name))


# ---------------------------------------------------------------------------------------------
# CE+DCM: context-encoder inpainting with a hinge-loss (projection) discriminator


def hinge_d_loss(
    real_logits: jax.Array, fake_logits: jax.Array, *, axis_name: AxisName | None = None
) -> jax.Array:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), a scalar."""
    real = masked_mean(jax.nn.relu(1.0 - real_logits), True, axis_name)
    fake = masked_mean(jax.nn.relu(1.0 + fake_logits), True, axis_name)
    return real + fake


def hinge_g_loss(fake_logits: jax.Array, *, axis_name: AxisName | None = None) -> jax.Array:
    """Generator hinge loss: -mean(D(fake)), a scalar."""
    return -masked_mean(fake_logits, True, axis_name)


def inpainting_l2(
    pred: jax.Array,
    target: jax.Array,
    region_mask: jax.Array,
    *,
    axis_name: AxisName | None = None,
) -> jax.Array:
    """Context-encoder reconstruction loss: mean squared error inside the inpainted region.

    pred, target: [B, *spatial, C]. region_mask: true where the region was hidden, [B, *spatial]
    or broadcastable to pred. Returns the mean over the region's elements (pixels x channels).
    """
    if region_mask.ndim == pred.ndim - 1:
        region_mask = region_mask[..., None]
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return masked_mean(err, region_mask.astype(bool), axis_name)
