"""Profile `pgjax preprocess` in-process, 1 worker: cProfile per phase, or CPU per component.

    python tools/profile_preprocess.py DICOM_DIR... [--top 30]
    python tools/profile_preprocess.py DICOM_DIR... --components [--set KEY=VALUE ...]
    python tools/profile_preprocess.py DICOM_DIR... --workers 2 [--set KEY=VALUE ...]

Writes a throwaway store under a temporary folder. Default: the top functions by cumulative time
for each phase (cProfile's cost per call inflates pydicom's many small calls: the scan looks ~3x
slower under it). --components: one whole run, and the CPU seconds spent in each part of the
pipeline (pydicom's file read in the pixel phase, decoding, normalisation, resizing, ...),
each exclusive of the parts it calls, beside pydicom's decode-only CPU seconds on the same
files; CPU time, unlike wall time, holds still on a loaded machine. --workers N: how each
phase's work divides over N worker processes: the CPU seconds of every unit (scan chunk, pixel
shard), summed per worker; the phase's total over its busiest worker is the speed-up it gets
when each worker has a core of its own, whatever else the machine runs. For shares by
sampling, py-spy works too:

    py-spy record -r 250 --format raw -o pixels.txt -- \\
        python -m pgjax.cli preprocess --out S --phase pixels --workers 1
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import json
import os
import pstats
import tempfile
import time
from pathlib import Path

from pgjax.data import pixel_units, pixels
from pgjax.data import preprocess as pp
from pgjax.data.config import PreprocessConfig
from pgjax.data.preprocess import PHASES, preprocess

# (module, function, label): where the pipeline's time goes beyond decoding.
COMPONENTS = (
    (pixels, "_decode", "decode (pydicom and the codec)"),
    (pixel_units, "_read", "pixel phase: pydicom file read (the second parse)"),
    (pixels, "size_problem", "pixel phase: size checks"),
    (pixels, "prepare_part", "normalise (modality LUT, window, percentiles)"),
    (pixels, "normalize_prepared", "normalise (modality LUT, window, percentiles)"),
    (pixels, "_resize", "2D resize (Pillow float bilinear)"),
    (pixels, "quantize", "quantise"),
    (pixel_units, "resample_volume", "volume resampling"),
    (pixels, "frame_geometry", "frame geometry"),
    (pp, "_save_slices", "slice hand-over files"),
    (pp, "_load_slices", "slice hand-over files"),
    *((pp, f"phase_{p}", f"phase {p}: everything else") for p in PHASES),
)


def _cpu_per_component(inputs, cfg, tmp: Path) -> tuple[float, collections.Counter]:
    spent, stack = collections.Counter(), []

    def timed(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.process_time()
            stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed, inner = time.process_time() - start, stack.pop()
                spent[label] += elapsed - inner
                if stack:
                    stack[-1] += elapsed

        return wrapper

    # A function is patched in every module that imported it by name (pixel_units calls
    # pixels' functions through its own names), each under its component's label.
    originals = []
    for module, name, label in COMPONENTS:
        fn = getattr(module, name)
        wrapped = timed(fn, label)
        for holder in (pixels, pixel_units, pp):
            if getattr(holder, name, None) is fn:
                originals.append((holder, name, fn))
                setattr(holder, name, wrapped)
    try:
        # Imports are a cost per process, not per file (the pipeline's start-up does these).
        import tensorstore  # noqa: F401

        import pgjax.data.plan  # noqa: F401

        start = time.process_time()
        preprocess(inputs, tmp / "store", cfg=cfg, workers=1, salt_file=tmp / "salt")
        return time.process_time() - start, spent
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def _timed_unit(name: str, job, *args) -> None:
    """Run the pipeline's unit function `name` in a worker and log its CPU seconds."""
    start, cpu = time.time(), time.process_time()
    getattr(pp, name)(job, *args)
    line = [name, time.process_time() - cpu, start, time.time(), os.getpid()]
    with open(os.environ["PGJAX_PROFILE_UNITS"], "a") as f:  # small appends are atomic
        f.write(json.dumps(line) + "\n")


def _scan_unit(job, *args):
    _timed_unit("_scan_unit", job, *args)


def _pixels_unit(job, *args):
    _timed_unit("_pixels_unit", job, *args)


def _balance(inputs, cfg, workers: int, tmp: Path) -> None:
    log = tmp / "units.jsonl"
    os.environ["PGJAX_PROFILE_UNITS"] = str(log)  # the spawned workers inherit it
    originals = pp._scan_unit, pp._pixels_unit
    pp._scan_unit, pp._pixels_unit = _scan_unit, _pixels_unit
    timings = {}
    try:
        preprocess(inputs, tmp / "store", cfg=cfg, workers=workers, salt_file=tmp / "salt",
                   timings=timings)  # fmt: skip
    finally:
        pp._scan_unit, pp._pixels_unit = originals
    print(f"wall seconds, {workers} workers: "
          + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))  # fmt: skip
    units = [json.loads(line) for line in log.read_text().splitlines()]
    for name, phase in (("_scan_unit", "scan"), ("_pixels_unit", "pixels")):
        mine = [u for u in units if u[0] == name]
        per_worker = collections.Counter()
        for _, cpu, _, _, pid in mine:
            per_worker[pid] += cpu
        total = sum(per_worker.values())
        busiest = max(per_worker.values(), default=0.0)
        shares = ", ".join(f"{v:.2f}" for v in sorted(per_worker.values(), reverse=True))
        longest = max((u[1] for u in mine), default=0.0)
        divides = total / max(busiest, 1e-9)
        print(f"{phase}: {len(mine)} units, CPU {total:.2f} s (longest unit {longest:.2f}); per "
              f"worker {shares}; total / busiest worker {divides:.2f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--components", action="store_true", help="CPU seconds per component")
    p.add_argument("--workers", type=int, default=1,
                   help="> 1: CPU seconds per unit and per worker, by phase")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a PreprocessConfig field, e.g. images_per_shard=32")  # fmt: skip
    args = p.parse_args()
    fields = {"min_patients": 2}
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key] = int(value) if value.isdigit() else value
    cfg = PreprocessConfig(**fields)
    with tempfile.TemporaryDirectory(prefix="pgjax-profile-") as tmp:
        if args.workers > 1:
            _balance(args.inputs, cfg, args.workers, Path(tmp))
            return
        if args.components:
            from pgjax.bench.preprocess import _decode_file
            from pgjax.data.scan import list_files

            paths = [path for _, path in list_files(args.inputs)]
            start = time.process_time()
            for path in paths:
                _decode_file(path)
            decode_only = time.process_time() - start
            total, spent = _cpu_per_component(args.inputs, cfg, Path(tmp))
            ratio = decode_only / total
            print(f"{len(paths)} files; CPU seconds, 1 worker: pydicom decode-only "
                  f"{decode_only:.2f}, pipeline {total:.2f} (ratio {ratio:.2f})")  # fmt: skip
            for label, seconds in spent.most_common():
                print(f"  {seconds:7.2f} s {100 * seconds / total:5.1f}%  {label}")
            return
        store = Path(tmp) / "store"
        for phase in PHASES:
            profile = cProfile.Profile()
            profile.enable()
            preprocess(args.inputs, store, cfg=cfg, workers=1, phases=[phase],
                       salt_file=Path(tmp) / "salt")  # fmt: skip
            profile.disable()
            print(f"\n===== phase {phase} =====")
            pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
