"""`pgjax bench train`: step time, throughput, XLA FLOPs and MFU of a config's train step.

Measured:
- the compiled step alone, on one device-resident batch (the compute limit);
- the real loop with batches from the store through Grain (when a store is given): the
  difference is host overhead, the share of step time spent outside the compiled step;
- how that grows with the number of devices (a sub-mesh), the global batch and the image size,
  one factor at a time from the base point (all devices, the config's batch, the store's image
  size). On a CPU, fake devices come from
  XLA_FLAGS=--xla_force_host_platform_device_count=8, set before the command starts.

FLOPs come from XLA's cost analysis of the compiled step (per device: the SPMD program one
device runs); `mfu` divides them by the step time and the device's peak dense bf16 FLOP/s,
where the device kind is in PEAK_FLOPS (the CPU has none, and an unknown kind gets no MFU).
XLA counts what it compiles, remat recomputation included, so that figure is closer to hardware
FLOPs utilisation. `mfu_model` divides the model FLOPs instead (pgjax/bench/flops.py: PaLM's
6 N + 12 L d T per token for a transformer, counted from the traced loss), which remat cannot
inflate; both are recorded.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from pgjax.bench.flops import step_model_flops
from pgjax.bench.record import write_record

# Peak dense bf16 FLOP/s per device (vendor datasheets).
PEAK_FLOPS = {
    "NVIDIA H100": 989e12,  # SXM; the PCIe card is 756e12
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    if "H100" in kind and "PCIe" in kind:
        return 756e12
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def _random_batch(config, info, image_shape, batch: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = np.full((batch, len(info.keywords)), 1, np.int32)
    for f, (start, stop) in enumerate(info.field_ranges):
        if stop > start:
            tokens[:, f] = rng.integers(start, stop, size=batch)
    out = {
        "pixels": rng.integers(0, 255, size=(batch, *image_shape), dtype=np.uint8),
        "tokens": tokens,
        "values": rng.normal(size=tokens.shape).astype(np.float32),
        "value_mask": (rng.random(tokens.shape) < 0.5).astype(np.uint8),
    }
    from pgjax.train.train import input_config

    if input_config(config).partners:  # cross-series translation: every item has a partner
        for name in ("tokens", "values", "value_mask"):
            out[f"partner_{name}"] = np.roll(out[name], 1, axis=0)
        out["has_partner"] = np.ones(batch, np.uint8)
    return out


def measure_step(config, info, image_shape, devices, steps: int) -> dict:
    """Compile and time the train step on a sub-mesh of `devices`, on a resident batch."""
    from pgjax.train import mesh as mesh_lib
    from pgjax.train import train as T

    mesh = mesh_lib.make_mesh(len(devices) // config.mesh.fsdp, config.mesh.fsdp, devices)
    s = T.setup_on(config, mesh, info)
    objective = s.objective
    sharding = mesh_lib.batch_sharding(mesh)
    raw = _random_batch(config, info, image_shape, config.input.global_batch)
    batch = {k: jax.device_put(v, sharding) for k, v in raw.items()}
    example = T.prepare_batch(batch)
    abstract, shardings = T.abstract_state(s, example)
    model_flops = step_model_flops(objective, abstract, example, config.seed)
    state = T.create_state(s, example, shardings)
    t0 = time.perf_counter()
    compiled = T.compile_step(s, shardings).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    peak = peak_flops(devices[0])
    return {
        "devices": len(devices),
        "global_batch": config.input.global_batch,
        "compile_s": compile_s,
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        "images_per_s": config.input.global_batch / step_s,
        # XLA's cost analysis counts the SPMD program one device runs (measured: it halves
        # from 1 to 2 devices at a fixed global batch).
        "flops_per_step_per_device": flops,
        "flops_per_step": flops * len(devices),
        "mfu": flops / step_s / peak if peak and flops else None,
        "model_flops_per_step": model_flops,
        "mfu_model": model_flops / step_s / (peak * len(devices)) if peak else None,
        "state": state,
        "compiled": compiled,
        "setup": s,
        "batch": batch,
    }


def measure_loop(config, m: dict, steps: int, rounds: int = 5) -> dict:
    """The real loop (store -> Grain -> global arrays -> step) against the compiled step on a
    resident batch, timed in alternating rounds after an uncounted warm-up round (a shared
    machine's load drifts, so each round's pair is compared): the share of step time spent
    outside the compiled step is the host overhead. The input side alone (next batch from
    Grain, then to global arrays, without a step) is timed too: it bounds the overhead from
    above when nothing overlaps, and shows how far below the noise a tiny share is."""
    from pgjax.train import mesh as mesh_lib
    from pgjax.train.input_pipeline import make_iterator, to_global
    from pgjax.train.train import input_config

    it, _ = make_iterator(input_config(config), 0, jax.process_index(), jax.process_count())
    sharding = mesh_lib.batch_sharding(m["setup"].mesh)
    state, compiled = m["state"], m["compiled"]
    resident = m["batch"]

    def from_store():
        return to_global(next(it), sharding)

    def timed(next_batch) -> float:
        nonlocal state
        state, metrics = compiled(state, next_batch())
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, next_batch())
        jax.block_until_ready(metrics)
        return (time.perf_counter() - t0) / steps

    def input_alone() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(from_store())
        return (time.perf_counter() - t0) / steps

    # Warm-up round, not counted: caches, threads, first reads.
    timed(lambda: resident)
    timed(from_store)
    step_s, loop_s, input_s = [], [], []
    for _ in range(rounds):
        step_s.append(timed(lambda: resident))
        loop_s.append(timed(from_store))
        input_s.append(input_alone())
    close = getattr(it, "close", None)
    if close:
        close()
    shares = [1 - s / loop for s, loop in zip(step_s, loop_s, strict=True)]
    step, loop = float(np.median(step_s)), float(np.median(loop_s))
    return {
        "loop_step_s": loop,
        "loop_images_per_s": config.input.global_batch / loop,
        "resident_step_s_per_round": step_s,
        "loop_step_s_per_round": loop_s,
        "host_overhead_share_per_round": shares,
        # Median of the per-round pairs, not clamped: a negative share says the difference is
        # below the timing noise.
        "host_overhead_share": float(np.median(shares)),
        "input_s_per_batch": float(np.median(input_s)),
        "input_share_of_step": float(np.median(input_s)) / step,
    }


def sweep_points(n_all: int, batch: int, shape, device_counts, batches, image_sizes) -> list:
    """(devices, global batch, image shape) settings: the base point, then one factor at a time."""
    shape = tuple(shape)
    points = [(n_all, batch, shape)]
    points += [(n, batch, shape) for n in device_counts]
    points += [(n_all, b, shape) for b in batches]
    points += [(n_all, batch, (*shape[:-2], s, s)) for s in image_sizes]
    return list(dict.fromkeys(points))


def run_bench(
    config_path: str,
    overrides,
    *,
    steps: int,
    batches,
    device_counts,
    out_dir,
    image_sizes=(),
    rounds: int = 5,
):
    from pgjax.train.config_lib import load_config
    from pgjax.train.train import protocol_info

    config = load_config(config_path, overrides)
    store = str(config.input.store)
    from pgjax.data.store import read_manifest

    manifest = read_manifest(store)
    info = protocol_info(store)
    image_shape = manifest["arrays"][f"{config.input.group}/pixels"]["shape"][1:]
    devices = jax.devices()
    results = []
    points = sweep_points(
        len(devices), config.input.global_batch, image_shape, device_counts, batches, image_sizes
    )
    for n, b, shape in points:
        c = load_config(config_path, [*overrides, f"input.global_batch={b}"])
        m = measure_step(c, info, list(shape), devices[:n], steps)
        row = {k: v for k, v in m.items() if k not in ("state", "compiled", "setup", "batch")}
        row["image_shape"] = list(shape)
        if n == len(devices) and list(shape) == list(image_shape) and jax.process_count() == 1:
            row.update(measure_loop(c, m, steps, rounds))  # the store's images: the real loop
        results.append(row)
        print(
            f"devices={n} batch={b} image={'x'.join(map(str, shape))}: "
            f"{row['steps_per_s']:.2f} steps/s, {row['images_per_s']:.1f} images/s, "
            f"{row['flops_per_step'] / 1e9:.1f} GFLOP/step (model "
            f"{row['model_flops_per_step'] / 1e9:.1f})"
            + (f", MFU {row['mfu']:.1%} (model {row['mfu_model']:.1%})" if row["mfu"] else "")
            + (
                f", host overhead {row['host_overhead_share']:.1%}"
                if "host_overhead_share" in row
                else ""
            )
        )
        del m
    settings = {
        "config": config_path,
        # The store's path stays on this machine (records are committed; paths can name
        # people or sites), as in the loader bench's record.
        "overrides": [
            "input.store=(given)" if o.startswith("input.store=") else o for o in overrides
        ],
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "peak_flops_per_device": peak_flops(devices[0]),
        "mfu_note": None
        if peak_flops(devices[0])
        else f"no peak FLOP/s known for device kind {devices[0].device_kind!r}: no MFU",
        "image_shape": image_shape,
        "steps": steps,
        "loop_rounds": rounds,
        "model": config.model.to_dict(),
    }
    return write_record("train", {"runs": results}, settings, out_dir)
