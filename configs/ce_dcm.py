"""Baseline: CE+DCM (Hu et al. 2020): context-encoder inpainting with a projection
discriminator conditioned on DICOM tags, hinge loss; generator and discriminator step together
from one fake per micro-batch. ResNet-50 as in the paper."""

from pgjax.train.defaults import base_config, only, variant


def get_config(arg: str = ""):
    c = only(base_config(), "ce_dcm")
    c.model.image_encoder = "resnet50"
    return variant(c, arg)
