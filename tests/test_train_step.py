"""The train step without a store: parameter constraints after the update, and the warnings
`setup` gives about what a config's settings do to its objective."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pgjax.objectives import ProtocolInfo, build_objective
from pgjax.train import train as T
from pgjax.train.defaults import base_config, only, shrink_for_cpu
from pgjax.train.mesh import make_mesh

INFO = ProtocolInfo(
    keywords=("Manufacturer", "KVP", "ConvolutionKernel"),
    field_ranges=((4, 8), (8, 14), (14, 20)),
    vocab_size=20,
)
TINY = dict(depth=1, width=16, num_heads=2, mlp_dim=32)
# Compilation, not running, dominates these tiny programs on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny_setup(**contrastive) -> T.Setup:
    """A Setup of CLIP alone on ViT-mu/8 on one device; lr 0.05 from the second step on."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(image_encoder="vit_mu/8", image_encoder_kw=TINY, protocol_encoder="mu",
                   protocol_encoder_kw=TINY, embed_dim=8, dtype="float32")  # fmt: skip
    c.objectives = dict(contrastive=dict(weight=1.0, kind="clip", **contrastive))
    c.optim = dict(lr=0.05, warmup_steps=1, weight_decay=0.05, b1=0.9, b2=0.95, clip_norm=1.0,
                   accum_steps=1, final_lr_ratio=1.0, disc_lr=0.0)  # fmt: skip
    c.total_steps = 100
    mesh = make_mesh(devices=jax.devices()[:1])
    tx, schedule = T.make_optimizer(c.optim, c.total_steps)
    return T.Setup(c, mesh, build_objective(c, INFO, mesh), tx, None, schedule, None)


def raw_batch(b=8, seed=0):
    """What the loader yields: uint8 pixels [B, H, W], tokens inside the field ranges."""
    rng = np.random.default_rng(seed)
    lo = np.array([r[0] for r in INFO.field_ranges])
    hi = np.array([r[1] for r in INFO.field_ranges])
    return dict(
        pixels=rng.integers(0, 256, (b, 16, 16), dtype=np.uint8),
        tokens=rng.integers(lo, hi, (b, len(lo))).astype(np.int32),
        values=rng.normal(size=(b, len(lo))).astype(np.float32),
        value_mask=np.tile([0, 1, 0], (b, 1)).astype(np.uint8),
    )


def test_temperature_leaves_the_cap_when_its_gradient_pushes_it_down():
    """A log-temperature above the cap: the next step clamps it to the cap; from there the
    gradient (random embeddings: a lower temperature lowers the loss) moves it below. A cap
    inside the loss would give it gradient 0 and leave it above the cap for good."""
    s = tiny_setup(init_scale=150.0, max_scale=100.0)
    batch = raw_batch()
    cap = math.log(100.0)
    init = jax.jit(lambda r, b: T.init_state(s, r, b), compiler_options=FAST_COMPILE)
    state = init(jax.random.key(0), T.prepare_batch(batch))
    # An init_scale above the cap starts at the cap.
    assert float(state["params"]["contrastive"]["log_scale"]) == pytest.approx(cap, abs=1e-6)

    state["params"]["contrastive"]["log_scale"] = jnp.float32(math.log(150.0))
    step = jax.jit(lambda st, b: T.train_step(s, st, b), compiler_options=FAST_COMPILE)
    trace = []
    for _ in range(4):
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])
        trace.append(float(state["params"]["contrastive"]["log_scale"]))
    # Step 0 runs at lr 0 (warm-up): the clamp alone brings the parameter to the cap.
    assert trace[0] == pytest.approx(cap, abs=1e-6), trace
    assert all(v <= cap + 1e-6 for v in trace), trace
    # Then it comes down (Adam's first steps move a parameter by about lr = 0.05 each).
    assert trace[-1] < cap - 0.05, trace
    assert trace == sorted(trace, reverse=True), trace


@pytest.mark.parametrize("term", ["contrastive", "simclr"])
def test_accumulation_with_in_batch_negatives_warns(term):
    config = only(shrink_for_cpu(base_config()), term)
    assert T.accumulation_warnings(config) == []
    config.optim.accum_steps = 4
    (message,) = T.accumulation_warnings(config)
    # The keys to look at, and what the objective became.
    assert "optim.accum_steps=4" in message and f"objectives.{term}.weight" in message
    assert "3 negatives each instead of 15" in message
    config.objectives[term].weight = 0.0
    config.objectives.dcm.weight = 1.0
    assert T.accumulation_warnings(config) == []  # per-item losses are unchanged by it


def test_setup_logs_the_accumulation_warning(caplog, monkeypatch):
    """`pgjax train` warns at start-up (logged before the mesh and objective are built)."""
    config = only(shrink_for_cpu(base_config()), "contrastive")
    config.optim.accum_steps = 2
    monkeypatch.setattr(T, "protocol_info", lambda store: INFO)
    with caplog.at_level(logging.WARNING, logger="pgjax.train.train"):
        T.setup(config)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "objectives.contrastive.weight" in warned[0].getMessage()
    caplog.clear()
    config.optim.accum_steps = 1
    with caplog.at_level(logging.WARNING, logger="pgjax.train.train"):
        T.setup(config)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_fsdp_step_gathers_the_parameters_and_computes_the_same_step():
    """On a data=2 x fsdp=4 mesh, fsdp_gather="step" (every parameter gathered once, the
    forward pass on each device's own items) and "auto" (XLA's partitioner decides each
    operation) give the same step; "step" moves no activations between devices (no all-to-all;
    "auto" resharded them: 243 all-to-alls on configs/pg.py:tiny at fsdp=8)."""
    from pgjax.bench.compile import collectives, summarize_collectives
    from pgjax.train.mesh import batch_sharding

    mesh = make_mesh(2, 4, jax.devices()[:8])
    base = tiny_setup().config
    base.sharding_rules = (
        (r".*(bias|scale|cls|pos_embed|log_scale|temperature)$", "replicate"),
        (r".*", "fsdp"),
    )
    batch = jax.device_put(raw_batch(b=8), batch_sharding(mesh))
    out, kinds = {}, {}
    for mode in ("step", "auto"):
        c = ml_collections.ConfigDict(base.to_dict())
        c.fsdp_gather = mode
        s = T.setup_on(c, mesh, INFO)
        _, shardings = T.abstract_state(s, T.prepare_batch(raw_batch(b=8)))
        state = T.create_state(s, T.prepare_batch(batch), shardings)
        assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(state["params"]))
        compiled = T.compile_step(s, shardings).lower(state, batch).compile(FAST_COMPILE)
        kinds[mode] = summarize_collectives(collectives(compiled.as_text()))
        # Loss and gradient norm of two steps (the second after a real update). Parameters
        # are not compared: Adam's first steps move each by about +-lr whatever the size of
        # its gradient, so summation-order noise on a near-zero gradient flips its sign.
        trace = []
        for _ in range(2):
            state, metrics = compiled(state, batch)
            trace += [float(metrics["loss"]), float(metrics["grad_norm"])]
        out[mode] = trace
    np.testing.assert_allclose(out["step"], out["auto"], rtol=1e-4)
    assert kinds["auto"]["all-to-all"]["count"] > 0, kinds["auto"]  # what "step" removes
    assert kinds["step"]["all-to-all"]["count"] == 0, kinds["step"]
    assert kinds["step"]["all-gather"]["count"] > 0, kinds["step"]
