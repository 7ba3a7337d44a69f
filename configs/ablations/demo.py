"""Demo-size ablation: every objective removed, and every baseline, at CPU size.

    pgjax sweep configs/ablations/demo.py --store pgjax-demo/store --workdir sweep-demo

Tiny models (configs/NAME.py:tiny), 60 pretraining steps each; see pgjax/eval/sweep.py for the
keys. `pgjax demo` runs the rows `pg`, `simclr` and `mae` of this list.
"""

import ml_collections

ROWS = (
    ("pg", "configs/pg.py:tiny"),
    ("pg_no_contrastive", "configs/pg_no_contrastive.py:tiny"),
    ("pg_no_masked_protocol", "configs/pg_no_masked_protocol.py:tiny"),
    ("pg_no_translation", "configs/pg_no_translation.py:tiny"),
    ("simclr", "configs/simclr.py:tiny"),
    ("mae", "configs/mae.py:tiny"),
    ("dcm", "configs/dcm.py:tiny"),
    ("ce_dcm", "configs/ce_dcm.py:tiny"),
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
    return c
