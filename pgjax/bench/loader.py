"""`pgjax bench loader`: images/s the training input pipeline delivers, against its limits.

Measured in one run on the same images (the store's training rows):

  memmap       a flat memory-mapped copy of the same pixel bytes (uncompressed, one .npy),
               random batches gathered with NumPy: the memory-bandwidth limit
  tensorstore  TensorStore alone: one read of a whole shuffled batch by index array, one read
               in flight (the limit the pipeline is held to: it cannot read faster)
  pipeline     what training gets: Grain + TensorStore (pgjax/train/input_pipeline.py), the
               batch made a global jax.Array on the mesh and augmented by the config's
               augmentation (jitted once, on device), for 0, 1, 2 and all-core Grain workers
  augment      the augmentation alone on a device-resident batch: on a CPU host it shares the
               cores with the loader, on an accelerator it runs beside it
  needed       the per-host rate that feeds the accelerators at the measured training speed:
               images/s of the newest `pgjax bench train` record for the config

All rates count images of the global batch. The page cache is warm for all (each measurement
first reads a few batches untimed). Limits and pipeline are measured in alternating rounds and
each pipeline rate is divided by the TensorStore rate of its own round: on a shared machine the
load changes over minutes. The augmented runs show whether the device keeps up with its own
augmentation; on a CPU host the "device" is the same few cores the loader uses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pgjax.bench.record import RESULTS_DIR, write_record
from pgjax.data import store as st

# ---------------------------------------------------------------------------------------------
# A reference store: the 256x256 uint8 case, written directly (no DICOM involved).


def write_reference_store(
    root: str | Path,
    images: int,
    size: int = 256,
    *,
    compression: str = "none",
    images_per_shard: int = 256,
    seed: int = 0,
) -> Path:
    """A complete images-only store of `images` synthetic size x size uint8 images.

    Same layout as `pgjax preprocess` writes (zarr v3, one chunk per image, sharded), every
    row in the train split. Pixels: a disc of smooth "tissue" with noise on a black background,
    so compressed stores see CT-like compression ratios, not those of noise or of zeros.
    """
    from pgjax.data.config import PreprocessConfig
    from pgjax.data.schema import DEFAULT_FIELDS

    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    group = root / "images"
    group.mkdir(parents=True)
    fields = [f.keyword for f in DEFAULT_FIELDS]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    disc = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.4**2
    tissue = 110 + 50 * np.sin(xx * 11) * np.cos(yy * 7)
    pixels = st.create_array(
        group / "pixels",
        [images, size, size],
        "uint8",
        rows_per_shard=images_per_shard,
        compression=compression,
    )
    for start in range(0, images, images_per_shard):
        n = min(images_per_shard, images - start)
        noise = rng.normal(0, 8, size=(n, size, size)).astype(np.float32)
        shade = rng.uniform(0.6, 1.4, size=(n, 1, 1)).astype(np.float32)
        block = np.where(disc, np.clip(tissue * shade + noise, 0, 255), 0).astype(np.uint8)
        pixels[start : start + n].write(block).result()  # one shard per write
    token_data = {
        "tokens": rng.integers(4, 64, size=(images, len(fields))).astype(np.int32),
        "values": rng.normal(size=(images, len(fields))).astype(np.float32),
        "value_mask": (rng.random((images, len(fields))) < 0.5).astype(np.uint8),
    }
    arrays = {"images/pixels": {"shape": [images, size, size], "dtype": "uint8"}}
    for name, dtype in st.TOKEN_ARRAYS.items():
        arr = st.create_array(
            group / name,
            [images, len(fields)],
            dtype,
            rows_per_shard=st.TOKEN_ROWS_PER_CHUNK,
            compression=compression,
        )
        arr.write(token_data[name]).result()
        arrays[f"images/{name}"] = {"shape": [images, len(fields)], "dtype": dtype}
    st.write_csv_atomic(
        group / "table.csv",
        {
            "row": list(range(images)),
            "ok": [1] * images,
            "split": ["train"] * images,
            # Studies of two series of four images, so cross-series partners are read as in
            # training on CT/MR studies.
            "study_key": [f"{i // 8:016x}" for i in range(images)],
            "series_key": [f"{i // 4:016x}" for i in range(images)],
        },
    )
    cfg = PreprocessConfig(image_size=(size, size), images_per_shard=images_per_shard)
    st.write_json_atomic(
        root / "manifest.json",
        {
            "format": st.STORE_FORMAT,
            "version": st.STORE_VERSION,
            "state": "complete",
            "written_by": "pgjax bench loader (reference store: synthetic pixels, no DICOM)",
            "config": cfg.to_json(),
            "compression": compression,
            "fields": fields,
            "arrays": arrays,
            "counts": {"images": images, "volumes": 0, "images_ok": images},
        },
    )
    return root


# ---------------------------------------------------------------------------------------------
# The measurements. Each returns images/s over `steps` batches after `warmup` untimed ones.


def _rate(fn, steps: int, batch: int, warmup: int = 2, first: int = 0) -> float:
    for s in range(first, first + warmup):
        fn(s)
    start = time.perf_counter()
    for s in range(first + warmup, first + warmup + steps):
        fn(s)
    return steps * batch / (time.perf_counter() - start)


def flat_copy(pixels, path: Path, block: int = 256) -> np.ndarray:
    """The pixel array as one uncompressed .npy, memory-mapped (read-only)."""
    out = np.lib.format.open_memmap(
        path, mode="w+", dtype=pixels.dtype.numpy_dtype, shape=tuple(pixels.shape)
    )
    for start in range(0, pixels.shape[0], block):
        stop = min(start + block, pixels.shape[0])
        out[start:stop] = pixels[start:stop].read().result()
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def measure_limits(source, mm: np.ndarray, steps: int, first: int) -> dict:
    """memmap and TensorStore batched reads of the pixels of the pipeline's own batches."""
    import tensorstore as ts

    # The pipeline's TensorStore settings (same cache pool), one read of the shuffled batch.
    context = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
    spec = {
        "driver": "zarr3",
        "recheck_cached_data": "open",
        "kvstore": {"driver": "file", "path": f"{source.cfg.store}/{source.cfg.group}/pixels"},
    }
    pixels = ts.open(spec, read=True, context=context).result()
    b = source.cfg.global_batch
    return {
        "memmap": _rate(lambda s: mm[source.global_rows(s)], steps, b, first=first),
        "tensorstore": _rate(
            lambda s: pixels[source.global_rows(s)].read().result(), steps, b, first=first
        ),
    }


def augment_fn(config):
    """The training augmentation of the config as one jitted function of (step, batch)."""
    import jax

    from pgjax.train.augment import AugmentConfig, augment
    from pgjax.train.train import prepare_batch

    cfg = AugmentConfig.from_config(config.get("augment"))
    key = jax.random.key(config.seed)

    @jax.jit
    def fn(step, batch):
        prepared = prepare_batch(batch)
        images = augment(jax.random.fold_in(key, step), prepared["image"], cfg)
        return {**prepared, "image": images}

    return fn, cfg


def measure_pipeline(input_cfg, sharding, fn, steps: int, augmented: bool) -> dict:
    """Grain + TensorStore -> global arrays (-> augmentation), as the train loop runs it:
    one step's device work in flight while the host fetches the next batch."""
    import jax

    from pgjax.train.input_pipeline import make_iterator, to_global

    start = time.perf_counter()
    it, _ = make_iterator(input_cfg, 0)
    pending = None

    def step(s):
        nonlocal pending
        batch = to_global(next(it), sharding)
        out = fn(np.int32(s), batch) if augmented else batch
        if pending is not None:
            jax.block_until_ready(pending)
        pending = out

    try:
        step(0)
        jax.block_until_ready(pending)
        first_batch_s = time.perf_counter() - start
        rate = _rate(step, steps, input_cfg.global_batch, first=1)
        jax.block_until_ready(pending)
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    return {"images_per_s": rate, "first_batch_s": first_batch_s}


def measure_augment_alone(source, sharding, fn, steps: int) -> float:
    """The augmentation on one device-resident batch: the device's own rate for it."""
    import jax

    from pgjax.train.input_pipeline import to_global

    batch = to_global(source[0], sharding)
    out = fn(np.int32(0), batch)  # compiles (fn is the pipeline's: jit once)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for s in range(steps):
        out = fn(np.int32(s), batch)
    jax.block_until_ready(out)
    return steps * source.cfg.global_batch / (time.perf_counter() - start)


def needed_rate(config_path: str, results_dir: str | Path) -> dict | None:
    """Images/s of the newest `pgjax bench train` record for the config (else for the same
    config file at another variant, else any): the rate one host must deliver."""
    records = []
    for p in sorted(Path(results_dir).glob("train-*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        records.append((r.get("time_utc", ""), p.name, r))
    base = config_path.split(":")[0]
    for match, ok in (
        ("same config", lambda c: c == config_path),
        ("same config file, other variant", lambda c: c.split(":")[0] == base),
        ("another config (none for this one)", lambda c: True),
    ):
        found = [x for x in records if ok(x[2]["settings"].get("config", ""))]
        if found:
            _, name, r = max(found, key=lambda x: x[:2])
            runs = r["figures"]["runs"]
            most = max(run["devices"] for run in runs)
            run = max((x for x in runs if x["devices"] == most), key=lambda x: x["images_per_s"])
            return {
                "record": name,
                "match": match,
                "config": r["settings"]["config"],
                "device_kind": r["settings"].get("device_kind"),
                "devices": most,
                "global_batch": run["global_batch"],
                "images_per_s": run["images_per_s"],
            }
    return None


def worker_counts(text: str) -> list[int]:
    """ "0,1,2,all" -> [0, 1, 2, cores], without repeats."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = []
    for w in text.split(","):
        n = cores if w.strip() == "all" else int(w)
        if n not in out:
            out.append(n)
    return out


def run_bench(
    store: str | None,
    *,
    config_path: str = "configs/pg.py",
    overrides=(),
    batch: int | None = None,
    workers=(0, 1, 2),
    steps: int = 60,
    rounds: int = 5,
    reference_images: int = 8192,
    reference_size: int = 256,
    compression: str = "none",
    out_dir: str | Path = RESULTS_DIR,
) -> Path:
    import dataclasses

    import jax

    from pgjax.train import mesh as mesh_lib
    from pgjax.train.config_lib import load_config
    from pgjax.train.input_pipeline import BatchSource
    from pgjax.train.train import input_config

    workdir = Path(tempfile.mkdtemp(prefix="pgjax-bench-loader-"))
    try:
        if store is None:
            store = write_reference_store(
                workdir / "store", reference_images, reference_size, compression=compression
            )
            store_kind = "reference (synthetic, written by the bench)"
        else:
            store_kind = "given"
        extra = [f"input.store={store}"] + ([f"input.global_batch={batch}"] if batch else [])
        config = load_config(config_path, [*overrides, *extra])
        base = input_config(config)
        manifest = st.read_manifest(store)
        source = BatchSource(base)
        source._open()
        load = [os.getloadavg()]
        print(
            f"store {store}: {len(source.rows)} rows, "
            f"{manifest['arrays'][f'{base.group}/pixels']}, batch {base.global_batch}"
        )
        mm = flat_copy(source._arrays["pixels"], workdir / "pixels.npy")
        mesh = mesh_lib.make_mesh(-1, 1)
        sharding = mesh_lib.batch_sharding(mesh)
        fn, aug_cfg = augment_fn(config)
        # Rounds of (limits, pipeline at each worker count): a shared machine's load drifts
        # over minutes, so each pipeline figure is compared with the limits of its own round.
        limits, delivered = [], {w: [] for w in workers}
        for r in range(rounds):
            limits.append(measure_limits(source, mm, steps, first=r * (steps + 2)))
            print(
                f"round {r}: memmap {limits[-1]['memmap']:.0f} images/s, "
                f"TensorStore batched read {limits[-1]['tensorstore']:.0f} images/s"
            )
            for w in workers:
                cfg = dataclasses.replace(base, workers=w)
                delivered[w].append(measure_pipeline(cfg, sharding, fn, steps, augmented=False))
                print(f"  workers={w}: pipeline {delivered[w][-1]['images_per_s']:.0f} images/s")
        augment_alone = measure_augment_alone(source, sharding, fn, max(2, steps // 4))
        print(f"augmentation alone on {jax.devices()[0].device_kind}: {augment_alone:.0f} images/s")
        pipeline = {}
        for w in workers:
            cfg = dataclasses.replace(base, workers=w)
            # On a CPU host the augmentation is the slow part: fewer steps say as much.
            augmented = measure_pipeline(cfg, sharding, fn, max(3, steps // 4), augmented=True)
            rates = [d["images_per_s"] for d in delivered[w]]
            ratios = [d / lim["tensorstore"] for d, lim in zip(rates, limits, strict=True)]
            pipeline[f"workers_{w}"] = {
                "delivered_images_per_s": float(np.median(rates)),
                "delivered_per_round": rates,
                "ratio_to_tensorstore": float(np.median(ratios)),
                "ratio_per_round": ratios,
                "augmented_images_per_s": augmented["images_per_s"],
                "first_batch_s": float(np.median([d["first_batch_s"] for d in delivered[w]])),
            }
            print(
                f"workers={w}: pipeline {np.median(rates):.0f} images/s delivered "
                f"({np.median(ratios):.2f}x TensorStore), {augmented['images_per_s']:.0f} "
                "with augmentation"
            )
        load.append(os.getloadavg())
        median = {k: float(np.median([lim[k] for lim in limits])) for k in limits[0]}
        best = max(pipeline.values(), key=lambda r: r["delivered_images_per_s"])
        needed = needed_rate(config_path, out_dir)
        figures = {
            "memmap_images_per_s": median["memmap"],
            "tensorstore_images_per_s": median["tensorstore"],
            "limits_per_round": limits,
            "augment_alone_images_per_s": augment_alone,
            **pipeline,
            "best_ratio_to_tensorstore": best["ratio_to_tensorstore"],
            "needed": needed,
            "load_average_1_5_15": load,
        }
        pix = manifest["arrays"][f"{base.group}/pixels"]
        settings = {
            "store": store_kind,
            "rows": len(source.rows),
            "image_shape": pix["shape"][1:],
            "dtype": pix["dtype"],
            "compression": manifest.get("compression"),
            "global_batch": base.global_batch,
            "prefetch": base.prefetch,
            "workers": list(workers),
            "steps": steps,
            "rounds": rounds,
            "config": config_path,
            "augment": dataclasses.asdict(aug_cfg),
            "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform,
        }
        if needed:
            print(
                f"needed: {needed['images_per_s']:.0f} images/s ({needed['config']} on "
                f"{needed['devices']} {needed['device_kind']}, {needed['record']})"
            )
        return write_record("loader", figures, settings, out_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
