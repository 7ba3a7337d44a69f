"""Protocol-image contrast: CLIP's softmax or SigLIP's sigmoid loss between the projected pooled
image and pooled (full) protocol embeddings, over the global batch (ring or all-gather under
shard_map). A learnable temperature t = exp(log t), initialised at t = 10, multiplies the cosine
similarities (Zhai et al.'s convention; CLIP calls t the logit scale and caps it at 100, as
here); SigLIP adds a learnable bias initialised at -10."""

from __future__ import annotations

import jax.numpy as jnp

from pgjax.losses import contrastive as closs
from pgjax.models import ProjectionHead
from pgjax.objectives.base import Term


class Contrastive(Term):
    name = "contrastive"
    uses_protocol = True
    reads_features = True

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        kind, method = settings["kind"], settings["method"]
        if kind not in ("clip", "siglip") or method not in ("ring", "allgather"):
            raise ValueError(
                "objectives.contrastive: kind must be clip or siglip and method ring or "
                f"allgather, got {kind!r}, {method!r}"
            )

    def heads(self):
        embed_dim = int(self.ctx.model.get("embed_dim", 256))
        return {
            "image_proj": ProjectionHead(embed_dim, dtype=self.ctx.dtype),
            "protocol_proj": ProjectionHead(embed_dim, dtype=self.ctx.dtype),
        }

    def init(self, init):
        init.part("image_proj", init.feats["pooled"])
        init.part("protocol_proj", init.protocol["pooled"])
        params = {"log_scale": jnp.log(jnp.float32(self.settings["init_scale"]))}
        if self.settings["kind"] == "siglip":
            params["bias"] = jnp.float32(self.settings["init_bias"])
        return {"contrastive": params}

    def loss(self, run, inputs):
        c, batch = self.settings, inputs.batch
        img = run("image_proj", inputs.feats["pooled"])  # L2-normalised by ProjectionHead
        protocol = run("protocol_encoder", batch["tokens"], batch["values"], batch["value_mask"])
        txt = run("protocol_proj", protocol["pooled"])
        p = run.params["contrastive"]
        log_scale = p["log_scale"]  # clamped to max_scale after each update (train.py)
        bias = p.get("bias")
        if self.ctx.mesh is None:
            if c["kind"] == "clip":
                loss = closs.clip_loss(img, txt, log_scale)
            else:
                loss = closs.siglip_loss(img, txt, log_scale, bias)
        else:
            loss = closs.contrastive_loss(
                img,
                txt,
                log_scale,
                bias,
                kind=c["kind"],
                mesh=self.ctx.mesh,
                batch_axes=self.ctx.batch_axes,
                method=c["method"],
            )
        metrics = {"temperature": jnp.exp(log_scale)}
        if bias is not None:
            metrics["siglip_bias"] = bias
        return loss, metrics
