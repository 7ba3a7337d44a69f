"""Baseline: DCM, predict every header field directly from the image (no protocol encoder)."""

from pgjax.train.defaults import base_config, only, shrink_for_cpu


def get_config(arg: str = ""):
    c = only(base_config(), "dcm")
    return shrink_for_cpu(c) if arg == "tiny" else c
