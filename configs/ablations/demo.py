"""Demo-size ablation: every objective removed, and every baseline, at CPU size.

    pgjax sweep configs/ablations/demo.py --store pgjax-demo/store --workdir sweep-demo

The CPU recipe (configs/NAME.py:cpu: ResNet-mu encoders, MAE on ViT-mu/8), 60 pretraining steps
each; see pgjax/eval/sweep.py for the keys. `pgjax demo` runs the rows `pg`, `simclr` and `mae`
of this list on 64x64 images.
"""

import ml_collections

ROWS = (
    ("pg", "configs/pg.py:cpu"),
    ("pg_no_contrastive", "configs/pg_no_contrastive.py:cpu"),
    ("pg_no_masked_protocol", "configs/pg_no_masked_protocol.py:cpu"),
    ("pg_no_translation", "configs/pg_no_translation.py:cpu"),
    ("simclr", "configs/simclr.py:cpu"),
    ("mae", "configs/mae.py:cpu"),
    ("dcm", "configs/dcm.py:cpu"),
    ("ce_dcm", "configs/ce_dcm.py:cpu"),
)


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.task = "cardiomegaly"
    c.label_fractions = (0.2, 1.0)
    c.seeds = (0, 1)
    c.heads = ("linear",)
    c.reference = "pg"
    c.random_init = True
    c.steps = 60
    # One pretraining per row (the layout WORKDIR/<row>); (0, 1, 2) trains each row three times
    # and compares rows by a bootstrap over seeds x patients (pgjax/eval/sweep.py).
    c.pretrain_seeds = (0,)
    c.overrides = ()
    c.rows = tuple(dict(name=n, config=cfg, overrides=()) for n, cfg in ROWS)
    # The transfer baseline: the reference's encoder loaded from published weights (a local
    # timm-layout or big_vision file; --set transfer.checkpoint=FILE) and probed without
    # pretraining. Without a checkpoint the row is skipped, with the reason in the outputs.
    c.transfer = dict(checkpoint=None, config=None, overrides=())
    return c
