"""The field groups the objectives read, and every setting of every term with its default.

One source: the objective terms, the base experiment config (pgjax/train/defaults.py) and the
README's table of settings (`settings_table`, kept in sync by tools/objectives_table.py) all
read them from here.
"""

from __future__ import annotations

import dataclasses


class FieldGroup(tuple):
    """A named tuple of field keywords. When a setting's value is a FieldGroup (its default, or a
    group a config uses), fields the store's schema lacks are dropped; names listed by hand must
    all be in the schema."""

    name: str

    def __new__(cls, name: str, keywords):
        self = super().__new__(cls, keywords)
        self.name = name
        return self

    def __add__(self, other):
        name = f"{self.name} + {getattr(other, 'name', list(other))}"
        return FieldGroup(name, tuple(self) + tuple(other))


# Who made the image: what protocol-protocol translation predicts within an item, and what the
# CE+DCM discriminator is conditioned on (ours; the paper names the idea only).
DEVICE_FIELDS = FieldGroup(
    "DEVICE_FIELDS",
    ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "MagneticFieldStrength"),
)
# How it was made: what translation shows to predict the device.
ACQUISITION_FIELDS = FieldGroup(
    "ACQUISITION_FIELDS",
    ("Modality", "BodyPartExamined", "ConvolutionKernel", "KVP", "XRayTubeCurrent", "Exposure",
     "SliceThickness", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
     "ScanningSequence", "SequenceVariant", "ViewPosition"),
)  # fmt: skip
# What cross-series translation predicts of the other series: the settings that differ between
# the series of one study (reconstruction kernel, thickness, sequence timing). Study-level fields
# (modality, body part, device) are shown, not predicted: copying them would be trivial.
SERIES_FIELDS = FieldGroup(
    "SERIES_FIELDS",
    ("ConvolutionKernel", "KVP", "XRayTubeCurrent", "Exposure", "SliceThickness",
     "SpacingBetweenSlices", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
     "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "ContrastBolusAgent"),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Setting:
    default: object
    doc: str


# Per term: a one-line description, and its settings. A key not listed is a config error.
TERM_DOCS: dict[str, str] = {
    "contrastive": "protocol-image contrast (CLIP softmax or SigLIP sigmoid) over the global batch",
    "masked_protocol": "masked protocol prediction: hidden fields from the others and the image",
    "translation": "protocol-protocol translation: device fields from acquisition fields and "
    "the image; across series, another series' settings from this image",
    "simclr": "SimCLR (Chen et al. 2020): NT-Xent between two augmented views",
    "mae": "MAE (He et al. 2022): reconstruct hidden patches (ViT encoders only)",
    "dcm": "DCM (Hu et al. 2020): every header field from the pooled image embedding",
    "ce_dcm": "CE+DCM (Hu et al. 2020): context-encoder inpainting with a tag-conditioned "
    "projection discriminator",
}

_WEIGHT = Setting(0.0, "weight of the term in the sum; 0 (or no section) turns it off")

TERM_SETTINGS: dict[str, dict[str, Setting]] = {
    "contrastive": {
        "weight": _WEIGHT,
        "kind": Setting("clip", '"clip" (softmax) or "siglip" (sigmoid)'),
        "method": Setting("ring", 'sharded negatives: "ring" or "allgather"'),
        "init_scale": Setting(10.0, "initial temperature t (logits are t * cosine)"),
        "init_bias": Setting(-10.0, "initial logit bias (SigLIP only)"),
        "max_scale": Setting(100.0, "cap of t (CLIP's)"),
    },
    "masked_protocol": {
        "weight": _WEIGHT,
        "rate": Setting(0.3, "share of each item's fields hidden and predicted"),
        "numeric_weight": Setting(1.0, "weight of the value MSE against the token cross entropy"),
        "hide_text": Setting(
            True,
            "never show the free-text fields (descriptions, protocol name: they name the "
            "settings that are targets); they are still predicted when drawn",
        ),
    },
    "translation": {
        "weight": _WEIGHT,
        "source": Setting(ACQUISITION_FIELDS, "fields shown (with the image)"),
        "target": Setting(DEVICE_FIELDS, "fields predicted"),
        "numeric_weight": Setting(1.0, "weight of the value MSE against the token cross entropy"),
        "series_weight": Setting(
            0.0, "weight of the cross-series part (the loader then pairs series of a study)"
        ),
        "series_target": Setting(SERIES_FIELDS, "fields of the other series hidden and predicted"),
        "hide_text": Setting(
            True,
            "hide the other series' free-text fields, which name its hidden settings "
            '("B30f", "T2 FLAIR"); with it on, `source` may not list them',
        ),
    },
    "simclr": {
        "weight": _WEIGHT,
        "temperature": Setting(0.1, "NT-Xent temperature"),
        "proj_dim": Setting(128, "projection output width"),
        "hidden_dim": Setting(None, "projection hidden width (None: the encoder's width)"),
        "augment": Setting({"preset": "simclr"}, "augmentation of the two views"),
    },
    "mae": {
        "weight": _WEIGHT,
        "mask_ratio": Setting(0.75, "share of patches hidden"),
        "norm_pix": Setting(True, "targets normalised per patch"),
        "decoder": Setting({}, "MAEDecoder keywords (width, depth, num_heads, mlp_dim)"),
    },
    "dcm": {
        "weight": _WEIGHT,
        "width": Setting(256, "per-field hidden width of the head"),
        "numeric_weight": Setting(1.0, "weight of the value MSE against the token cross entropy"),
    },
    "ce_dcm": {
        "weight": _WEIGHT,
        "hole": Setting(0.25, "side of the central hole, as a share of each image side"),
        "adv_weight": Setting(0.001, "weight of the adversarial term (Pathak's lambda_adv)"),
        "rec_weight": Setting(0.999, "weight of the hole's L2 (lambda_rec)"),
        "tags": Setting(DEVICE_FIELDS + ACQUISITION_FIELDS, "the discriminator's conditioning"),
        "decoder": Setting({}, "ContextEncoderDecoder keywords"),
        "disc": Setting({}, "ProjectionDiscriminator keywords (channels: one stride-2 conv each)"),
    },
}


def is_group(names) -> bool:
    """Whether `names` are exactly one of the field groups (or a default made of them)."""
    groups = [DEVICE_FIELDS, ACQUISITION_FIELDS, SERIES_FIELDS]
    groups += [s.default for t in TERM_SETTINGS.values() for s in t.values()]
    return any(isinstance(g, FieldGroup) and tuple(names) == tuple(g) for g in groups)


TERM_DEFAULTS: dict[str, dict] = {
    term: {key: s.default for key, s in settings.items()}
    for term, settings in TERM_SETTINGS.items()
}
TERMS = tuple(TERM_SETTINGS)


def _show(value) -> str:
    if isinstance(value, FieldGroup):
        return value.name
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def settings_table() -> str:
    """The README's table of every term's settings and defaults (Markdown)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for term, settings in TERM_SETTINGS.items():
        rows.append(f"| **`objectives.{term}`** | | {TERM_DOCS[term]} |")
        for key, s in settings.items():
            rows.append(f"| `{key}` | `{_show(s.default)}` | {s.doc} |")
    groups = (DEVICE_FIELDS, ACQUISITION_FIELDS, SERIES_FIELDS)
    rows += ["", "Field groups (fields the store's schema lacks are dropped):", ""]
    rows += [f"- `{g.name}`: {', '.join(g)}" for g in groups]
    return "\n".join(rows) + "\n"
