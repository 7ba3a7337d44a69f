"""SimCLR (Chen et al. 2020): NT-Xent between two augmented views of each image, through an MLP
projection, over the global batch. The views are drawn from the un-augmented image with the
term's own augmentation."""

from __future__ import annotations

import jax.numpy as jnp

from pgjax.losses import contrastive as closs
from pgjax.losses import image as iloss
from pgjax.models import SimCLRProjection
from pgjax.objectives.base import Term
from pgjax.train.augment import AugmentConfig, augment


class SimCLR(Term):
    name = "simclr"

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.augment = AugmentConfig.from_config(settings["augment"])

    def heads(self):
        s = self.settings
        return {
            "simclr_proj": SimCLRProjection(
                int(s["proj_dim"]), s["hidden_dim"], dtype=self.ctx.dtype
            )
        }

    def init(self, init):
        init.part("simclr_proj", init.feats["pooled"])
        return {}

    def loss(self, run, inputs):
        images = inputs.batch["image"]
        b = images.shape[0]
        # Both views of an item side by side ([x0, x0, x1, x1, ...]): a batch-sharded layout
        # keeps each item's views on its own device, and one encoder pass sees all 2B views
        # (SimCLR's global BatchNorm statistics cover both).
        views = augment(inputs.keys["simclr"], jnp.repeat(images, 2, axis=0), self.augment)
        z = run("simclr_proj", run("image_encoder", views)["pooled"])
        z = z.reshape(b, 2, -1)
        z1, z2 = z[:, 0], z[:, 1]
        t = self.settings["temperature"]
        if self.ctx.mesh is None:
            return iloss.nt_xent_loss(z1, z2, t), {}
        loss = closs.sharded_loss(
            lambda a, b, axis: iloss.nt_xent_loss_sharded(a, b, t, axis),
            self.ctx.mesh,
            self.ctx.batch_axes,
            (z1, z2),
        )
        return loss, {}
