"""The protocol terms cannot read their targets off the free-text fields, and what the image
contributes to each is measured (issue 14, defect 4)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import pgjax.objectives as ob
from pgjax.losses.protocol import sample_field_mask

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)

KEYWORDS = ("Manufacturer", "SeriesDescription", "KVP", "ConvolutionKernel", "ProtocolName")
INFO = ob.ProtocolInfo(
    KEYWORDS,
    ((4, 8), (8, 14), (14, 20), (20, 26), (26, 32)),
    32,
    text_fields=("SeriesDescription", "ProtocolName"),
)
TEXT = [KEYWORDS.index("SeriesDescription"), KEYWORDS.index("ProtocolName")]
TINY = dict(depth=1, width=32, num_heads=2, mlp_dim=64)


def make_config(**objectives):
    c = ml_collections.ConfigDict()
    c.model = dict(image_encoder="vit_mu/8", image_encoder_kw=TINY, protocol_encoder="mu",
                   protocol_encoder_kw=TINY, fusion=TINY, dtype="float32")  # fmt: skip
    c.objectives = objectives
    return c


def make_batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    lo = np.array([r[0] for r in INFO.field_ranges])
    hi = np.array([r[1] for r in INFO.field_ranges])

    def protocol():
        tokens = (lo + rng.integers(0, 1 << 20, (b, len(lo))) % (hi - lo)).astype(np.int32)
        value_mask = np.zeros((b, len(lo)), np.float32)
        value_mask[:, KEYWORDS.index("KVP")] = 1.0
        return tokens, rng.normal(size=(b, len(lo))).astype(np.float32) * value_mask, value_mask

    tokens, values, value_mask = protocol()
    p_tokens, p_values, p_mask = protocol()
    return dict(image=jnp.asarray(rng.random((b, 32, 32, 1)), jnp.float32), tokens=tokens,
                values=values, value_mask=value_mask, partner_tokens=p_tokens,
                partner_values=p_values, partner_value_mask=p_mask,
                has_partner=np.ones(b, np.float32))  # fmt: skip


def other_text(tokens, items):
    """tokens with the free-text fields of `items` set to another valid id."""
    tokens = np.array(tokens)
    for f in TEXT:
        lo, hi = INFO.field_ranges[f]
        tokens[items, f] = lo + (tokens[items, f] - lo + 1) % (hi - lo)
    return tokens


def loss_of(objective, batch):
    variables = jit(objective.init)(jax.random.key(0), batch)
    return jit(lambda b: objective.loss(variables, b, jax.random.key(1))[0])


@pytest.mark.parametrize("hide_text", [True, False])
def test_cross_series_translation_hides_the_partner_description(hide_text):
    config = make_config(translation=dict(
        weight=1.0, source=("KVP",), target=("Manufacturer",), series_weight=1.0,
        series_target=("ConvolutionKernel", "KVP"), hide_text=hide_text))  # fmt: skip
    objective = ob.build_objective(config, INFO, None)
    batch = make_batch()
    loss = loss_of(objective, batch)
    changed = dict(batch, partner_tokens=other_text(batch["partner_tokens"], slice(None)))
    if hide_text:  # the default: the partner's description never reaches the model
        assert float(loss(changed)) == float(loss(batch))
    else:  # shown, it does (what the default prevents)
        assert abs(float(loss(changed)) - float(loss(batch))) > 1e-6


@pytest.mark.parametrize("hide_text", [True, False])
def test_masked_prediction_never_shows_the_description(hide_text):
    config = make_config(masked_protocol=dict(weight=1.0, rate=0.3, hide_text=hide_text))
    objective = ob.build_objective(config, INFO, None)
    batch = make_batch()
    rng = jax.random.key(1)
    # The fields this rng hides and predicts; change the text only where it is not a target.
    hidden = np.asarray(sample_field_mask(objective._keys(rng)["mpp"], 8, len(KEYWORDS), 0.3))
    shown = np.flatnonzero(~hidden[:, TEXT].any(axis=1))
    assert len(shown) >= 3
    loss = loss_of(objective, batch)
    changed = dict(batch, tokens=other_text(batch["tokens"], shown))
    if hide_text:
        assert float(loss(changed)) == float(loss(batch))
    else:
        assert abs(float(loss(changed)) - float(loss(batch))) > 1e-6


def test_a_translation_source_cannot_be_a_hidden_text_field():
    config = make_config(translation=dict(weight=1.0, source=("KVP", "SeriesDescription")))
    with pytest.raises(ValueError, match=r"translation.source names the free-text fields \['Ser"):
        ob.build_objective(config, INFO, None)
    config.objectives.translation.hide_text = False
    ob.build_objective(config, INFO, None)


def test_image_ablation_reports_what_the_image_adds():
    config = make_config(
        masked_protocol=dict(weight=1.0),
        translation=dict(weight=1.0, source=("KVP",), target=("Manufacturer",),
                         series_weight=1.0, series_target=("ConvolutionKernel",)),
        dcm=dict(weight=1.0, width=16),
    )  # fmt: skip
    objective = ob.build_objective(config, INFO, None)
    batch = make_batch()
    variables = jit(objective.init)(jax.random.key(0), batch)
    ablation = jit(objective.image_ablation)
    got = ablation(variables, batch, jax.random.key(1))
    prefixes = ("mpp", "translation", "translation_series", "dcm")
    expected = {f"image/{p}_{m}{s}" for p in prefixes for m in ("accuracy", "ce")
                for s in ("", "_no_image", "_gain")}  # fmt: skip
    assert set(got) == expected
    for p in prefixes:
        acc, acc0 = float(got[f"image/{p}_accuracy"]), float(got[f"image/{p}_accuracy_no_image"])
        assert 0.0 <= acc <= 1.0 and 0.0 <= acc0 <= 1.0
        np.testing.assert_allclose(got[f"image/{p}_accuracy_gain"], acc - acc0, atol=1e-7)
        # The zeroed image is another input: the cross entropy moves.
        assert abs(float(got[f"image/{p}_ce_gain"])) > 1e-6, p
    # The ablation zeroes the image, nothing else: on a black batch both runs are the same.
    black = ablation(
        variables, dict(batch, image=jnp.zeros_like(batch["image"])), jax.random.key(1)
    )
    for p in prefixes:
        assert float(black[f"image/{p}_ce_gain"]) == 0.0
        assert float(black[f"image/{p}_ce"]) == float(got[f"image/{p}_ce_no_image"])
