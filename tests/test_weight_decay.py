"""AdamW's weight-decay mask follows its stated rule (issue 14, defect 8): the kernels of dense
and conv layers decay, nothing else does."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pgjax.train.config_lib import load_config
from pgjax.train.mesh import path_name
from pgjax.train.train import make_optimizer, weight_decay_mask

REPO = Path(__file__).resolve().parents[1]


def pg_vit_params():
    """Parameter shapes of configs/pg.py:tiny (ViT-mu/8 image encoder, every PG term)."""
    import pgjax.objectives as ob
    from pgjax.data.schema import DEFAULT_FIELDS

    f = len(DEFAULT_FIELDS)
    info = ob.ProtocolInfo(
        tuple(x.keyword for x in DEFAULT_FIELDS), tuple((4 + 2 * i, 6 + 2 * i) for i in range(f)),
        4 + 2 * f,
    )  # fmt: skip
    config = load_config(REPO / "configs" / "pg.py:tiny")
    assert config.model.image_encoder.startswith("vit")
    objective = ob.build_objective(config, info, None)
    batch = dict(
        image=jnp.zeros((2, 64, 64, 1)),
        tokens=jnp.full((2, f), 4, jnp.int32),
        values=jnp.zeros((2, f)),
        value_mask=jnp.zeros((2, f)),
    )
    return jax.eval_shape(objective.init, jax.random.key(0), batch)["params"]


def test_decayed_leaves_of_a_vit_protocol_genome_config():
    params = pg_vit_params()
    mask = weight_decay_mask(params)
    flags = {path_name(p): bool(m) for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {p for p, m in flags.items() if m}
    kept = {p for p, m in flags.items() if not m}
    assert decayed == {p for p in flags if p.endswith("/kernel")}
    # Every leaf that is not decayed, by name: what the rule exempts, and nothing else.
    assert {p.rsplit("/", 1)[-1] for p in kept} == {
        "bias", "scale", "cls_token", "pos_embed", "embedding", "field_embed", "value_kernel",
        "value_bias", "log_scale",
    }  # fmt: skip
    for path in ("image_encoder/cls_token", "image_encoder/pos_embed", "protocol_encoder/cls_token",
                 "protocol_encoder/field_embed", "protocol_encoder/token_embed/embedding",
                 "contrastive/log_scale", "contrastive/bias"):  # fmt: skip
        assert path in kept, path
    assert "image_encoder/blocks_0/mlp/fc1/kernel" in decayed
    assert "image_encoder/patch_embed/kernel" in decayed
    assert "fusion/token_head/kernel" in decayed


def test_an_embedding_is_not_pulled_towards_zero():
    # With zero gradients, AdamW changes a parameter only by decay: the kernel shrinks, the
    # tokens (ViT cls, MAE mask token) and the embeddings do not.
    params = {
        "image_encoder": {"cls_token": jnp.ones((1, 1, 4)), "fc": {"kernel": jnp.ones((4, 4))}},
        "mae_decoder": {"mask_token": jnp.ones((1, 1, 4)),
                        "decoder_pos_embed": jnp.ones((1, 3, 4))},
        "protocol_encoder": {"Embed_0": {"embedding": jnp.ones((5, 4))}},
    }  # fmt: skip
    o = ml_collections.ConfigDict(
        dict(lr=0.1, warmup_steps=0, weight_decay=0.5, b1=0.9, b2=0.95, clip_norm=1.0,
             final_lr_ratio=1.0)
    )  # fmt: skip
    tx, _ = make_optimizer(o, total_steps=10)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):  # the schedule's first lr is 0
        updates, state = tx.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    assert float(params["image_encoder"]["fc"]["kernel"][0, 0]) < 1.0
    for leaf in (params["image_encoder"]["cls_token"], params["mae_decoder"]["mask_token"],
                 params["mae_decoder"]["decoder_pos_embed"],
                 params["protocol_encoder"]["Embed_0"]["embedding"]):  # fmt: skip
        np.testing.assert_array_equal(leaf, 1.0)
