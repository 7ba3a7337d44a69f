"""Baseline: MAE (masked image modelling, 75% of patches hidden; He et al. 2022)."""

from pgjax.train.defaults import base_config, only, variant


def get_config(arg: str = ""):
    c = only(base_config(), "mae")
    return variant(c, arg)
