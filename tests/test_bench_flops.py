"""Model FLOPs from the traced loss: PaLM's transformer formula for a ViT, blind to remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pgjax.bench import flops as bf
from pgjax.models import ViT

WIDTH, DEPTH, MLP, PATCH = 64, 2, 256, 8


def _vit_step_flops(remat: bool, batch: int = 3, side: int = 32) -> int:
    vit = ViT(width=WIDTH, depth=DEPTH, num_heads=2, mlp_dim=MLP, patch_size=(PATCH, PATCH),
              remat=remat)  # fmt: skip
    images = jax.ShapeDtypeStruct((batch, side, side, 1), jnp.float32)
    params = jax.eval_shape(vit.init, jax.random.key(0), images)

    def loss(p, x):
        return jnp.sum(vit.apply(p, x)["tokens"] ** 2)

    return bf.TRAIN_OVER_FORWARD * bf.forward_flops(loss, params, images)


def test_vit_count_is_palms_formula():
    batch, side = 3, 32
    patches = (side // PATCH) ** 2
    seq = patches + 1  # the cls token
    block_params = DEPTH * (4 * WIDTH * WIDTH + 2 * WIDTH * MLP)  # qkv, proj, fc1, fc2
    patch_params = PATCH * PATCH * WIDTH  # the patch embedding, on the patches only
    expected = batch * (
        bf.transformer_train_flops(block_params, DEPTH, WIDTH, seq) + 6 * patch_params * patches
    )
    assert _vit_step_flops(False, batch, side) == expected


def test_remat_does_not_change_the_count():
    assert _vit_step_flops(True) == _vit_step_flops(False)


def test_convolution_scan_and_shard_map_are_counted():
    kernel = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)
    x = jax.ShapeDtypeStruct((2, 10, 10, 4), jnp.float32)

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip

    assert bf.forward_flops(conv, x, kernel) == 2 * (2 * 10 * 10 * 8) * (3 * 3 * 4)

    m = jax.ShapeDtypeStruct((16, 16), jnp.float32)

    def looped(a):
        return jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=5)[0]

    assert bf.forward_flops(looped, m) == 5 * 2 * 16**3

    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.ShapeDtypeStruct((64, 16), jnp.float32)
    sharded = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("d"), P()),
                            out_specs=P("d"))  # fmt: skip
    assert bf.forward_flops(sharded, rows, m) == 2 * 64 * 16 * 16  # 8 devices x 8 rows each


def test_ce_dcm_step_counts_the_discriminators_backward_once():
    """CE+DCM's loss takes the discriminator's gradients in its forward pass: the step is counted
    as traced, between the forward's count (no generator backward) and 3 x it (every backward,
    the discriminator's included, tripled). The step used to call objective.disc_loss, which
    the simultaneous update had removed (AttributeError)."""
    import optax

    import pgjax.objectives as ob
    from pgjax.train import mesh as mesh_lib
    from pgjax.train import train as T
    from pgjax.train.defaults import base_config, only, shrink_for_cpu

    c = shrink_for_cpu(only(base_config(), "ce_dcm"))
    c.model.image_encoder_kw = dict(depth=1, width=32, num_heads=2, mlp_dim=64)
    c.objectives.ce_dcm.tags = ("Manufacturer",)
    c.objectives.ce_dcm.disc = dict(channels=(16, 32))
    c.objectives.ce_dcm.decoder = dict(channels=32, min_channels=8)
    info = ob.ProtocolInfo(("Manufacturer", "KVP"), ((4, 8), (8, 12)), 12)
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    objective = ob.build_objective(c, info, mesh)
    tx, schedule = T.make_optimizer(c.optim, c.total_steps)
    s = T.Setup(c, mesh, objective, tx, optax.adam(1e-4), schedule, None)
    batch = T.prepare_batch(dict(pixels=jnp.zeros((4, 32, 32), jnp.uint8),
                                 tokens=jnp.full((4, 2), 5, jnp.int16),
                                 values=jnp.zeros((4, 2), jnp.float16),
                                 value_mask=jnp.zeros((4, 2), jnp.uint8)))  # fmt: skip
    state, _ = T.abstract_state(s, batch)
    variables = {"params": state["params"], **state["model_state"]}
    forward = bf.forward_flops(lambda v, b: objective.loss(v, b, jax.random.key(0))[0],
                               variables, batch)  # fmt: skip
    step = bf.step_model_flops(objective, state, batch)
    assert forward < step < bf.TRAIN_OVER_FORWARD * forward, (forward, step)
