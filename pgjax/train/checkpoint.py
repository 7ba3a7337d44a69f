"""Orbax checkpoints: the train state and the input iterator's position, saved together.

Saves are asynchronous (training continues while arrays are written) and atomic (Orbax
writes to a temporary folder and renames it), so a run killed at any moment restarts from the
last finished checkpoint. Restoring takes the target shardings from the current mesh, so a
checkpoint written on one mesh shape restores onto another.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from pgjax.train.input_pipeline import InputConfig, make_iterator


def manager(workdir: str | Path, keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: dict, iterator, input_cfg: InputConfig):
    data = {
        "next_step": step,
        "grain": iterator.get_state(),
        # The Grain state's layout depends on these; restore falls back to next_step if they
        # differ (the batch at a step does not depend on them).
        "workers": input_cfg.workers,
        "global_batch": input_cfg.global_batch,
        "seed": input_cfg.seed,
    }
    mgr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
    )


def abstract_with_shardings(abstract_state, shardings):
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract_state, shardings
    )


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state, shardings):
    """(state, data) of a checkpoint, laid out by `shardings` (the current mesh)."""
    target = abstract_with_shardings(abstract_state, shardings)
    restored = mgr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], restored["data"]


def positioned_iterator(input_cfg: InputConfig, data: dict | None, start_step: int):
    """The input iterator at `start_step`, through Grain's saved state where it applies."""
    pid, count = jax.process_index(), jax.process_count()
    same_layout = data is not None and all(
        data.get(k) == getattr(input_cfg, k) for k in ("workers", "global_batch", "seed")
    )
    if same_layout:
        it, _ = make_iterator(input_cfg, 0, pid, count)
        it.set_state(data["grain"])
        return it
    it, _ = make_iterator(input_cfg, start_step, pid, count)
    return it


def load_state(workdir: str | Path, step: int | None = None) -> tuple[dict, int]:
    """A checkpoint's train state as host NumPy arrays, whatever mesh or processes wrote it.

    For evaluation, export and tests: reads the shapes from the checkpoint's own metadata, so
    no model or mesh needs to be built first.
    """
    import numpy as np

    root = Path(workdir).absolute() / "checkpoints"
    steps = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"{root}: no checkpoints")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{root}: no checkpoint for step {step} (have {steps})")
    checkpointer = ocp.StandardCheckpointer()
    path = root / str(step) / "state"
    tree = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = checkpointer.restore(path, target)
    return jax.tree.map(np.asarray, state), step
