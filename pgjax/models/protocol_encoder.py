"""The protocol encoder: a small transformer over the F de-identified header fields of one item.

Each field becomes one token: field embedding (which field) + token embedding (its global
vocabulary id: a category, a quantile bin, MISSING, UNK or MASK) + for numeric fields a learned
embedding of the z-scored value, gated by `value_mask` (0/1) so that an absent value contributes
nothing (absence is carried by the MISSING token id). A summary (cls) token is prepended.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from pgjax.models.layers import Dtype, transformer_stack

# size -> (width, depth, num_heads, mlp_dim). Our choice: the paper fixes none. F = 31 tokens is
# a short sequence, so the encoder is shallower than an image ViT of the same width.
PROTOCOL_SIZES = {
    "mu": (64, 2, 2, 256),
    "ti": (192, 4, 3, 768),
    "s": (384, 6, 6, 1536),
    "b": (768, 6, 12, 3072),
}


def protocol_config(size: str) -> dict:
    """ProtocolEncoder sizes (width, depth, num_heads, mlp_dim) for "mu", "ti", "s" or "b"."""
    if size not in PROTOCOL_SIZES:
        raise ValueError(f"unknown protocol encoder size {size!r}; known: {sorted(PROTOCOL_SIZES)}")
    width, depth, heads, mlp = PROTOCOL_SIZES[size]
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp)


class ProtocolEncoder(nn.Module):
    """Transformer encoder over protocol fields.

    The caller hides a field from the model (masked protocol prediction) by setting its token to
    MASK and its value_mask to 0; a value left unmasked would leak the answer.

    Attributes:
      num_fields: F, the number of protocol fields (columns of `tokens`).
      vocab_size: V, size of the global token vocabulary.
      width, depth, num_heads, mlp_dim: transformer sizes (see `protocol_config`).
      dropout: dropout on the embeddings and inside every block.
      pad_id: fields holding this token id are ignored as attention keys (None: attend to all).
        Their own output states are still computed, and meaningless.
      gelu_approximate, attention_impl, remat, dtype, param_dtype: as in `ViT`.
    """

    num_fields: int
    vocab_size: int
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 1024
    dropout: float = 0.0
    pad_id: int | None = 0
    gelu_approximate: bool = False
    attention_impl: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, values, value_mask, *, train: bool = False):
        """tokens: int [B, F]; values: float [B, F] (z-scored, 0 where absent); value_mask:
        [B, F], 1 where a numeric value is present. Returns {"pooled": [B, width] (the summary
        token after the final norm), "fields": [B, F, width]}."""
        b, f = tokens.shape
        if f != self.num_fields:
            raise ValueError(f"expected {self.num_fields} protocol fields, got {f}")
        init = nn.initializers.normal(0.02)
        w = self.width

        x = nn.Embed(
            self.vocab_size,
            w,
            embedding_init=init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="token_embed",
        )(tokens)
        x = x + self.param("field_embed", init, (f, w), self.param_dtype).astype(self.dtype)
        # One value direction (and offset) per field: a z-score means something different for
        # every field, and the quantile-bin token already gives the coarse value.
        v_kernel = self.param("value_kernel", init, (f, w), self.param_dtype).astype(self.dtype)
        v_bias = self.param("value_bias", nn.initializers.zeros, (f, w), self.param_dtype)
        present = (value_mask > 0)[..., None]
        # Zero absent values first: a NaN there would otherwise leak into the gradients.
        v = jnp.where(present, values[..., None], 0).astype(self.dtype)
        x = x + jnp.where(present, v * v_kernel + v_bias.astype(self.dtype), 0)

        cls = self.param("cls_token", init, (1, 1, w), self.param_dtype).astype(self.dtype)
        x = jnp.concatenate([cls.repeat(b, axis=0), x], axis=1)
        key_mask = None
        if self.pad_id is not None:
            key_mask = jnp.concatenate([jnp.ones((b, 1), bool), tokens != self.pad_id], axis=1)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        x = transformer_stack(self, x, key_mask, train, prefix="blocks", norm="norm")
        return {"pooled": x[:, 0], "fields": x[:, 1:]}
