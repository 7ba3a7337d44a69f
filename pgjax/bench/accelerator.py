"""The summary of one tools/accelerator_check.sh run: its records read back, set against the
project's targets (`python -m pgjax.bench.accelerator DIR`).

Targets (issue 15): at least 45% MFU for the PG ViT-B/16 step on an H100 or H200, and PG's
achieved FLOP rate (XLA's FLOPs per second) at least 0.95x the plain-JAX step's in the same run,
at the same image size and attention implementation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MFU_TARGET = 0.45
RATE_TARGET = 0.95


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def summarize(folder: str | Path) -> list[str]:
    records = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    plain = {}
    for r in records:
        if r["benchmark"] == "plain_vit_step":
            for run in r["figures"]["runs"]:
                key = (r["settings"]["attention"], tuple(run["image_shape"]))
                plain[key] = run["achieved_flops_per_s"]
    lines = []
    for r in records:
        if r["benchmark"] != "train":
            continue
        impl = (r["settings"]["model"].get("image_encoder_kw") or {}).get("attention_impl")
        note = r["settings"].get("mfu_note")
        for run in r["figures"]["runs"]:
            shape = tuple(run.get("image_shape") or r["settings"]["image_shape"])
            rate = run["flops_per_step"] / run["step_s"]
            ref = plain.get((impl, shape))
            ratio = rate / ref if ref else None
            mfu = run.get("mfu")
            lines.append(
                f"PG {r['settings']['config']} attention={impl or 'default'} "
                f"{'x'.join(map(str, shape))} batch {run['global_batch']} on {run['devices']} "
                f"device(s): {run['images_per_s']:.1f} images/s, MFU {_pct(mfu)} (XLA) / "
                f"{_pct(run.get('mfu_model'))} (model)"
                + (
                    f" [target {MFU_TARGET:.0%}: {'met' if mfu >= MFU_TARGET else 'NOT met'}]"
                    if mfu is not None
                    else f" [{note}]"
                )  # fmt: skip
                + (
                    f"; FLOP rate / plain step {ratio:.2f} [target {RATE_TARGET}: "
                    f"{'met' if ratio >= RATE_TARGET else 'NOT met'}]"
                    if ratio is not None
                    else "; no plain step to compare"
                )  # fmt: skip
            )
    for r in records:
        if r["benchmark"] == "loader":
            f = r["figures"]
            for key, w in sorted(f.items()):
                if key.startswith("workers_"):
                    lines.append(
                        f"loader, {key[8:]} workers: {w['delivered_images_per_s']:.0f} images/s "
                        f"delivered, {w['augmented_images_per_s']:.0f} with augmentation"
                    )
    for r in records:
        if r["benchmark"] == "compile":
            kw = r["settings"]["model"].get("image_encoder_kw") or {}
            for run in r["figures"]["runs"]:
                mem = run["memory_per_device"]
                lines.append(
                    f"compiled {r['settings']['config']} batch {run['global_batch']} on "
                    f"{run['devices']} device(s), remat {bool(kw.get('remat'))}: peak "
                    f"{mem['peak_bytes'] / 2**30:.2f} GiB (temporaries "
                    f"{mem['temp_bytes'] / 2**30:.2f} GiB), "
                    f"{run['flops_per_step'] / 1e12:.2f} TFLOP per step"
                )
    if not lines:
        lines.append(f"no train, loader or compile records in {folder}")
    return lines


if __name__ == "__main__":
    print("\n".join(summarize(sys.argv[1])))
