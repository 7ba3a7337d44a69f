"""The ablation benchmark (pre-registered; README, "The ablation benchmark"): does protocol-aware
pretraining generalise better to a new site than image-only pretraining of the same encoder?

Fixed before any run; nothing here is changed after seeing a result.

    pgjax synth --sites configs/sites/benchmark.toml --out bench/corpus --studies 5000 \
        --mix 1,0,0,0 --xr-size 128 --seed 0 --workers 2
    pgjax preprocess bench/corpus/dicom --out bench/store --labels bench/corpus/labels.csv \
        --site-names bench/corpus/site_names.csv \
        --external-sites ext_acquisition,ext_casemix,ext_reversal --workers 2 \
        --set image_size=64,64 --set min_patients=3
    pgjax sweep configs/ablations/benchmark.py --store bench/store --workdir bench/sweep

Corpus: chest radiographs only, 3 training sites and 3 external sites, each external site its
own test split (`external:<site>`): an unseen vendor with kVp outside the training range
(acquisition shift), an older, sicker population (case-mix shift), and the explicit
view/label reversal (a stress test, never pooled with the others). At every site but the
reversal one, sicker patients are imaged AP (bedside) more often, and AP magnifies the heart.

Primary metric: external AUROC on `external:ext_acquisition`, linear probe on 20% of the
training patients' labels, PG minus SimCLR (both ResNet-mu, `:cpu` recipe), mean over 3
pretraining seeds x 3 label-subset seeds, 95% CI from the hierarchical bootstrap over pretraining
seeds x patients. PG is better if the interval lies above 0, worse if below, and otherwise no
difference was detected at this power (the interval says which sizes are excluded).
Everything else is secondary: the other external splits, worst-view-stratum AUROC, ECE, 10% and
100% labels, DCM, CE+DCM, the PG ablations, and MAE against PG in their own ViT group.
Reference rows (oracle, thumbnail, protocol-only, random init) show what the instrument can
detect; an encoder whose internal-test AUROC interval contains 0.5 is "not informative".
"""

import ml_collections

# (name, config, overrides, reference). ResNet-mu rows are compared with `pg`; MAE hides patches,
# so it needs a ViT and is compared with PG on the same ViT-mu/8 (`pg_vit`), never across.
ROWS = (
    ("pg", "configs/pg.py:cpu", (), "pg"),
    ("simclr", "configs/simclr.py:cpu", (), "pg"),
    ("dcm", "configs/dcm.py:cpu", (), "pg"),
    ("ce_dcm", "configs/ce_dcm.py:cpu", (), "pg"),
    ("pg_no_contrastive", "configs/pg_no_contrastive.py:cpu", (), "pg"),
    ("pg_no_masked_protocol", "configs/pg_no_masked_protocol.py:cpu", (), "pg"),
    ("pg_no_translation", "configs/pg_no_translation.py:cpu", (), "pg"),
    ("pg_vit", "configs/pg.py:tiny", (), "pg_vit"),
    ("mae", "configs/mae.py:cpu", (), "pg_vit"),
)


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.task = "cardiomegaly"
    c.label_fractions = (0.1, 0.2, 1.0)
    c.seeds = (0, 1, 2)  # label-subset seeds
    c.pretrain_seeds = (0, 1, 2)
    c.heads = ("linear",)
    c.reference = "pg"
    c.random_init = True
    c.steps = 300
    # Registered and run when every config's augmentation was the resized crop ("light"); the
    # default is now native-scale crops, so the registered benchmark pins what it ran with.
    c.overrides = ("augment.preset=light",)
    c.rows = tuple(
        dict(name=n, config=cfg, overrides=o, reference=ref) for n, cfg, o, ref in ROWS
    )
    # Fine-tuning heads beside the linear probes (every run trains an encoder, so only these
    # rows, at 10% and 20% labels): WORKDIR/eval_finetune/, table_finetune.md. Added before any
    # result of this benchmark existed.
    c.finetune = dict(rows=("pg", "simclr", "random_init"), label_fractions=(0.1, 0.2))
    c.primary = dict(
        split="external:ext_acquisition", head="linear", label_fraction=0.2, row="pg",
        versus="simclr", metric="auroc",
    )  # fmt: skip
    return c
