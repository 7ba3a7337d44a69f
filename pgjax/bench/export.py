"""`pgjax bench export`: CPU inference throughput of the exported PyTorch model beside the JAX
model, on the same inputs.

The model is a training checkpoint (`--workdir`, exported here with its parity check), or a
config's models at their initial weights (`--config` and `--store`: throughput does not depend
on the weights, so full-size models can be measured without training them on a CPU; the export
and its parity check run all the same). Inputs: the store's first usable items, as stored
(uint8), repeated up to the batch size; both sides embed the same array.

Per side and part (image encoder, protocol encoder): one warm-up call (JAX compiles there),
then calls until `seconds` have passed (at least 3); items/s is items over the timed calls'
wall time. JAX runs jitted float32 on its default (CPU) device in this process; PyTorch (eval
mode, inference_mode) runs afterwards in its own process with JAX blocked
(`pgjax.bench.torch_rate`), as users run it, once per thread count of `threads` (0: torch's
default). The machine's load average is recorded: torch's OpenMP threads degrade badly when
other processes hold the cores (measured: 40x slower at 2 threads under a load of 6 on 2 cores,
while 1 thread is unaffected), so compare thread counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pgjax.bench.record import write_record


def rate(fn, items: int, seconds: float) -> dict:
    fn()  # warm-up: compilation (JAX), allocator and thread-pool start (both)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"items_per_s": items * len(times) / sum(times), "calls": len(times),
            "median_call_s": float(np.median(times))}  # fmt: skip


def _from_config(config_path: str, overrides, store: str):
    """(export config, variables) of a config's models at initial weights."""
    import jax

    from pgjax.data.store import open_store
    from pgjax.export.source import build_objective_for, describe_export, exported_variables
    from pgjax.train.config_lib import load_config
    from pgjax.train.input_pipeline import BatchSource, InputConfig
    from pgjax.train.train import prepare_batch

    config = load_config(config_path, [f"input.store={store}", *overrides]).to_dict()
    st = open_store(store)
    objective = build_objective_for(config, st)
    source = BatchSource(InputConfig(store=store, group=config["input"]["group"],
                                     splits=("train", "val", "test", "external"),
                                     global_batch=1))  # fmt: skip
    batch = prepare_batch({k: np.asarray(v) for k, v in source[0].items()
                           if k in ("pixels", "tokens", "values", "value_mask")})  # fmt: skip
    variables = jax.jit(objective.init)(jax.random.key(0), batch)
    variables = exported_variables(jax.tree.map(np.asarray, variables))
    return describe_export(config, objective, st, variables, step=0), variables, st.root


def run_bench(*, workdir=None, config=None, overrides=(), store=None, batch: int = 16,
              seconds: float = 5.0, threads: tuple[int, ...] = (0, 1),
              out_dir="benchmarks/results") -> Path:  # fmt: skip
    from pgjax.export import exporter
    from pgjax.export.parity import store_inputs
    from pgjax.export.source import load_workdir, open_training_store, read_training_config
    from pgjax.inference import JaxEncoder

    load_before = os.getloadavg()
    if workdir is not None:
        export_config, variables = load_workdir(workdir, store=store)
        store_root = open_training_store(read_training_config(Path(workdir)), Path(workdir),
                                         store).root  # fmt: skip
        source = f"checkpoint {workdir} (step {export_config['source']['step']})"
    else:
        export_config, variables, store_root = _from_config(config, overrides, store)
        source = f"{config} at initial weights"
    with tempfile.TemporaryDirectory(prefix="pgjax-bench-export-") as tmp:
        out = Path(tmp) / "export"
        report = exporter.write_export(export_config, variables, out, store_root)
        jax_model = JaxEncoder(export_config, variables)
        real = store_inputs(export_config, store_root, limit=batch)
        if real is None:
            raise ValueError(f"{store_root}: no usable items to benchmark on")
        reps = -(-batch // len(real["images"]))
        inputs = {k: np.concatenate([v] * reps)[:batch] for k, v in real.items()}
        images = inputs["images"]
        jax_rates = {"image": rate(lambda: jax_model.embed_images(images), batch, seconds)}
        if "tokens" in inputs:
            args = (inputs["tokens"], inputs["values"], inputs["value_mask"])
            jax_rates["protocol"] = rate(lambda: jax_model.embed_protocol(*args), batch, seconds)
        torch_runs = [_torch_side(out, inputs, Path(tmp), seconds, n) for n in threads]
    for run in torch_runs:
        for part, r in jax_rates.items():
            run[part]["torch_to_jax"] = run[part]["items_per_s"] / r["items_per_s"]
    # Both sides agree on the benchmark inputs themselves too (not only on parity's sets).
    embedded = jax_model.embed_images(images)
    figures = {
        "parity_max_abs": report["max_abs"],
        "parity_max_rel": max(o["max_rel"] for o in report["outputs"].values()),
        "bench_inputs_max_abs": max(
            float(np.abs(embedded - np.asarray(run.pop("image_embedding"))).max())
            for run in torch_runs
        ),
        "jax": jax_rates,
        "torch": torch_runs,
    }
    import jax

    arch = export_config["architecture"]
    settings = {
        "source": source,
        "image_encoder": export_config["source"]["image_encoder"],
        "architecture": arch,
        "input_shape": export_config["input"]["shape"],
        "batch": batch,
        "seconds": seconds,
        "load_average_1min": [load_before[0], os.getloadavg()[0]],
        "jax_device": str(jax.devices()[0].device_kind),
        "parameters": int(sum(np.size(v) for v in jax.tree.leaves(variables["params"]))),
    }
    return write_record("export", figures, settings, out_dir)


def _torch_side(out: Path, inputs: dict, tmp: Path, seconds: float, threads: int) -> dict:
    np.savez(tmp / "bench_inputs.npz", **inputs)
    cmd = [sys.executable, "-m", "pgjax.bench.torch_rate", str(out), str(tmp / "bench_inputs.npz"),
           str(tmp / "torch.json"), str(seconds), str(threads)]  # fmt: skip
    repo_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"PyTorch benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads((tmp / "torch.json").read_text())
