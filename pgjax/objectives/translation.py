"""Protocol-protocol translation. Within an item: only the `source` fields (acquisition settings)
are shown with the image, every other field is hidden, and the `target` fields (the device) are
predicted, with the fusion head of masked protocol prediction.

Across series (`series_weight` > 0): the protocol of another series of the same study (from the
loader, see input_pipeline) is shown with its `series_target` fields (acquisition settings)
hidden, and the fusion head predicts them from that series' remaining fields (its device, body
part) attending to this item's image: what a study's other acquisitions were, given one of its
images. With `hide_text` (the default) that series' free-text fields are hidden too: its
SeriesDescription and ProtocolName ("B30f", "T2 FLAIR") name the settings to predict. Items
whose study has one series are left out."""

from __future__ import annotations

import jax.numpy as jnp

from pgjax.losses import protocol as ploss
from pgjax.objectives.base import Term, field_mask
from pgjax.objectives.masked_protocol import fused_prediction, fusion_head, init_fusion


class Translation(Term):
    name = "translation"
    uses_protocol = True
    reads_features = True

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        info = ctx.info
        self.source = field_mask(info, settings["source"], "translation.source")  # bool [F]
        self.target = field_mask(info, settings["target"], "translation.target")
        if (self.source & self.target).any():
            both = [
                k
                for k, s, g in zip(info.keywords, self.source, self.target, strict=True)
                if s and g
            ]
            raise ValueError(f"translation: fields {both} are both source and target")
        if settings["series_weight"] < 0:
            raise ValueError("objectives.translation.series_weight must be >= 0")
        text = info.text_mask
        if settings["hide_text"] and (self.source & text).any():
            named = [
                k for k, s_, t in zip(info.keywords, self.source, text, strict=True) if s_ and t
            ]
            raise ValueError(
                f"config.objectives.translation.source names the free-text fields {named}, "
                "which hide_text (on) hides; remove them or set hide_text=False"
            )
        self.series_target = None  # cross-series: bool [F], or None when off
        self.series_hidden = None  # the other series' fields hidden from the input
        if settings["series_weight"] > 0:
            self.series_target = field_mask(
                info, settings["series_target"], "translation.series_target"
            )
            self.series_hidden = self.series_target | (text if settings["hide_text"] else False)

    def heads(self):
        return {"fusion": fusion_head(self.ctx)}

    def init(self, init):
        init_fusion(init)
        return {}

    def loss(self, run, inputs):
        s, batch = self.settings, inputs.batch
        tokens, values, value_mask = batch["tokens"], batch["values"], batch["value_mask"]
        shown = ploss.apply_field_mask(tokens, values, value_mask, ~self.source)
        out = fused_prediction(run, inputs.feats, *shown)
        loss, m = ploss.translation_loss(
            out["logits"],
            out["values"],
            tokens,
            values,
            value_mask,
            self.target,
            self.ctx.allowed,
            s["numeric_weight"],
        )
        metrics = {f"translation_{k}": m[k] for k in ("ce", "mse", "accuracy")}
        if self.series_target is not None:
            series_loss, m = self._series(run, inputs)
            loss = loss + s["series_weight"] * series_loss
            metrics.update(m)
        return loss, metrics

    def _series(self, run, inputs):
        batch = inputs.batch
        if "partner_tokens" not in batch:
            raise ValueError(
                "objectives.translation.series_weight > 0 needs batches with partner_* arrays "
                "(InputConfig(partners=True))"
            )
        partner = batch["partner_tokens"], batch["partner_values"], batch["partner_value_mask"]
        out = fused_prediction(
            run, inputs.feats, *ploss.apply_field_mask(*partner, self.series_hidden)
        )
        has_partner = jnp.asarray(batch["has_partner"]).astype(bool)
        predict = jnp.asarray(self.series_target)[None, :] & has_partner[:, None]
        loss, m = ploss.masked_protocol_loss(
            out["logits"],
            out["values"],
            *partner,
            predict,
            self.ctx.allowed,
            self.settings["numeric_weight"],
        )
        metrics = {f"translation_series_{k}": m[k] for k in ("ce", "mse", "accuracy")}
        metrics["translation_series_items"] = jnp.mean(has_partner.astype(jnp.float32))
        return loss, metrics
