"""DCM of Hu et al. 2020: predict every header field's token and numeric value from the pooled
image embedding alone."""

from __future__ import annotations

import jax.numpy as jnp

from pgjax.losses import protocol as ploss
from pgjax.models import FieldPredictionHead
from pgjax.objectives.base import Term


class DCM(Term):
    name = "dcm"
    reads_features = True

    def heads(self):
        info = self.ctx.info
        width = int(self.settings["width"])
        return {
            "dcm_head": FieldPredictionHead(
                info.num_fields, info.vocab_size, width, info.field_ranges, dtype=self.ctx.dtype
            )
        }

    def init(self, init):
        init.part("dcm_head", init.feats["pooled"])
        return {}

    def loss(self, run, inputs):
        batch = inputs.batch
        tokens = batch["tokens"]
        out = run("dcm_head", inputs.feats["pooled"])
        loss, m = ploss.masked_protocol_loss(
            out["logits"],
            out["values"],
            tokens,
            batch["values"],
            batch["value_mask"],
            jnp.ones(tokens.shape, bool),  # every field is a target
            self.ctx.allowed,
            self.settings["numeric_weight"],
        )
        return loss, {f"dcm_{k}": m[k] for k in ("ce", "mse", "accuracy")}
