"""Tests of the pretraining objectives (pgjax.objectives) with tiny models on CPU.

Each training test is one jitted function (init, then Adam steps in a scan), so it compiles
once.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pgjax.objectives as ob
from pgjax.train.mesh import BATCH_AXES, batch_sharding, make_mesh

# XLA CPU options for these tests: compilation, not running, dominates tiny models on CPU.
# Level 0 compiles ViTs about twice as fast and runs them as fast; convs run ~30x slower at
# level 0, so the ResNet test uses level 1.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CONV_COMPILE = {"xla_backend_optimization_level": 1}

INFO = ob.ProtocolInfo(
    keywords=(
        "Manufacturer",
        "ManufacturerModelName",
        "KVP",
        "ConvolutionKernel",
        "SliceThickness",
        "MagneticFieldStrength",
    ),
    field_ranges=((4, 8), (8, 14), (14, 20), (20, 26), (26, 32), (32, 40)),
    vocab_size=40,
)
KINDS = ("categorical", "categorical", "numeric", "categorical", "numeric", "numeric")
TINY = dict(depth=1, width=32, num_heads=2, mlp_dim=64)

# Per term: its settings for the tiny test models, and the parameter parts it must train.
TERMS = {
    "contrastive": (
        {},
        {"image_encoder", "protocol_encoder", "image_proj", "protocol_proj", "contrastive"},
    ),
    "masked_protocol": ({"rate": 0.5}, {"image_encoder", "protocol_encoder", "fusion"}),
    "translation": ({}, {"image_encoder", "protocol_encoder", "fusion"}),
    "simclr": ({"proj_dim": 16}, {"image_encoder", "simclr_proj"}),
    "mae": ({"decoder": TINY}, {"image_encoder", "mae_decoder"}),
    "dcm": ({"width": 16}, {"image_encoder", "dcm_head"}),
}
PROTOCOL_GENOME = ("contrastive", "masked_protocol", "translation")


def make_config(terms, *, encoder="vit_mu/8", encoder_kw=TINY, **objectives):
    """A tiny-model config with `terms` enabled at weight 1 (with TERMS' test settings), and
    `objectives` sections added or overriding."""
    c = ml_collections.ConfigDict()
    c.model = dict(
        image_encoder=encoder,
        image_encoder_kw=dict(encoder_kw),
        protocol_encoder="mu",
        protocol_encoder_kw=TINY,
        embed_dim=16,
        fusion=TINY,
        dtype="float32",
    )
    c.objectives = {name: dict(weight=1.0, **TERMS[name][0]) for name in terms}
    for name, section in objectives.items():
        c.objectives[name] = section
    return c


def make_batch(b=16, spatial=(32, 32), seed=0):
    """A random batch whose tokens respect the field ranges; a few fields MISSING."""
    k_tok, k_missing, k_val, k_img = jax.random.split(jax.random.key(seed), 4)
    lo = np.array([r[0] for r in INFO.field_ranges])
    hi = np.array([r[1] for r in INFO.field_ranges])
    tokens = lo + jax.random.randint(k_tok, (b, len(lo)), 0, 1 << 20) % (hi - lo)
    missing = jax.random.bernoulli(k_missing, 0.15, tokens.shape)
    tokens = jnp.where(missing, 1, tokens).astype(jnp.int32)  # 1 = MISSING
    numeric = np.array([k == "numeric" for k in KINDS])
    value_mask = (numeric & ~missing).astype(jnp.float32)
    values = jax.random.normal(k_val, tokens.shape) * value_mask
    image = jax.random.uniform(k_img, (b, *spatial, 1))
    return dict(image=image, tokens=tokens, values=values, value_mask=value_mask)


def one_device_mesh():
    return make_mesh(devices=jax.devices()[:1])


def _norms(tree):
    """Per top-level part, the gradient norm, and the fraction of its leaves that are nonzero."""
    out = {}
    for part, sub in tree.items():
        leaves = jax.tree.leaves(sub)
        out[part] = (
            optax.tree.norm(sub),
            jnp.mean(jnp.stack([jnp.any(x != 0) for x in leaves]).astype(jnp.float32)),
        )
    return out


def train(objective, batch, steps=30, lr=3e-3, compiler_options=FAST_COMPILE):
    """Init, then `steps` Adam steps of `objective.loss` on a fixed batch and rng. With a
    discriminator, as in the trainer: one gradient of the loss's value for every parameter,
    the discriminator's taking its own Adam step (both players from the same parameters).

    Returns (initial variables, final variables, history, final loss); history holds per step
    the loss, metrics and per-part gradient norms (taken before that step's update).
    """

    def split(tree):
        return {k: v for k, v in tree.items() if k != "disc"}, tree.get("disc")

    def run(init_rng, rng):
        variables = objective.init(init_rng, batch)
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        opt = optax.adam(lr)
        has_disc = objective.has_discriminator

        def step(carry, _):
            params, state, opt_state, disc_opt_state = carry

            def loss_fn(p):
                value, metrics, new_state = objective.loss({"params": p, **state}, batch, rng)
                return value, (metrics, new_state)

            (_, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            out = {"loss": metrics["loss"], "metrics": metrics, "grads": _norms(grads)}
            (model, disc), (grads, disc_grads) = split(params), split(grads)
            updates, opt_state = opt.update(grads, opt_state)
            params = optax.apply_updates(model, updates)
            if has_disc:
                d_updates, disc_opt_state = opt.update(disc_grads, disc_opt_state)
                params = {**params, "disc": optax.apply_updates(disc, d_updates)}
            return (params, new_state, opt_state, disc_opt_state), out

        model, disc = split(params)
        disc_opt_state = opt.init(disc) if has_disc else ()
        carry = (params, state, opt.init(model), disc_opt_state)
        (params, state, _, _), history = jax.lax.scan(step, carry, None, length=steps)
        final_loss = objective.loss({"params": params, **state}, batch, rng)[1]["loss"]
        return variables, {"params": params, **state}, history, final_loss

    return jax.jit(run, compiler_options=compiler_options)(jax.random.key(1), jax.random.key(2))


def check_training(objective, result, expected_parts):
    initial, final, history, final_loss = result
    # Exactly the parts the terms use (plus the discriminator, trained by its own loss only).
    disc = {"disc"} if objective.has_discriminator else set()
    assert set(initial["params"]) == set(expected_parts) | disc
    loss = np.asarray(history["loss"])
    assert np.all(np.isfinite(loss))
    for name, value in history["metrics"].items():
        assert np.all(np.isfinite(value)), name
    for part in expected_parts:
        norm, nonzero_leaves = (float(x[0]) for x in history["grads"][part])
        assert np.isfinite(norm) and norm > 0, part
        assert nonzero_leaves == 1.0, f"{part}: some parameters get no gradient"
    assert float(final_loss) < 0.9 * loss[0], (loss[0], float(final_loss))


PG_WEIGHTS = {"contrastive": 0.5, "masked_protocol": 1.0, "translation": 2.0}


@pytest.fixture(scope="module")
def protocol_genome():
    config = make_config(PROTOCOL_GENOME)
    for name, weight in PG_WEIGHTS.items():
        config.objectives[name].weight = weight
    objective = ob.build_objective(config, INFO, one_device_mesh())
    batch = make_batch()
    return objective, batch, train(objective, batch)


def test_protocol_genome_trains_all_its_parts(protocol_genome):
    objective, _, result = protocol_genome
    expected = set().union(*(TERMS[t][1] for t in PROTOCOL_GENOME))
    check_training(objective, result, expected)
    metrics = result[2]["metrics"]
    np.testing.assert_allclose(metrics["temperature"][0], 10.0, rtol=1e-6)
    assert float(metrics["mpp_accuracy"][-1]) > float(metrics["mpp_accuracy"][0])


def test_total_is_the_weighted_sum_of_each_term_computed_alone(protocol_genome):
    """The combined loss against objectives of one term each (weight 1), built separately and
    run on the same parameters, batch and key: sum of weight x term, and each term's metrics."""
    objective, batch, (initial, _, _, _) = protocol_genome
    rng = jax.random.key(2)
    jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    total, metrics, _ = jit(objective.loss)(initial, batch, rng)
    alone = {}
    for name in PG_WEIGHTS:
        single = ob.build_objective(make_config([name]), INFO, one_device_mesh())
        alone[name] = float(jit(single.loss)(initial, batch, rng)[0])
    # Hand-summed with the weights 0.5, 1 and 2.
    want = 0.5 * alone["contrastive"] + alone["masked_protocol"] + 2.0 * alone["translation"]
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    for name, weight in PG_WEIGHTS.items():
        np.testing.assert_allclose(float(metrics[name]), alone[name], rtol=1e-5)
        np.testing.assert_allclose(float(metrics[f"{name}_weighted"]), weight * alone[name],
                                   rtol=1e-5)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("term", list(TERMS))
def test_each_term_alone_trains(term):
    objective = ob.build_objective(make_config([term]), INFO, one_device_mesh())
    check_training(objective, train(objective, make_batch()), TERMS[term][1])


def test_ablation_drops_the_term_and_its_parts():
    config = make_config(PROTOCOL_GENOME)
    config.objectives.contrastive.weight = 0.0
    objective = ob.build_objective(config, INFO, None)
    assert set(objective.terms) == {"masked_protocol", "translation"}
    assert set(objective.parts) == {"image_encoder", "protocol_encoder", "fusion"}
    config.objectives.masked_protocol.weight = 0.0
    config.objectives.translation.weight = 0.0
    config.objectives.dcm = dict(weight=1.0)
    objective = ob.build_objective(config, INFO, None)
    assert set(objective.parts) == {"image_encoder", "dcm_head"}


def test_ce_dcm_trains_generator_and_discriminator_together():
    config = make_config(
        [],
        encoder="resnet_mu",
        encoder_kw={},
        ce_dcm=dict(
            weight=1.0,
            hole=0.25,
            adv_weight=0.01,
            decoder=dict(channels=32, min_channels=8),
            disc=dict(channels=(16, 32)),
        ),
    )
    objective = ob.build_objective(config, INFO, one_device_mesh())
    assert objective.has_discriminator
    result = train(objective, make_batch(), steps=30, compiler_options=CONV_COMPILE)
    initial, final, history, _ = result
    check_training(objective, result, {"image_encoder", "ce_decoder"})
    # The discriminator learns (its own loss; tests/test_ce_dcm_step.py: each player's gradient).
    assert np.all(np.asarray(history["grads"]["disc"][0]) > 0)
    d_loss = np.asarray(history["metrics"]["disc/loss"])
    assert np.all(np.isfinite(d_loss))
    assert d_loss[-5:].mean() < d_loss[:5].mean()  # it learns to tell true holes from filled
    m = history["metrics"]
    assert m["ce_dcm_l2"][-1] < 0.5 * m["ce_dcm_l2"][0]
    # BatchNorm statistics (encoder, decoder) and spectral-norm vectors (disc) move.
    for part in ("image_encoder", "ce_decoder", "disc"):
        before = jax.tree.leaves(initial["batch_stats"][part])
        after = jax.tree.leaves(final["batch_stats"][part])
        assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True)), part


def _sharded_vs_dense(config):
    batch = make_batch(b=16)
    dense = ob.build_objective(config, INFO, None)
    mesh = make_mesh()
    assert mesh.size == 8
    sharded = ob.build_objective(config, INFO, mesh)
    variables = jax.jit(dense.init, compiler_options=FAST_COMPILE)(jax.random.key(0), batch)
    rng = jax.random.key(1)
    l1, m1, _ = jax.jit(dense.loss, compiler_options=FAST_COMPILE)(variables, batch, rng)
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    batch = jax.device_put(batch, batch_sharding(mesh))
    assert batch["image"].sharding.spec == P(BATCH_AXES)
    l8, m8, _ = jax.jit(sharded.loss, compiler_options=FAST_COMPILE)(variables, batch, rng)
    return float(l1), float(l8), m1, m8


@pytest.mark.parametrize(
    "contrastive",
    [
        {"kind": "clip", "method": "ring"},
        pytest.param({"kind": "siglip", "method": "ring"}, marks=pytest.mark.slow),
        pytest.param({"kind": "siglip", "method": "allgather"}, marks=pytest.mark.slow),
        pytest.param({"kind": "clip", "method": "allgather"}, marks=pytest.mark.slow),
    ],
)
def test_sharded_losses_equal_single_device(contrastive):
    # Both global-batch terms at once (one init, two compiles); each term is compared alone.
    config = make_config(["simclr"], contrastive=dict(weight=1.0, **contrastive))
    l1, l8, m1, m8 = _sharded_vs_dense(config)
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    for term in ("contrastive", "simclr"):
        assert np.isfinite(m1[term]) and m1[term] > 0.1
        np.testing.assert_allclose(m8[term], m1[term], rtol=2e-5)
    if contrastive["kind"] == "siglip":
        np.testing.assert_allclose(m8["siglip_bias"], -10.0)


def test_embeddings(protocol_genome):
    objective, batch, (_, final, _, _) = protocol_genome

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def embed(variables, batch):
        return (
            objective.embed_images(variables, batch["image"]),
            objective.embed_images(variables, batch["image"][:1]),
            objective.embed_protocol(
                variables, batch["tokens"], batch["values"], batch["value_mask"]
            ),
        )

    images, first, protocol = embed(final, {k: v[:3] for k, v in batch.items()})
    assert images.shape == (3, TINY["width"]) and images.dtype == jnp.float32
    assert protocol.shape == (3, TINY["width"]) and protocol.dtype == jnp.float32
    assert np.all(np.isfinite(images)) and np.all(np.isfinite(protocol))
    # Eval mode is deterministic and per item: a sub-batch gives the same rows.
    np.testing.assert_allclose(first, images[:1], rtol=1e-5, atol=1e-6)


def test_volumes_with_a_3d_vit():
    config = make_config(["contrastive", "masked_protocol"], encoder="vit3d_mu/4x8x8")
    objective = ob.build_objective(config, INFO, one_device_mesh())
    batch = make_batch(b=8, spatial=(8, 16, 16))

    def run(rng):
        variables = objective.init(rng, batch)

        def loss_fn(p):
            return objective.loss({**variables, "params": p}, batch, rng)[:2]

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return loss, metrics, optax.tree.norm(grads["image_encoder"])

    loss, metrics, grad_norm = jax.jit(run, compiler_options=FAST_COMPILE)(jax.random.key(0))
    assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    assert np.isfinite(grad_norm) and grad_norm > 0


def test_translation_sees_only_the_source_fields():
    # Hidden inputs must not reach the model: changing a field that is neither shown nor
    # predicted leaves the loss unchanged; changing a shown field changes it.
    config = make_config(
        [], translation=dict(weight=1.0, source=("KVP",), target=("Manufacturer",))
    )
    objective = ob.build_objective(config, INFO, None)
    batch = make_batch(b=4)
    jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    variables = jit(objective.init)(jax.random.key(0), batch)
    loss = jit(lambda b: objective.loss(variables, b, jax.random.key(1))[0])
    kvp, kernel, thickness = (
        INFO.keywords.index(k) for k in ("KVP", "ConvolutionKernel", "SliceThickness")
    )
    hidden = dict(
        batch,
        tokens=batch["tokens"].at[:, kernel].set(INFO.field_ranges[kernel][0]),
        values=batch["values"].at[:, thickness].add(3.0),
    )
    shown = dict(batch, values=batch["values"].at[:, kvp].add(3.0))
    base = float(loss(batch))
    assert float(loss(hidden)) == base
    assert abs(float(loss(shown)) - base) > 1e-4


def test_ce_dcm_hole_is_central():
    config = make_config([], encoder="resnet_mu", encoder_kw={}, ce_dcm=dict(weight=1.0))
    objective = ob.build_objective(config, INFO, None)
    assert objective.terms["ce_dcm"].hole((2, 32, 32, 1)) == (slice(12, 20), slice(12, 20))
    assert objective.terms["ce_dcm"].hole((2, 16, 64, 64, 1)) == (
        slice(6, 10),
        slice(24, 40),
        slice(24, 40),
    )


def test_config_errors():
    with pytest.raises(ValueError, match="no loss term enabled"):
        ob.build_objective(
            make_config([], **{name: dict(weight=0.0) for name in ob.TERMS}), INFO, None
        )
    with pytest.raises(ValueError, match="no loss term enabled"):
        ob.build_objective(make_config([]), INFO, None)
    with pytest.raises(ValueError, match="unknown objectives"):
        ob.build_objective(make_config([], contrastiv=dict(weight=1.0)), INFO, None)
    with pytest.raises(ValueError, match="unknown keys"):
        ob.build_objective(make_config([], mae=dict(weight=1.0, ratio=0.5)), INFO, None)
    with pytest.raises(ValueError, match="needs a ViT"):
        ob.build_objective(make_config(["mae"], encoder="resnet_mu", encoder_kw={}), INFO, None)
    with pytest.raises(ValueError, match="not in the schema"):
        ob.build_objective(
            make_config([], translation=dict(weight=1.0, source=("EchoTme",))), INFO, None
        )
    with pytest.raises(ValueError, match="both source and target"):
        ob.build_objective(
            make_config([], translation=dict(weight=1.0, source=("KVP", "Manufacturer"))),
            INFO,
            None,
        )
    dcm = ob.build_objective(make_config(["dcm"]), INFO, None)
    with pytest.raises(ValueError, match="no protocol encoder"):
        dcm.embed_protocol({}, None, None, None)


def test_ce_dcm_hole_too_small_for_the_discriminator():
    config = make_config([], encoder="resnet_mu", encoder_kw={}, ce_dcm=dict(weight=1.0))
    objective = ob.build_objective(config, INFO, None)
    with pytest.raises(ValueError, match="too small for the discriminator"):
        objective.init(jax.random.key(0), make_batch(b=2))  # 8 px hole, 4 stride-2 convs


def test_translation_defaults_keep_the_schema_fields():
    objective = ob.build_objective(make_config(["translation"]), INFO, None)
    shown = [
        k for k, s in zip(INFO.keywords, objective.terms["translation"].source, strict=True) if s
    ]
    predicted = [
        k for k, t in zip(INFO.keywords, objective.terms["translation"].target, strict=True) if t
    ]
    assert shown == ["KVP", "ConvolutionKernel", "SliceThickness"]
    assert predicted == ["Manufacturer", "ManufacturerModelName", "MagneticFieldStrength"]


def test_protocol_info_from_vocabulary():
    from pgjax.data.schema import Field, Schema

    class Vocab:  # the attributes of pgjax.data.tokenizer.Vocabulary that are read
        keywords = ["Modality", "SeriesDescription", "KVP"]
        field_ranges = [(4, 6), (6, 8), (8, 11)]
        size = 11
        schema = Schema(
            (
                Field("Modality", "categorical"),
                Field("SeriesDescription", "categorical", freetext=True),
                Field("KVP", "numeric", multi="first"),
            )
        )

    info = ob.ProtocolInfo.from_vocabulary(Vocab())
    assert info == ob.ProtocolInfo(
        ("Modality", "SeriesDescription", "KVP"), ((4, 6), (6, 8), (8, 11)), 11,
        text_fields=("SeriesDescription",),
    )  # fmt: skip
    assert info.text_mask.tolist() == [False, True, False]
    assert info.num_fields == 3 and hash(info)


def test_series_translation_predicts_the_partner_series_hidden_settings():
    # Cross-series translation: the partner series' target fields are hidden and scored, its
    # other fields are shown; items without a partner contribute nothing.
    config = make_config(
        [],
        translation=dict(weight=1.0, source=("KVP",), target=("Manufacturer",), series_weight=2.0),
    )
    objective = ob.build_objective(config, INFO, None)
    target = [
        k
        for k, t in zip(INFO.keywords, objective.terms["translation"].series_target, strict=True)
        if t
    ]
    assert target == ["KVP", "ConvolutionKernel", "SliceThickness"]  # the defaults in INFO
    batch = make_batch(b=4)
    partner = make_batch(b=4, seed=1)
    has = jnp.array([1.0, 1.0, 0.0, 1.0])
    batch = dict(
        batch,
        partner_tokens=partner["tokens"],
        partner_values=partner["values"],
        partner_value_mask=partner["value_mask"],
        has_partner=has,
    )
    jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    variables = jit(objective.init)(jax.random.key(0), batch)
    run = jit(lambda b: objective.loss(variables, b, jax.random.key(1)))
    loss, metrics, _ = run(batch)
    np.testing.assert_allclose(metrics["translation_series_items"], 0.75)
    # The cross-series part enters linearly with its weight: objectives with series_weight 0
    # and 1 (built separately, same parameters) give L(2) = L(0) + 2 (L(1) - L(0)).
    by_weight = {}
    for w in (0.0, 1.0):
        section = dict(weight=1.0, source=("KVP",), target=("Manufacturer",), series_weight=w)
        other = ob.build_objective(make_config([], translation=section), INFO, None)
        by_weight[w] = float(jit(other.loss)(variables, batch, jax.random.key(1))[0])
    series = by_weight[1.0] - by_weight[0.0]
    assert series > 0.1  # a real cross-entropy, not a rounding difference
    np.testing.assert_allclose(float(loss), by_weight[0.0] + 2.0 * series, rtol=1e-5)

    kernel, manufacturer = INFO.keywords.index("ConvolutionKernel"), 0

    def partner_with(item, field):
        # Another valid token of the field for one item's partner.
        lo, hi = INFO.field_ranges[field]
        token = lo + (int(batch["partner_tokens"][item, field]) - lo + 1) % (hi - lo)
        return dict(batch, partner_tokens=batch["partner_tokens"].at[item, field].set(token))

    base = float(loss)
    # A hidden, scored target of an item with a partner changes the loss...
    assert abs(float(run(partner_with(0, kernel))[0]) - base) > 1e-5
    # ...the same change for the item without a partner is ignored...
    assert float(run(partner_with(2, kernel))[0]) == base
    # ...and a shown field of the partner (its manufacturer) reaches the model.
    assert abs(float(run(partner_with(0, manufacturer))[0]) - base) > 1e-5
    # No partners at all: the cross-series part is exactly zero.
    loss0, m0, _ = run(dict(batch, has_partner=jnp.zeros(4)))
    assert float(m0["translation_series_ce"]) == 0.0
    assert float(loss0) == by_weight[0.0]
    with pytest.raises(ValueError, match="partner"):
        objective.loss(variables, make_batch(b=4), jax.random.key(1))
