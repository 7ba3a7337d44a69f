"""Image-only losses of the baselines: MAE, SimCLR (NT-Xent), and CE+DCM's hinge GAN terms.

MAE's patches and masking are the ViT's (`pgjax.models.patchify`, `pgjax.models.mae_masking`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pgjax.losses.contrastive import MASKED_LOGIT, AxisName, masked_mean, ring_logsumexp

# ---------------------------------------------------------------------------------------------
# MAE


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
    return hinge_d_real(real_logits, axis_name=axis_name) + hinge_d_fake(
        fake_logits, axis_name=axis_name
    )


def hinge_d_real(real_logits: jax.Array, *, axis_name: AxisName | None = None) -> jax.Array:
    """The true samples' half of `hinge_d_loss`: mean(relu(1 - D(real)))."""
    return masked_mean(jax.nn.relu(1.0 - real_logits), True, axis_name)


def hinge_d_fake(fake_logits: jax.Array, *, axis_name: AxisName | None = None) -> jax.Array:
    """The fakes' half of `hinge_d_loss`: mean(relu(1 + D(fake)))."""
    return masked_mean(jax.nn.relu(1.0 + fake_logits), True, axis_name)


def hinge_g_loss(fake_logits: jax.Array, *, axis_name: AxisName | None = None) -> jax.Array:
    """Generator hinge loss: -mean(D(fake)), a scalar."""
    return -masked_mean(fake_logits, True, axis_name)
