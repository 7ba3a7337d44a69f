"""Transformer pieces shared by the ViT, the protocol encoder and the heads.

Conventions kept everywhere so that a converter can export the parameters to PyTorch (timm layout)
mechanically and match it to 1e-4: pre-norm residual blocks, LayerNorm epsilon 1e-6, exact GELU by
default (torch's default), and a fused `qkv` projection laid out like timm's
([..., 3, heads, head_dim] along the output axis). Attention goes through
`jax.nn.dot_product_attention` so that GPUs can use the fused cuDNN kernel.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LN_EPSILON = 1e-6  # timm's ViT; torch's LayerNorm default (1e-5) would break export parity.

# Linear layers: Xavier-uniform weights and zero biases, as in MAE and big_vision.
dense_init = nn.initializers.xavier_uniform()


def attention(q, k, v, key_mask=None, implementation=None):
    """Multi-head scaled dot-product attention.

    q: [B, T, N, H]; k, v: [B, S, N, H]; key_mask: optional bool [B, S], True where a key may be
    attended to. implementation: passed to `jax.nn.dot_product_attention` (None, "xla", "cudnn").
    Returns [B, T, N, H].
    """
    mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention when `context` is given.

    Self-attention uses one fused `qkv` projection (timm's layout); cross-attention projects the
    queries with `q` and the context with a fused `kv`. Both end with the output projection `proj`.
    The output width equals the input width.

    Attributes:
      num_heads: number of heads; must divide the width.
      qkv_bias: biases on the q/k/v projections (timm's ViT default: True).
      attention_impl: `implementation` for `jax.nn.dot_product_attention` (None lets jax choose).
        Attention dropout is not offered: the fused kernels do not support it.
    """

    num_heads: int
    qkv_bias: bool = True
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, *, key_mask=None):
        """x: [B, T, W]; context: optional [B, S, Wc]; key_mask: optional bool [B, S or T]."""
        b, t, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init
        )
        if context is None:
            qkv = dense(3 * width, use_bias=self.qkv_bias, name="qkv")(x)
            qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            s = context.shape[1]
            q = dense(width, use_bias=self.qkv_bias, name="q")(x)
            q = q.reshape(b, t, self.num_heads, head_dim)
            kv = dense(2 * width, use_bias=self.qkv_bias, name="kv")(context)
            kv = kv.reshape(b, s, 2, self.num_heads, head_dim)
            k, v = kv[:, :, 0], kv[:, :, 1]
        out = attention(q, k, v, key_mask, implementation=self.attention_impl)
        return dense(width, name="proj")(out.reshape(b, t, width))


class Mlp(nn.Module):
    """Two-layer MLP `fc1` -> GELU -> dropout -> `fc2` -> dropout (timm's Mlp).

    Attributes:
      mlp_dim: hidden width.
      dropout: dropout rate after the activation and after `fc2`.
      gelu_approximate: tanh approximation of GELU; False (exact) matches torch's default.
    """

    mlp_dim: int
    dropout: float = 0.0
    gelu_approximate: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init
        )
        width = x.shape[-1]
        x = dense(self.mlp_dim, name="fc1")(x)
        x = nn.gelu(x, approximate=self.gelu_approximate)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        x = dense(width, name="fc2")(x)
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Attributes:
      num_heads, mlp_dim: attention heads and MLP hidden width.
      dropout: dropout rate on the attention output and inside the MLP.
      gelu_approximate, attention_impl: see `Mlp` and `Attention`.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    gelu_approximate: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None, deterministic=True):
        """x: [B, T, W]; key_mask: optional bool [B, T]. Positional arguments so `nn.remat` can
        mark `deterministic` static."""
        norm = functools.partial(
            nn.LayerNorm, epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype
        )
        y = Attention(
            self.num_heads,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(norm(name="norm1")(x), key_mask=key_mask)
        x = x + nn.Dropout(self.dropout)(y, deterministic=deterministic)
        y = Mlp(
            self.mlp_dim,
            dropout=self.dropout,
            gelu_approximate=self.gelu_approximate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(norm(name="norm2")(x), deterministic)
        return x + y


def block_class(remat: bool) -> type[TransformerBlock]:
    """`TransformerBlock`, or its rematerialised version (recomputed in the backward pass to save
    activation memory; parameter names are unchanged). `deterministic` (argument 3, counting
    `self`) is static because it switches dropout on and off."""
    return nn.remat(TransformerBlock, static_argnums=(3,)) if remat else TransformerBlock


def transformer_stack(
    m: nn.Module, x, key_mask, train: bool, *, prefix: str = "blocks", norm: str = "norm"
):
    """`m.depth` pre-norm blocks and the final LayerNorm, created in module `m`'s scope.

    Called from the `@nn.compact` method of a model with the usual fields (depth, num_heads,
    mlp_dim, dropout, gelu_approximate, attention_impl, remat, dtype, param_dtype), so the
    parameters are named `{prefix}_{i}` and `{norm}` directly under that model.
    """
    block = block_class(m.remat)
    for i in range(m.depth):
        x = block(
            num_heads=m.num_heads,
            mlp_dim=m.mlp_dim,
            dropout=m.dropout,
            gelu_approximate=m.gelu_approximate,
            attention_impl=m.attention_impl,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
            name=f"{prefix}_{i}",
        )(x, key_mask, not train)
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=m.dtype, param_dtype=m.param_dtype, name=norm)(x)
