"""Downstream tasks for `pgjax eval` and `pgjax sweep`, and how they are evaluated.

Each task names a label (the `task` column of labels.csv, joined to the store by salted study
key), the store group its items come from, the evaluation unit, the splits and the label
fractions. Splits: the probe trains on `train_splits` (patient-level, training sites), picks its
regularisation on `val_splits`, and is tested on `test_splits`: the internal test split and the
whole held-out external site(s). `pgjax eval --tasks THIS_FILE --set KEY=VALUE` changes any key.
"""

import ml_collections


def _task(label, unit="study", external_by_site=False, strata=("ViewPosition",)):
    return dict(
        label=label,  # the `task` value in labels.csv / the store's table
        group="images",  # store group: "images" (2D items) or "volumes"
        unit=unit,  # "study": mean probability over a study's items; "item": each item
        train_splits=("train",),
        val_splits=("val",),
        test_splits=("test", "external"),
        # Fractions of the labelled training *patients*, drawn per seed (nested: the 10% set
        # is part of the 20% set of the same seed), stratified by the patient's label.
        label_fractions=(0.01, 0.1, 0.2, 1.0),
        seeds=(0, 1, 2),
        # Each held-out site its own test split "external:<site>" (sites of different shift
        # types are not pooled); False: one pooled "external" split.
        external_by_site=external_by_site,
        # Protocol fields whose values are the strata of the within-stratum AUROC (worst
        # stratum reported beside the pooled AUROC) and of the representation diagnostics.
        strata=strata,
    )


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.tasks = dict(
        # radiographs: one image per study
        cardiomegaly=_task("cardiomegaly", external_by_site=True),
        # CT: up to 16 slices per series, several series per study
        pe=_task("pe", strata=("ConvolutionKernel",)),
        glioma_grade=_task("glioma_grade", strata=("Manufacturer",)),  # brain MR
    )
    c.probe = dict(
        # L2 logistic regression on standardised frozen embeddings; the penalty (per item,
        # as in sklearn's 1/C over n) is chosen by validation log-loss.
        l2_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
        conditioned=False,  # also feed the protocol embedding (models with a protocol encoder)
    )
    # `pgjax eval --calibrate protocol`: one temperature per vendor x scanner-model group with
    # at least min_count validation items (and both classes); the others take the global one.
    c.calibration = dict(min_count=20)
    c.finetune = dict(steps=60, batch=16, lr=1e-4, head_lr=1e-2, weight_decay=1e-4, eval_every=20)
    c.metrics = dict(
        n_boot=1000,  # bootstrap resamples (patient-level) for ECE and Brier, overall rows
        subgroup_boot=200,  # the same for subgroup rows (site, vendor, scanner model...)
        sensitivity=0.9,  # false-positive rate reported at this sensitivity
        border_min_patients=3,  # a protocol seen for fewer training patients is "border"
    )
    # Reference rows of every evaluation, through the same probe, label fractions and seeds as
    # the models: oracle (the true latent score, 1-D logistic fit), thumbnail (logistic
    # regression on an 8x8 area-downsample of the stored image), protocol_only (one-hot header
    # tokens, no pixels), random_init (the reference encoder's architecture, untrained).
    c.references = ("oracle", "thumbnail", "protocol_only", "random_init")
    c.embed_batch = 64
    return c
