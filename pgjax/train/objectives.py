"""Pretraining objectives: the models of one experiment config and the weighted sum of its terms.

Protocol Genome (arXiv 2509.06995) trains one image encoder and one protocol encoder with three
terms; the baselines are further terms of the same trainer, so any combination runs (ablations
set a weight to 0, baselines enable only their own term):

  contrastive      protocol-image contrast: CLIP's softmax or SigLIP's sigmoid loss between the
                   projected pooled image and pooled (full) protocol embeddings, over the global
                   batch (ring or all-gather under shard_map). A learnable temperature t =
                   exp(log t), initialised at t = 10, multiplies the cosine similarities (Zhai
                   et al.'s convention; CLIP calls t the logit scale and caps it at 100, as here);
                   SigLIP adds a learnable bias initialised at -10.
  masked_protocol  masked protocol prediction: a random `rate` of each item's fields is hidden
                   (MASK token, value removed); the protocol encoder's field states attend to the
                   image tokens in a fusion head that predicts the hidden fields' tokens (softmax
                   restricted to each field's ids) and numeric values.
  translation      protocol-protocol translation: only the `source` fields (acquisition
                   settings) are shown with the image, every other field is hidden, and the
                   `target` fields (the device) are predicted, with the same fusion head.
                   Across series (`series_weight` > 0): the protocol of another series of the
                   same study (from the loader, see input_pipeline) is shown with its
                   `series_target` fields (acquisition settings) hidden, and the fusion head
                   predicts them from that series' remaining fields (its description, device)
                   attending to this item's image: what a study's other acquisitions were, given
                   one of its images. Items whose study has one series are left out.
  simclr           SimCLR (Chen et al. 2020): NT-Xent between two augmented views of each image,
                   through an MLP projection, over the global batch.
  mae              MAE (He et al. 2022): the ViT sees 1 - mask_ratio of the patches, a small
                   decoder reconstructs the others (per-patch normalised pixels).
  dcm              "DCM" of Hu et al. 2020: predict every header field's token and numeric value
                   from the pooled image embedding alone.
  ce_dcm           "CE+DCM" of Hu et al. 2020: context-encoder inpainting (Pathak et al. 2016) of
                   a central hole (filled with the mean of the visible pixels; the encoder's
                   feature map, or a ViT's token grid, is decoded to the hole), L2 on the hole
                   plus a hinge adversarial term from a projection discriminator conditioned on
                   DICOM tags (Miyato & Koyama 2018). The discriminator is trained in
                   alternation by `disc_loss`; its spectral-norm vectors advance in `loss`.

Parameters (top-level keys of variables["params"]; a part exists only if an enabled term uses
it): image_encoder, protocol_encoder, image_proj, protocol_proj, contrastive (log_scale, bias),
fusion (shared by masked_protocol and translation: the hidden fields' states say what to
predict), simclr_proj, mae_decoder, dcm_head, ce_decoder, disc (the discriminator, trained only
by `disc_loss`). BatchNorm statistics and spectral-norm vectors live under the same keys in
variables["batch_stats"].

Config keys read (defaults in brackets):

  model.image_encoder ["vit_b/16"]     name for `build_image_encoder`
  model.image_encoder_kw [{}]          its keyword overrides (e.g. depth, pool, norm)
  model.protocol_encoder ["s"]         size for `build_protocol_encoder`
  model.protocol_encoder_kw [{}]
  model.embed_dim [256]                contrastive projection dim
  model.fusion [{}]                    FusionHead keywords (width, depth, num_heads, mlp_dim, ...)
  model.dtype ["float32"]              compute dtype, "float32" or "bfloat16"; params stay f32
  augment [{"preset": "none"}]         augmentation (see augment.py) of the image that every
                                       term except SimCLR sees. No preset changes intensities by
                                       default: for protocol terms they are the signal.
  objectives.<name>.weight [0]         weight of the term; 0 (or an absent section) turns it off
  objectives.contrastive: kind ["clip"|"siglip"], method ["ring"|"allgather"], init_scale [10],
      init_bias [-10] (SigLIP only), max_scale [100]
  objectives.masked_protocol: rate [0.3], numeric_weight [1.0] (MSE weight vs. cross entropy)
  objectives.translation: source [TRANSLATION_SOURCES], target [TRANSLATION_TARGETS],
      numeric_weight [1.0], series_weight [0] (weight of the cross-series part inside the
      term; the batch must carry partner_* arrays, which `pgjax train` asks the loader for),
      series_target [SERIES_TRANSLATION_TARGETS]. The defaults keep the fields that the
      schema has; names given explicitly must all be in the schema.
  objectives.simclr: temperature [0.1], proj_dim [128], hidden_dim [None: the encoder width],
      augment [{"preset": "simclr"}] (the views are drawn from the un-augmented image)
  objectives.mae: mask_ratio [0.75], norm_pix [True], decoder [{}] (MAEDecoder keywords:
      width, depth, num_heads, mlp_dim; MAE's 512/8/16/2048 by default). ViT encoders only.
  objectives.dcm: width [256] (per-field hidden width of the head), numeric_weight [1.0]
  objectives.ce_dcm: hole [0.25] (side of the central hole as a fraction of each image side;
      Hu et al. and Pathak et al. used 0.5), adv_weight [0.001] and rec_weight [0.999]
      (Pathak et al.'s lambda_adv and lambda_rec), tags [TRANSLATION_TARGETS +
      TRANSLATION_SOURCES present in the schema] (the discriminator's conditioning fields),
      decoder [{}] (ContextEncoderDecoder keywords), disc [{}] (ProjectionDiscriminator
      keywords, e.g. channels: one stride-2 conv each, so the hole side must be at least
      2 ** len(channels))

Sharding: `loss` runs under jit with the batch sharded over BATCH_AXES of `mesh`. The global-batch
losses (contrastive, NT-Xent) run the sharded ring / all-gather versions there; per-item losses
are plain means, which XLA makes global. mesh=None computes the dense single-device losses.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pgjax.losses import contrastive as closs
from pgjax.losses import image as iloss
from pgjax.losses import protocol as ploss
from pgjax.models import (
    ContextEncoderDecoder,
    FusionHead,
    MAEDecoder,
    ProjectionDiscriminator,
    ProjectionHead,
    ViT,
    build_image_encoder,
    build_protocol_encoder,
    mae_masking,
    patchify,
)
from pgjax.models.heads import FieldTokenHead
from pgjax.models.layers import LN_EPSILON, Dtype, dense_init
from pgjax.train.augment import AugmentConfig, augment
from pgjax.train.mesh import BATCH_AXES

# Acquisition settings shown to the translation model, and the device fields it predicts.
TRANSLATION_SOURCES = (
    "ConvolutionKernel",
    "KVP",
    "XRayTubeCurrent",
    "SliceThickness",
    "RepetitionTime",
    "EchoTime",
    "FlipAngle",
)
TRANSLATION_TARGETS = (
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "SoftwareVersions",
)
# What cross-series translation predicts of the other series: the settings that differ between
# the series of one study (reconstruction kernel, thickness, sequence timing). Study-level fields
# (modality, body part, device) are shown, not predicted: copying them would be trivial.
SERIES_TRANSLATION_TARGETS = (
    "ConvolutionKernel",
    "KVP",
    "XRayTubeCurrent",
    "Exposure",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "ContrastBolusAgent",
)

# Every setting of every term, with its default; a key not listed here is a config error.
TERM_DEFAULTS: dict[str, dict] = {
    "contrastive": dict(
        weight=0.0, kind="clip", method="ring", init_scale=10.0, init_bias=-10.0, max_scale=100.0
    ),
    "masked_protocol": dict(weight=0.0, rate=0.3, numeric_weight=1.0),
    "translation": dict(
        weight=0.0,
        source=None,
        target=None,
        numeric_weight=1.0,
        series_weight=0.0,
        series_target=None,
    ),
    "simclr": dict(
        weight=0.0, temperature=0.1, proj_dim=128, hidden_dim=None, augment={"preset": "simclr"}
    ),
    "mae": dict(weight=0.0, mask_ratio=0.75, norm_pix=True, decoder={}),
    "dcm": dict(weight=0.0, width=256, numeric_weight=1.0),
    "ce_dcm": dict(
        weight=0.0,
        hole=0.25,
        adv_weight=0.001,
        rec_weight=0.999,
        tags=None,
        decoder={},
        disc={},
    ),
}
TERMS = tuple(TERM_DEFAULTS)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ProtocolInfo:
    """What the objectives need to know of the protocol vocabulary.

    keywords: the F field names, in token-column order. field_ranges: per field, its half-open
    [start, stop) range of global token ids. field_kinds: "categorical", "numeric" or
    "presence". vocab_size: V, the number of token ids (specials included).
    """

    keywords: tuple[str, ...]
    field_ranges: tuple[tuple[int, int], ...]
    field_kinds: tuple[str, ...]
    vocab_size: int

    def __post_init__(self):
        object.__setattr__(self, "keywords", tuple(self.keywords))
        object.__setattr__(self, "field_ranges", tuple(tuple(r) for r in self.field_ranges))
        object.__setattr__(self, "field_kinds", tuple(self.field_kinds))
        if not len(self.keywords) == len(self.field_ranges) == len(self.field_kinds):
            raise ValueError("keywords, field_ranges and field_kinds must have one entry per field")

    @property
    def num_fields(self) -> int:
        return len(self.keywords)

    @classmethod
    def from_vocabulary(cls, vocab) -> ProtocolInfo:
        """From a `pgjax.data.tokenizer.Vocabulary`."""
        return cls(
            keywords=tuple(vocab.keywords),
            field_ranges=tuple(tuple(r) for r in vocab.field_ranges),
            field_kinds=tuple(vocab.field_kinds),
            vocab_size=int(vocab.size),
        )


# ---------------------------------------------------------------------------------------------
# Heads that exist only for one objective


class FieldPredictionHead(nn.Module):
    """DCM head: every protocol field's token logits and numeric value from one pooled image
    embedding, [B, D] -> {"logits": float32 [B, F, C] (each field's candidates), "values":
    float32 [B, F]}.

    A field-specific projection to `width` (a per-field linear read-out of the image embedding,
    like Hu et al.'s classifier on the encoder's features), GELU and LayerNorm, then token and
    value layers shared by the fields: a low-rank stand-in for F separate V-way classifiers,
    which would cost D * F * V parameters.
    """

    num_fields: int
    vocab_size: int
    width: int = 256
    field_ranges: Sequence[tuple[int, int]] = ()  # scored per field: FieldTokenHead
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled):
        dense = dict(kernel_init=dense_init, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.num_fields * self.width, name="field_proj", **dense)(pooled)
        x = nn.gelu(x.reshape(pooled.shape[0], self.num_fields, self.width), approximate=False)
        x = nn.LayerNorm(
            epsilon=LN_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(x)
        logits = FieldTokenHead(
            self.vocab_size, self.field_ranges, self.dtype, self.param_dtype, name="token_head"
        )(x)
        values = nn.Dense(1, name="value_head", **dense)(x)[..., 0]
        return {"logits": logits, "values": values.astype(jnp.float32)}


class SimCLRProjection(nn.Module):
    """SimCLR's two-layer MLP projection, [B, D] -> float32 [B, embed_dim]; the hidden width
    defaults to the input width D (2048 for SimCLR's ResNet-50), known only at init."""

    embed_dim: int = 128
    hidden_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return ProjectionHead(
            self.embed_dim,
            hidden_dim=self.hidden_dim or x.shape[-1],
            activation="relu",
            normalize=False,  # NT-Xent normalises
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(x)


# ---------------------------------------------------------------------------------------------
# Applying the parts


class _Runner:
    """Applies the objective's parts to their slices of one variables tree.

    Non-param collections (BatchNorm statistics, spectral-norm vectors) are threaded from call
    to call, so a part applied twice in one step (e.g. the encoder on the image and on SimCLR's
    views) updates its running statistics twice, in order; `collections()` returns them all.
    """

    def __init__(self, parts: dict, variables: dict, *, train: bool, rng: jax.Array | None):
        self.parts = parts
        self.params = variables["params"]
        self.state = {col: dict(tree) for col, tree in variables.items() if col != "params"}
        self.train = train
        self.rng = rng
        self.calls = 0

    def __call__(self, name, *args, module=None, params=None, train=None, **kwargs):
        """Apply part `name` (or `module`, a variant of it with the same parameters) with its
        parameters (or `params`). `train` defaults to the runner's; in training mode the part's
        collections are mutable and get updated."""
        module = self.parts[name] if module is None else module
        train = self.train if train is None else train
        variables = {"params": self.params[name] if params is None else params}
        variables.update({col: tree[name] for col, tree in self.state.items() if name in tree})
        if _takes_train(module):
            kwargs["train"] = train
        rngs = None
        if train and self.rng is not None:
            self.calls += 1  # every call its own dropout key
            rngs = {"dropout": jax.random.fold_in(self.rng, self.calls)}
        mutable = [col for col in variables if col != "params"] if train else False
        if not mutable:
            return module.apply(variables, *args, rngs=rngs, **kwargs)
        out, updated = module.apply(variables, *args, rngs=rngs, mutable=mutable, **kwargs)
        for col, tree in updated.items():
            self.state[col][name] = tree
        return out

    def collections(self) -> dict:
        return self.state


def _takes_train(module: nn.Module) -> bool:
    """Whether the module's __call__ has a `train` flag (ProjectionHead has none)."""
    return "train" in inspect.signature(type(module).__call__).parameters


def _as_dict(x) -> dict:
    if x is None:
        return {}
    return dict(x.to_dict() if hasattr(x, "to_dict") else x)


def _read_terms(objectives: dict) -> dict[str, dict]:
    """The enabled terms (weight > 0), in TERMS order, each with its settings and defaults."""
    unknown = sorted(set(objectives) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; known: {list(TERMS)}")
    terms = {}
    for name, defaults in TERM_DEFAULTS.items():
        given = _as_dict(objectives.get(name))
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


def _fields(info: ProtocolInfo, names, default: Sequence[str], what: str) -> np.ndarray:
    """bool [F] mask of the named fields. Default names absent from the schema are dropped (a
    custom schema may lack some); explicitly configured names must all exist."""
    if names is None:
        names = [n for n in default if n in info.keywords]
    mask = ploss.field_group(info.keywords, tuple(names))
    if not mask.any():
        raise ValueError(f"{what}: none of the fields {list(names)} is in the schema")
    return mask


# ---------------------------------------------------------------------------------------------
# The objective


class Objective:
    """The model(s) and the weighted sum of the enabled loss terms of one experiment config.

    Build with `build_objective`. Batches are dicts of global arrays: image float32 [B, H, W, 1]
    in [0, 1] (or a volume [B, D, H, W, 1]), tokens int32 [B, F], values float32 [B, F]
    (z-scored, 0 where absent), value_mask float32 [B, F] (1 where a value is present).
    """

    def __init__(self, config, info: ProtocolInfo, mesh: jax.sharding.Mesh | None):
        config = _as_dict(config)
        self.info = info
        self.mesh = mesh
        self.terms = _read_terms(_as_dict(config.get("objectives")))
        if not self.terms:
            raise ValueError(
                "no loss term enabled: set config.objectives.<name>.weight > 0 for at least one "
                f"of {list(TERMS)}"
            )
        model = _as_dict(config.get("model"))
        dtype_name = model.get("dtype", "float32")
        if dtype_name not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, not {dtype_name!r}")
        dtype = _DTYPES[dtype_name]
        self.augment_cfg = AugmentConfig.from_config(config.get("augment"))
        self.allowed = ploss.FieldCandidates(info.field_ranges, info.vocab_size)
        self.has_discriminator = "ce_dcm" in self.terms
        # Set below for the terms that need them.
        self.source = self.target = None  # translation: bool [F] field masks
        self.series_target = None  # cross-series translation: bool [F], or None when off
        self.simclr_augment = None  # SimCLR's view augmentation
        self.tags = None  # CE+DCM: int [K] indices of the discriminator's tag fields

        on = self.terms.__contains__
        self.uses_protocol = on("contrastive") or on("masked_protocol") or on("translation")
        # Terms that read the encoder's features of the (base-augmented) image; SimCLR, MAE and
        # CE+DCM encode their own variants of it.
        self.uses_image_features = self.uses_protocol or on("dcm")

        parts: dict[str, nn.Module] = {}
        parts["image_encoder"] = build_image_encoder(
            model.get("image_encoder", "vit_b/16"),
            **{"dtype": dtype, **_as_dict(model.get("image_encoder_kw"))},
        )
        if self.uses_protocol:
            parts["protocol_encoder"] = build_protocol_encoder(
                model.get("protocol_encoder", "s"),
                info.num_fields,
                info.vocab_size,
                **{"dtype": dtype, **_as_dict(model.get("protocol_encoder_kw"))},
            )
        if on("contrastive"):
            c = self.terms["contrastive"]
            if c["kind"] not in ("clip", "siglip") or c["method"] not in ("ring", "allgather"):
                raise ValueError(
                    "objectives.contrastive: kind must be clip or siglip and method ring or "
                    f"allgather, got {c['kind']!r}, {c['method']!r}"
                )
            embed_dim = int(model.get("embed_dim", 256))
            parts["image_proj"] = ProjectionHead(embed_dim, dtype=dtype)
            parts["protocol_proj"] = ProjectionHead(embed_dim, dtype=dtype)
        if on("masked_protocol") or on("translation"):
            parts["fusion"] = FusionHead(
                info.vocab_size,
                info.field_ranges,
                **{"dtype": dtype, **_as_dict(model.get("fusion"))},
            )
        if on("translation"):
            t = self.terms["translation"]
            self.source = _fields(info, t["source"], TRANSLATION_SOURCES, "translation.source")
            self.target = _fields(info, t["target"], TRANSLATION_TARGETS, "translation.target")
            if (self.source & self.target).any():
                both = [
                    k
                    for k, s, g in zip(info.keywords, self.source, self.target, strict=True)
                    if s and g
                ]
                raise ValueError(f"translation: fields {both} are both source and target")
            if t["series_weight"] < 0:
                raise ValueError("objectives.translation.series_weight must be >= 0")
            if t["series_weight"] > 0:
                self.series_target = _fields(
                    info, t["series_target"], SERIES_TRANSLATION_TARGETS, "series_target"
                )
        if on("simclr"):
            s = self.terms["simclr"]
            self.simclr_augment = AugmentConfig.from_config(s["augment"])
            parts["simclr_proj"] = SimCLRProjection(
                int(s["proj_dim"]), s["hidden_dim"], dtype=dtype
            )
        if on("mae"):
            if not isinstance(parts["image_encoder"], ViT):
                raise ValueError(
                    f"the mae objective needs a ViT image encoder, not "
                    f"{model.get('image_encoder', 'vit_b/16')!r}: it drops patch tokens"
                )
            parts["mae_decoder"] = MAEDecoder(
                patch_dim=math.prod(parts["image_encoder"].patch_size),  # one channel
                **{"dtype": dtype, **_as_dict(self.terms["mae"]["decoder"])},
            )
        if on("dcm"):
            parts["dcm_head"] = FieldPredictionHead(
                info.num_fields, info.vocab_size, int(self.terms["dcm"]["width"]),
                info.field_ranges, dtype=dtype,
            )  # fmt: skip
        if on("ce_dcm"):
            c = self.terms["ce_dcm"]
            if not 0 < c["hole"] < 1:
                raise ValueError(f"ce_dcm.hole must be in (0, 1), got {c['hole']}")
            self.tags = np.flatnonzero(
                _fields(info, c["tags"], TRANSLATION_TARGETS + TRANSLATION_SOURCES, "ce_dcm.tags")
            )
            # out_size is set from the image shape when applied (see _ce_decoder).
            parts["ce_decoder"] = ContextEncoderDecoder(
                **{"dtype": dtype, **_as_dict(c["decoder"])}
            )
            parts["disc"] = ProjectionDiscriminator(
                info.vocab_size, **{"dtype": dtype, **_as_dict(c["disc"])}
            )
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
        if "ce_dcm" in self.terms:
            self._ce_decoder(images)  # fail before any work on a hole the models cannot fit
        keys = iter(jax.random.split(rng, len(self.parts) + 1))
        params: dict = {}
        state: dict = {}

        def init_part(name, *args, module=None, **kwargs):
            module = self.parts[name] if module is None else module
            k_params, k_dropout = jax.random.split(next(keys))
            if _takes_train(module):
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
        if self.uses_protocol:
            protocol = init_part(
                "protocol_encoder", one["tokens"], one["values"], one["value_mask"]
            )
        if "contrastive" in self.terms:
            c = self.terms["contrastive"]
            init_part("image_proj", feats["pooled"])
            init_part("protocol_proj", protocol["pooled"])
            params["contrastive"] = {"log_scale": jnp.log(jnp.float32(c["init_scale"]))}
            if c["kind"] == "siglip":
                params["contrastive"]["bias"] = jnp.float32(c["init_bias"])
        if "fusion" in self.parts:
            init_part("fusion", protocol["fields"], feats["tokens"])
        if "simclr" in self.terms:
            init_part("simclr_proj", feats["pooled"])
        if "mae" in self.terms:
            keep, restore, _ = mae_masking(
                next(keys), 1, feats["tokens"].shape[1], self.terms["mae"]["mask_ratio"]
            )
            init_part("mae_decoder", feats["tokens"][:, : keep.shape[1]], restore)
        if "dcm" in self.terms:
            init_part("dcm_head", feats["pooled"])
        if "ce_dcm" in self.terms:
            # The encoder sees the image with a hole: same shapes as the image itself.
            region = init_part(
                "ce_decoder",
                self._feature_map(feats, images.shape),
                module=self._ce_decoder(images),
            )
            init_part("disc", region, *self._tags(one["tokens"]))
        return {"params": params, **state}

    # ------------------------------------------------------------------------------ losses

    def _keys(self, rng):
        # One key per use: two draws from one key (e.g. MPP's field mask and MAE's patch mask)
        # would be correlated.
        names = ("augment", "simclr", "mpp", "mae", "dropout")
        return dict(zip(names, jax.random.split(rng, len(names)), strict=True))

    def loss(self, variables: dict, batch: dict, rng: jax.Array):
        """The weighted sum of the enabled terms on one (global) batch.

        Returns (scalar total, metrics, updated non-param collections). Metrics: "loss" (the
        total), each term's raw value under its name and weighted value as "<name>_weighted",
        and per-term diagnostics ("temperature", "mpp_accuracy", "translation_accuracy",
        "dcm_accuracy", "ce_dcm_l2", ...). The discriminator's parameters get no gradient from
        this loss (its use in the adversarial term is under stop_gradient).
        """
        keys = self._keys(rng)
        run = _Runner(self.parts, variables, train=True, rng=keys["dropout"])
        images = augment(keys["augment"], batch["image"], self.augment_cfg)
        feats = run("image_encoder", images) if self.uses_image_features else None

        raw: dict[str, jax.Array] = {}
        metrics: dict[str, jax.Array] = {}
        for name in self.terms:
            if name == "contrastive":
                raw[name], m = self._contrastive(run, feats, batch)
            elif name == "masked_protocol":
                raw[name], m = self._masked_protocol(run, feats, batch, keys["mpp"])
            elif name == "translation":
                raw[name], m = self._translation(run, feats, batch)
            elif name == "simclr":
                raw[name], m = self._simclr(run, batch["image"], keys["simclr"])
            elif name == "mae":
                raw[name], m = self._mae(run, images, keys["mae"])
            elif name == "dcm":
                raw[name], m = self._dcm(run, feats, batch)
            else:
                raw[name], m = self._ce_dcm(run, images, batch)
            metrics.update(m)

        total = jnp.float32(0.0)
        for name, value in raw.items():
            weighted = self.terms[name]["weight"] * value
            metrics[name] = value
            metrics[f"{name}_weighted"] = weighted
            total = total + weighted
        metrics["loss"] = total
        return total, metrics, run.collections()

    def _batch_axes(self) -> tuple[str, ...]:
        return tuple(a for a in BATCH_AXES if a in self.mesh.axis_names)

    def _contrastive(self, run, feats, batch):
        c = self.terms["contrastive"]
        img = run("image_proj", feats["pooled"])  # L2-normalised by ProjectionHead
        protocol = run("protocol_encoder", batch["tokens"], batch["values"], batch["value_mask"])
        txt = run("protocol_proj", protocol["pooled"])
        p = run.params["contrastive"]
        log_scale = jnp.minimum(p["log_scale"], math.log(c["max_scale"]))
        bias = p.get("bias")
        if self.mesh is None:
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
                mesh=self.mesh,
                batch_axes=self._batch_axes(),
                method=c["method"],
            )
        metrics = {"temperature": jnp.exp(log_scale)}
        if bias is not None:
            metrics["siglip_bias"] = bias
        return loss, metrics

    def _fused_prediction(self, run, feats, tokens, values, value_mask):
        fields = run("protocol_encoder", tokens, values, value_mask)["fields"]
        return run("fusion", fields, feats["tokens"])

    def _masked_protocol(self, run, feats, batch, rng):
        s = self.terms["masked_protocol"]
        tokens, values, value_mask = batch["tokens"], batch["values"], batch["value_mask"]
        hidden = ploss.sample_field_mask(rng, *tokens.shape, s["rate"])
        out = self._fused_prediction(
            run, feats, *ploss.apply_field_mask(tokens, values, value_mask, hidden)
        )
        loss, m = ploss.masked_protocol_loss(
            out["logits"],
            out["values"],
            tokens,
            values,
            value_mask,
            hidden,
            self.allowed,
            s["numeric_weight"],
        )
        return loss, {f"mpp_{k}": m[k] for k in ("ce", "mse", "accuracy")}

    def _translation(self, run, feats, batch):
        s = self.terms["translation"]
        tokens, values, value_mask = batch["tokens"], batch["values"], batch["value_mask"]
        shown = ploss.apply_field_mask(tokens, values, value_mask, ~self.source)
        out = self._fused_prediction(run, feats, *shown)
        loss, m = ploss.translation_loss(
            out["logits"],
            out["values"],
            tokens,
            values,
            value_mask,
            self.target,
            self.allowed,
            s["numeric_weight"],
        )
        metrics = {f"translation_{k}": m[k] for k in ("ce", "mse", "accuracy")}
        if self.series_target is not None:
            series_loss, m = self._series_translation(run, feats, batch)
            loss = loss + s["series_weight"] * series_loss
            metrics.update(m)
        return loss, metrics

    def _series_translation(self, run, feats, batch):
        if "partner_tokens" not in batch:
            raise ValueError(
                "objectives.translation.series_weight > 0 needs batches with partner_* arrays "
                "(InputConfig(partners=True))"
            )
        s = self.terms["translation"]
        partner = batch["partner_tokens"], batch["partner_values"], batch["partner_value_mask"]
        out = self._fused_prediction(
            run, feats, *ploss.apply_field_mask(*partner, self.series_target)
        )
        has_partner = jnp.asarray(batch["has_partner"]).astype(bool)
        predict = jnp.asarray(self.series_target)[None, :] & has_partner[:, None]
        loss, m = ploss.masked_protocol_loss(
            out["logits"], out["values"], *partner, predict, self.allowed, s["numeric_weight"]
        )
        metrics = {f"translation_series_{k}": m[k] for k in ("ce", "mse", "accuracy")}
        metrics["translation_series_items"] = jnp.mean(has_partner.astype(jnp.float32))
        return loss, metrics

    def _simclr(self, run, images, rng):
        s = self.terms["simclr"]
        b = images.shape[0]
        # Both views of an item side by side ([x0, x0, x1, x1, ...]): a batch-sharded layout
        # keeps each item's views on its own device, and one encoder pass sees all 2B views
        # (SimCLR's global BatchNorm statistics cover both).
        views = augment(rng, jnp.repeat(images, 2, axis=0), self.simclr_augment)
        z = run("simclr_proj", run("image_encoder", views)["pooled"])
        z = z.reshape(b, 2, -1)
        z1, z2 = z[:, 0], z[:, 1]
        t = s["temperature"]
        if self.mesh is None:
            return iloss.nt_xent_loss(z1, z2, t), {}
        loss = closs.sharded_loss(
            lambda a, b, axis: iloss.nt_xent_loss_sharded(a, b, t, axis),
            self.mesh,
            self._batch_axes(),
            (z1, z2),
        )
        return loss, {}

    def _mae(self, run, images, rng):
        s = self.terms["mae"]
        patch = tuple(self.parts["image_encoder"].patch_size)
        num_patches = math.prod(n // p for n, p in zip(images.shape[1:-1], patch, strict=True))
        keep, restore, hidden = mae_masking(rng, images.shape[0], num_patches, s["mask_ratio"])
        visible = run("image_encoder", images, keep_indices=keep)["tokens"]
        pred = run("mae_decoder", visible, restore)
        loss = iloss.mae_loss(pred, patchify(images, patch), hidden > 0, s["norm_pix"])
        return loss, {}

    def _dcm(self, run, feats, batch):
        s = self.terms["dcm"]
        tokens = batch["tokens"]
        out = run("dcm_head", feats["pooled"])
        loss, m = ploss.masked_protocol_loss(
            out["logits"],
            out["values"],
            tokens,
            batch["values"],
            batch["value_mask"],
            jnp.ones(tokens.shape, bool),  # every field is a target
            self.allowed,
            s["numeric_weight"],
        )
        return loss, {f"dcm_{k}": m[k] for k in ("ce", "mse", "accuracy")}

    # CE+DCM --------------------------------------------------------------------------------

    def _hole(self, shape) -> tuple[slice, ...]:
        """The central hole of images of `shape` [B, *spatial, C]: one slice per spatial axis,
        of round(hole * side) pixels (at least 1, less than the side)."""
        hole = self.terms["ce_dcm"]["hole"]
        out = []
        for n in shape[1:-1]:
            size = min(max(1, round(hole * n)), n - 1)
            start = (n - size) // 2
            out.append(slice(start, start + size))
        return tuple(out)

    def _ce_decoder(self, images) -> ContextEncoderDecoder:
        """The inpainting decoder for this image shape: its output is the hole."""
        hole = self._hole(images.shape)
        disc_convs = len(self.parts["disc"].channels)
        if min(h.stop - h.start for h in hole) < 2**disc_convs:
            raise ValueError(
                f"ce_dcm: the hole {[h.stop - h.start for h in hole]} is too small for the "
                f"discriminator's {disc_convs} stride-2 convs; raise ce_dcm.hole or use fewer "
                "ce_dcm.disc.channels"
            )
        return self.parts["ce_decoder"].clone(
            out_size=tuple(h.stop - h.start for h in hole), out_channels=images.shape[-1]
        )

    def _feature_map(self, feats, image_shape):
        """The encoder's spatial features: a ResNet's feature map, or a ViT's patch tokens put
        back on their grid (row-major, as the ViT flattened them)."""
        if "feature_map" in feats:
            return feats["feature_map"]
        patch = tuple(self.parts["image_encoder"].patch_size)
        grid = tuple(n // p for n, p in zip(image_shape[1:-1], patch, strict=True))
        tokens = feats["tokens"]
        return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])

    def _tags(self, tokens):
        """The discriminator's conditioning: token ids of the tag fields [B, K], and a mask that
        leaves out the specials (PAD, MISSING, UNK, MASK carry no value to condition on)."""
        tags = tokens[:, self.tags]
        return tags, (tags >= ploss.NUM_SPECIAL).astype(jnp.float32)

    def _inpaint(self, run, images):
        """(predicted hole, true hole), both [B, *hole, C]. The encoder sees the image with its
        hole filled with the mean of the visible pixels: in-distribution brightness, no cue."""
        hole = self._hole(images.shape)
        region = (slice(None), *hole, slice(None))
        in_hole = jnp.zeros(images.shape[1:-1], bool).at[hole].set(True)[None, ..., None]
        axes = tuple(range(1, images.ndim))
        context_mean = jnp.sum(jnp.where(in_hole, 0.0, images), axis=axes, keepdims=True) / (
            jnp.sum(~in_hole) * images.shape[-1]
        )
        holed = jnp.where(in_hole, context_mean, images)
        feats = run("image_encoder", holed)
        pred = run(
            "ce_decoder", self._feature_map(feats, images.shape), module=self._ce_decoder(images)
        )
        return pred, images[region]

    def _ce_dcm(self, run, images, batch):
        s = self.terms["ce_dcm"]
        pred, real = self._inpaint(run, images)
        l2 = jnp.mean(jnp.square(pred - real))  # the whole output is the hole
        # Only the generator learns from this term: the discriminator's parameters enter under
        # stop_gradient. In training mode the call still advances its spectral-norm vectors
        # (batch_stats), the one place they can be updated: disc_loss returns no collections.
        fake_logits = run(
            "disc",
            pred,
            *self._tags(batch["tokens"]),
            params=jax.lax.stop_gradient(run.params["disc"]),
        )
        adv = iloss.hinge_g_loss(fake_logits)
        loss = s["rec_weight"] * l2 + s["adv_weight"] * adv
        return loss, {"ce_dcm_l2": l2, "ce_dcm_adv": adv}

    def disc_loss(self, variables: dict, batch: dict, rng: jax.Array):
        """Hinge loss of the CE+DCM discriminator on true holes vs. inpainted ones.

        The generator runs as in `loss` (same augmentation for the same rng, BatchNorm in
        training mode, its statistic updates discarded) and its output is under stop_gradient:
        differentiate w.r.t. params["disc"]. Returns (loss, metrics {"loss", "real_logit",
        "fake_logit"}: the loss and the mean logits on true and on inpainted holes; the trainer
        logs them under "disc/").
        """
        if not self.has_discriminator:
            raise ValueError("disc_loss: this objective has no discriminator (enable ce_dcm)")
        keys = self._keys(rng)
        run = _Runner(self.parts, variables, train=True, rng=keys["dropout"])
        images = augment(keys["augment"], batch["image"], self.augment_cfg)
        pred, real = self._inpaint(run, images)
        tags = self._tags(batch["tokens"])
        # train=False: the spectral-norm vectors are only read here (see _ce_dcm).
        real_logits = run("disc", real, *tags, train=False)
        fake_logits = run("disc", jax.lax.stop_gradient(pred), *tags, train=False)
        loss = iloss.hinge_d_loss(real_logits, fake_logits)
        return loss, {
            "loss": loss,
            "real_logit": jnp.mean(real_logits),
            "fake_logit": jnp.mean(fake_logits),
        }

    # ------------------------------------------------------------------------------ embeddings

    def embed_images(self, variables: dict, images: jax.Array) -> jax.Array:
        """Pooled image features float32 [B, D] (eval mode: no dropout, running statistics)."""
        run = _Runner(self.parts, variables, train=False, rng=None)
        return run("image_encoder", images)["pooled"].astype(jnp.float32)

    def embed_protocol(self, variables: dict, tokens, values, value_mask) -> jax.Array:
        """Pooled protocol features float32 [B, W] of tokens/values/value_mask [B, F]."""
        if "protocol_encoder" not in self.parts:
            raise ValueError(
                "embed_protocol: this objective has no protocol encoder (enable contrastive, "
                "masked_protocol or translation)"
            )
        run = _Runner(self.parts, variables, train=False, rng=None)
        return run("protocol_encoder", tokens, values, value_mask)["pooled"].astype(jnp.float32)


def build_objective(
    config: ml_collections.ConfigDict, info: ProtocolInfo, mesh: jax.sharding.Mesh | None
) -> Objective:
    """The Objective of an experiment config (see the module docstring for the keys read)."""
    return Objective(config, info, mesh)
