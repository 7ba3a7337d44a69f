"""Masked protocol prediction: a random `rate` of each item's fields is hidden (MASK token, value
removed); the protocol encoder's field states attend to the image tokens in a fusion head that
predicts the hidden fields' tokens (softmax restricted to each field's ids) and numeric values.
With `hide_text` (the default) the free-text fields are never shown: a description ("CHEST
B31F 1MM", "T2 FLAIR") would give most hidden settings away without the image. The fusion head
is shared with translation: the hidden fields' states say what to predict."""

from __future__ import annotations

import jax.numpy as jnp

from pgjax.losses import protocol as ploss
from pgjax.models import FusionHead
from pgjax.objectives.base import Term


def fusion_head(ctx) -> FusionHead:
    return FusionHead(
        ctx.info.vocab_size,
        ctx.info.field_ranges,
        **{"dtype": ctx.dtype, **dict(ctx.model.get("fusion") or {})},
    )


def init_fusion(init) -> None:
    init.part("fusion", init.protocol["fields"], init.feats["tokens"])


def fused_prediction(run, feats, tokens, values, value_mask) -> dict:
    """The fusion head's {"logits", "values"} for a (partly hidden) protocol and image features."""
    fields = run("protocol_encoder", tokens, values, value_mask)["fields"]
    return run("fusion", fields, feats["tokens"])


class MaskedProtocol(Term):
    name = "masked_protocol"
    uses_protocol = True
    reads_features = True

    def heads(self):
        return {"fusion": fusion_head(self.ctx)}

    def init(self, init):
        init_fusion(init)
        return {}

    def shown_mask(self, hidden):
        """The fields hidden from the input, [B, F]: the targets, and with hide_text the
        free-text fields (every item has a target, and a description names most of them)."""
        if self.settings["hide_text"]:
            return hidden | jnp.asarray(self.ctx.info.text_mask)[None, :]
        return hidden

    def loss(self, run, inputs):
        s, batch = self.settings, inputs.batch
        tokens, values, value_mask = batch["tokens"], batch["values"], batch["value_mask"]
        hidden = ploss.sample_field_mask(inputs.keys["mpp"], *tokens.shape, s["rate"])
        out = fused_prediction(
            run,
            inputs.feats,
            *ploss.apply_field_mask(tokens, values, value_mask, self.shown_mask(hidden)),
        )
        loss, m = ploss.masked_protocol_loss(
            out["logits"],
            out["values"],
            tokens,
            values,
            value_mask,
            hidden,
            self.ctx.allowed,
            s["numeric_weight"],
        )
        return loss, {f"mpp_{k}": m[k] for k in ("ce", "mse", "accuracy")}
