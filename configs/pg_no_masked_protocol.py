"""Ablation: Protocol Genome without the masked_protocol objective (its weight is 0)."""

from pgjax.train.defaults import base_config, variant


def get_config(arg: str = ""):
    c = base_config()
    c.objectives.masked_protocol.weight = 0.0
    return variant(c, arg)
