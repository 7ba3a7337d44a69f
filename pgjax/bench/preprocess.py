"""`pgjax bench preprocess`: preprocessing files/s against pydicom's decode-only rate.

The limit is what pydicom alone does with the same files: read each file and decode all its
pixels, nothing else. The pipeline adds a header scan, planning, normalisation, resizing,
volume resampling and the store writes; the ratio shows what those cost. Both are measured in
the same run on the same files, with 1 and 2 processes (the scaling with workers), in
alternating rounds (decode-only, then the pipeline on a fresh store): a shared machine's load
drifts over seconds, so each round's ratio compares two measurements taken side by side and the
record keeps the median and every round.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from pgjax.bench.record import write_record


def _decode_file(path: str) -> int:
    try:
        ds = pydicom.dcmread(path)
        return int(ds.pixel_array.size)
    except Exception:
        return 0  # not an image, or undecodable: the pipeline skips those too


def decode_only(paths: list[str], workers: int) -> float:
    """Seconds for pydicom to read and decode every file, with `workers` processes."""
    start = time.perf_counter()
    if workers <= 1:
        for p in paths:
            _decode_file(p)
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            # Warm the workers first (start-up and imports are not decoding): a bad path
            # imports this module and pydicom in each worker and returns at once.
            list(pool.map(_decode_file, [""] * (4 * workers)))
            start = time.perf_counter()
            list(pool.map(_decode_file, paths, chunksize=max(1, len(paths) // (8 * workers))))
    return time.perf_counter() - start


def pipeline(inputs: list[Path], store: Path, workers: int, cfg) -> dict[str, float]:
    """Seconds per preprocessing phase, into a new store."""
    from pgjax.data.preprocess import preprocess

    times = {}
    for phase in ("scan", "plan", "pixels", "finalize"):
        start = time.perf_counter()
        preprocess(
            inputs, store, cfg=cfg, workers=workers, phases=[phase],
            salt_file=store.parent / "salt",
        )  # fmt: skip
        times[phase] = time.perf_counter() - start
    times["total"] = sum(times.values())
    return times


def run_bench(
    inputs: list[Path] | None, studies: int, workers_list: list[int], out_dir, rounds: int = 3
) -> Path:
    from pgjax.data.config import PreprocessConfig
    from pgjax.data.preprocess import default_private
    from pgjax.data.scan import list_files

    workdir = Path(tempfile.mkdtemp(prefix="pgjax-bench-"))
    try:
        labels = None
        if not inputs:
            from pgjax.synth.corpus import write_corpus

            write_corpus(workdir / "corpus", studies=studies, seed=0)
            inputs = [workdir / "corpus" / "dicom"]
            labels = str(workdir / "corpus" / "labels.csv")
        paths = [p for _, p in list_files(inputs)]
        cfg = PreprocessConfig(min_patients=2)
        figures = {"files": len(paths), "bytes": sum(Path(p).stat().st_size for p in paths)}
        for w in workers_list:
            # Page cache warm for both: the corpus was just written or the first round reads it.
            dec, times = [], []
            for r in range(rounds):
                dec.append(decode_only(paths, w))
                store = workdir / f"store-w{w}-r{r}"
                times.append(pipeline(inputs, store, w, cfg))
                shutil.rmtree(default_private(store), ignore_errors=True)
                shutil.rmtree(store, ignore_errors=True)
            ratios = [d / t["total"] for d, t in zip(dec, times, strict=True)]
            med = {k: float(np.median([t[k] for t in times])) for k in times[0]}
            figures[f"workers_{w}"] = {
                "decode_only_s": float(np.median(dec)),
                "decode_only_files_per_s": len(paths) / float(np.median(dec)),
                "pipeline_s": med,
                "pipeline_files_per_s": len(paths) / med["total"],
                "ratio_pipeline_to_decode_only": float(np.median(ratios)),
                "decode_only_s_per_round": dec,
                "pipeline_s_per_round": times,
                "ratio_per_round": ratios,
            }
            f = figures[f"workers_{w}"]
            print(
                f"workers={w}: pydicom decode-only {f['decode_only_files_per_s']:.1f} files/s, "
                f"pipeline {f['pipeline_files_per_s']:.1f} files/s (median ratio "
                f"{f['ratio_pipeline_to_decode_only']:.2f}, rounds "
                + ", ".join(f"{x:.2f}" for x in ratios)
                + "); phases "
                + ", ".join(f"{k} {v:.2f}s" for k, v in med.items() if k != "total")
            )
        settings = {
            "inputs": "synthetic corpus" if labels else "user files",
            "studies": studies if labels else None,
            "workers": workers_list,
            "rounds": rounds,
            "config": cfg.to_json(),
        }
        return write_record("preprocess", figures, settings, out_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
