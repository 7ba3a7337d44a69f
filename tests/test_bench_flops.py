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
