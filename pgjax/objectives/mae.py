"""MAE (He et al. 2022): the ViT sees 1 - mask_ratio of the patches, a small decoder reconstructs
the others (per-patch normalised pixels). ViT encoders only."""

from __future__ import annotations

import math

from pgjax.losses import image as iloss
from pgjax.models import MAEDecoder, ViT, mae_masking, patchify
from pgjax.objectives.base import Term, as_dict


class MAE(Term):
    name = "mae"

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        if not isinstance(ctx.image_encoder, ViT):
            raise ValueError(
                f"the mae objective needs a ViT image encoder, not "
                f"{ctx.model.get('image_encoder', 'vit_b/16')!r}: it drops patch tokens"
            )
        self.patch = tuple(ctx.image_encoder.patch_size)

    def heads(self):
        return {
            "mae_decoder": MAEDecoder(
                patch_dim=math.prod(self.patch),  # one channel
                **{"dtype": self.ctx.dtype, **as_dict(self.settings["decoder"])},
            )
        }

    def init(self, init):
        tokens = init.feats["tokens"]
        keep, restore, _ = mae_masking(init.key(), 1, tokens.shape[1], self.settings["mask_ratio"])
        init.part("mae_decoder", tokens[:, : keep.shape[1]], restore)
        return {}

    def loss(self, run, inputs):
        s, images = self.settings, inputs.images
        num_patches = math.prod(n // p for n, p in zip(images.shape[1:-1], self.patch, strict=True))
        keep, restore, hidden = mae_masking(
            inputs.keys["mae"], images.shape[0], num_patches, s["mask_ratio"]
        )
        visible = run("image_encoder", images, keep_indices=keep)["tokens"]
        pred = run("mae_decoder", visible, restore)
        loss = iloss.mae_loss(pred, patchify(images, self.patch), hidden > 0, s["norm_pix"])
        return loss, {}
