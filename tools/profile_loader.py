"""Profile the training input pipeline (0 workers: everything in this process) with cProfile.

    python tools/profile_loader.py STORE [--batch 256] [--steps 30] [--rounds 5] [--top 15]

Times, alternately, one layer at a time: TensorStore's batched read of the same batches (the
limit `pgjax bench loader` divides by), that read placed on the devices (XLA copies it), the
same read into a 64-byte aligned buffer (what XLA's CPU client needs to alias instead of
copy), the pipeline's batch source alone (`BatchSource[step]`, no Grain), the batch source
made global arrays (no Grain), and the pipeline (Grain + TensorStore -> global arrays) with 1
and 2 Grain read threads; then prints where the pipeline's main thread spends its time. Run
it with the bench's device count (XLA_FLAGS=--xla_force_host_platform_device_count=8) to see
the same `to_global` cost.
With 0 workers Grain reads on its own threads, so time the main thread spends waiting for a
batch (`acquire` of a lock) is time the read itself takes. This is how the README's loader
profile was taken.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import time

import jax
import numpy as np
import tensorstore as ts

from pgjax.train import mesh as mesh_lib
from pgjax.train.input_pipeline import (
    BatchSource,
    InputConfig,
    aligned_empty,
    make_iterator,
    to_global,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    cfg = InputConfig(store=args.store, global_batch=args.batch)
    sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh(-1, 1))
    source = BatchSource(cfg)
    source._open()
    pixels = source._arrays["pixels"]
    it, _ = make_iterator(cfg, 0)
    it2, _ = make_iterator(dataclasses.replace(cfg, read_threads=2), 0)

    def read_aligned(s):
        rows = source.global_rows(s)
        out = aligned_empty((len(rows), *pixels.shape[1:]), pixels.dtype.numpy_dtype)
        ts.array(out, copy=False, write=True).write(pixels[rows]).result()

    runs = {
        "TensorStore batched read": lambda s: pixels[source.global_rows(s)].read().result(),
        "same read into an aligned buffer": read_aligned,
        # TensorStore's arrays are 16-byte aligned: XLA's CPU client copies them.
        "TensorStore read + global arrays": lambda s: jax.block_until_ready(
            jax.device_put(pixels[source.global_rows(s)].read().result(), sharding)
        ),
        # The pipeline's own batch read, no Grain; then made global arrays: beside the pipeline
        # below, what Grain adds.
        "batch source alone": lambda s: source[s],
        "batch source + global arrays": lambda s: jax.block_until_ready(
            to_global(source[s], sharding)
        ),
        "pipeline (global arrays)": lambda s: jax.block_until_ready(to_global(next(it), sharding)),
        "pipeline, 2 read threads": lambda s: jax.block_until_ready(to_global(next(it2), sharding)),
    }
    rates = {k: [] for k in runs}
    step = 0
    for _ in range(args.rounds):
        for name, fn in runs.items():
            fn(step)
            start = time.perf_counter()
            for _ in range(args.steps):
                step += 1
                fn(step)
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
    limit = rates["TensorStore batched read"]
    for name, r in rates.items():
        # Each round's rate over the read limit of the same round (load drifts between rounds).
        ratio = np.median([x / lim for x, lim in zip(r, limit, strict=True)])
        print(
            f"{name}: median {np.median(r):.0f} images/s over rounds {[round(x) for x in r]}, "
            f"{ratio:.2f}x the read (median of rounds)"
        )
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        jax.block_until_ready(to_global(next(it), sharding))
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    for i in (it, it2):
        if hasattr(i, "close"):
            i.close()


if __name__ == "__main__":
    main()
