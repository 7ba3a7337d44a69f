"""Profile `pgjax preprocess` in-process, 1 worker: cProfile per phase, or CPU per component.

    python tools/profile_preprocess.py DICOM_DIR... [--top 30]
    python tools/profile_preprocess.py DICOM_DIR... --components [--set KEY=VALUE ...]

Writes a throwaway store under a temporary folder. Default: the top functions by cumulative time
for each phase (cProfile's cost per call inflates pydicom's many small calls: the scan looks ~3x
slower under it). --components: one whole run, and the CPU seconds spent in each part of the
pipeline (pydicom's file read in the pixel phase, decoding, normalisation, resizing, ...),
each exclusive of the parts it calls, beside pydicom's decode-only CPU seconds on the same
files; CPU time, unlike wall time, holds still on a loaded machine. For shares by sampling,
py-spy works too:

    py-spy record -r 250 --format raw -o pixels.txt -- \\
        python -m pgjax.cli preprocess --out S --phase pixels --workers 1
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
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
    (pixels, "normalize_series", "normalise (modality LUT, window, percentiles)"),
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

    originals = [(m, name, getattr(m, name)) for m, name, _ in COMPONENTS]
    for module, name, label in COMPONENTS:
        setattr(module, name, timed(getattr(module, name), label))
    try:
        import pgjax.data.plan  # noqa: F401  imports are a cost per process, not per file

        start = time.process_time()
        preprocess(inputs, tmp / "store", cfg=cfg, workers=1, salt_file=tmp / "salt")
        return time.process_time() - start, spent
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--components", action="store_true", help="CPU seconds per component")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a PreprocessConfig field, e.g. images_per_shard=32")  # fmt: skip
    args = p.parse_args()
    fields = {"min_patients": 2}
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key] = int(value) if value.isdigit() else value
    cfg = PreprocessConfig(**fields)
    with tempfile.TemporaryDirectory(prefix="pgjax-profile-") as tmp:
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
