"""The base experiment config every file in configs/ starts from.

Values the Protocol Genome paper does not give are our choices, marked "(ours)"; each is a
config key so an ablation is a config, not a code change.
"""

from __future__ import annotations

import ml_collections

# The field groups live with the objectives' defaults (one source). Plain tuples in the config,
# so that a command line may override them with any tuple.
from pgjax.objectives.defaults import ACQUISITION_FIELDS, DEVICE_FIELDS
from pgjax.train import mesh as mesh_lib


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.input = dict(
        store="pgjax-demo/store",
        group="images",  # or "volumes" with a 3D encoder
        splits=("train",),
        global_batch=256,
        # Grain worker processes per host (spawned). 0: TensorStore reads each batch on its own
        # threads in the training process; a worker adds a shared-memory copy of every batch,
        # which cost more than it saved in `pgjax bench loader` (benchmarks/README.md).
        workers=0,
        prefetch=2,  # batches read ahead per process
        read_threads=1,  # Grain threads issuing those reads (TensorStore parallelises each)
    )
    c.model = dict(
        image_encoder="vit_b/16",
        image_encoder_kw={},
        protocol_encoder="s",
        protocol_encoder_kw={},
        embed_dim=512,
        fusion=dict(depth=2, num_heads=8, width=512, mlp_dim=2048),
        dtype="bfloat16",  # compute dtype; parameters stay float32
    )
    c.objectives = dict(
        contrastive=dict(weight=1.0, kind="siglip", method="ring"),
        masked_protocol=dict(weight=1.0, rate=0.3, numeric_weight=1.0),
        # Within each item (acquisition -> device), and across the series of a study (another
        # series' acquisition settings from this image; the loader pairs the series).
        translation=dict(
            weight=0.5,
            source=tuple(ACQUISITION_FIELDS),
            target=tuple(DEVICE_FIELDS),
            series_weight=1.0,
        ),
        # SimCLR draws its two views with its own, strong augmentation (pgjax/train/augment.py).
        simclr=dict(weight=0.0, temperature=0.1, augment=dict(preset="simclr")),
        mae=dict(weight=0.0, mask_ratio=0.75, decoder={}),
        dcm=dict(weight=0.0, numeric_weight=1.0),
        # A central hole of half the image side, as in Pathak et al. 2016 and Hu et al. 2020.
        ce_dcm=dict(weight=0.0, hole=0.5, adv_weight=0.001, tags=tuple(DEVICE_FIELDS)),
    )
    # What every other objective sees: random crops at native scale only (ours): shifts by whole
    # pixels, no resampling. Pixel size, intensity and noise texture carry kernel, kVp and field
    # strength, the signal the protocol objectives learn from, so no resizing and no intensity
    # jitter (configs/pg_resized_crop.py is the ablation with resized crops); no flips: left and
    # right are anatomy.
    c.augment = dict(preset="native")
    c.optim = dict(
        lr=1e-3,  # peak, for global batch 256 (ours; scale linearly with the batch)
        warmup_steps=1000,
        weight_decay=0.05,
        b1=0.9,
        b2=0.95,
        clip_norm=1.0,
        accum_steps=1,  # micro-batches per step; the contrastive negatives are per micro-batch
        final_lr_ratio=0.01,
        disc_lr=2e-4,  # CE+DCM discriminator (Adam, as in Pathak et al.)
    )
    # Published weights for the image encoder before pretraining (pgjax/train/init_from.py):
    # `from` a local timm-layout .safetensors/.pt/.pth/.bin or big_vision .npz; `format` auto
    # (by suffix); `strict` refuses unmatched parameters; `stem` sums (or averages) an RGB stem
    # into the one channel; `prefix` selects a sub-model's entries (e.g. "visual.trunk.").
    c.init = {"from": None, "format": "auto", "strict": True, "stem": "sum", "prefix": ""}
    c.total_steps = 100_000
    c.mesh = dict(data=-1, fsdp=1)
    # (regex on the parameter path, rule): see pgjax/train/mesh.py, whose defaults these are.
    c.sharding_rules = mesh_lib.DEFAULT_RULES
    # With fsdp > 1: "step" gathers every parameter once per step, before the forward pass (each
    # device keeps its shard of the summed gradients), so each matmul runs on the device's own
    # items; "auto" leaves each operation's layout to XLA's partitioner, which on configs/pg.py
    # (fsdp=8) moved 17.6 GiB per device and step against 1.3 GiB with "step" (README,
    # 'Compiled cluster step').
    c.fsdp_gather = "step"
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    return c


def shrink_for_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ':tiny' variant of any config: same objectives, models small enough for a CPU."""
    c.input.global_batch = 16
    c.input.workers = 0
    c.model.image_encoder = (
        "resnet_mu" if c.model.image_encoder.startswith("resnet") else "vit_mu/8"
    )
    c.model.protocol_encoder = "mu"
    c.model.embed_dim = 32
    c.model.fusion = dict(depth=1, num_heads=2, width=32, mlp_dim=64)
    c.objectives.mae.decoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.model.dtype = "float32"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    c.total_steps = 60
    c.log_every = 10
    c.checkpoint_every = 20
    return c


def cpu_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ':cpu' variant: the ablation benchmark's CPU recipe (configs/ablations/benchmark.py).

    ':tiny' plus a ResNet-mu image encoder for every objective that can use one: on 64x64
    radiographs the frozen features of ResNet-mu carry the cardiothoracic ratio (ridge r 0.90,
    internal AUROC 0.93 at random init) where those of ViT-mu/8 do not (r 0.07, AUROC 0.49 with
    4-pixel patches): measured with tools/recipe_curve.py (README, "A CPU recipe"). MAE hides
    patches, so it keeps ViT-mu/8, and its rows are compared only with ViT rows.
    """
    c = shrink_for_cpu(c)
    if float(c.objectives.mae.weight) == 0.0:
        c.model.image_encoder = "resnet_mu"
    c.total_steps = 300
    c.optim.warmup_steps = 30
    c.log_every = 50
    c.checkpoint_every = 100
    return c


VARIANTS = {"": lambda c: c, "tiny": shrink_for_cpu, "cpu": cpu_recipe}


def variant(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    """The config for `configs/NAME.py:ARG`: the cluster config, ':tiny' or ':cpu'."""
    if arg not in VARIANTS:
        known = sorted(v for v in VARIANTS if v)
        raise ValueError(f"unknown config variant {arg!r}; known: {known} (or none)")
    return VARIANTS[arg](c)


def only(c: ml_collections.ConfigDict, *names: str) -> ml_collections.ConfigDict:
    """Enable exactly the named objectives (weight 1), disable the rest."""
    for name in c.objectives:
        c.objectives[name].weight = 1.0 if name in names else 0.0
    return c
