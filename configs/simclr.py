"""Baseline: SimCLR (image-image contrastive, two augmented views, global-batch NT-Xent)."""

from pgjax.train.defaults import base_config, only, variant


def get_config(arg: str = ""):
    c = only(base_config(), "simclr")
    # Its two views use the "simclr" augmentation preset (Chen et al. 2020, without flips).
    return variant(c, arg)
