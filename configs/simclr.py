"""Baseline: SimCLR (image-image contrastive, two augmented views, global-batch NT-Xent)."""

from pgjax.train.defaults import base_config, only, shrink_for_cpu


def get_config(arg: str = ""):
    c = only(base_config(), "simclr")
    # SimCLR needs strong views (Chen et al. 2020), still without flips (anatomy).
    c.augment = dict(crop_scale=(0.3, 1.0), brightness=0.4, contrast=0.4, noise=0.05)
    return shrink_for_cpu(c) if arg == "tiny" else c
