"""CE+DCM's train step (issue 14, defect 3): the discriminator learns on the micro-batches, from
the one fake the generator makes, and accumulation lowers the peak memory of the whole step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pgjax.objectives as ob
from pgjax.train import mesh as mesh_lib
from pgjax.train import train as T
from pgjax.train.defaults import base_config, only, shrink_for_cpu

INFO = ob.ProtocolInfo(
    ("Manufacturer", "KVP", "ConvolutionKernel"), ((4, 8), (8, 12), (12, 16)), 16
)
DECODER = dict(channels=32, min_channels=8)  # the last stage (and out_conv's input): 8 channels
# Compilation dominates on CPU; level 0 compiles several times faster, and buffer assignment (the
# memory analysis) still runs.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SIZE = 32  # px: ViT-mu/8 gives a 4x4 token grid, decoded to the 16x16 hole


def ce_dcm_setup(accum_steps=1, batch=32, disc=(16, 32)):
    c = shrink_for_cpu(only(base_config(), "ce_dcm"))
    c.model.image_encoder = "vit_mu/8"
    c.model.image_encoder_kw = dict(depth=1, width=32, num_heads=2, mlp_dim=64)
    c.objectives.ce_dcm.tags = ("Manufacturer", "KVP")
    c.objectives.ce_dcm.disc = dict(channels=disc)
    c.objectives.ce_dcm.decoder = DECODER
    c.augment = dict(preset="none")
    c.optim.accum_steps = accum_steps
    c.input.global_batch = batch
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    objective = ob.build_objective(c, INFO, mesh)
    tx, schedule = T.make_optimizer(c.optim, c.total_steps)
    return T.Setup(c, mesh, objective, tx, optax.adam(1e-4, b1=0.5), schedule, None)


def raw_batch(b, size=SIZE):
    return dict(pixels=jax.ShapeDtypeStruct((b, size, size), jnp.uint8),
                tokens=jax.ShapeDtypeStruct((b, 3), jnp.int16),
                values=jax.ShapeDtypeStruct((b, 3), jnp.float16),
                value_mask=jax.ShapeDtypeStruct((b, 3), jnp.uint8))  # fmt: skip


def abstract(s, raw):
    example = T.prepare_batch(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), raw))
    return T.abstract_state(s, example)


def _fakes(jaxpr, channels: int) -> int:
    """Forward passes of the inpainting decoder's out_conv in a jaxpr (sub-jaxprs included):
    convs from `channels` to 1 channel with its 3x3 kernel. Its two backward convs read the
    1-channel gradient or write the kernel's shape, so they are not counted."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            out = eqn.outvars[0].aval.shape
            n += rhs == (3, 3, channels, 1) and lhs[-1] == channels and out[-1] == 1 and out[0] > 3
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _fakes(inner, channels)
    return n


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_the_generator_makes_one_fake_per_micro_batch(accum_steps):
    s = ce_dcm_setup(accum_steps, batch=8)
    raw = raw_batch(8)
    state, _ = abstract(s, raw)
    jaxpr = jax.make_jaxpr(functools.partial(T.train_step, s))(state, raw)
    # One decoder pass (a scan traces its body once) serves the generator's loss and the
    # discriminator's; the step used to make a second fake, on the whole batch, for the latter.
    assert _fakes(jaxpr.jaxpr, DECODER["min_channels"]) == 1


def test_peak_memory_falls_with_accumulation():
    # The discriminator's activations dominate the step: a wide first conv (256 channels) on a
    # 32x32 hole of 32 images is 8 MB per pass, beside a generator (one-block ViT, small
    # decoder) of a few MB. Compiled temp bytes on CPU, accum 1 -> 4: 44.7 -> 12.5 MB (0.28)
    # now; 44.8 -> 27.5 MB (0.61) with the step before the fix (72eff88: the discriminator's
    # loss on the whole batch, from a second fake), whose discriminator ignored accum_steps;
    # 62.0 -> 15.4 MB with the first fix (c8af474: three discriminator passes, their
    # activations all kept for the backward pass).
    raw = raw_batch(32, size=64)
    temp = {}
    for accum in (1, 4):
        s = ce_dcm_setup(accum, batch=32, disc=(256, 16))
        state, shardings = abstract(s, raw)
        compiled = T.compile_step(s, shardings).lower(state, raw).compile(FAST_COMPILE)
        temp[accum] = compiled.memory_analysis().temp_size_in_bytes
    # Every activation the step holds, the discriminator's too, scales with the micro-batch.
    assert temp[4] < 0.4 * temp[1], temp


def test_each_player_gets_only_the_gradient_of_its_own_loss():
    s = ce_dcm_setup(batch=4)
    objective = s.objective
    rng = np.random.default_rng(0)
    batch = dict(image=jnp.asarray(rng.random((4, SIZE, SIZE, 1)), jnp.float32),
                 tokens=jnp.asarray(rng.integers(4, 16, (4, 3)), jnp.int32),
                 values=jnp.zeros((4, 3)), value_mask=jnp.zeros((4, 3)))  # fmt: skip
    variables = jax.jit(objective.init, compiler_options=FAST_COMPILE)(jax.random.key(0), batch)

    def grads_of(metric):
        def f(p):
            value, metrics, _ = objective.loss({**variables, "params": p}, batch, jax.random.key(1))
            return value if metric is None else metrics[metric]

        return jax.jit(jax.grad(f), compiler_options=FAST_COMPILE)(variables["params"])

    def norm(tree):
        return float(optax.tree.norm(tree))

    gen, disc, value = grads_of("loss"), grads_of("disc/loss"), grads_of(None)
    assert (
        norm(gen["disc"]) == 0.0 and norm(gen["ce_decoder"]) > 0 and norm(gen["image_encoder"]) > 0
    )
    assert (
        norm(disc["disc"]) > 0
        and norm(disc["ce_decoder"]) == 0
        and norm(disc["image_encoder"]) == 0
    )
    # The value the trainer differentiates carries both, each to its own player.
    for a, b, c in zip(*(jax.tree.leaves(t) for t in (value, gen, disc)), strict=True):
        np.testing.assert_allclose(a, b + c, rtol=1e-4, atol=1e-6)  # summation order
