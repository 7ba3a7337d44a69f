"""Masked protocol prediction learns a field that only the image tells (issue 14): on a synthetic
protocol whose contrast-agent field shows only as an enhanced structure in the image, the real
objective and train step learn to predict it from the image, and lose it when the image is
zeroed. (The learning test on the real store, tests/test_train.py, cannot show this: there the
image tells only CT from MR, which the visible fields already tell.)"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pgjax.losses import protocol as ploss
from pgjax.objectives import ProtocolInfo, build_objective
from pgjax.objectives.base import Runner
from pgjax.objectives.masked_protocol import fused_prediction
from pgjax.train import train as T
from pgjax.train.config_lib import load_config
from pgjax.train.defaults import only
from pgjax.train.mesh import make_mesh

REPO = Path(__file__).resolve().parents[1]
S = ploss.NUM_SPECIAL
# Three categorical fields: a vendor and a body part drawn independently of everything, and
# whether a contrast agent was given, which shows only in the image.
FIELDS = ("Manufacturer", "ContrastBolusAgent", "BodyPartExamined")
RANGES = ((S, S + 3), (S + 3, S + 5), (S + 5, S + 8))
INFO = ProtocolInfo(FIELDS, RANGES, S + 8)
AGENT = FIELDS.index("ContrastBolusAgent")
SIZE = 32  # px: ViT-mu/8 sees a 4x4 grid of patches
STEPS, BATCH = 80, 16


def synthetic_items(rng: np.random.Generator, n: int) -> tuple[dict, np.ndarray]:
    """n items as the store holds them (uint8 pixels, int16 tokens, no numeric values), and
    each item's contrast class (0 none, 1 given). The image: a background of random brightness
    with noise and a disc (an organ, placed at random near the centre) that the agent brightens
    by 100 grey levels; no visible field depends on the agent."""
    choice = np.stack([rng.integers(0, hi - lo, n) for lo, hi in RANGES], axis=1)
    tokens = (choice + np.array([lo for lo, _ in RANGES])).astype(np.int16)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(SIZE // 2 - 4, SIZE // 2 + 5, (2, n))
    disc = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 <= (SIZE // 3) ** 2
    level = rng.uniform(40, 100, (n, 1, 1))
    image = level + 100.0 * disc * choice[:, AGENT, None, None]
    image = image + 6.0 * rng.standard_normal((n, SIZE, SIZE))
    zeros = np.zeros(tokens.shape)
    raw = dict(pixels=np.clip(np.rint(image), 0, 255).astype(np.uint8), tokens=tokens,
               values=zeros.astype(np.float16), value_mask=zeros.astype(np.uint8))  # fmt: skip
    return raw, choice[:, AGENT]


def contrast_agent_scores(seed: int = 0, steps: int = STEPS) -> dict:
    """configs/pg.py:tiny with masked protocol prediction alone (its default rate of hidden
    fields, no augmentation), `steps` steps of the real train step on fresh synthetic items;
    then the contrast field's accuracy on 256 held-out items with it alone hidden, with the
    image and with the image zeroed, and the accuracy of the training items' majority class."""
    overrides = [f"input.global_batch={BATCH}", f"total_steps={steps}", f"seed={seed}"]
    config = only(load_config(REPO / "configs/pg.py:tiny", overrides), "masked_protocol")
    config.augment = {"preset": "none"}
    mesh = make_mesh(devices=jax.devices()[:1])
    tx, schedule = T.make_optimizer(config.optim, config.total_steps)
    s = T.Setup(config, mesh, build_objective(config, INFO, mesh), tx, None, schedule, None)
    train, train_class = synthetic_items(np.random.default_rng(seed), steps * BATCH)
    held, held_class = synthetic_items(np.random.default_rng(1000 + seed), 256)
    batches = {k: jnp.asarray(v.reshape(steps, BATCH, *v.shape[1:])) for k, v in train.items()}

    def run(batches):
        first = T.prepare_batch({k: v[0] for k, v in batches.items()})
        state = T.init_state(s, jax.random.key(seed), first)

        def step(state, batch):
            state, metrics = T.train_step(s, state, batch)
            return state, metrics["loss"]

        return jax.lax.scan(step, state, batches)

    state, curve = jax.jit(run)(batches)
    assert np.all(np.isfinite(curve))

    variables = {"params": state["params"], **state["model_state"]}
    objective = build_objective(config, INFO, None)
    hidden = jnp.zeros((1, len(FIELDS)), bool).at[0, AGENT].set(True)

    @jax.jit
    def accuracy(batch):
        # The masked protocol term's own path, in eval mode, with the contrast field hidden.
        run = Runner(objective.parts, variables, train=False, rng=None)
        feats = run("image_encoder", batch["image"])
        tokens, values, value_mask = batch["tokens"], batch["values"], batch["value_mask"]
        out = fused_prediction(run, feats, *ploss.apply_field_mask(tokens, values, value_mask,
                                                                   hidden))  # fmt: skip
        predicted = jnp.broadcast_to(hidden, tokens.shape)
        candidates = ploss.FieldCandidates(INFO.field_ranges, INFO.vocab_size)
        _, m = ploss.masked_protocol_loss(out["logits"], out["values"], tokens, values,
                                          value_mask, predicted, candidates)  # fmt: skip
        return m["accuracy"]

    batch = T.prepare_batch({k: jnp.asarray(v) for k, v in held.items()})
    majority = np.bincount(train_class).argmax()
    return {
        "accuracy": float(accuracy(batch)),
        "blind_accuracy": float(accuracy(dict(batch, image=jnp.zeros_like(batch["image"])))),
        "prior_accuracy": float(np.mean(held_class == majority)),
    }


def test_masked_protocol_predicts_a_field_only_the_image_tells():
    """After STEPS steps the contrast field is predicted from the image, well above the
    majority class and above the same model with the image zeroed. Measured with seeds 0-3
    (the test runs seed 0; CPU): accuracy 0.95, 0.98, 1.00, 0.83; with the image zeroed 0.42,
    0.51, 0.44, 0.51 (one class for every item); the majority class 0.58, 0.49, 0.44, 0.49.
    Smallest margins: 0.34 over the prior, 0.32 over the zeroed image; asserted: 0.25. With
    the agent left out of the images (the disc never brightened), seed 0 gave 0.56 against a
    prior of 0.58, and the test failed."""
    scores = contrast_agent_scores()
    print(scores)
    assert scores["accuracy"] > scores["prior_accuracy"] + 0.25, scores
    assert scores["accuracy"] > scores["blind_accuracy"] + 0.25, scores
