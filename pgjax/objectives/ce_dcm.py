"""CE+DCM of Hu et al. 2020: context-encoder inpainting (Pathak et al. 2016) of a central hole
(filled with the mean of the visible pixels; the encoder's feature map, or a ViT's token grid,
is decoded to the hole), L2 on the hole plus a hinge adversarial term from a projection
discriminator conditioned on DICOM tags (Miyato & Koyama 2018). The discriminator, params
["disc"], learns only from its hinge loss, which `loss` computes on the generator's fake."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pgjax.losses import image as iloss
from pgjax.losses import protocol as ploss
from pgjax.models import ContextEncoderDecoder, ProjectionDiscriminator
from pgjax.objectives.base import Term, as_dict, field_mask


class CEDCM(Term):
    name = "ce_dcm"

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        if not 0 < settings["hole"] < 1:
            raise ValueError(f"ce_dcm.hole must be in (0, 1), got {settings['hole']}")
        # int [K]: the discriminator's tag fields.
        self.tags = np.flatnonzero(field_mask(ctx.info, settings["tags"], "ce_dcm.tags"))
        # out_size is set from the image shape when applied (see decoder).
        self._decoder = ContextEncoderDecoder(
            **{"dtype": ctx.dtype, **as_dict(settings["decoder"])}
        )
        self._disc = ProjectionDiscriminator(
            ctx.info.vocab_size, **{"dtype": ctx.dtype, **as_dict(settings["disc"])}
        )

    def heads(self):
        return {"ce_decoder": self._decoder, "disc": self._disc}

    def hole(self, shape) -> tuple[slice, ...]:
        """The central hole of images of `shape` [B, *spatial, C]: one slice per spatial axis,
        of round(hole * side) pixels (at least 1, less than the side)."""
        out = []
        for n in shape[1:-1]:
            size = min(max(1, round(self.settings["hole"] * n)), n - 1)
            start = (n - size) // 2
            out.append(slice(start, start + size))
        return tuple(out)

    def decoder(self, images) -> ContextEncoderDecoder:
        """The inpainting decoder for this image shape: its output is the hole."""
        hole = self.hole(images.shape)
        disc_convs = len(self._disc.channels)
        if min(h.stop - h.start for h in hole) < 2**disc_convs:
            raise ValueError(
                f"ce_dcm: the hole {[h.stop - h.start for h in hole]} is too small for the "
                f"discriminator's {disc_convs} stride-2 convs; raise ce_dcm.hole or use fewer "
                "ce_dcm.disc.channels"
            )
        return self._decoder.clone(
            out_size=tuple(h.stop - h.start for h in hole), out_channels=images.shape[-1]
        )

    def check(self, images) -> None:
        """Fail before any work on a hole the models cannot fit."""
        self.decoder(images)

    def feature_map(self, feats, image_shape):
        """The encoder's spatial features: a ResNet's feature map, or a ViT's patch tokens put
        back on their grid (row-major, as the ViT flattened them)."""
        if "feature_map" in feats:
            return feats["feature_map"]
        patch = tuple(self.ctx.image_encoder.patch_size)
        grid = tuple(n // p for n, p in zip(image_shape[1:-1], patch, strict=True))
        tokens = feats["tokens"]
        return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])

    def tag_inputs(self, tokens):
        """The discriminator's conditioning: token ids of the tag fields [B, K], and a mask that
        leaves out the specials (PAD, MISSING, UNK, MASK carry no value to condition on)."""
        tags = tokens[:, self.tags]
        return tags, (tags >= ploss.NUM_SPECIAL).astype(jnp.float32)

    def init(self, init):
        # The encoder sees the image with a hole: same shapes as the image itself.
        images = init.one["image"]
        region = init.part(
            "ce_decoder",
            self.feature_map(init.feats, images.shape),
            module=self.decoder(images),
        )
        init.part("disc", region, *self.tag_inputs(init.one["tokens"]))
        return {}

    def inpaint(self, run, images):
        """(predicted hole, true hole), both [B, *hole, C]. The encoder sees the image with its
        hole filled with the mean of the visible pixels: in-distribution brightness, no cue."""
        hole = self.hole(images.shape)
        region = (slice(None), *hole, slice(None))
        in_hole = jnp.zeros(images.shape[1:-1], bool).at[hole].set(True)[None, ..., None]
        axes = tuple(range(1, images.ndim))
        context_mean = jnp.sum(jnp.where(in_hole, 0.0, images), axis=axes, keepdims=True) / (
            jnp.sum(~in_hole) * images.shape[-1]
        )
        holed = jnp.where(in_hole, context_mean, images)
        feats = run("image_encoder", holed)
        pred = run("ce_decoder", self.feature_map(feats, images.shape), module=self.decoder(images))
        return pred, images[region]

    def loss(self, run, inputs):
        """The generator's loss, and the discriminator's hinge loss on the same fake.

        One generator pass makes the fake that both players see, and one discriminator pass on
        it serves both: its vector-Jacobian product, taken twice, gives the generator the
        gradient of the adversarial term w.r.t. the fake only and the discriminator that of its
        hinge loss w.r.t. its parameters only. Each player gets the gradient of its own loss
        alone, both from the parameters at the start of the step (simultaneous updates), on
        the same micro-batches. The discriminator's loss is returned in the metrics as
        "disc/loss" (see `Term`).

        All of the discriminator's work happens here, in the forward pass: the value the
        trainer differentiates carries these gradients (see `_with_gradient`), not the
        discriminator's activations, which are freed before the generator's backward pass.
        """
        s = self.settings
        pred, real = self.inpaint(run, inputs.images)
        l2 = jnp.mean(jnp.square(pred - real))  # the whole output is the hole
        tags = self.tag_inputs(inputs.batch["tokens"])
        params = jax.lax.stop_gradient(run.params["disc"])
        # The true holes. In training mode this pass advances the spectral-norm vectors
        # (batch_stats); the fake's pass reads them as it left them.
        real_d, real_vjp = run.vjp("disc", real, *tags, params=params)
        real_loss, d_real = jax.value_and_grad(iloss.hinge_d_real)(real_d)
        real_grads = real_vjp(d_real)[1]
        fake_d, fake_vjp = run.vjp("disc", jax.lax.stop_gradient(pred), *tags, params=params,
                                   train=False)  # fmt: skip
        adv, d_adv = jax.value_and_grad(iloss.hinge_g_loss)(fake_d)
        fake_loss, d_fake = jax.value_and_grad(iloss.hinge_d_fake)(fake_d)
        adv = _with_gradient(pred, adv, fake_vjp(d_adv)[0])
        disc_grads = jax.tree.map(jnp.add, real_grads, fake_vjp(d_fake)[1])
        disc_loss = _with_gradient(run.params["disc"], real_loss + fake_loss, disc_grads)
        loss = s["rec_weight"] * l2 + s["adv_weight"] * adv
        return loss, {
            "ce_dcm_l2": l2,
            "ce_dcm_adv": adv,
            "disc/loss": disc_loss,
            "disc/real_logit": jnp.mean(real_d),
            "disc/fake_logit": jnp.mean(fake_d),
        }


@jax.custom_vjp
def _with_gradient(x, value, grads):
    """`value`, whose gradient w.r.t. `x` (an array or a tree) is `grads`, computed beforehand,
    and 0 w.r.t. everything else."""
    return value


def _with_gradient_fwd(x, value, grads):
    return value, (value, grads)


def _with_gradient_bwd(res, cotangent):
    value, grads = res
    zeros = jax.tree.map(jnp.zeros_like, grads)
    return jax.tree.map(lambda g: cotangent * g, grads), jnp.zeros_like(value), zeros


_with_gradient.defvjp(_with_gradient_fwd, _with_gradient_bwd)
