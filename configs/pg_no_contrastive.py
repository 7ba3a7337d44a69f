"""Ablation: Protocol Genome without the contrastive objective (its weight is 0)."""

from pgjax.train.defaults import base_config, shrink_for_cpu


def get_config(arg: str = ""):
    c = base_config()
    c.objectives.contrastive.weight = 0.0
    return shrink_for_cpu(c) if arg == "tiny" else c
