"""`pgjax bench report`: every record under benchmarks/results/ as one Markdown page."""

from __future__ import annotations

import json
from pathlib import Path

PRE_HEADER = (
    "| time (UTC) | machine | inputs | files | MB | workers | pydicom decode-only files/s "
    "| decode-only MB/s | pipeline files/s | pipeline MB/s | ratio | ratio after start-up "
    "| load avg |"
)
TRAIN_HEADER = (
    "| time (UTC) | machine | config | devices | global batch | image | steps/s | images/s "
    "| GFLOP/step (XLA) | model GFLOP/step | MFU (XLA) | MFU (model) | host overhead "
    "| input alone / step |"
)
COMPILE_HEADER = (
    "| time (UTC) | commit | config | mesh | global batch | image | TFLOP/step (XLA) "
    "| peak GiB/device | temporaries GiB | params + optimizer MiB/device | all-gather "
    "| reduce-scatter | all-reduce | collective-permute | all-to-all | [B, B] or [B, F, V] moved "
    "| largest temporary |"
)

EXPORT_HEADER = (
    "| time (UTC) | machine | model | input | batch | torch threads | part "
    "| JAX items/s | PyTorch items/s | PyTorch / JAX | parity max abs | load avg |"
)
LOADER_HEADER = (
    "| time (UTC) | machine | store | batch | memmap images/s | TensorStore batched images/s "
    "| workers | pipeline images/s | pipeline / TensorStore | with augmentation | augmentation "
    "alone | needed (train record) |"
)


def _rule(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


def _machine(r: dict) -> str:
    m = r["machine"]
    device = r["settings"].get("device_kind")
    return f"{m['cpu']} ({m['cores']} cores)" + (f", {device}" if device else "")


def _preprocess_rows(r: dict) -> list[str]:
    """One row per worker count: all files, then (clinical preset) each transfer syntax."""
    settings, figures = r["settings"], r["figures"]
    preset = settings.get("preset") or ("small" if "synthetic" in settings["inputs"] else "")
    name = preset or settings["inputs"]
    parts = [(name, figures)] + [
        (f"{name}: {syntax}", entry) for syntax, entry in figures.get("by_syntax", {}).items()
    ]
    rows = []
    for label, part in parts:
        for key, f in sorted(part.items()):
            if not key.startswith("workers_"):
                continue
            loads = f.get("load_average_1min_per_round")
            load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
            mb = f"{part['bytes'] / 1e6:.0f}" if "bytes" in part else "n/a"
            rows.append(
                f"| {r['time_utc']} | {_machine(r)} | {label} | {part['files']} | {mb} | "
                f"{key[8:]} | {f['decode_only_files_per_s']:.1f} | "
                f"{_or_na(f.get('decode_only_mb_per_s'))} | {f['pipeline_files_per_s']:.1f} | "
                f"{_or_na(f.get('pipeline_mb_per_s'))} | "
                f"{f['ratio_pipeline_to_decode_only']:.2f} | "
                f"{_or_na(f.get('ratio_after_start'), '.2f')} | {load} |"
            )
    return rows


def _or_na(value, fmt: str = ".1f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _train_rows(r: dict) -> list[str]:
    rows = []
    for run in r["figures"]["runs"]:
        mfu = f"{run['mfu']:.1%}" if run.get("mfu") else "n/a"
        mfu_model = f"{run['mfu_model']:.1%}" if run.get("mfu_model") else "n/a"
        model = run.get("model_flops_per_step")  # older records have none
        model = "n/a" if model is None else f"{model / 1e9:.2f}"
        host, alone = run.get("host_overhead_share"), run.get("input_share_of_step")
        shape = "x".join(map(str, _image_shape(r, run)))
        rows.append(
            f"| {r['time_utc']} | {_machine(r)} | {r['settings']['config']} | "
            f"{run['devices']} | {run['global_batch']} | {shape} | {run['steps_per_s']:.2f} | "
            f"{run['images_per_s']:.1f} | {run['flops_per_step'] / 1e9:.2f} | {model} | "
            f"{mfu} | {mfu_model} | "
            f"{'n/a' if host is None else f'{host:.1%}'} | "
            f"{'n/a' if alone is None else f'{alone:.1%}'} |"
        )
    return rows


def _compile_rows(r: dict) -> list[str]:
    rows, s = [], r["settings"]
    for run in r["figures"]["runs"]:
        mesh = ",".join(f"{k}={v}" for k, v in run["mesh"].items() if v > 1) or "1 device"
        mem = run["memory_per_device"]
        # In the header's order (records store their keys sorted).
        kinds = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
        coll = " | ".join(
            f"{c['count']} / {c['bytes'] / 2**20:.1f} MiB" if c["count"] else "0"
            for c in (run["collectives"][k] for k in kinds)
        )
        temps = run["largest_temporaries"]
        if isinstance(temps, list) and temps:
            t = temps[0]
            where = t["op_name"].split(")/", 1)[-1] or t["instruction"]
            largest = f"{t['shape']} {t['bytes'] / 2**20:.0f} MiB ({where})"
        else:
            largest = "n/a"
        bad = run["forbidden_collectives"]
        rows.append(
            f"| {r['time_utc']} | {s.get('commit') or '?'} | {s['config']} | {mesh} | "
            f"{run['global_batch']} | {'x'.join(map(str, s['image_shape']))} | "
            f"{run['flops_per_step'] / 1e12:.2f} | {mem['peak_bytes'] / 2**30:.2f} | "
            f"{mem['temp_bytes'] / 2**30:.2f} | "
            f"{(run['params_bytes_per_device'] + run['opt_state_bytes_per_device']) / 2**20:.0f}"
            f" | {coll} | {'yes: ' + ', '.join(sorted({b['why'] for b in bad})) if bad else 'no'}"
            f" | {largest} |"
        )
    return rows


def _image_shape(r: dict, run: dict) -> list:
    # Records before the image-size sweep hold one shape, in their settings.
    return run.get("image_shape") or r["settings"].get("image_shape") or ["?"]


def _export_rows(r: dict) -> list[str]:
    rows, s, f = [], r["settings"], r["figures"]
    shape = "x".join(map(str, s["input_shape"]))
    for run in f["torch"]:
        for part, jax_rate in f["jax"].items():
            rows.append(
                f"| {r['time_utc']} | {_machine(r)} | {s['image_encoder']} | {shape} | "
                f"{s['batch']} | {run['threads']} | {part} | {jax_rate['items_per_s']:.1f} | "
                f"{run[part]['items_per_s']:.1f} | {run[part]['torch_to_jax']:.2f} | "
                f"{f['parity_max_abs']:.1e} | {max(s['load_average_1min']):.1f} |"
            )
    return rows


def _loader_rows(r: dict) -> list[str]:
    f, s = r["figures"], r["settings"]
    store = (f"{s['rows']} x {'x'.join(map(str, s['image_shape']))} {s['dtype']}, "
             f"{s['compression']}")  # fmt: skip
    need = f.get("needed")
    need = (
        f"{need['images_per_s']:.0f} ({need['config']}, {need['device_kind']})" if need else "n/a"
    )
    rows = []
    for key, w in sorted(f.items(), key=lambda kv: kv[0]):
        if not key.startswith("workers_"):
            continue
        rows.append(
            f"| {r['time_utc']} | {_machine(r)} | {store} | {s['global_batch']} | "
            f"{f['memmap_images_per_s']:.0f} | {f['tensorstore_images_per_s']:.0f} | {key[8:]} | "
            f"{w['delivered_images_per_s']:.0f} | {w['ratio_to_tensorstore']:.2f} | "
            f"{w['augmented_images_per_s']:.0f} | {f['augment_alone_images_per_s']:.0f} | {need} |"
        )
    return rows


def write_report(results_dir: str | Path = "benchmarks/results") -> Path:
    results_dir = Path(results_dir)
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    lines = ["# Benchmark results", "",
             "Made by `pgjax bench report` from the JSON records in `results/`; each row names",
             "the machine it was measured on. What bounds each figure, with profiles, is in",
             "the top-level README, section 'Performance, as measured'.", ""]  # fmt: skip
    loader = [row for r in records if r["benchmark"] == "loader" for row in _loader_rows(r)]
    if loader:
        lines += ["## Input pipeline (`pgjax bench loader`)", "",
                  "Images/s of the Grain + TensorStore pipeline delivering global arrays, against "
                  "TensorStore's own batched read and a memory-mapped copy of the same pixels "
                  "(medians over rounds measured alternately; target: pipeline / TensorStore "
                  ">= 0.8). With augmentation: the training augmentation (jitted) on the "
                  "device; on a CPU host it shares the cores.", "",
                  LOADER_HEADER, _rule(LOADER_HEADER)]  # fmt: skip
        lines += [*loader, ""]
    pre = [row for r in records if r["benchmark"] == "preprocess" for row in _preprocess_rows(r)]
    if pre:
        lines += ["## Preprocessing (`pgjax bench preprocess`)", "", PRE_HEADER, _rule(PRE_HEADER)]
        lines += [*pre, ""]
    train = [row for r in records if r["benchmark"] == "train" for row in _train_rows(r)]
    if train:
        lines += ["## Training step (`pgjax bench train`)", "",
                  "Host overhead: 1 - (compiled step on a resident batch) / (step in the real "
                  "Grain-fed loop), median of alternating rounds (target < 5%; negative when the "
                  "difference is below the timing noise). Input alone / step: the time to fetch "
                  "and place one batch with no step running, over the resident step time: an "
                  "upper bound on the overhead when nothing overlaps.", "",
                  TRAIN_HEADER, _rule(TRAIN_HEADER)]  # fmt: skip
        lines += [*train, ""]
    compiled = [row for r in records if r["benchmark"] == "compile" for row in _compile_rows(r)]
    if compiled:
        lines += ["## Compiled train step on a simulated mesh (`pgjax bench compile`)", "",
                  "The train step compiled by XLA:CPU for 8 simulated devices from abstract "
                  "inputs (no step runs). Per device: peak = arguments + outputs - donated + "
                  "temporaries; parameters + optimizer state from their shardings. Collectives: "
                  "count / bytes (HLO instructions; the larger of operands and results). A GPU "
                  "compile fuses differently, so its temporaries differ; see pgjax/bench/"
                  "compile.py.", "",
                  COMPILE_HEADER, _rule(COMPILE_HEADER), *compiled, ""]  # fmt: skip
    export = [row for r in records if r["benchmark"] == "export" for row in _export_rows(r)]
    if export:
        lines += ["## PyTorch export, CPU inference (`pgjax bench export`)", "", EXPORT_HEADER,
                  _rule(EXPORT_HEADER), *export, ""]  # fmt: skip
    out = results_dir.parent / "README.md"
    out.write_text("\n".join(lines) + "\n")
    _plot(records, results_dir.parent / "train_scaling.png")
    return out


def _plot(records: list[dict], path: Path) -> None:
    """Step time against devices, global batch and image side: for each, the runs of each
    record that differ from the record's base point (its first run) in that factor alone."""
    series = {"devices": [], "global batch": [], "image side": []}
    for r in records:
        if r["benchmark"] != "train":
            continue
        runs = [(run, _image_shape(r, run)[-1]) for run in r["figures"]["runs"]]
        base, side = runs[0]
        label = f"{r['settings']['config']}, {r['time_utc'][:10]}"
        for name, key in (("devices", "devices"), ("global batch", "global_batch")):
            pts = [
                (run[key], 1 / run["steps_per_s"])
                for run, s in runs
                if s == side
                and all(run[k] == base[k] for k in ("devices", "global_batch") if k != key)
            ]
            series[name].append((label, pts))
        pts = [
            (s, 1 / run["steps_per_s"])
            for run, s in runs
            if run["devices"] == base["devices"] and run["global_batch"] == base["global_batch"]
        ]
        series["image side"].append((label, pts))
    if not any(len(pts) > 1 for lines in series.values() for _, pts in lines):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    # One colour per record in every panel (a record may lack a sweep).
    labels = list(dict.fromkeys(label for lines in series.values() for label, _ in lines))
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, (name, lines) in zip(axes, series.items(), strict=True):
        for label, pts in lines:
            if len(pts) > 1:
                xy = zip(*sorted(set(pts)), strict=True)
                ax.plot(*xy, marker="o", label=label, color=colour[label])
        ax.set_xlabel(name)
        ax.set_ylabel("step time (s)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("train step time, one factor at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
