"""Tests of the Flax models: shapes, parameter counts, invariances, numerics and gradient flow.

Everything runs at toy sizes on CPU, and the big configurations are only traced (jax.eval_shape).
The time goes into XLA compilation, so the tests keep it down: variables come from `fake_init`
(XLA:CPU compiles each random initializer separately, about 0.3 s per parameter), every forward
or backward pass is one `jit` compiled without backend optimisation, and forward checks reuse
the outputs of the gradient pass where they can.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgjax.models import (
    ContextEncoderDecoder,
    FusionHead,
    MAEDecoder,
    ProjectionDiscriminator,
    ProjectionHead,
    ResNet,
    ViT,
    build_image_encoder,
    build_protocol_encoder,
    mae_masking,
    patchify,
    unpatchify,
    vit_config,
)
from pgjax.models.layers import Attention

F, V = 6, 40  # protocol fields and vocabulary size of the toy protocol batches

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def normal(seed, shape):
    """Test inputs from numpy: jax.random would compile a threefry kernel per shape."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def fake_init(model, *args, **kwargs):
    """Variables shaped by tracing `model.init` (so its code runs), filled on the host: kernels
    ~ N(0, 1/fan_in), norm scales and variances 1, means 0, everything else ~ N(0, 0.02)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key.split("/")[-1]  # spectral-norm stats are named "layer/kernel/u"
        if name in ("scale", "var", "sigma"):
            value = np.ones(leaf.shape)
        elif name == "mean":
            value = np.zeros(leaf.shape)
        elif name == "kernel":
            value = rng.normal(size=leaf.shape) / np.sqrt(math.prod(leaf.shape[:-1]))
        else:
            value = 0.02 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def run(model, variables, *args, **kwargs):
    """`model.apply` compiled as one program (eager mode compiles every primitive)."""
    return jit(functools.partial(model.apply, **kwargs))(variables, *args)


def outputs_and_grads(model, variables, *args, **kwargs):
    """`model.apply`'s result, and the gradient with respect to the parameters of a random
    linear function of all outputs (a plain sum would cancel through a final LayerNorm)."""
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
        result = model.apply({"params": params, **state}, *args, **kwargs)
        outputs = result[0] if kwargs.get("mutable") else result
        leaves = jax.tree.leaves(outputs)
        total = sum(
            jnp.sum(x.astype(jnp.float32) * normal(100 + i, x.shape)) for i, x in enumerate(leaves)
        )
        return total, result

    (_, result), grads = jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return result, grads


def assert_no_dead_params(grads):
    dead = [
        jax.tree_util.keystr(path)
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
        if not np.any(np.asarray(g) != 0)
    ]
    assert not dead, f"parameters without gradient: {dead}"


def n_params(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- ViT


@pytest.fixture(scope="module")
def vit_mu():
    model = build_image_encoder("vit_mu/8")
    x = normal(1, (2, 32, 32, 1))
    variables = fake_init(model, x)
    return model, variables, x, run(model, variables, x)


def test_vit_2d_shapes_and_param_names(vit_mu):
    _, variables, _, out = vit_mu
    assert out["pooled"].shape == (2, 64)
    assert out["tokens"].shape == (2, 16, 64)  # (32 / 8) ** 2 patches, cls excluded
    p = variables["params"]
    assert p["pos_embed"].shape == (1, 17, 64)
    assert set(p["blocks_0"]["attn"]) == {"qkv", "proj"}
    assert set(p["blocks_1"]["mlp"]) == {"fc1", "fc2"}
    assert {"patch_embed", "cls_token", "norm"} <= set(p)


def test_vit_gap_pool_has_no_cls_token():
    model = ViT(**{**vit_config("mu/8"), "pool": "gap"})
    x = normal(1, (2, 16, 16, 1))
    variables = fake_init(model, x)
    assert "cls_token" not in variables["params"]
    assert variables["params"]["pos_embed"].shape == (1, 4, 64)
    out = run(model, variables, x)
    np.testing.assert_allclose(out["pooled"], out["tokens"].mean(axis=1), atol=1e-6)


def test_vit_3d_shapes():
    model = build_image_encoder("vit3d_mu/4x8x8")
    assert model.patch_size == (4, 8, 8)
    x = normal(1, (2, 8, 16, 24, 1))
    variables = fake_init(model, x)
    assert variables["params"]["patch_embed"]["kernel"].shape == (4, 8, 8, 1, 64)
    out = run(model, variables, x)
    assert out["pooled"].shape == (2, 64)
    assert out["tokens"].shape == (2, 2 * 2 * 3, 64)


def test_vit_rejects_mismatched_input(vit_mu):
    model, variables, _, _ = vit_mu
    with pytest.raises(ValueError, match="needs 4D"):
        model.apply(variables, jnp.ones((1, 8, 32, 32, 1)))
    with pytest.raises(ValueError, match="divisible"):
        model.apply(variables, jnp.ones((1, 30, 32, 1)))


def test_keep_indices_selects_tokens_and_keeps_positions(vit_mu):
    model, variables, x, full = vit_mu
    apply = jit(model.apply)
    kept = apply(variables, x, keep_indices=jnp.array([[3, 0, 7, 12], [15, 1, 2, 4]]))
    assert kept["tokens"].shape == (2, 4, 64)
    assert kept["pooled"].shape == (2, 64)
    # Keeping every patch in a shuffled order permutes the full output: position embeddings are
    # added before the selection, and attention is permutation-equivariant.
    rng = np.random.default_rng(0)
    perm = jnp.asarray(np.stack([rng.permutation(16) for _ in range(2)]))
    shuffled = apply(variables, x, keep_indices=perm)
    np.testing.assert_allclose(
        shuffled["tokens"], jnp.take_along_axis(full["tokens"], perm[..., None], axis=1), atol=1e-5
    )
    np.testing.assert_allclose(shuffled["pooled"], full["pooled"], atol=1e-5)


def test_vit_b16_parameter_count():
    model = build_image_encoder("vit_b/16")
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 1), jnp.float32)
    )
    # timm vit_base_patch16_224 has 86,567,656 parameters: minus the 1000-class head (769,000)
    # and two of the three input channels of the patch embedding (2 * 16 * 16 * 768).
    assert n_params(shapes["params"]) == 86_567_656 - 769_000 - 2 * 16 * 16 * 768


def test_patchify_matches_patch_embedding_order(vit_mu):
    """MAE targets (patchify) must be in the ViT's token order, with each patch's pixels in the
    order of the flattened patch-embedding kernel; and unpatchify must invert it, 2D and 3D."""
    _, variables, x, _ = vit_mu
    kernel = variables["params"]["patch_embed"]["kernel"]
    patches = patchify(x, (8, 8))
    assert patches.shape == (2, 16, 64)
    conv = jax.lax.conv_general_dilated(
        x, kernel, (8, 8), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(patches @ kernel.reshape(-1, 64), conv.reshape(2, 16, 64), atol=1e-5)
    np.testing.assert_array_equal(unpatchify(patches, (8, 8), (32, 32)), x)

    v = normal(3, (1, 4, 6, 8, 2))
    np.testing.assert_array_equal(unpatchify(patchify(v, (2, 3, 4)), (2, 3, 4), (4, 6, 8)), v)
    # grid cell (0, 1, 1) is patch 3; its voxel (1, 2, 3), channel 1, is element 47
    assert patchify(v, (2, 3, 4))[0, 3, 47] == v[0, 1, 3 + 2, 4 + 3, 1]


def test_vit_bfloat16_compute_close_to_float32(vit_mu):
    model, variables, x, ref = vit_mu
    out = run(model.clone(dtype=jnp.bfloat16), variables, x)
    assert out["tokens"].dtype == jnp.bfloat16
    for name in ("pooled", "tokens"):
        err = jnp.abs(out[name].astype(jnp.float32) - ref[name])
        assert err.max() < 0.1 and err.mean() < 0.02, (name, err.max(), err.mean())


def test_vit_gradients_reach_all_params_with_and_without_remat(vit_mu):
    model, variables, x, ref = vit_mu
    out, grads = outputs_and_grads(model, variables, x)
    assert_no_dead_params(grads)
    # Rematerialisation changes the memory schedule, not the numbers.
    out_r, grads_r = outputs_and_grads(model.clone(remat=True), variables, x)
    np.testing.assert_allclose(out_r["pooled"], out["pooled"], atol=1e-6)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5), grads_r, grads
    )


# ---------------------------------------------------------------- attention


def _naive_attention(params, x, context, num_heads, key_mask):
    b, t, w = x.shape
    h = w // num_heads
    if context is None:
        qkv = (x @ params["qkv"]["kernel"] + params["qkv"]["bias"]).reshape(b, t, 3, num_heads, h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        s = context.shape[1]
        q = (x @ params["q"]["kernel"] + params["q"]["bias"]).reshape(b, t, num_heads, h)
        kv = (context @ params["kv"]["kernel"] + params["kv"]["bias"]).reshape(
            b, s, 2, num_heads, h
        )
        k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, w)
    return out @ params["proj"]["kernel"] + params["proj"]["bias"]


@pytest.mark.parametrize("cross", [False, True])
def test_attention_equals_naive_softmax_attention(cross):
    x = normal(1, (2, 5, 8))
    context = normal(2, (2, 7, 12)) if cross else None
    s = 7 if cross else 5
    key_mask = jnp.arange(s)[None, :] < jnp.array([[s], [3]])  # second row: 3 valid keys
    layer = Attention(num_heads=2)
    variables = fake_init(layer, x, context, key_mask=key_mask)  # random biases too
    out = run(layer, variables, x, context, key_mask=key_mask)
    ref = _naive_attention(variables["params"], x, context, 2, key_mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- ResNet


def test_resnet50_parameter_count():
    model = build_image_encoder("resnet50")
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 1), jnp.float32)
    )
    # torchvision resnet50: 25,557,032 parameters; minus the fc layer (2048 * 1000 + 1000) and two
    # of the three input channels of conv1 (2 * 64 * 7 * 7). BN running stats are not parameters.
    assert n_params(shapes["params"]) == 25_557_032 - 2_049_000 - 2 * 64 * 7 * 7
    # A running mean and variance for every BN scale and bias.
    n_norm = sum(x.size for x in jax.tree.leaves(shapes["params"]) if x.ndim == 1)
    assert n_params(shapes["batch_stats"]) == n_norm


def test_resnet_2d_shapes_batch_stats_and_gradients():
    model = build_image_encoder("resnet_mu")
    x = normal(1, (2, 64, 64, 1))
    variables = fake_init(model, x)
    (out, state), grads = outputs_and_grads(
        model, variables, x, train=True, mutable=["batch_stats"]
    )
    assert out["pooled"].shape == (2, 128)
    assert out["feature_map"].shape == (2, 2, 2, 128)  # stride 32, width 16 * 8
    assert out["tokens"].shape == (2, 4, 128)
    np.testing.assert_allclose(out["pooled"], out["feature_map"].mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(out["tokens"], out["feature_map"].reshape(2, 4, 128), atol=0)
    # One training step moves the stem's running mean from 0 by 0.1 (torch's momentum) times
    # the batch mean of the 7x7 stride-2 conv with symmetric padding 3.
    stem = jax.lax.conv_general_dilated(
        x,
        variables["params"]["conv1"]["kernel"],
        (2, 2),
        ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        state["batch_stats"]["norm1"]["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), atol=1e-6
    )
    assert_no_dead_params(grads)
    # Eval mode reads the running statistics: no mutable collection needed (tracing would fail).
    assert jax.eval_shape(model.apply, {**variables, **state}, x)["pooled"].shape == (2, 128)


def test_resnet_3d_group_norm_has_no_state():
    model = ResNet(stage_sizes=(1, 1), block="bottleneck", width=8, norm="group")
    x = normal(1, (2, 16, 16, 16, 1))
    variables = fake_init(model, x)
    assert set(variables) == {"params"}
    out = run(model, variables, x, train=True)
    assert out["feature_map"].shape == (2, 2, 2, 2, 64)  # stride 8; 4 * 2 * 8 channels
    assert out["tokens"].shape == (2, 8, 64)


# ---------------------------------------------------------------- protocol encoder


def protocol_batch(b=3, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, V, size=(b, F)).astype(np.int32)
    values = rng.normal(size=(b, F)).astype(np.float32)
    value_mask = (rng.random((b, F)) < 0.5).astype(np.float32)
    value_mask[:, 0] = 1.0  # every row has a numeric value, so value params get gradients
    value_mask[:, 2] = 0.0
    return tokens, values, value_mask


@pytest.fixture(scope="module")
def protocol_mu():
    model = build_protocol_encoder("mu", num_fields=F, vocab_size=V)
    batch = tuple(jnp.asarray(a) for a in protocol_batch())
    return model, fake_init(model, *batch), batch


def test_protocol_encoder_invariances(protocol_mu):
    """One batch of variants of the same rows (rows are independent): a value where value_mask
    is 0 is invisible, a present value and a token are not, and a PAD field is not attended."""
    model, variables, _ = protocol_mu
    tokens, values, value_mask = protocol_batch()
    variants = {"ref": (tokens, values, value_mask)}
    variants["absent value"] = (tokens, values.copy(), value_mask)
    variants["absent value"][1][:, 2] += 123.0
    variants["present value"] = (tokens, values.copy(), value_mask)
    variants["present value"][1][:, 0] += 1.0
    variants["token"] = (tokens.copy(), values, value_mask)
    variants["token"][0][:, 2] = 3
    pad_tokens = tokens.copy()
    pad_tokens[:, 3] = 0
    pad_mask = value_mask.copy()
    pad_mask[:, 3] = 1.0  # a value on the PAD field, so changing it would show if attended
    variants["pad"] = (pad_tokens, values, pad_mask)
    pad_values = values.copy()
    pad_values[:, 3] += 5.0
    variants["pad value"] = (pad_tokens, pad_values, pad_mask)

    stacked = [jnp.asarray(np.concatenate(parts)) for parts in zip(*variants.values(), strict=True)]
    out = run(model, variables, *stacked)
    assert out["pooled"].shape == (3 * len(variants), 64)
    assert out["fields"].shape == (3 * len(variants), F, 64)
    res = {
        name: jax.tree.map(lambda a, i=i: a[3 * i : 3 * i + 3], out)
        for i, name in enumerate(variants)
    }
    jax.tree.map(np.testing.assert_array_equal, res["absent value"], res["ref"])
    assert not np.allclose(res["present value"]["pooled"], res["ref"]["pooled"], atol=1e-4)
    assert not np.allclose(res["token"]["pooled"], res["ref"]["pooled"], atol=1e-4)
    assert not np.allclose(res["token"]["fields"][:, 4], res["ref"]["fields"][:, 4], atol=1e-4)
    np.testing.assert_allclose(res["pad value"]["pooled"], res["pad"]["pooled"], atol=1e-6)
    keep = [0, 1, 2, 4, 5]  # the PAD field's own state changes; nothing else may
    np.testing.assert_allclose(
        res["pad value"]["fields"][:, keep], res["pad"]["fields"][:, keep], atol=1e-6
    )


def test_protocol_encoder_rejects_wrong_field_count(protocol_mu):
    model, variables, batch = protocol_mu
    with pytest.raises(ValueError, match="protocol fields"):
        model.apply(variables, *(a[:, :-1] for a in batch))


def test_protocol_encoder_bfloat16_close_to_float32_and_gradients(protocol_mu):
    model, variables, batch = protocol_mu
    ref, grads = outputs_and_grads(model, variables, *batch)
    assert_no_dead_params(grads)
    out = run(model.clone(dtype=jnp.bfloat16), variables, *batch)
    assert out["fields"].dtype == jnp.bfloat16
    for name in ("pooled", "fields"):
        err = jnp.abs(out[name].astype(jnp.float32) - ref[name])
        assert err.max() < 0.1 and err.mean() < 0.02, (name, err.max(), err.mean())


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize("hidden_dim", [None, 32])
def test_projection_head(hidden_dim):
    head = ProjectionHead(embed_dim=16, hidden_dim=hidden_dim)
    x = normal(1, (4, 24))
    variables = fake_init(head, x)
    assert set(variables["params"]) == ({"proj"} if hidden_dim is None else {"fc1", "fc2"})
    z, grads = outputs_and_grads(head, variables, x)
    assert z.shape == (4, 16) and z.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
    assert_no_dead_params(grads)


def test_fusion_head():
    fields = jnp.repeat(normal(1, (1, F, 48)), 2, axis=0)  # the same protocol twice ...
    image_tokens = normal(2, (2, 16, 64))  # ... with two different images
    ranges = [(4 + 6 * f, 10 + 6 * f) for f in range(F - 1)] + [(34, 40)]  # V = 40
    head = FusionHead(vocab_size=V, field_ranges=ranges, width=32, depth=2, num_heads=2,
                      mlp_dim=64)  # fmt: skip
    variables = fake_init(head, fields, image_tokens)
    out, grads = outputs_and_grads(head, variables, fields, image_tokens)
    # Each field scored over its own candidates: MISSING, UNK and its 6 ids.
    assert out["logits"].shape == (2, F, 8) and out["logits"].dtype == jnp.float32
    assert variables["params"]["token_head"]["kernel"].shape == (32, V)  # as a dense head
    assert out["values"].shape == (2, F) and out["values"].dtype == jnp.float32
    assert not np.allclose(out["logits"][0], out["logits"][1], atol=1e-4)  # the image matters
    assert_no_dead_params(grads)
    out16 = jax.eval_shape(head.clone(dtype=jnp.bfloat16).apply, variables, fields, image_tokens)
    assert out16["logits"].dtype == jnp.float32  # losses stay in float32 under bf16 compute


def test_mae_masking():
    b, t = 3, 16
    masking = jit(mae_masking, static_argnums=(1, 2, 3))
    keep, restore, mask = masking(jax.random.key(5), b, t, 0.75)
    assert keep.shape == (b, 4) and restore.shape == (b, t) and mask.shape == (b, t)
    np.testing.assert_array_equal(mask.sum(axis=1), t - 4)
    np.testing.assert_array_equal(jnp.take_along_axis(mask, keep, axis=1), 0)
    # restore undoes the shuffle whose first K entries are keep
    shuffle = jnp.argsort(restore, axis=1)
    np.testing.assert_array_equal(shuffle[:, :4], keep)
    never_empty = functools.partial(mae_masking, batch_size=1, num_patches=10, mask_ratio=0.9)
    assert jax.eval_shape(never_empty, jax.random.key(0))[0].shape == (1, 1)


@pytest.mark.parametrize(
    "patches, ratio, kept",
    [
        (14, 0.75, 3),  # 3.5: floor, as MAE's reference code; round() kept 4 (71% hidden)
        (196, 0.75, 49),  # ViT-B/16 at 224 px: exactly a quarter
        (20, 0.9, 2),  # 20 * (1 - 0.9) = 1.9999999999999996: float error is not a patch
        (10, 0.95, 1),  # at least one patch is kept
        (16, 0.0, 16),
    ],
)
def test_mae_masking_keeps_the_floor_of_the_visible_share(patches, ratio, kept):
    masking = functools.partial(mae_masking, batch_size=2, num_patches=patches, mask_ratio=ratio)
    keep, _, mask = jax.eval_shape(masking, jax.random.key(0))
    assert keep.shape == (2, kept) and mask.shape == (2, patches)


def test_mae_masking_refuses_ratios_outside_0_1():
    for ratio in (1.0, -0.1):
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            mae_masking(jax.random.key(0), 1, 16, ratio)


@pytest.mark.parametrize(
    "shape, patch", [((2, 8, 12, 3), (4, 4)), ((2, 8, 12, 1), (2, 3)), ((1, 4, 8, 6, 2), (2, 4, 3))]
)
def test_patchify_round_trip(shape, patch):
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    patches = patchify(x, patch)
    assert patches.shape == (
        shape[0],
        np.prod(shape[1:-1]) // np.prod(patch),
        np.prod(patch) * shape[-1],
    )
    # Patch 0 is the top-left (front) block, raster order with channels last.
    corner = x[(0,) + tuple(slice(0, k) for k in patch)]
    np.testing.assert_array_equal(patches[0, 0], corner.reshape(-1))
    np.testing.assert_array_equal(unpatchify(patches, patch, shape[1:-1]), x)


def test_patchify_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        patchify(jnp.zeros((1, 10, 8, 1)), (4, 4))


def test_mae_decoder_shapes_and_gradients():
    b, t = 3, 16
    restore = jnp.asarray(np.stack([np.random.default_rng(i).permutation(t) for i in range(b)]))
    visible = normal(1, (b, 4, 24))
    decoder = MAEDecoder(patch_dim=8 * 8, width=32, depth=1, num_heads=2, mlp_dim=64)
    pred, grads = outputs_and_grads(decoder, fake_init(decoder, visible, restore), visible, restore)
    assert pred.shape == (b, t, 64) and pred.dtype == jnp.float32
    assert_no_dead_params(grads)


def test_mae_decoder_puts_visible_tokens_back_in_place():
    """Without blocks every step is per token, so changing one visible token must change the
    prediction at its original patch position and nowhere else."""
    t = 8
    keep = jnp.array([[6, 1, 3, 4]])
    restore = jnp.argsort(jnp.concatenate([keep, jnp.array([[0, 2, 5, 7]])], axis=1), axis=1)
    decoder = MAEDecoder(patch_dim=4, width=16, depth=0)
    visible = normal(1, (2, 4, 16))
    visible = visible.at[1].set(visible[0]).at[1, 0].add(1.0)  # row 1: token 0 changed
    pred = run(decoder, fake_init(decoder, visible[:1], restore), visible, restore.repeat(2, 0))
    assert pred.shape == (2, t, 4)
    changed = np.flatnonzero(np.abs(pred[1] - pred[0]).max(axis=-1) > 1e-6)
    np.testing.assert_array_equal(changed, [6])  # visible token 0 is patch keep[0, 0] == 6


def test_context_encoder_decoder():
    feature_map = normal(1, (2, 2, 2, 128))  # resnet_mu on 64x64 images
    decoder = ContextEncoderDecoder(out_size=(32, 32), channels=32, min_channels=8)
    variables = fake_init(decoder, feature_map)
    (out, _), grads = outputs_and_grads(
        decoder, variables, feature_map, train=True, mutable=["batch_stats"]
    )
    assert out.shape == (2, 32, 32, 1) and out.dtype == jnp.float32
    assert_no_dead_params(grads)
    assert [k for k in variables["params"] if k.startswith("up")][-2:] == ["up3", "up3_norm"]
    with pytest.raises(ValueError, match="power of 2"):
        decoder.clone(out_size=(24, 24)).init(jax.random.key(0), feature_map)


@pytest.fixture(scope="module")
def discriminator():
    d = ProjectionDiscriminator(vocab_size=V, channels=(8, 16))
    x = normal(1, (2, 16, 16, 1))
    tags = jnp.array([[5, 6, 7], [8, 9, 10]], jnp.int32)
    return d, fake_init(d, x, tags), x, tags


def test_discriminator_projection_term_responds_to_tags(discriminator):
    d, variables, x, tags = discriminator
    apply = jit(d.apply)
    on = jnp.ones(tags.shape)
    off = jnp.zeros(tags.shape)
    out = apply(variables, x, tags, on)
    assert out.shape == (2,) and out.dtype == jnp.float32
    other = apply(variables, x, tags.at[:, 0].set(20), on)
    assert np.all(np.abs(other - out) > 1e-6)
    # Without tags only psi(phi(x)) remains, whatever the tag ids ...
    base = apply(variables, x, tags, off)
    np.testing.assert_array_equal(apply(variables, x, tags.at[:, 0].set(20), off), base)
    # ... and the projection term is the sum of one term per tag.
    single = [apply(variables, x, tags, off.at[:, k].set(1.0)) - base for k in range(3)]
    np.testing.assert_allclose(out - base, sum(single), rtol=1e-4, atol=1e-5)


def test_discriminator_spectral_norm_and_gradients(discriminator):
    d, variables, x, tags = discriminator
    assert set(variables["batch_stats"]) == {"conv0_sn", "conv1_sn", "linear_sn", "tag_embed_sn"}
    (out, state), grads = outputs_and_grads(
        d, variables, x, tags, train=True, mutable=["batch_stats"]
    )
    assert out.shape == (2,)
    u = state["batch_stats"]["conv1_sn"]["conv1/kernel/u"]
    assert not np.allclose(u, variables["batch_stats"]["conv1_sn"]["conv1/kernel/u"])
    assert_no_dead_params(grads)
    plain = d.clone(spectral_norm=False)
    assert set(jax.eval_shape(plain.init, jax.random.key(0), x, tags)) == {"params"}


# ---------------------------------------------------------------- registry


def test_registry_names():
    assert build_image_encoder("vit_ti/16").width == 192
    assert build_image_encoder("vit_s/16").num_heads == 6
    big = build_image_encoder("vit_l/16", dtype=jnp.bfloat16)
    assert (big.depth, big.mlp_dim, big.dtype) == (24, 4096, jnp.bfloat16)
    assert build_image_encoder("vit_b/16x8").patch_size == (16, 8)
    assert build_image_encoder("vit3d_mu/8").patch_size == (8, 8, 8)
    assert build_image_encoder("resnet50", norm="group").norm == "group"
    assert build_image_encoder("resnet_mu").block == "basic"
    enc = build_protocol_encoder("ti", 31, 1000, dropout=0.1)
    assert (enc.width, enc.num_fields, enc.vocab_size, enc.dropout) == (192, 31, 1000, 0.1)
    for bad in ("vit_xl/16", "vit_b/16x16x16", "resnet7", "convnext"):
        with pytest.raises(ValueError):
            build_image_encoder(bad)
