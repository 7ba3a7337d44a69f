"""Heads on top of the encoders: contrastive and SimCLR projections, protocol fusion (masked
protocol prediction and translation), the DCM field-prediction head, the MAE pixel decoder, and
the context-encoder inpainting decoder and tag-conditioned projection discriminator of the
CE+DCM baseline (Hu et al. 2020).

Heads that feed a loss return float32 whatever the compute dtype, so losses are computed in
float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgjax.losses.protocol import FieldCandidates
from pgjax.models.layers import (
    LN_EPSILON,
    Attention,
    Dtype,
    Mlp,
    dense_init,
    transformer_stack,
)


class ProjectionHead(nn.Module):
    """Projection to the contrastive embedding space: [..., D] -> [..., embed_dim].

    Attributes:
      embed_dim: output dimension (256; SimCLR used 128, CLIP 512-1024).
      hidden_dim: None for a linear projection (CLIP, our default for protocol-image pairs), or
        the hidden width of a two-layer MLP `fc1` -> activation -> `fc2` (SimCLR's nonlinear
        head, which SimCLR found better than a linear one for image-image contrast).
      activation: "relu" (SimCLR) or "gelu" (exact) for the MLP.
      normalize: L2-normalise the output (cosine-similarity losses), like torch's F.normalize.
    """

    embed_dim: int = 256
    hidden_dim: int | None = None
    activation: str = "relu"
    normalize: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init
        )
        if self.hidden_dim is None:
            x = dense(self.embed_dim, name="proj")(x)
        else:
            act = {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=False)}
            if self.activation not in act:
                raise ValueError(f"activation must be relu or gelu, not {self.activation!r}")
            x = act[self.activation](dense(self.hidden_dim, name="fc1")(x))
            x = dense(self.embed_dim, name="fc2")(x)
        x = x.astype(jnp.float32)
        if self.normalize:
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x


class FieldTokenHead(nn.Module):
    """Token logits of each field over its own candidate ids (MISSING, UNK, its id range; see
    `pgjax.losses.protocol.FieldCandidates`): [B, F, W] -> float32 [B, F, C].

    The parameters are those of `nn.Dense(vocab_size)` (kernel [W, V], bias [V]), so a field's
    logit for an id is the one a dense head over the whole vocabulary would give; only the
    columns of a field's candidates are multiplied with that field's states: F times fewer
    products than [B, F, V] logits, and no [B, F, V] array. Padding candidates get logit 0 (the
    losses leave them out).
    """

    vocab_size: int
    field_ranges: Sequence[tuple[int, int]]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        candidates = FieldCandidates(tuple(self.field_ranges), self.vocab_size)
        if x.shape[-2] != len(candidates.ranges):
            raise ValueError(
                f"{x.shape[-2]} field states for {len(candidates.ranges)} field ranges"
            )
        kernel = self.param("kernel", dense_init, (x.shape[-1], self.vocab_size), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,), self.param_dtype)
        x = x.astype(self.dtype)
        # Static, contiguous slices of the parameters, each cast after slicing: the backward pass
        # then pads each slice's gradient back into one [W, V] sum. (A gather, or slices of a
        # kernel cast to bfloat16 first, made XLA keep one float32 [W, V] buffer per field:
        # 1.2 GiB per pass at W = 512, V = 19,686, F = 31.)
        special = candidates.field_ids(0)[:2]  # MISSING and UNK, the same for every field
        lo, hi = int(special[0]), int(special[-1]) + 1
        if hi - lo != len(special):
            raise ValueError(f"scored specials {special} are not contiguous ids")

        def dense(start, stop, states):
            k = kernel[:, start:stop].astype(self.dtype)
            return states @ k + bias[start:stop].astype(self.dtype)

        specials = dense(lo, hi, x)  # [..., F, 2], every field at once
        out = []
        for f, (start, stop) in enumerate(candidates.ranges):
            logits = jnp.concatenate([specials[..., f, :], dense(start, stop, x[..., f, :])], -1)
            pad = candidates.width - logits.shape[-1]
            out.append(jnp.pad(logits, [(0, 0)] * (x.ndim - 2) + [(0, pad)]))
        return jnp.stack(out, axis=-2).astype(jnp.float32)


class FusionBlock(nn.Module):
    """Transformer decoder block over field states: self-attention among the fields, then
    cross-attention from the fields to the image tokens, then an MLP; all pre-norm residual."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    gelu_approximate: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic=True):
        norm = functools.partial(
            nn.LayerNorm, epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype
        )
        attn = functools.partial(
            Attention,
            self.num_heads,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        drop = functools.partial(nn.Dropout(self.dropout), deterministic=deterministic)
        x = x + drop(attn(name="attn")(norm(name="norm1")(x)))
        context = norm(name="norm_context")(context)
        x = x + drop(attn(name="cross_attn")(norm(name="norm2")(x), context))
        y = Mlp(
            self.mlp_dim,
            dropout=self.dropout,
            gelu_approximate=self.gelu_approximate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(norm(name="norm3")(x), deterministic)
        return x + y


class FusionHead(nn.Module):
    """Per-field predictions from protocol field states that attend to image tokens.

    Used for masked protocol prediction (masked fields arrive as the MASK token's state from the
    ProtocolEncoder) and protocol translation. Both inputs are first projected to `width`
    (`field_proj`, `image_proj`), so any encoder widths can be combined.

    Attributes:
      vocab_size: V, the size of the global vocabulary.
      field_ranges: per field, its [start, stop) of global ids: each field is scored over its
        own candidates only (`FieldTokenHead`).
      width, depth, num_heads, mlp_dim: fusion transformer sizes. Defaults (256, 2, 4, 1024) are
        ours: a light head, so that the encoders, not the head, must carry the information.
      dropout, gelu_approximate, attention_impl, dtype, param_dtype: as in the encoders.
    """

    vocab_size: int
    field_ranges: Sequence[tuple[int, int]]
    width: int = 256
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 1024
    dropout: float = 0.0
    gelu_approximate: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, fields, image_tokens, *, train: bool = False):
        """fields: [B, F, Wp]; image_tokens: [B, T, Wi]. Returns {"logits": float32 [B, F, C]
        (each field's candidates, `FieldCandidates`),
        "values": float32 [B, F] (predicted z-scored numeric value)}."""
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init
        )
        x = dense(self.width, name="field_proj")(fields)
        context = dense(self.width, name="image_proj")(image_tokens)
        for i in range(self.depth):
            x = FusionBlock(
                self.num_heads,
                self.mlp_dim,
                dropout=self.dropout,
                gelu_approximate=self.gelu_approximate,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{i}",
            )(x, context, not train)
        x = nn.LayerNorm(
            epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(x)
        logits = FieldTokenHead(
            self.vocab_size, self.field_ranges, self.dtype, self.param_dtype, name="token_head"
        )(x)
        values = dense(1, name="value_head")(x)[..., 0]
        return {"logits": logits, "values": values.astype(jnp.float32)}


class FieldPredictionHead(nn.Module):
    """DCM head: every protocol field's token logits and numeric value from one pooled image
    embedding, [B, D] -> {"logits": float32 [B, F, C] (each field's candidates), "values":
    float32 [B, F]}.

    A field-specific projection to `width` (a per-field linear read-out of the image embedding,
    like Hu et al.'s classifier on the encoder's features), GELU and LayerNorm, then token and
    value layers shared by the fields: a low-rank stand-in for F separate V-way classifiers,
    which would cost D * F * V parameters.
    """

    num_fields: int
    vocab_size: int
    width: int = 256
    field_ranges: Sequence[tuple[int, int]] = ()  # scored per field: FieldTokenHead
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled):
        dense = dict(kernel_init=dense_init, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.num_fields * self.width, name="field_proj", **dense)(pooled)
        x = nn.gelu(x.reshape(pooled.shape[0], self.num_fields, self.width), approximate=False)
        x = nn.LayerNorm(
            epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(x)
        logits = FieldTokenHead(
            self.vocab_size, self.field_ranges, self.dtype, self.param_dtype, name="token_head"
        )(x)
        values = nn.Dense(1, name="value_head", **dense)(x)[..., 0]
        return {"logits": logits, "values": values.astype(jnp.float32)}


class SimCLRProjection(nn.Module):
    """SimCLR's two-layer MLP projection, [B, D] -> float32 [B, embed_dim]; the hidden width
    defaults to the input width D (2048 for SimCLR's ResNet-50), known only at init."""

    embed_dim: int = 128
    hidden_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return ProjectionHead(
            self.embed_dim,
            hidden_dim=self.hidden_dim or x.shape[-1],
            activation="relu",
            normalize=False,  # NT-Xent normalises
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(x)


def mae_masking(rng, batch_size: int, num_patches: int, mask_ratio: float):
    """Random per-sample patch masking (He et al. 2022).

    Keeps floor(num_patches * (1 - mask_ratio)) patches, at least one: MAE's reference code
    (`int(L * (1 - mask_ratio))`), so the hidden share is never below mask_ratio (14 patches at
    0.75 keep 3, not 4). A 1e-6 slack absorbs float error: 20 * (1 - 0.9) is 1.9999999999999996.
    Returns (keep_indices int32 [B, K] for `ViT(keep_indices=...)`, restore_indices int32 [B, T]
    for `MAEDecoder`, mask float32 [B, T] in patch order: 1 where the patch was hidden).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = max(1, math.floor(num_patches * (1.0 - mask_ratio) + 1e-6))
    noise = jax.random.uniform(rng, (batch_size, num_patches))
    shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    hidden_sorted = (jnp.arange(num_patches) >= keep).astype(jnp.float32)
    mask = jnp.take_along_axis(jnp.broadcast_to(hidden_sorted, shuffle.shape), restore, axis=1)
    return shuffle[:, :keep], restore, mask


class MAEDecoder(nn.Module):
    """MAE pixel decoder (He et al. 2022): visible tokens plus a learned mask token at every
    hidden position, put back in patch order, through a small transformer, to per-patch pixels.

    Works for 2D and 3D patches alike: it only sees the token sequence. Compare its output with
    `vit.patchify(images, patch_size)`.

    Attributes:
      patch_dim: pixels per patch, prod(patch_size) * channels.
      width, depth, num_heads, mlp_dim: decoder sizes; MAE's defaults (512, 8, 16, 2048).
      Position embeddings are learned (MAE uses fixed sin-cos ones), sized at init from
      `restore_indices`.
      dropout, gelu_approximate, attention_impl, remat, dtype, param_dtype: as in `ViT`.
    """

    patch_dim: int
    width: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_dim: int = 2048
    dropout: float = 0.0
    gelu_approximate: bool = False
    attention_impl: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, visible_tokens, restore_indices, *, train: bool = False):
        """visible_tokens: [B, K, We] (encoder patch tokens, in keep_indices order);
        restore_indices: int [B, T]. Returns float32 [B, T, patch_dim]."""
        b, k, _ = visible_tokens.shape
        t = restore_indices.shape[1]
        x = nn.Dense(
            self.width,
            kernel_init=dense_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="decoder_embed",
        )(visible_tokens)
        mask_token = self.param(
            "mask_token", nn.initializers.normal(0.02), (1, 1, self.width), self.param_dtype
        )
        x = jnp.concatenate(
            [x, jnp.broadcast_to(mask_token.astype(x.dtype), (b, t - k, self.width))], axis=1
        )
        x = jnp.take_along_axis(x, restore_indices[..., None].astype(jnp.int32), axis=1)
        pos = self.param(
            "decoder_pos_embed", nn.initializers.normal(0.02), (1, t, self.width), self.param_dtype
        )
        x = x + pos.astype(self.dtype)
        x = transformer_stack(self, x, None, train, prefix="decoder_blocks", norm="decoder_norm")
        x = nn.Dense(
            self.patch_dim,
            kernel_init=dense_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="decoder_pred",
        )(x)
        return x.astype(jnp.float32)


def _upsample_nearest(x, factor: int = 2):
    """Nearest-neighbour upsampling of every spatial axis (torch nn.Upsample(mode="nearest"))."""
    for axis in range(1, x.ndim - 1):
        x = jnp.repeat(x, factor, axis=axis)
    return x


class ContextEncoderDecoder(nn.Module):
    """Context-encoder inpainting decoder (Pathak et al. 2016, as used by Hu et al. 2020).

    From the encoder's final feature map [B, h, w, C] (the image with its central region blanked)
    to the pixels of that region [B, *out_size, out_channels]: a 1x1 `reduce` conv, then
    log2(out_size / h) stages of nearest 2x upsampling + 3x3 conv + norm + ReLU (instead of
    transposed convs: no checkerboard artefacts, Odena et al. 2016, and trivially torch-exact),
    then a 3x3 `out_conv`. Pathak's channel-wise fully connected bottleneck is not used: a
    ResNet-50 feature map already has an image-wide receptive field. The output is linear (no
    tanh), on the scale of the input images. Also runs on [B, d, h, w, C] volume features.

    Attributes:
      out_size: spatial size of the inpainted region; out_size / feature size must be the same
        power of two along every axis (e.g. 256 px input, ResNet stride 32 -> 8x8 features,
        128x128 central region -> 4 stages).
      out_channels: image channels.
      channels: channels after `reduce`; halved by every upsampling stage, down to
        `min_channels`.
      norm: "batch" (DCGAN/Pathak; `batch_stats` collection), "group" or "none".
      axis_name, bn_momentum, group_norm_groups: as in `ResNet`.
    """

    out_size: Sequence[int] = (128, 128)
    out_channels: int = 1
    channels: int = 512
    min_channels: int = 32
    norm: str = "batch"
    axis_name: str | None = None
    bn_momentum: float = 0.9
    group_norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feature_map, *, train: bool = False):
        """feature_map: [B, *spatial, C]. Returns float32 [B, *out_size, out_channels]."""
        spatial = feature_map.shape[1:-1]
        out_size = tuple(self.out_size)
        nd = len(spatial)
        ratio = out_size[0] // spatial[0]
        n_up = ratio.bit_length() - 1
        if ratio < 1 or 2**n_up != ratio or out_size != tuple(s * ratio for s in spatial):
            raise ValueError(
                f"out_size {out_size} must be the feature map size {spatial} times one power of 2"
            )
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', not {self.norm!r}")

        def conv(features, kernel, name, use_bias):
            pad = (kernel - 1) // 2
            return nn.Conv(
                features,
                (kernel,) * nd,
                padding=((pad, pad),) * nd,
                use_bias=use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        def norm_act(x, name):
            if self.norm == "batch":
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=self.bn_momentum,
                    epsilon=1e-5,
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=name,
                )(x)
            elif self.norm == "group":
                x = nn.GroupNorm(
                    num_groups=math.gcd(self.group_norm_groups, x.shape[-1]),
                    epsilon=1e-5,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=name,
                )(x)
            return nn.relu(x)

        # Convs followed by a norm need no bias (the norm's shift replaces it).
        with_bias = self.norm == "none"
        x = conv(self.channels, 1, "reduce", with_bias)(feature_map.astype(self.dtype))
        x = norm_act(x, "reduce_norm")
        for i in range(n_up):
            x = _upsample_nearest(x)
            x = conv(max(self.channels // 2 ** (i + 1), self.min_channels), 3, f"up{i}", with_bias)(
                x
            )
            x = norm_act(x, f"up{i}_norm")
        x = conv(self.out_channels, 3, "out_conv", True)(x)
        return x.astype(jnp.float32)


class ProjectionDiscriminator(nn.Module):
    """Conv discriminator with a DICOM-tag projection term (Miyato & Koyama 2018), for the
    inpainted region of the CE+DCM baseline; train with a hinge loss.

    output = psi(phi(x)) + sum_k tag_mask_k * <embed(tag_k), phi(x)>, where phi is a stack of
    4x4 stride-2 convs (DCGAN; torch padding 1 is symmetric, so the export is exact) with leaky
    ReLU, then global sum pooling (as Miyato & Koyama), and psi is the linear layer `linear`. Tags
    are global vocabulary ids, so one `tag_embed` table serves every field.

    Attributes:
      vocab_size: V, size of the global token vocabulary.
      channels: conv channels, one stride-2 conv each.
      negative_slope: leaky ReLU slope (0.2, DCGAN).
      spectral_norm: spectral normalisation of every layer, the embedding included (Miyato et
        al. 2018, as in the projection-discriminator paper's code). The power-iteration vectors
        live in the `batch_stats` collection and are updated when train=True (apply with
        mutable=["batch_stats"]).
    """

    vocab_size: int
    channels: Sequence[int] = (64, 128, 256, 512)
    negative_slope: float = 0.2
    spectral_norm: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, tags, tag_mask=None, *, train: bool = False):
        """x: [B, *spatial, C] region; tags: int [B, K] token ids of the conditioning fields;
        tag_mask: optional [B, K], 0 to leave a tag out (e.g. MISSING). Returns float32 [B]."""

        def call(layer, h):
            if self.spectral_norm:
                return nn.SpectralNorm(layer, name=f"{layer.name}_sn")(h, update_stats=train)
            return layer(h)

        nd = x.ndim - 2
        h = x.astype(self.dtype)
        for i, c in enumerate(self.channels):
            conv = nn.Conv(
                c,
                (4,) * nd,
                strides=(2,) * nd,
                padding=((1, 1),) * nd,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{i}",
            )
            h = nn.leaky_relu(call(conv, h), self.negative_slope)
        phi = h.sum(axis=tuple(range(1, nd + 1)))
        linear = nn.Dense(1, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")
        out = call(linear, phi)[:, 0].astype(jnp.float32)
        embed = nn.Embed(
            self.vocab_size,
            phi.shape[-1],
            embedding_init=nn.initializers.normal(0.02),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="tag_embed",
        )
        emb = call(embed, tags)
        if tag_mask is not None:
            emb = emb * tag_mask.astype(emb.dtype)[..., None]
        projection = jnp.einsum("bkc,bc->b", emb.astype(jnp.float32), phi.astype(jnp.float32))
        return out + projection
