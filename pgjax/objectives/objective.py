"""The objective of one experiment config: its models and the weighted sum of its terms.

`TERM_TYPES` maps each config name (`config.objectives.<name>`) to its term; the settings and
their defaults are in pgjax/objectives/defaults.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pgjax.losses import protocol as ploss
from pgjax.models import build_image_encoder, build_protocol_encoder
from pgjax.objectives.base import (
    Context,
    InitInputs,
    Inputs,
    ProtocolInfo,
    Runner,
    Term,
    as_dict,
    takes_train,
)
from pgjax.objectives.ce_dcm import CEDCM
from pgjax.objectives.contrastive import Contrastive
from pgjax.objectives.dcm import DCM
from pgjax.objectives.defaults import TERM_DEFAULTS, TERMS
from pgjax.objectives.mae import MAE
from pgjax.objectives.masked_protocol import MaskedProtocol
from pgjax.objectives.simclr import SimCLR
from pgjax.objectives.translation import Translation
from pgjax.train.augment import AugmentConfig, augment

TERM_TYPES: dict[str, type[Term]] = {
    "contrastive": Contrastive,
    "masked_protocol": MaskedProtocol,
    "translation": Translation,
    "simclr": SimCLR,
    "mae": MAE,
    "dcm": DCM,
    "ce_dcm": CEDCM,
}
assert tuple(TERM_TYPES) == TERMS, "every term of defaults.TERM_SETTINGS needs a type, in order"

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def read_settings(objectives: dict) -> dict[str, dict]:
    """The enabled terms (weight > 0), in TERMS order, each with its settings and defaults."""
    unknown = sorted(set(objectives) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; known: {list(TERMS)}")
    terms = {}
    for name, defaults in TERM_DEFAULTS.items():
        given = as_dict(objectives.get(name))
        bad = sorted(set(given) - set(defaults))
        if bad:
            raise ValueError(
                f"config.objectives.{name}: unknown keys {bad}; known {sorted(defaults)}"
            )
        settings = {**defaults, **given}
        if settings["weight"] < 0:
            raise ValueError(f"config.objectives.{name}.weight must be >= 0")
        if settings["weight"] > 0:
            terms[name] = settings
    return terms


class Objective:
    """The model(s) and the weighted sum of the enabled loss terms of one experiment config.

    Build with `build_objective`. Batches are dicts of global arrays: image float32 [B, H, W, 1]
    in [0, 1] (or a volume [B, D, H, W, 1]), tokens int32 [B, F], values float32 [B, F]
    (z-scored, 0 where absent), value_mask float32 [B, F] (1 where a value is present).

    Parameters (top-level keys of variables["params"]; a part exists only if an enabled term
    uses it): image_encoder, protocol_encoder, and each term's heads and parameters: image_proj,
    protocol_proj, contrastive (log_scale, bias), fusion (masked_protocol and translation),
    simclr_proj, mae_decoder, dcm_head, ce_decoder, disc. BatchNorm statistics and spectral-norm
    vectors live under the same keys in variables["batch_stats"].

    Sharding: `loss` runs under jit with the batch sharded over BATCH_AXES of `mesh`. The
    global-batch losses (contrastive, NT-Xent) run the sharded ring / all-gather versions there;
    per-item losses are plain means, which XLA makes global. mesh=None computes the dense
    single-device losses.
    """

    def __init__(self, config, info: ProtocolInfo, mesh: jax.sharding.Mesh | None):
        config = as_dict(config)
        self.info = info
        self.mesh = mesh
        settings = read_settings(as_dict(config.get("objectives")))
        if not settings:
            raise ValueError(
                "no loss term enabled: set config.objectives.<name>.weight > 0 for at least one "
                f"of {list(TERMS)}"
            )
        model = as_dict(config.get("model"))
        dtype_name = model.get("dtype", "float32")
        if dtype_name not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, not {dtype_name!r}")
        dtype = _DTYPES[dtype_name]
        self.augment_cfg = AugmentConfig.from_config(config.get("augment"))
        image_encoder = build_image_encoder(
            model.get("image_encoder", "vit_b/16"),
            **{"dtype": dtype, **as_dict(model.get("image_encoder_kw"))},
        )
        ctx = Context(
            info=info,
            mesh=mesh,
            dtype=dtype,
            model=model,
            image_encoder=image_encoder,
            allowed=ploss.FieldCandidates(info.field_ranges, info.vocab_size),
        )
        self.terms: dict[str, Term] = {
            name: TERM_TYPES[name](s, ctx) for name, s in settings.items()
        }
        self.has_discriminator = "ce_dcm" in self.terms
        self.uses_protocol = any(t.uses_protocol for t in self.terms.values())
        # Terms that read the encoder's features of the (base-augmented) image; SimCLR, MAE and
        # CE+DCM encode their own variants of it.
        self.uses_image_features = any(t.reads_features for t in self.terms.values())

        parts: dict[str, nn.Module] = {"image_encoder": image_encoder}
        if self.uses_protocol:
            parts["protocol_encoder"] = build_protocol_encoder(
                model.get("protocol_encoder", "s"),
                info.num_fields,
                info.vocab_size,
                **{"dtype": dtype, **as_dict(model.get("protocol_encoder_kw"))},
            )
        for term in self.terms.values():
            for name, module in term.heads().items():
                if name in parts and parts[name] != module:
                    raise ValueError(f"two terms define the part {name!r} differently")
                parts[name] = module
        self.parts = parts

    # ------------------------------------------------------------------------------ init

    def init(self, rng: jax.Array, batch: dict) -> dict:
        """Initialise every part on the first item of `batch` (shapes only matter).

        Returns {"params": {part: ...}} plus {"batch_stats": {part: ...}} for parts with
        BatchNorm or spectral norm. params["disc"] is the discriminator (CE+DCM only).
        """
        one = {k: v[:1] for k, v in batch.items()}
        images = one["image"]
        if images.ndim not in (4, 5):
            raise ValueError(f"images must be [B, H, W, C] or [B, D, H, W, C], got {images.shape}")
        for term in self.terms.values():
            if hasattr(term, "check"):
                term.check(images)
        keys = iter(jax.random.split(rng, len(self.parts) + 1))
        params: dict = {}
        state: dict = {}

        def init_part(name, *args, module=None, **kwargs):
            if name in params:  # a part two terms share (the fusion head)
                return None
            module = self.parts[name] if module is None else module
            k_params, k_dropout = jax.random.split(next(keys))
            if takes_train(module):
                kwargs["train"] = False
            out, variables = module.init_with_output(
                {"params": k_params, "dropout": k_dropout}, *args, **kwargs
            )
            variables = dict(variables)
            params[name] = variables.pop("params")
            for col, tree in variables.items():
                state.setdefault(col, {})[name] = tree
            return out

        feats = init_part("image_encoder", images)
        protocol = None
        if self.uses_protocol:
            protocol = init_part(
                "protocol_encoder", one["tokens"], one["values"], one["value_mask"]
            )
        inputs = InitInputs(one, feats, protocol, init_part, lambda: next(keys))
        for term in self.terms.values():
            params.update(term.init(inputs))
        return {"params": params, **state}

    # ------------------------------------------------------------------------------ losses

    def _keys(self, rng):
        # One key per use: two draws from one key (e.g. MPP's field mask and MAE's patch mask)
        # would be correlated.
        names = ("augment", "simclr", "mpp", "mae", "dropout")
        return dict(zip(names, jax.random.split(rng, len(names)), strict=True))

    def _inputs(self, run, batch, keys, train: bool = True) -> Inputs:
        images = batch["image"]
        if train:
            images = augment(keys["augment"], images, self.augment_cfg)
        feats = run("image_encoder", images) if self.uses_image_features else None
        return Inputs(batch, images, feats, keys)

    def _terms(self, variables, batch, rng, train: bool):
        """Each enabled term's raw value, their metrics, and the runner (for its collections)."""
        keys = self._keys(rng)
        run = Runner(self.parts, variables, train=train, rng=keys["dropout"] if train else None)
        inputs = self._inputs(run, batch, keys, train)
        raw: dict[str, jax.Array] = {}
        metrics: dict[str, jax.Array] = {}
        for name, term in self.terms.items():
            raw[name], m = term.loss(run, inputs)
            metrics.update(m)
        return raw, metrics, run

    def loss(self, variables: dict, batch: dict, rng: jax.Array):
        """The weighted sum of the enabled terms on one (global) batch.

        Returns (value, metrics, updated non-param collections). The value is what to
        differentiate w.r.t. all of params: the weighted sum of the terms (metrics["loss"]),
        plus, with CE+DCM, its discriminator's hinge loss ("disc/loss"), each player getting the
        gradient of its own loss only. Metrics: "loss", each term's raw value under its name and
        weighted value as "<name>_weighted", and per-term diagnostics ("temperature",
        "mpp_accuracy", "translation_accuracy", "dcm_accuracy", "ce_dcm_l2", "disc/real_logit",
        ...).
        """
        raw, metrics, run = self._terms(variables, batch, rng, train=True)
        total = jnp.float32(0.0)
        for name, value in raw.items():
            weighted = self.terms[name].weight * value
            metrics[name] = value
            metrics[f"{name}_weighted"] = weighted
            total = total + weighted
        metrics["loss"] = total
        value = total + metrics["disc/loss"] if "disc/loss" in metrics else total
        return value, metrics, run.collections()

    def image_ablation(self, variables: dict, batch: dict, rng: jax.Array) -> dict:
        """What the image contributes to each protocol term: its accuracy and cross entropy with
        the batch's images and with the images zeroed (eval mode: no augmentation or dropout,
        running statistics; the same hidden fields for both).

        Returns {"image/<metric>": with the image, "image/<metric>_no_image": zeroed,
        "image/<metric>_gain": the difference} for every "*_accuracy" and "*_ce" metric of the
        enabled terms (masked_protocol: mpp_*, translation: translation_* and
        translation_series_*, dcm: dcm_*). A gain near 0 means the term is solved from the
        protocol alone.
        """
        zeroed = dict(batch, image=jnp.zeros_like(batch["image"]))
        _, with_image, _ = self._terms(variables, batch, rng, train=False)
        _, without, _ = self._terms(variables, zeroed, rng, train=False)
        out = {}
        for k, v in with_image.items():
            if k.endswith(("_accuracy", "_ce")):
                out[f"image/{k}"] = v
                out[f"image/{k}_no_image"] = without[k]
                out[f"image/{k}_gain"] = v - without[k]
        return out

    # ------------------------------------------------------------------------------ embeddings

    def embed_images(self, variables: dict, images: jax.Array) -> jax.Array:
        """Pooled image features float32 [B, D] (eval mode: no dropout, running statistics)."""
        run = Runner(self.parts, variables, train=False, rng=None)
        return run("image_encoder", images)["pooled"].astype(jnp.float32)

    def embed_protocol(self, variables: dict, tokens, values, value_mask) -> jax.Array:
        """Pooled protocol features float32 [B, W] of tokens/values/value_mask [B, F]."""
        if "protocol_encoder" not in self.parts:
            raise ValueError(
                "embed_protocol: this objective has no protocol encoder (enable contrastive, "
                "masked_protocol or translation)"
            )
        run = Runner(self.parts, variables, train=False, rng=None)
        return run("protocol_encoder", tokens, values, value_mask)["pooled"].astype(jnp.float32)


def build_objective(
    config: ml_collections.ConfigDict, info: ProtocolInfo, mesh: jax.sharding.Mesh | None
) -> Objective:
    """The Objective of an experiment config (pgjax/objectives/defaults.py: the keys read)."""
    return Objective(config, info, mesh)
