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
import os
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
    """Seconds per preprocessing phase, into a new store: one run, as `pgjax preprocess`
    makes it (one pool of workers for all phases)."""
    from pgjax.data.preprocess import preprocess

    times = {}
    start = time.perf_counter()
    preprocess(inputs, store, cfg=cfg, workers=workers, salt_file=store.parent / "salt",
               timings=times)  # fmt: skip
    times["total"] = time.perf_counter() - start
    return times


def measure(inputs: list[Path], workers: int, cfg, workdir: Path, rounds: int) -> dict:
    """Decode-only and the pipeline on the files under `inputs`, `rounds` times alternately."""
    from pgjax.data.preprocess import default_private
    from pgjax.data.scan import list_files

    paths = [p for _, p in list_files(inputs)]
    megabytes = sum(Path(p).stat().st_size for p in paths) / 1e6
    dec, times, loads = [], [], []
    for r in range(rounds):
        # Page cache warm for both: the corpus was just written or the first round reads it.
        loads.append(os.getloadavg()[0])
        dec.append(decode_only(paths, workers))
        store = workdir / f"store-w{workers}-r{r}"
        times.append(pipeline(inputs, store, workers, cfg))
        shutil.rmtree(default_private(store), ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    ratios = [d / t["total"] for d, t in zip(dec, times, strict=True)]
    # Start-up (worker processes and their imports) is a cost per run, not per file: the total
    # counts it, and the rate without it is what a long run approaches (decode-only's pool is
    # warmed before its clock starts, so this is the like-for-like ratio).
    steady = [t["total"] - t.get("start", 0.0) for t in times]
    med = {k: float(np.median([t[k] for t in times])) for k in times[0]}
    decode_s = float(np.median(dec))
    return {
        "decode_only_s": decode_s,
        "decode_only_files_per_s": len(paths) / decode_s,
        "decode_only_mb_per_s": megabytes / decode_s,
        "pipeline_s": med,
        "pipeline_files_per_s": len(paths) / med["total"],
        "pipeline_mb_per_s": megabytes / med["total"],
        "ratio_pipeline_to_decode_only": float(np.median(ratios)),
        "pipeline_files_per_s_after_start": len(paths) / float(np.median(steady)),
        "ratio_after_start": float(np.median([d / s for d, s in zip(dec, steady, strict=True)])),
        "decode_only_s_per_round": dec,
        "pipeline_s_per_round": times,
        "ratio_per_round": ratios,
        "load_average_1min_per_round": loads,
    }


def _summary_line(label: str, w: int, f: dict) -> str:
    return (
        f"{label} workers={w}: pydicom decode-only {f['decode_only_files_per_s']:.1f} files/s "
        f"{f['decode_only_mb_per_s']:.1f} MB/s, pipeline {f['pipeline_files_per_s']:.1f} "
        f"files/s {f['pipeline_mb_per_s']:.1f} MB/s (median ratio "
        f"{f['ratio_pipeline_to_decode_only']:.2f}, rounds "
        + ", ".join(f"{x:.2f}" for x in f["ratio_per_round"])
        + f"; after start-up {f['pipeline_files_per_s_after_start']:.1f} files/s, ratio "
        f"{f['ratio_after_start']:.2f}); phases "
        + ", ".join(f"{k} {v:.2f}s" for k, v in f["pipeline_s"].items() if k != "total")
    )


PRESETS = ("small", "clinical")


def _add_scaling(part: dict, workers_list: list[int]) -> None:
    """Per phase, in total and after start-up, the time with 1 worker over the time with w (the
    speed-up). Not for start-up itself: with 1 worker it is imports only, often already done."""
    if 1 not in workers_list:
        return
    one = part["workers_1"]["pipeline_s"]
    for w in workers_list:
        if w > 1:
            times = part[f"workers_{w}"]["pipeline_s"]
            speedup = {k: one[k] / times[k] for k in one if times.get(k) and k != "start"}
            speedup["after_start"] = (
                part[f"workers_{w}"]["pipeline_files_per_s_after_start"]
                / part["workers_1"]["pipeline_files_per_s_after_start"]
            )
            part[f"workers_{w}"]["speedup_over_1_worker"] = speedup


def run_bench(
    inputs: list[Path] | None,
    studies: int,
    workers_list: list[int],
    out_dir,
    rounds: int = 3,
    preset: str = "small",
    patients: int = 4,
    clinical_settings=None,
) -> Path:
    """Measure and write a record. Without inputs, a synthetic corpus: `preset` "small"
    (`pgjax synth`, `studies` studies: 128x128 slices) or "clinical" (pgjax/synth/clinical.py,
    `patients` patients: archive-sized files in several transfer syntaxes, each syntax also
    measured on its own; `clinical_settings` replaces its default ClinicalSettings)."""
    from pgjax.data.config import PreprocessConfig
    from pgjax.data.scan import list_files

    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    workdir = Path(tempfile.mkdtemp(prefix="pgjax-bench-"))
    try:
        synthetic, groups, corpus = not inputs, {}, None
        if synthetic and preset == "clinical":
            from pgjax.synth.clinical import ClinicalSettings, write_clinical_corpus

            clinical = clinical_settings or ClinicalSettings(patients=patients)
            corpus = write_clinical_corpus(workdir / "corpus", clinical)
            inputs = sorted((workdir / "corpus" / "dicom").iterdir())
            groups = {p.name: [p] for p in inputs}
        elif synthetic:
            from pgjax.synth.corpus import write_corpus

            write_corpus(workdir / "corpus", studies=studies, seed=0)
            inputs = [workdir / "corpus" / "dicom"]
        paths = [p for _, p in list_files(inputs)]
        cfg = PreprocessConfig(min_patients=2)
        if preset == "clinical" and synthetic:
            # A few hundred files in the default 256-row shards make 2-3 pixel units, too few
            # for 2 workers to share; a cluster run over an archive has thousands.
            # All patients train: with a handful of patients a random salt can otherwise leave
            # the train split (which fits the vocabulary) empty; the split costs nothing here.
            cfg = PreprocessConfig(min_patients=2, images_per_shard=32, volumes_per_shard=2,
                                   split_fractions=(1.0, 0.0, 0.0))  # fmt: skip
        figures = {"files": len(paths), "bytes": sum(Path(p).stat().st_size for p in paths)}
        load_start = os.getloadavg()
        for w in workers_list:
            figures[f"workers_{w}"] = f = measure(inputs, w, cfg, workdir, rounds)
            print(_summary_line("all files", w, f))
        if groups:
            figures["by_syntax"] = {}
            for name, folders in groups.items():
                tally = corpus["syntaxes"][name]
                entry = {"uid": tally["uid"], "files": tally["files"], "bytes": tally["bytes"]}
                for w in workers_list:
                    entry[f"workers_{w}"] = f = measure(folders, w, cfg, workdir, rounds)
                    print(_summary_line(name, w, f))
                figures["by_syntax"][name] = entry
            figures["syntaxes_lacking"] = corpus["lacking"]
            for name, reason in corpus["lacking"].items():
                print(f"not in the mix: {name} ({reason})")
        for part in [figures, *figures.get("by_syntax", {}).values()]:
            _add_scaling(part, workers_list)
        for w in workers_list:
            if "speedup_over_1_worker" in figures[f"workers_{w}"]:
                speedup = figures[f"workers_{w}"]["speedup_over_1_worker"]
                print(f"all files, {w} workers over 1: "
                      + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()))  # fmt: skip
        figures["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
        settings = {
            "inputs": f"synthetic corpus ({preset})" if synthetic else "user files",
            "preset": preset if synthetic else None,
            "studies": studies if synthetic and preset == "small" else None,
            "clinical_corpus": corpus["settings"] if corpus else None,
            "workers": workers_list,
            "rounds": rounds,
            "config": cfg.to_json(),
        }
        return write_record("preprocess", figures, settings, out_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
