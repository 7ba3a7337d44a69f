"""Protocol Genome: contrastive + masked protocol prediction + protocol translation.

ViT-B/16 on 256x256 images, global batch 256, bf16 compute: the cluster config.
`configs/pg.py:tiny` is the same experiment at CPU size (tests, the demo).
"""

from pgjax.train.defaults import base_config, variant


def get_config(arg: str = ""):
    c = base_config()
    return variant(c, arg)
