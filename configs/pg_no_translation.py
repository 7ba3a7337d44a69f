"""Ablation: Protocol Genome without the translation objective (its weight is 0)."""

from pgjax.train.defaults import base_config, variant


def get_config(arg: str = ""):
    c = base_config()
    c.objectives.translation.weight = 0.0
    return variant(c, arg)
