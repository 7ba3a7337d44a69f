"""`pgjax train`: pretraining, readable top to bottom.

    1. set up: processes, mesh, store vocabulary, objective, optimizer
    2. create the train state (sharded by the config's rules), or restore the latest checkpoint
    3. the train step: one jitted, donated update (gradient accumulation, NaN guard inside)
    4. the loop: Grain batches -> global arrays -> step -> metrics, progress, checkpoints

The state is a plain dict pytree: step, params, opt_state, model_state (e.g. BatchNorm
statistics), and the discriminator's optimizer state for CE+DCM. A batch is a pure function
of (seed, step), and so is the step's random key: a run restarted from a checkpoint reaches the
same parameters as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pgjax.objectives import ProtocolInfo, build_objective
from pgjax.progress import Progress
from pgjax.train import checkpoint as ckpt
from pgjax.train import init_from
from pgjax.train import mesh as mesh_lib
from pgjax.train.input_pipeline import InputConfig, make_iterator, to_global

log = logging.getLogger(__name__)

# Terms whose negatives are the other items of the batch. Under gradient accumulation each
# micro-batch is a batch of its own: fewer negatives, a different (easier) objective.
IN_BATCH_NEGATIVE_TERMS = ("contrastive", "simclr")


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# 1. Set-up.


def input_config(config) -> InputConfig:
    i = config.input
    t = config.objectives.get("translation") or {}
    partners = t.get("weight", 0) > 0 and t.get("series_weight", 0) > 0
    return InputConfig(
        store=str(i.store), group=i.group, splits=tuple(i.splits), global_batch=i.global_batch,
        seed=config.seed, workers=i.workers, prefetch=i.prefetch,
        read_threads=i.get("read_threads", 1), partners=partners,
    )  # fmt: skip


def protocol_info(store_path: str) -> ProtocolInfo:
    from pgjax.data.store import open_store

    return ProtocolInfo.from_vocabulary(open_store(store_path).vocabulary())


def decays(path: str) -> bool:
    """Whether AdamW decays the parameter at `path` ("image_encoder/blocks_0/mlp/fc1/kernel").

    The rule: weight decay applies to the weights of dense and conv layers (leaves named
    "kernel") and to nothing else: not to biases, norm scales, scalars (temperature, SigLIP
    bias), or embeddings (token, field, value and position embeddings, cls and mask tokens),
    which decay would pull towards zero for no regularising gain (as in CLIP and MAE).
    """
    return path.rsplit("/", 1)[-1] == "kernel"


def weight_decay_mask(params):
    """`decays` over a parameter tree: a tree of bools, optax's `mask`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(mesh_lib.path_name(path)), params
    )


def make_optimizer(o, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=min(o.warmup_steps, max(1, total_steps // 2)),
        decay_steps=total_steps,
        end_value=o.lr * o.final_lr_ratio,
    )

    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(
            schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=weight_decay_mask
        ),
    )
    return tx, schedule


def prepare_batch(batch: dict) -> dict:
    """Stored integers -> float images in [0, 1] with a channel axis; masks to float."""
    pixels = batch["pixels"]
    scale = 255.0 if pixels.dtype == jnp.uint8 else 65535.0
    out = {"image": (pixels.astype(jnp.float32) / scale)[..., None]}
    for prefix in ("", "partner_") if "has_partner" in batch else ("",):
        out[f"{prefix}tokens"] = batch[f"{prefix}tokens"].astype(jnp.int32)
        out[f"{prefix}values"] = batch[f"{prefix}values"].astype(jnp.float32)
        out[f"{prefix}value_mask"] = batch[f"{prefix}value_mask"].astype(jnp.float32)
    if "has_partner" in batch:
        out["has_partner"] = batch["has_partner"].astype(jnp.float32)
    return out


@dataclasses.dataclass
class Setup:
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    objective: object
    tx: optax.GradientTransformation
    tx_disc: optax.GradientTransformation | None
    schedule: optax.Schedule
    input_cfg: InputConfig


def accumulation_warnings(config) -> list[str]:
    """What gradient accumulation changes in this config's objective, one line per term."""
    n = int(config.optim.get("accum_steps", 1))
    if n <= 1:
        return []
    out = []
    for name in IN_BATCH_NEGATIVE_TERMS:
        section = config.objectives.get(name) or {}
        if section.get("weight", 0) > 0:
            micro = config.input.global_batch // n
            out.append(
                f"optim.accum_steps={n} with objectives.{name}.weight > 0: each of the {n} "
                f"micro-batches is its own contrastive batch ({micro} items, {micro - 1} "
                f"negatives each instead of {config.input.global_batch - 1}), so the "
                f"{name} objective is not the one of input.global_batch="
                f"{config.input.global_batch}. Set optim.accum_steps=1 to keep it."
            )
    return out


def setup(config) -> Setup:
    for warning in accumulation_warnings(config):
        log.warning(warning)
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    return setup_on(config, mesh, protocol_info(config.input.store), input_config(config))


def setup_on(config, mesh, info: ProtocolInfo, input_cfg=None) -> Setup:
    """The objective and optimizers of `config` on a given mesh and vocabulary (the benchmarks
    build their own mesh and stand-in vocabulary; they read no store)."""
    objective = build_objective(config, info, mesh)
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    tx_disc = optax.adam(config.optim.disc_lr, b1=0.5) if objective.has_discriminator else None
    return Setup(config, mesh, objective, tx, tx_disc, schedule, input_cfg)


# ---------------------------------------------------------------------------------------------
# 2. The train state.


def _split_disc(params):
    rest = {k: v for k, v in params.items() if k != "disc"}
    return rest, params.get("disc")


def init_state(s: Setup, rng, example_batch) -> dict:
    variables = s.objective.init(rng, example_batch)
    params = variables["params"]
    params = constrain_params(s, params)  # e.g. an init_scale above max_scale
    model_params, disc_params = _split_disc(params)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": s.tx.init(model_params),
        "model_state": {k: v for k, v in variables.items() if k != "params"},
        # NaN guard bookkeeping: how many steps were skipped, and the first one.
        "nonfinite_steps": jnp.zeros((), jnp.int32),
        "first_nonfinite_step": jnp.full((), -1, jnp.int32),
    }
    if disc_params is not None:
        state["disc_opt_state"] = s.tx_disc.init(disc_params)
    return state


def state_shardings(s: Setup, abstract_state):
    rules = tuple(tuple(r) for r in s.config.sharding_rules)
    return mesh_lib.tree_shardings(abstract_state, s.mesh, rules)


def abstract_state(s: Setup, example_batch) -> tuple[dict, object]:
    """Shapes and shardings of the state, without computing it."""
    rng = jax.random.key(s.config.seed)
    abstract = jax.eval_shape(lambda r, b: init_state(s, r, b), rng, example_batch)
    return abstract, state_shardings(s, abstract)


def create_state(s: Setup, example_batch, shardings) -> dict:
    """The initial state, created directly in its sharded layout (never whole on one device)."""
    rng = jax.random.key(s.config.seed)
    return jax.jit(lambda r, b: init_state(s, r, b), out_shardings=shardings)(rng, example_batch)


# ---------------------------------------------------------------------------------------------
# 3. The train step.


def gathered(s: Setup, params: dict) -> dict:
    """The parameters the forward pass uses. With fsdp > 1 and `fsdp_gather="step"`, all of
    them whole on every device (one all-gather per step; each device keeps its shard of the
    summed gradients: a reduce-scatter, or on XLA:CPU an all-reduce), as ZeRO-3 does per
    layer. XLA's partitioner, left to choose, can instead move the activations to where a
    weight's shard is, or all-reduce partial products of a batch it first gathered. The cost
    is one unsharded copy of the parameters during the step; the optimizer state and the
    updates stay sharded."""
    mode = s.config.get("fsdp_gather", "step")
    if mode not in ("step", "auto"):
        raise ValueError(f"fsdp_gather must be 'step' or 'auto', not {mode!r}")
    if mode == "auto" or s.mesh.shape["fsdp"] == 1:
        return params
    return jax.lax.with_sharding_constraint(params, mesh_lib.replicated(s.mesh))


def constrain_params(s: Setup, params: dict) -> dict:
    """Parameter constraints, applied after every update: the contrastive temperature t =
    exp(log_scale) is clamped to objectives.contrastive.max_scale, as CLIP does. A cap inside
    the loss (min(log_scale, cap)) has gradient 0 above the cap, and scalars get no weight
    decay, so a parameter that passed it would never come back."""
    term = s.objective.terms.get("contrastive")
    if term is None or "contrastive" not in params:
        return params
    p = params["contrastive"]
    cap = jnp.asarray(math.log(term.settings["max_scale"]), p["log_scale"].dtype)
    return {**params, "contrastive": {**p, "log_scale": jnp.minimum(p["log_scale"], cap)}}


def _micro_batches(batch: dict, n: int, mesh) -> dict:
    """[B, ...] -> [n, B/n, ...], each micro-batch spread over every device.

    Rows a, a+n, a+2n... form micro-batch a, so each device keeps an equal share of each.
    """
    out = {}
    spec = jax.sharding.PartitionSpec(None, mesh_lib.BATCH_AXES)
    for k, x in batch.items():
        x = jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
        out[k] = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
    return out


def train_step(s: Setup, state: dict, raw_batch: dict) -> tuple[dict, dict]:
    objective, config = s.objective, s.config
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    _, rng_g = jax.random.split(rng)  # (the first half was the discriminator's own pass)
    batch = prepare_batch(raw_batch)
    params = state["params"]

    # One gradient for every parameter, the discriminator's included: its hinge loss is part of
    # the objective's value, on the generator's fake of the same micro-batch (see
    # objectives/ce_dcm.py), so accumulation bounds its memory too and the fake is made once.
    def loss_fn(p, model_state, micro, key):
        p = gathered(s, p)
        loss, m, new_model_state = objective.loss({"params": p, **model_state}, micro, key)
        return loss, (m, new_model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n_micro = config.optim.accum_steps
    if n_micro == 1:
        (loss, (m, model_state)), grads = grad_fn(params, state["model_state"], batch, rng_g)
    else:
        micro = _micro_batches(batch, n_micro, s.mesh)

        def body(carry, xs):
            grads_acc, model_state = carry
            mb, k = xs
            (loss, (m, model_state)), g = grad_fn(params, model_state, mb, k)
            return (jax.tree.map(jnp.add, grads_acc, g), model_state), (loss, m)

        zeros = jax.tree.map(jnp.zeros_like, params)
        keys = jax.random.split(rng_g, n_micro)
        (grads, model_state), (losses, ms) = jax.lax.scan(
            body, (zeros, state["model_state"]), (micro, keys)
        )
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        loss, m = losses.mean(), jax.tree.map(jnp.mean, ms)

    model_params, disc_params = _split_disc(params)
    grads, disc_grads = _split_disc(grads)
    updates, opt_state = s.tx.update(grads, state["opt_state"], model_params)
    new_params = constrain_params(s, optax.apply_updates(model_params, updates))
    if disc_params is not None:
        d_updates, new_disc_opt = s.tx_disc.update(disc_grads, state["disc_opt_state"], disc_params)
        new_params = dict(new_params, disc=optax.apply_updates(disc_params, d_updates))
    grad_norm = optax.tree.norm(grads)
    # NaN guard: a non-finite step changes nothing but the counters, so the parameters (and
    # the next checkpoint) stay the last good ones; the host stops the run on the next check.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    new_state = {
        "step": step + 1,
        "params": keep_if_finite(new_params, state["params"]),
        "opt_state": keep_if_finite(opt_state, state["opt_state"]),
        "model_state": keep_if_finite(model_state, state["model_state"]),
        "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32),
        "first_nonfinite_step": jnp.where(
            (state["first_nonfinite_step"] < 0) & ~finite, step, state["first_nonfinite_step"]
        ),
    }
    if disc_params is not None:
        new_state["disc_opt_state"] = keep_if_finite(new_disc_opt, state["disc_opt_state"])
    # "loss" is the objective's weighted sum (the discriminator's loss is "disc/loss").
    metrics = dict(m, grad_norm=grad_norm, lr=s.schedule(step), finite=finite)
    return new_state, metrics


def compile_step(s: Setup, shardings):
    batch_sharding = mesh_lib.batch_sharding(s.mesh)
    return jax.jit(
        lambda state, batch: train_step(s, state, batch),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, mesh_lib.replicated(s.mesh)),
        donate_argnums=(0,),
    )


def compile_image_ablation(s: Setup, shardings):
    """The objective's `image_ablation` on the state and a raw batch: each protocol term's
    accuracy with the image and with it zeroed, logged with the training metrics."""

    def fn(state, raw_batch):
        variables = {"params": state["params"], **state["model_state"]}
        rng = jax.random.fold_in(jax.random.key(s.config.seed), state["step"])
        return s.objective.image_ablation(variables, prepare_batch(raw_batch), rng)

    return jax.jit(
        fn,
        in_shardings=(shardings, mesh_lib.batch_sharding(s.mesh)),
        out_shardings=mesh_lib.replicated(s.mesh),
    )


# ---------------------------------------------------------------------------------------------
# 4. The loop.


class MetricsWriter:
    """metrics.jsonl in the workdir (process 0 only), and TensorBoard where installed."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _check_finite(state: dict, stopped_at: int, manager) -> None:
    if int(state["nonfinite_steps"]) > 0:
        last = manager.latest_step()
        raise NonFiniteLoss(
            f"non-finite loss or gradient at step {int(state['first_nonfinite_step'])}; "
            f"stopped at step {stopped_at}. That step's update was not applied, and the last "
            f"good checkpoint (step {last}) is untouched."
        )


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, max_steps: int | None = None):
    """Train until config.total_steps (or max_steps more steps, for tests and benchmarks)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    s = setup(config)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1) + "\n")

    # The first batch gives the shapes for init; the iterator is then placed at the start step.
    probe, _ = make_iterator(s.input_cfg, 0, jax.process_index(), jax.process_count())
    batch_sharding = mesh_lib.batch_sharding(s.mesh)
    example = prepare_batch(to_global(next(probe), batch_sharding))
    _close(probe)
    abstract, shardings = abstract_state(s, example)

    manager = ckpt.manager(workdir, keep=config.keep_checkpoints)
    data_state = None
    if manager.latest_step() is not None:
        state, data_state = ckpt.restore(manager, manager.latest_step(), abstract, shardings)
    else:
        state = create_state(s, example, shardings)
        # Published weights for the image encoder (config.init.from); a resumed run has them
        # in its checkpoint already.
        state = init_from.initialise_state(state, config, s.objective, example, workdir)
    start = int(state["step"])
    it = ckpt.positioned_iterator(s.input_cfg, data_state, start)

    step_fn = compile_step(s, shardings)
    ablation_fn = compile_image_ablation(s, shardings)
    end = config.total_steps if max_steps is None else min(config.total_steps, start + max_steps)
    writer = MetricsWriter(workdir)
    progress = Progress(end - start, "train", "steps", every_s=30)
    pending = None  # the previous step's metrics: checked one step late, so nothing stalls
    window_start, window_steps = time.perf_counter(), 0
    step = start
    try:
        while step < end:
            batch = to_global(next(it), batch_sharding)
            state, metrics = step_fn(state, batch)
            step += 1
            window_steps += 1
            if pending is not None and not bool(pending["finite"]):
                _check_finite(state, step, manager)
            pending = metrics
            note = ""
            if step % config.log_every == 0 or step == end:
                _check_finite(state, step, manager)
                rate = window_steps / (time.perf_counter() - window_start)
                images = rate * config.input.global_batch
                # What the image adds to each protocol term, on this (already seen) batch.
                metrics = {**metrics, **ablation_fn(state, batch)}
                writer.write(
                    step, {**jax.device_get(metrics), "steps_per_s": rate, "images_per_s": images}
                )
                note = f"loss {float(metrics['loss']):.4f} {images:.0f} images/s"
                window_start, window_steps = time.perf_counter(), 0
            progress.update(1, note)
            if step % config.checkpoint_every == 0 or step == end:
                _check_finite(state, step, manager)
                ckpt.save(manager, step, state, it, s.input_cfg)
        manager.wait_until_finished()
    finally:
        writer.close()
        _close(it)
        manager.close()
    return state


def _close(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
