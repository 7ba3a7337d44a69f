"""Ablation: Protocol Genome with resized crops (the "light" augmentation preset) instead of the
default native-scale crops: crops of 50-100% of the area resized back bilinearly, which change
the apparent pixel size and smooth the noise texture that carries kernel and kVp."""

from pgjax.train.defaults import base_config, variant


def get_config(arg: str = ""):
    c = base_config()
    c.augment = dict(preset="light")
    return variant(c, arg)
