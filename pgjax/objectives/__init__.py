"""Pretraining objectives: one module per loss term, behind one interface (`base.Term`: its
heads, their init, its loss as a pure function of the parameters and the batch).

Protocol Genome (arXiv 2509.06995) trains one image encoder and one protocol encoder with three
terms (contrastive, masked_protocol, translation); the baselines (simclr, mae, dcm, ce_dcm) are
further terms of the same trainer, so any combination runs: ablations set a weight to 0,
baselines enable only their own term. `objective.TERM_TYPES` maps the config names to the
terms; `defaults` holds the field groups and every setting with its default (the README's table
of settings is rendered from it).

Model config keys read (defaults in brackets):

  model.image_encoder ["vit_b/16"]     name for `build_image_encoder`
  model.image_encoder_kw [{}]          its keyword overrides (e.g. depth, pool, norm)
  model.protocol_encoder ["s"]         size for `build_protocol_encoder`
  model.protocol_encoder_kw [{}]
  model.embed_dim [256]                contrastive projection dim
  model.fusion [{}]                    FusionHead keywords (width, depth, num_heads, mlp_dim, ...)
  model.dtype ["float32"]              compute dtype, "float32" or "bfloat16"; params stay f32
  augment [{"preset": "none"}]         augmentation (see augment.py) of the image that every
                                       term except SimCLR sees.
  objectives.<name>.<key>              see defaults.TERM_SETTINGS
"""

from pgjax.objectives.base import ProtocolInfo, Term
from pgjax.objectives.defaults import (
    ACQUISITION_FIELDS,
    DEVICE_FIELDS,
    SERIES_FIELDS,
    TERM_DEFAULTS,
    TERM_SETTINGS,
    TERMS,
    FieldGroup,
    settings_table,
)
from pgjax.objectives.objective import TERM_TYPES, Objective, build_objective

__all__ = [
    "ACQUISITION_FIELDS",
    "DEVICE_FIELDS",
    "SERIES_FIELDS",
    "TERMS",
    "TERM_DEFAULTS",
    "TERM_SETTINGS",
    "TERM_TYPES",
    "FieldGroup",
    "Objective",
    "ProtocolInfo",
    "Term",
    "build_objective",
    "settings_table",
]
