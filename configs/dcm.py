"""Baseline: DCM, predict every header field directly from the image (no protocol encoder)."""

from pgjax.train.defaults import base_config, only, variant


def get_config(arg: str = ""):
    c = only(base_config(), "dcm")
    return variant(c, arg)
