"""Tests of pgjax.losses: sharded losses equal their dense references, values and gradients."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pgjax.losses import contrastive as C
from pgjax.losses import image as I
from pgjax.losses import protocol as PR

TOL = {"rtol": 1e-5, "atol": 1e-5}

# Called through jit: run eagerly, every op would be compiled on its own, slowly on 8 devices.
masked_protocol_loss = jax.jit(PR.masked_protocol_loss)
translation_loss = jax.jit(PR.translation_loss)
sample_field_mask = jax.jit(
    PR.sample_field_mask, static_argnums=(1, 2), static_argnames="min_fields"
)
mae_loss = jax.jit(I.mae_loss, static_argnames="norm_pix")


def _mesh(shape):
    """8 devices as ("data",) or 4x2 ("a", "b"), the batch on all of them.

    "8" has explicit axes (what jax.make_mesh defaults to), "4x2" and "8-auto" auto ones: the
    global-array entry points must accept both.
    """
    if shape in ("8", "8-auto"):
        kind = AxisType.Explicit if shape == "8" else AxisType.Auto
        return jax.make_mesh((8,), ("data",), axis_types=(kind,)), ("data",)
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto, AxisType.Auto))
    return mesh, ("a", "b")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _embeddings(n, d, seed=0):
    """[n, d] unit image and protocol embeddings, float32."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d))
    # Protocols correlated with their images, so positives and negatives differ in scale.
    txt = img + 0.7 * rng.normal(size=(n, d))
    return _unit(img), _unit(txt)


def _logsumexp_np(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


# ---------------------------------------------------------------------------------------------
# Dense references against NumPy


def test_clip_dense_matches_numpy():
    img, txt = _embeddings(12, 5)
    log_scale = np.log(7.0)
    logits = np.exp(log_scale) * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
    labels = np.arange(12)
    i2t = -(logits - _logsumexp_np(logits, 1)[:, None])[labels, labels].mean()
    t2i = -(logits - _logsumexp_np(logits, 0)[None, :])[labels, labels].mean()
    np.testing.assert_allclose(
        jax.jit(C.clip_loss)(img, txt, log_scale), (i2t + t2i) / 2, rtol=1e-6
    )


def test_siglip_dense_matches_numpy():
    img, txt = _embeddings(10, 4)
    t, bias = 10.0, -3.0
    logits = t * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T + bias
    z = 2 * np.eye(10) - 1
    expected = np.log1p(np.exp(-z * logits)).sum() / 10
    np.testing.assert_allclose(
        jax.jit(C.siglip_loss)(img, txt, np.log(t), bias), expected, rtol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Sharded == dense, values and gradients


@pytest.mark.parametrize("mesh_shape", ["8", "4x2"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_sharded_contrastive_matches_dense(mesh_shape, kind):
    mesh, axes = _mesh(mesh_shape)
    img, txt = _embeddings(32, 8)
    log_scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-2.0)
    if kind == "clip":
        args, dense = (img, txt, log_scale), C.clip_loss
    else:
        args, dense = (img, txt, log_scale, bias), C.siglip_loss
    wrt = tuple(range(len(args)))
    ref_value, ref_grads = jax.jit(jax.value_and_grad(dense, wrt))(*args)

    results = {}
    for method in ("ring", "allgather"):

        def loss(*a, method=method):
            return C.contrastive_loss(
                *a[:3], *a[3:], kind=kind, mesh=mesh, batch_axes=axes, method=method
            )

        value, grads = jax.jit(jax.value_and_grad(loss, wrt))(*args)
        np.testing.assert_allclose(value, ref_value, **TOL)
        for g, ref in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, ref, **TOL)
        results[method] = (value, grads)
    # Ring and all-gather agree with each other more tightly than with the dense reference.
    np.testing.assert_allclose(results["ring"][0], results["allgather"][0], **TOL)
    for a, b in zip(results["ring"][1], results["allgather"][1], strict=True):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("fn", [C.clip_loss_sharded, C.siglip_loss_sharded])
def test_gradient_taken_inside_shard_map(fn):
    """A train step that differentiates inside shard_map gets each device's slice of the global
    gradient, and the full (device-summed) gradient of the replicated scalars."""
    mesh, _ = _mesh("8-auto")  # a direct shard_map call: auto axes reshard its inputs
    img, txt = _embeddings(32, 8, seed=1)
    scalars = (jnp.float32(2.0),) if fn is C.clip_loss_sharded else (2.0, -1.0)
    scalars = tuple(jnp.float32(s) for s in scalars)
    dense = C.clip_loss if fn is C.clip_loss_sharded else C.siglip_loss
    wrt = tuple(range(2 + len(scalars)))
    ref = jax.jit(jax.grad(dense, wrt))(img, txt, *scalars)

    def per_device(i, t, *s):
        return jax.grad(lambda *a: fn(*a, "data"), wrt)(i, t, *s)

    specs = (P("data"), P("data")) + (P(),) * len(scalars)
    step = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=specs)
    got = jax.jit(step)(img, txt, *scalars)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, **TOL)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_ring_logsumexp_matches_dense(exclude_self):
    """Per row, not just summed: the losses only use sums, which would hide a misplaced row."""
    mesh, axes = _mesh("4x2")
    x, y = _embeddings(32, 8, seed=4)
    logits = 3.0 * np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    if exclude_self:
        np.fill_diagonal(logits, -np.inf)

    def per_device(x, y):
        return C.ring_logsumexp(x, y, 3.0, axes, columns=True, exclude_self=exclude_self)

    fn = jax.shard_map(per_device, mesh=mesh, in_specs=P(axes), out_specs=P(axes))
    rows, cols = jax.jit(fn)(x, y)
    np.testing.assert_allclose(rows, _logsumexp_np(logits, 1), **TOL)
    np.testing.assert_allclose(cols, _logsumexp_np(logits, 0), **TOL)


def test_contrastive_loss_rejects_bad_arguments():
    mesh, _ = _mesh("8")
    img, txt = _embeddings(12, 4)
    with pytest.raises(ValueError, match="does not split"):
        C.contrastive_loss(img, txt, 1.0, mesh=mesh)
    img, txt = _embeddings(16, 4)
    with pytest.raises(ValueError, match="needs a bias"):
        C.contrastive_loss(img, txt, 1.0, kind="siglip", mesh=mesh)
    with pytest.raises(ValueError, match="unknown"):
        C.contrastive_loss(img, txt, 1.0, mesh=mesh, method="gather")


# ---------------------------------------------------------------------------------------------
# Precision: the similarity products run in full float32 on every backend


def _dot_precisions(jaxpr) -> list:
    """The `precision` of every dot_general in a jaxpr, nested ones (shard_map, scan,
    checkpoint, custom rules) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if hasattr(sub, "eqns"):
                    found += _dot_precisions(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    found += _dot_precisions(sub.jaxpr)
    return found


def _contrastive_fn(kind, method):
    """(img, txt, log_scale, bias) -> the loss `kind` computed by `method`."""
    mesh, _ = _mesh("8")

    def nt_xent_ring(img, txt):
        local = functools.partial(I.nt_xent_loss_sharded, temperature=0.1)
        return C.sharded_loss(
            lambda x, y, axis: local(x, y, axis_name=axis), mesh, ("data",), (img, txt)
        )

    fns = {
        ("clip", "dense"): lambda img, txt, s, b: C.clip_loss(img, txt, s),
        ("siglip", "dense"): C.siglip_loss,
        ("nt_xent", "dense"): lambda img, txt, s, b: I.nt_xent_loss(img, txt, 0.1),
        ("nt_xent", "ring"): lambda img, txt, s, b: nt_xent_ring(img, txt),
    }
    if (kind, method) in fns:
        return fns[kind, method]
    return lambda img, txt, s, b: C.contrastive_loss(
        img, txt, s, None if kind == "clip" else b, kind=kind, mesh=mesh, method=method
    )


@pytest.mark.parametrize(
    "kind, method",
    [(k, m) for k in ("clip", "siglip") for m in ("dense", "ring", "allgather")]
    + [("nt_xent", "dense"), ("nt_xent", "ring")],
)
def test_similarity_products_use_highest_precision(kind, method):
    """Default precision is one bf16 pass on TPU (TF32 on GPU): at logit scale 100 that errs by
    ~0.1. Every dot of the loss and of its gradient must ask for HIGHEST (CPU ignores the flag,
    so the check is on the program, not on the numbers)."""
    img, txt = _embeddings(16, 8)
    fn = _contrastive_fn(kind, method)
    grad = jax.value_and_grad(fn, (0, 1, 2))
    jaxpr = jax.make_jaxpr(grad)(img, txt, jnp.float32(np.log(100.0)), jnp.float32(-10.0))
    precisions = _dot_precisions(jaxpr.jaxpr)
    assert len(precisions) >= 2, precisions  # forward and backward products were found
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert all(p == highest for p in precisions), precisions


# ---------------------------------------------------------------------------------------------
# Memory: the ring never builds a logits block that grows with the global batch


def _shapes(text):
    """Every array shape in StableHLO (tensor<AxBxf32>) or HLO (f32[A,B]) text."""
    found = {tuple(map(int, m.split("x"))) for m in re.findall(r"tensor<(\d+(?:x\d+)*)x\w+>", text)}
    found |= {tuple(map(int, m.split(","))) for m in re.findall(r"\w+\[(\d+(?:,\d+)*)\]", text)}
    return found


def _lowered_grad(kind, method, mesh, n, d):
    def loss(img, txt, log_scale, bias):
        bias = None if kind == "clip" else bias
        return C.contrastive_loss(img, txt, log_scale, bias, kind=kind, mesh=mesh, method=method)

    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    return jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, s, s)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_ring_hlo_has_no_global_square(kind):
    mesh, _ = _mesh("8")
    # D much smaller than b, so that the arrays that rightly grow with N (embeddings [N, D], the
    # ring's saved [n - 1, b, D] chunks) stay well below a logits block against the global batch.
    n, d = 192, 8
    b = n // 8
    lowered = {m: _lowered_grad(kind, m, mesh, n, d) for m in ("ring", "allgather")}
    global_view = {m: _shapes(lo.as_text()) for m, lo in lowered.items()}
    per_device = {m: _shapes(lo.compile().as_text()) for m, lo in lowered.items()}

    # The program as written (global view): the all-gather's saved softmax is a [N, N] array
    # (each device holding [b, N] of it). The ring has nothing close, not even the n [b, b]
    # blocks stacked, which is what saving them for the backward pass would look like.
    assert (n, n) in global_view["allgather"]
    assert max(np.prod(s) for s in global_view["ring"]) < n * n / 2
    # After partitioning, per device: the all-gather holds [b, N] blocks, the ring [b, b] ones
    # (its largest array is the [n - 1, b, D] chunks saved for the backward pass).
    assert max(np.prod(s) for s in per_device["allgather"]) >= b * n
    assert max(np.prod(s) for s in per_device["ring"]) < b * n / 2
    assert (b, b) in per_device["ring"]


def test_ring_uses_less_temp_memory_at_larger_batch():
    mesh, _ = _mesh("8")
    compiled = {
        m: _lowered_grad("clip", m, mesh, 2048, 32).compile() for m in ("ring", "allgather")
    }
    try:
        stats = {m: c.memory_analysis() for m, c in compiled.items()}
    except (NotImplementedError, AttributeError) as e:  # backend-dependent
        pytest.skip(f"compiled.memory_analysis() unavailable on this backend: {e}")
    if any(s is None or not hasattr(s, "temp_size_in_bytes") for s in stats.values()):
        pytest.skip("compiled.memory_analysis() reports no temp sizes on this backend")
    ring, gather = (stats[m].temp_size_in_bytes for m in ("ring", "allgather"))
    # Per device: ring ~ [256, 256] blocks + [2048, 32] chunks; all-gather ~ several [256, 2048].
    assert ring * 3 < gather, (ring, gather)


# ---------------------------------------------------------------------------------------------
# SimCLR


def _nt_xent_np(z1, z2, temperature):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sims = np.array([z[i] @ z[k] / temperature for k in range(n2) if k != i])
        total += np.log(np.exp(sims).sum()) - z[i] @ z[pos] / temperature
    return total / n2


def test_nt_xent_matches_numpy():
    z1, z2 = (np.asarray(x) * 3.0 for x in _embeddings(6, 5, seed=2))  # not unit: normalised inside
    np.testing.assert_allclose(
        jax.jit(I.nt_xent_loss)(z1, z2, 0.5), _nt_xent_np(z1, z2, 0.5), rtol=1e-5
    )


@pytest.mark.parametrize("mesh_shape", ["8", "4x2"])
def test_nt_xent_sharded_matches_dense(mesh_shape):
    mesh, axes = _mesh(mesh_shape)
    z1, z2 = _embeddings(32, 8, seed=3)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(I.nt_xent_loss, (0, 1)), static_argnums=2)(
        z1, z2, 0.2
    )

    def loss(a, b):
        return C.sharded_loss(
            lambda x, y, ax: I.nt_xent_loss_sharded(x, y, 0.2, ax), mesh, axes, (a, b)
        )

    value, grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(z1, z2)
    np.testing.assert_allclose(value, ref_value, **TOL)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, **TOL)


# ---------------------------------------------------------------------------------------------
# Protocol losses

# Vocabulary of 10: specials 0-3, field 0 owns ids 4-6, field 1 owns 7-9.
RANGES = [(4, 7), (7, 10)]


def test_allowed_targets():
    allowed = PR.allowed_targets(RANGES, 10)
    np.testing.assert_array_equal(allowed[0], [0, 1, 1, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(allowed[1], [0, 1, 1, 0, 0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError):
        PR.allowed_targets([(2, 5)], 10)  # overlaps the special ids


def test_restricted_softmax_gives_zero_probability_outside_a_field():
    logits = np.random.default_rng(4).normal(size=(3, 2, 10)).astype(np.float32) * 5
    allowed = PR.allowed_targets(RANGES, 10)
    probs = np.asarray(jnp.exp(PR.restricted_log_softmax(logits, allowed)))
    assert np.all(probs[:, ~allowed] == 0.0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert np.all(probs[:, allowed] > 0)


def test_masked_protocol_loss_hand_case():
    allowed = PR.allowed_targets(RANGES, 10)
    logits = np.zeros((1, 2, 10), np.float32)
    logits[0, 0, 5] = np.log(3.0)  # field 0: allowed ids {1, 2, 4, 5, 6}, weights 1, 1, 1, 3, 1
    logits[0, 0, 8] = 50.0  # another field's id: must not take any probability
    logits[0, 1, 0] = 50.0  # PAD: likewise
    tokens = np.array([[5, 9]])
    values = np.array([[np.nan, 0.5]], np.float32)  # field 0 has no value; NaN must not leak
    value_mask = np.array([[False, True]])
    predict = np.array([[True, True]])
    numeric_pred = np.array([[7.0, 1.5]], np.float32)

    loss, metrics = masked_protocol_loss(
        logits, numeric_pred, tokens, values, value_mask, predict, allowed, numeric_weight=0.5
    )
    ce0 = -np.log(3 / 7)  # field 0, target id 5
    ce1 = -np.log(1 / 5)  # field 1: five allowed ids, equal logits
    np.testing.assert_allclose(metrics["ce"], (ce0 + ce1) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["mse"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(loss, (ce0 + ce1) / 2 + 0.5, rtol=1e-6)
    # Field 0's argmax (5) is right; field 1's is a tie resolved to the first allowed id (1).
    np.testing.assert_allclose(metrics["accuracy"], 0.5)
    assert metrics["n_targets"] == 2

    grads = jax.grad(
        lambda lg, npred: masked_protocol_loss(
            lg, npred, tokens, values, value_mask, predict, allowed
        )[0],
        (0, 1),
    )(logits, numeric_pred)
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[0])[0][~allowed], 0.0)


def test_masked_protocol_loss_ignores_unpredicted_and_pad_targets():
    allowed = PR.allowed_targets(RANGES, 10)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 2, 10)).astype(np.float32)
    values = np.zeros((2, 2), np.float32)
    value_mask = np.zeros((2, 2), bool)
    tokens = np.array([[4, 7], [PR.PAD, PR.PAD]])  # item 1 is an all-PAD filler row
    predict = np.array([[True, False], [True, True]])
    _, metrics = masked_protocol_loss(logits, values, tokens, values, value_mask, predict, allowed)
    logp = np.asarray(PR.restricted_log_softmax(logits, allowed))
    np.testing.assert_allclose(metrics["ce"], -logp[0, 0, 4], rtol=1e-6)
    assert metrics["n_targets"] == 1


def test_masked_protocol_loss_sharded_is_the_global_mean():
    """Devices with different numbers of masked fields: psum-ed counts, not a mean of means."""
    mesh, _ = _mesh("8-auto")
    allowed = PR.allowed_targets(RANGES, 10)
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(16, 2, 10)).astype(np.float32)
    numeric_pred = rng.normal(size=(16, 2)).astype(np.float32)
    tokens = np.stack([rng.integers(4, 7, 16), rng.integers(7, 10, 16)], 1)
    values = rng.normal(size=(16, 2)).astype(np.float32)
    value_mask = np.tile(np.array([0, 1], np.uint8), (16, 1))  # as the tokenizer writes it
    predict = rng.random((16, 2)) < 0.4  # uneven counts per device
    args = (logits, numeric_pred, tokens, values, value_mask, predict)

    ref_loss, ref_metrics = masked_protocol_loss(*args, allowed)

    def per_device(*a):
        return PR.masked_protocol_loss(*a, allowed, axis_name="data")

    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * 6, out_specs=P())
    loss, metrics = jax.jit(fn)(*args)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], **TOL)


def test_sample_field_mask_guarantees_min_fields():
    batch, fields, rate = 2000, 10, 0.3
    mask = np.asarray(sample_field_mask(jax.random.key(6), batch, fields, rate, min_fields=2))
    counts = mask.sum(1)
    assert mask.shape == (batch, fields) and counts.min() == 2
    # Otherwise the rate governs: the count is max(Binomial(10, 0.3), 2).
    binom = [math.comb(fields, k) * rate**k * (1 - rate) ** (fields - k) for k in range(fields + 1)]
    expected = sum(max(k, 2) * p for k, p in enumerate(binom))
    assert abs(counts.mean() - expected) < 0.1, (counts.mean(), expected)


def _protocol_loss_loops(logits, numeric_pred, tokens, values, value_mask, predict, ranges):
    """A plain-Python reference: (cross entropy, squared error, accuracy) averaged over the
    predicted fields, field by field. A field's softmax runs over MISSING, UNK and its own ids;
    a target outside them (PAD) is not scored."""
    ces, hits, errors = [], [], []
    for i in range(len(tokens)):
        for f, (start, stop) in enumerate(ranges):
            if not predict[i][f]:
                continue
            ids = [PR.MISSING, PR.UNK, *range(start, stop)]
            if value_mask[i][f]:
                errors.append((float(numeric_pred[i][f]) - float(values[i][f])) ** 2)
            if tokens[i][f] not in ids:
                continue
            row = [float(logits[i][f][k]) for k in ids]
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            ces.append(log_z - float(logits[i][f][tokens[i][f]]))
            hits.append(ids[row.index(top)] == tokens[i][f])
    return np.mean(ces), np.mean(errors), np.mean(hits)


def test_translation_loss_predicts_the_fixed_group():
    keywords = ["Modality", "Manufacturer", "ManufacturerModelName", "KVP", "MagneticFieldStrength"]
    group = PR.field_group(
        keywords, ["Manufacturer", "ManufacturerModelName", "MagneticFieldStrength"]
    )
    np.testing.assert_array_equal(group, [False, True, True, False, True])
    with pytest.raises(ValueError):
        PR.field_group(keywords, ["PatientName"])

    ranges = [(4 + 3 * f, 7 + 3 * f) for f in range(5)]
    allowed = PR.allowed_targets(ranges, 19)
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(3, 5, 19)).astype(np.float32)
    tokens = np.array([[s + 1 for s, _ in ranges]] * 3)
    values = rng.normal(size=(3, 5)).astype(np.float32)
    value_mask = np.array([[False, False, False, True, True]] * 3)
    numeric_pred = rng.normal(size=(3, 5)).astype(np.float32)
    tokens[1, 2] = PR.MISSING  # a legitimate target
    tokens[2, 1] = PR.PAD  # not a target: left out
    got = translation_loss(logits, numeric_pred, tokens, values, value_mask, group, allowed, 0.5)
    ce, mse, hits = _protocol_loss_loops(logits, numeric_pred, tokens, values, value_mask,
                                         [group] * 3, ranges)  # fmt: skip
    np.testing.assert_allclose(got[1]["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(got[1]["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(got[1]["accuracy"], hits, rtol=1e-6)
    np.testing.assert_allclose(got[0], ce + 0.5 * mse, rtol=1e-5)
    assert got[1]["n_targets"] == 3 * 3 - 1
    # Only MagneticFieldStrength (field 4) has a predicted value; KVP is not in the group.
    want_mse = np.mean((numeric_pred[:, 4] - values[:, 4]) ** 2)
    np.testing.assert_allclose(got[1]["mse"], want_mse, rtol=1e-5)

    hidden, hidden_values, hidden_mask = PR.apply_field_mask(tokens, values, value_mask, group)
    assert np.all(np.asarray(hidden)[:, group] == PR.MASK)
    np.testing.assert_array_equal(np.asarray(hidden)[:, ~group], np.asarray(tokens)[:, ~group])
    assert not np.asarray(hidden_mask)[:, 4].any() and np.asarray(hidden_mask)[:, 3].all()
    assert np.all(np.asarray(hidden_values)[:, group] == 0)


# ---------------------------------------------------------------------------------------------
# Image losses


def test_mae_loss_uses_only_masked_patches():
    rng = np.random.default_rng(9)
    target = rng.normal(size=(2, 6, 12)).astype(np.float32)
    pred = rng.normal(size=(2, 6, 12)).astype(np.float32)
    mask = jnp.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]], bool)
    loss = mae_loss(pred, target, mask)
    # Changing the prediction of a visible patch changes nothing.
    np.testing.assert_allclose(
        mae_loss(pred + 100.0 * (np.arange(6) == 1)[:, None], target, mask), loss
    )

    t = np.asarray(target, np.float64)
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((np.asarray(pred) - t) ** 2).mean(-1)
    np.testing.assert_allclose(loss, per_patch[np.asarray(mask)].mean(), rtol=1e-5)
    raw = ((np.asarray(pred) - np.asarray(target)) ** 2).mean(-1)[np.asarray(mask)].mean()
    np.testing.assert_allclose(mae_loss(pred, target, mask, norm_pix=False), raw, rtol=1e-5)


def test_hinge_losses_hand_cases():
    real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - x): 0, 0.5, 2
    fake = jnp.array([-3.0, 0.0])  # relu(1 + x): 0, 1
    np.testing.assert_allclose(I.hinge_d_loss(real, fake), 2.5 / 3 + 0.5)
    np.testing.assert_allclose(I.hinge_g_loss(fake), 1.5)


def test_field_candidates_ids_and_positions():
    cand = PR.FieldCandidates([(4, 7), (7, 10), (10, 10)], 10)  # the third field's range is empty
    assert cand.width == 5
    np.testing.assert_array_equal(cand.ids, [[1, 2, 4, 5, 6], [1, 2, 7, 8, 9], [1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(cand.valid[2], [1, 1, 0, 0, 0])
    tokens = np.array([[5, 9, PR.MISSING], [PR.UNK, 4, PR.PAD]])  # 4 is not field 1's
    pos, known = cand.positions(tokens)
    np.testing.assert_array_equal(known, [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(np.where(known, pos, -1), [[3, 4, 0], [1, -1, -1]])
    with pytest.raises(ValueError):
        PR.FieldCandidates([(2, 5)], 10)  # overlaps the special ids


def test_per_field_scoring_gives_the_whole_vocabulary_loss():
    """The head's per-field logits and the loss on them against the old path: dense logits over
    the whole vocabulary, each field's softmax restricted to its ids (a reference here)."""
    from pgjax.models.heads import FieldTokenHead

    ranges, vocab, batch, width = [(4, 9), (9, 12), (12, 12), (12, 30)], 30, 6, 8
    head = FieldTokenHead(vocab, ranges)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(batch, len(ranges), width)).astype(np.float32)
    params = head.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32), params)
    kernel, bias = (np.asarray(params["params"][k]) for k in ("kernel", "bias"))
    tokens = np.stack([rng.integers(a, max(b, a + 1), batch) for a, b in ranges], 1)
    tokens[:, 2] = PR.MISSING  # the empty field can only be MISSING or UNK
    tokens[0, 0], tokens[1, 1], tokens[2, 3] = PR.UNK, PR.PAD, 5  # PAD and 5: not scorable
    predict = rng.random(tokens.shape) < 0.7
    predict[0, 0] = predict[1, 1] = predict[2, 3] = True
    numeric = rng.normal(size=tokens.shape).astype(np.float32)
    value_mask = rng.random(tokens.shape) < 0.5
    values = rng.normal(size=tokens.shape).astype(np.float32)

    cand = PR.FieldCandidates(ranges, vocab)
    logits = head.apply(params, x)
    assert logits.shape == (batch, len(ranges), cand.width)
    loss, m = PR.masked_protocol_loss(
        logits, numeric, tokens, values, value_mask, predict, cand, numeric_weight=0.5
    )

    # Reference: the old path, [B, F, V] logits from the same parameters.
    full = np.einsum("bfw,wv->bfv", x.astype(np.float64), kernel) + bias
    ce, hits, n = 0.0, 0, 0
    for b in range(batch):
        for f, (start, stop) in enumerate(ranges):
            ids = [PR.MISSING, PR.UNK, *range(start, stop)]
            if not predict[b, f] or tokens[b, f] not in ids:
                continue
            row = full[b, f, ids]
            logp = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
            ce -= logp[ids.index(tokens[b, f])]
            hits += ids[int(np.argmax(row))] == tokens[b, f]
            n += 1
    has = predict & value_mask
    mse = np.sum(np.where(has, (numeric - values) ** 2, 0)) / has.sum()
    assert m["n_targets"] == n
    np.testing.assert_allclose(m["ce"], ce / n, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], hits / n, rtol=1e-6)
    np.testing.assert_allclose(loss, ce / n + 0.5 * mse, rtol=1e-5)
    # And the package's whole-vocabulary path, on the reference logits, agrees too.
    old, m_old = PR.masked_protocol_loss(
        full.astype(np.float32), numeric, tokens, values, value_mask, predict,
        PR.allowed_targets(ranges, vocab), numeric_weight=0.5,
    )  # fmt: skip
    np.testing.assert_allclose(loss, old, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], m_old["accuracy"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_per_field_scoring_backward_holds_one_vocabulary_sized_gradient(dtype):
    """The head's gradient is one [W, V] sum, not a float32 [W, V] buffer per field: sliced
    from a kernel cast to bfloat16 first, XLA kept F of them (measured here: 32.5 [W, V] of
    temporaries in bfloat16 against 1.1 in float32; at configs/pg.py's W = 512, V = 19,686 that
    was 1.2 GiB per fusion pass). Compiled only: the temporaries are XLA's buffer assignment."""
    from pgjax.models.heads import FieldTokenHead

    fields, width, batch, ids = 31, 64, 8, 200
    ranges = tuple((4 + f * ids, 4 + (f + 1) * ids) for f in range(fields))
    vocab = ranges[-1][1]
    head = FieldTokenHead(vocab, ranges, dtype=dtype)
    x = jnp.zeros((batch, fields, width))
    params = head.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(head.apply(p, x) ** 2)))
    temp = grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < 2 * width * vocab * 4, temp / (width * vocab * 4)
