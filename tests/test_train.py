"""The trainer on a real (tiny) store: objectives learn, runs resume exactly, meshes change,
two processes equal one, and a non-finite loss stops the run cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from dicom_corpus import copy_with_identity
from pydicom.data import get_testdata_file

from pgjax.data.config import PreprocessConfig
from pgjax.data.preprocess import preprocess
from pgjax.train import checkpoint as ckpt
from pgjax.train.config_lib import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["pg", "pg_no_contrastive", "pg_no_masked_protocol", "pg_no_translation",
           "pg_resized_crop", "simclr", "mae", "dcm", "ce_dcm"]  # fmt: skip
VENDORS = ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """48 real CT/MR files whose protocol fields vary with the image (vendor, kVp, TR); each
    of 24 patients has one study of two series (an MR and a CT slice), so cross-series
    translation has partners."""
    root = tmp_path_factory.mktemp("train_dicom")
    for n in range(48):
        vendor = VENDORS[n % 3]
        if n % 2:
            extra = {"Manufacturer": vendor, "KVP": 80 + 20 * (n % 3)}
            src = get_testdata_file("CT_small.dcm")
        else:
            extra = {"Manufacturer": vendor, "RepetitionTime": 500.0 * (1 + n % 3)}
            src = get_testdata_file("MR_small.dcm")
        dst = root / "site_a" / f"{n:03d}.dcm"
        copy_with_identity(src, dst, patient=n // 2, tag=f"t{n}", study="s", **extra)
    out = tmp_path_factory.mktemp("train_store") / "store"
    # A fixed salt (kept outside the store): the salted patient keys, and so the held-out
    # patients of the learning test, are the same on every run.
    (out.parent / "salt").write_text("3c" * 32 + "\n")
    cfg = PreprocessConfig(image_size=(32, 32), min_patients=2, split_fractions=(1.0, 0.0, 0.0))
    preprocess([root], out, cfg=cfg, workers=1, salt_file=out.parent / "salt")
    return out


def tiny(name: str, store: Path, *overrides: str):
    base = [f"input.store={store}", "input.global_batch=16", "log_every=1"]
    return load_config(REPO / "configs" / f"{name}.py:tiny", base + list(overrides))


def final_params(workdir: Path, step: int | None = None):
    return ckpt.load_state(workdir, step)[0]["params"]


def assert_trees_close(a, b, atol=0.0):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


# Every test trains the same program (same config, same total_steps: the learning-rate
# schedule is compiled in), so the persistent compilation cache compiles it once.
STEPS = 30


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory):
    """The reference: configs/pg.py:tiny trained for STEPS steps without interruption."""
    from pgjax.train.train import train

    workdir = tmp_path_factory.mktemp("straight")
    train(tiny("pg", store, f"total_steps={STEPS}", "checkpoint_every=10"), workdir)
    return workdir


def assert_learns(workdir: Path, name: str) -> None:
    curve = losses(workdir)
    assert len(curve) == STEPS and all(np.isfinite(curve))
    first, last = np.mean(curve[:5]), np.mean(curve[-5:])
    assert last < first, f"{name}: loss did not fall ({first:.4f} -> {last:.4f})"


def test_protocol_genome_learns(straight):
    assert_learns(straight, "pg")
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    # Every objective term, the temperature, the learning rate and the gradient norm are logged.
    keys = set(rows[-1])
    assert {"loss", "lr", "grad_norm", "steps_per_s", "images_per_s"} <= keys
    assert any("temperature" in k for k in keys), keys
    # What the image adds to each protocol term: accuracy with it and with it zeroed.
    for metric in ("mpp_accuracy", "translation_accuracy", "translation_series_accuracy"):
        assert {f"image/{metric}", f"image/{metric}_no_image", f"image/{metric}_gain"} <= keys
    # Every item of this store has a partner series: cross-series translation is trained.
    assert all(r["translation_series_items"] == 1.0 for r in rows)
    assert all(np.isfinite(r["translation_series_ce"]) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in CONFIGS if c != "pg"])
def test_every_tiny_config_learns(name, store, tmp_path):
    from pgjax.train.train import train

    train(tiny(name, store, f"total_steps={STEPS}", "checkpoint_every=10"), tmp_path)
    assert_learns(tmp_path, name)


@pytest.mark.slow  # subsumed by the SIGKILL resume test below; kept for the slow suite
def test_stop_and_resume_equals_uninterrupted(store, straight, tmp_path):
    from pgjax.train.train import train

    config = tiny("pg", store, f"total_steps={STEPS}", "checkpoint_every=10")
    train(config, tmp_path, max_steps=15)  # checkpoints at 10 and 15
    assert ckpt.manager(tmp_path).latest_step() == 15
    train(config, tmp_path)
    assert_trees_close(final_params(straight), final_params(tmp_path))


def test_restore_onto_another_mesh(store, straight, tmp_path):
    """A checkpoint written on an 8x1 (data x fsdp) mesh restores exactly onto 2x4, with the
    parameters really sharded over fsdp, and training continues from it."""
    from pgjax.train import train as T
    from pgjax.train.input_pipeline import make_iterator, to_global

    other = tiny("pg", store, f"total_steps={STEPS}", "checkpoint_every=10", "mesh.data=2",
                 "mesh.fsdp=4")  # fmt: skip
    s = T.setup(other)
    probe, _ = make_iterator(s.input_cfg, 0)
    example = T.prepare_batch(to_global(next(probe), T.mesh_lib.batch_sharding(s.mesh)))
    probe.close()
    abstract, shardings = T.abstract_state(s, example)
    mgr = ckpt.manager(straight)
    state, data = ckpt.restore(mgr, 10, abstract, shardings)
    mgr.close()
    saved, _ = ckpt.load_state(straight, 10)
    assert_trees_close(jax.tree.map(np.asarray, state), saved)
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state["params"])]
    assert any("fsdp" in tuple(spec) for spec in specs), "no parameter sharded over fsdp"
    assert data["next_step"] == 10

    # Continue from it on the new mesh: same computation in another reduction order, so the
    # parameters drift by float rounding that Adam scales up to about the learning rate.
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(straight / "checkpoints" / "10", workdir / "checkpoints" / "10")
    T.train(other, workdir)
    assert_trees_close(final_params(straight), final_params(workdir), atol=5e-3)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path):
    """A store whose numeric values turn infinite after a few batches stops the run."""
    import shutil

    import tensorstore as ts

    from pgjax.train.train import NonFiniteLoss, train

    bad = tmp_path / "store"
    shutil.copytree(store, bad)
    values = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(bad / "images/values")}}
    ).result()
    poisoned = values.read().result()
    poisoned[:, :] = np.inf
    values.write(poisoned).result()
    config = tiny("pg", bad, f"total_steps={STEPS}", "checkpoint_every=10")
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss or gradient at step 0"):
        train(config, tmp_path / "run")
    assert ckpt.manager(tmp_path / "run").latest_step() is None  # nothing bad was saved


def _train_cmd(store: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pgjax.cli", "train", "--config",
        str(REPO / "configs" / "pg.py:tiny"), "--workdir", str(workdir),
        f"--config.input.store={store}", "--config.input.global_batch=16", *extra,
    ]  # fmt: skip


def test_killed_training_resumes_to_the_same_parameters(store, straight, tmp_path):
    """SIGKILL a real `pgjax train` after its second checkpoint; rerun the command. Every 5
    steps: 20 steps still to run at the kill (every 2 saved 15 checkpoints, seconds each)."""
    extra = [f"--config.total_steps={STEPS}", "--config.checkpoint_every=5", "--config.log_every=1"]
    cmd = _train_cmd(store, tmp_path / "killed", *extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 1200  # a guard against a hang only; loaded machines are slow
    while time.monotonic() < deadline:
        done = [p for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.exists() else []
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Killed mid-run, not after it finished: the rerun below must really resume.
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    mgr = ckpt.manager(tmp_path / "killed")
    latest = mgr.latest_step()
    mgr.close()
    assert latest is not None and 0 < latest < STEPS, latest
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_trees_close(final_params(straight), final_params(tmp_path / "killed"))


def test_two_processes_equal_one(store, straight, tmp_path):
    """Two jax.distributed processes on loopback (4 CPU devices each) == one process with 8,
    after the first 10 steps (the reference's first checkpoint; same schedule, total_steps
    STEPS). Each step's collectives cross the processes over loopback, seconds a step on 2
    cores: the 20 more steps to STEPS added about a minute and proved nothing more."""
    steps = [f"--config.total_steps={STEPS}", "--config.checkpoint_every=10", "--max-steps", "10"]
    flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    port = 20000 + os.getpid() % 20000
    procs = [
        subprocess.Popen(
            _train_cmd(
                store,
                tmp_path / "two",
                *steps,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    mgr = ckpt.manager(tmp_path / "two")
    assert mgr.latest_step() == 10
    mgr.close()
    assert_trees_close(
        without_key_biases(final_params(straight, 10)),
        without_key_biases(final_params(tmp_path / "two")),
        atol=1e-5,
    )


def without_key_biases(params):
    """Params with the attention key biases zeroed. Softmax is invariant to a key bias, so its
    true gradient is 0 and what it gets is rounding noise, which Adam scales up to full-size
    steps: it differs between any two reduction orders (one process or two), by design."""

    def zero(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['qkv']['bias']"):
            width = x.shape[0] // 3
            return np.concatenate([x[:width], np.zeros_like(x[width : 2 * width]), x[2 * width :]])
        if name.endswith("['kv']['bias']"):
            return np.concatenate([np.zeros_like(x[: x.shape[0] // 2]), x[x.shape[0] // 2 :]])
        return x

    return jax.tree_util.tree_map_with_path(zero, params)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(store, tmp_path):
    """Two micro-batches of 8 give the update of one batch of 16, for a loss that is a mean of
    equal-sized per-micro-batch means: DCM's cross entropy over every (item, field), with no
    random augmentation (each micro-batch draws its own) and no numeric term (its mean is over
    the values present, which differs between micro-batches). The contrastive terms would not
    match either: each micro-batch has its own negatives, as documented."""
    from pgjax.train.train import train

    for accum in (1, 2):
        config = tiny("dcm", store, "total_steps=3", "checkpoint_every=3",
                      f"optim.accum_steps={accum}", "augment.preset=none",
                      "objectives.dcm.numeric_weight=0.0")  # fmt: skip
        train(config, tmp_path / f"accum{accum}")
    # Step 1 starts from the same parameters: the loss and the gradient (its norm, logged
    # before Adam, which would hide a missing 1/n) must agree to float rounding.
    first = [
        json.loads((tmp_path / f"accum{a}" / "metrics.jsonl").open().readline()) for a in (1, 2)
    ]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(first[0][key], first[1][key], rtol=1e-5, err_msg=key)
    # After 3 Adam steps, rounding differences on near-zero gradients grow to a fraction of one
    # step's update (lr 1e-3 under warm-up): close, not bit-equal.
    assert_trees_close(final_params(tmp_path / "accum1"), final_params(tmp_path / "accum2"),
                       atol=1e-4)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Learning that counts: masked protocol prediction against the per-field prior, held out


def _items(store: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """Every item's arrays as stored, and the rows of the training and held-out patients (a
    quarter of the patients, every item of theirs)."""
    from pgjax.data.store import open_store

    group = open_store(store).images
    names = ("pixels", "tokens", "values", "value_mask")
    arrays = {k: group.array(k).read().result() for k in names}
    patients = group.table()["patient_key"]
    held_patients = sorted(set(patients))[::4]
    held = np.isin(patients, held_patients)
    return arrays, np.flatnonzero(~held), np.flatnonzero(held)


def _prior(arrays, train_rows, held_rows, allowed):
    """The per-field prior on the held-out items: accuracy of each field's majority token in
    the training items (over the (item, field) pairs the loss scores), and the squared error of
    each numeric field's training mean (over the pairs with a value)."""
    tokens, values = arrays["tokens"], arrays["values"]
    has_value = arrays["value_mask"].astype(bool)
    hits, errors = [], []
    for f in range(tokens.shape[1]):
        ids, counts = np.unique(tokens[train_rows, f], return_counts=True)
        majority = ids[np.argmax(counts)]
        target = tokens[held_rows, f]
        hits += list(target[allowed[f, target]] == majority)
        train_values = values[train_rows, f][has_value[train_rows, f]]
        mean = train_values.mean() if len(train_values) else 0.0
        errors += list((values[held_rows, f][has_value[held_rows, f]] - mean) ** 2)
    return float(np.mean(hits)), float(np.mean(errors))


MPP_STEPS = 60


def masked_protocol_scores(store: Path, steps: int = MPP_STEPS, seed: int = 0) -> dict:
    """configs/pg.py:tiny with masked protocol prediction alone, `steps` steps of the real
    train step (one jitted scan) on three quarters of the patients; then the loss's own metrics
    on the other quarter (8 mask draws), with the image and with it zeroed, and the per-field
    prior's scores on the same items."""
    from pgjax.losses.protocol import allowed_targets
    from pgjax.objectives import build_objective
    from pgjax.train import train as T
    from pgjax.train.defaults import only
    from pgjax.train.mesh import make_mesh

    arrays, train_rows, held_rows = _items(store)
    config = only(tiny("pg", store, f"total_steps={steps}", f"seed={seed}"), "masked_protocol")
    info = T.protocol_info(str(store))
    mesh = make_mesh(devices=jax.devices()[:1])
    tx, schedule = T.make_optimizer(config.optim, config.total_steps)
    s = T.Setup(config, mesh, build_objective(config, info, mesh), tx, None, schedule, None)
    rng = np.random.default_rng(seed)
    b = config.input.global_batch
    order = np.stack([rng.choice(train_rows, b, replace=False) for _ in range(steps)])
    data = {k: jax.numpy.asarray(v) for k, v in arrays.items()}

    def run(order):
        first = T.prepare_batch({k: v[order[0]] for k, v in data.items()})
        state = T.init_state(s, jax.random.key(seed), first)

        def step(state, rows):
            state, metrics = T.train_step(s, state, {k: v[rows] for k, v in data.items()})
            return state, metrics["loss"]

        return jax.lax.scan(step, state, order)

    state, curve = jax.jit(run)(order)
    assert np.all(np.isfinite(curve))

    # Evaluation: the same objective without augmentation, on the held-out items.
    eval_config = config.copy_and_resolve_references()
    eval_config.augment = {"preset": "none"}
    evaluate = build_objective(eval_config, info, None)
    variables = {"params": state["params"], **state["model_state"]}
    held = T.prepare_batch({k: v[held_rows] for k, v in arrays.items()})
    blind = dict(held, image=jax.numpy.zeros_like(held["image"]))

    @jax.jit
    def metrics(batch, key):
        m = evaluate.loss(variables, batch, key)[1]
        return m["mpp_accuracy"], m["mpp_mse"]

    keys = [jax.random.key(100 + k) for k in range(8)]
    accuracy, mse = np.mean([metrics(held, k) for k in keys], axis=0)
    blind_accuracy, blind_mse = np.mean([metrics(blind, k) for k in keys], axis=0)
    allowed = allowed_targets(info.field_ranges, info.vocab_size)
    prior_accuracy, prior_mse = _prior(arrays, train_rows, held_rows, allowed)
    return {
        "accuracy": float(accuracy), "mse": float(mse),
        "blind_accuracy": float(blind_accuracy), "blind_mse": float(blind_mse),
        "prior_accuracy": prior_accuracy, "prior_mse": prior_mse,
    }  # fmt: skip


def test_masked_protocol_prediction_beats_the_prior_on_held_out_items(store):
    """Masked protocol prediction learns what the per-field prior cannot: after MPP_STEPS
    steps, on held-out patients, its accuracy on the hidden fields is above the majority
    token's and its numeric error below the training mean's. Measured with seeds 0-3 (the
    test runs seed 0; a rerun gives the same numbers): accuracy 0.77-0.92 against the prior's
    0.64, mse 0.13-0.14 against 0.62; asserted with margins below the smallest measured.

    Zeroing the image is measured, not asserted: in this store the image tells only CT from
    MR, which the visible fields (kVp, TR, ...) already tell. With seeds 0-3 the accuracy
    without the image moved by -0.02 to +0.005 and the mse rose by 0.003-0.11, from an
    out-of-distribution input more than from lost information: no reliable margin. A field
    only the image tells is tested in tests/test_masked_protocol_reads_the_image.py."""
    scores = masked_protocol_scores(store)
    print(scores)
    assert scores["accuracy"] > scores["prior_accuracy"] + 0.08, scores
    assert scores["mse"] < 0.5 * scores["prior_mse"], scores
