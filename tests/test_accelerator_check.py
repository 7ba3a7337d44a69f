"""tools/accelerator_check.sh --tiny: the accelerator check end to end at CPU size."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# Two `pgjax bench train` runs of the full PG objective (the second finds the first's compiled
# step in the script's compilation cache), two plain steps, a store and the loader bench: 44 s
# wall and 47 s of CPU on the idle 2-core dev machine (49 s wall, 60 s CPU before the tiny path
# took XLA's older CPU emitters and one loop round), so in the default suite.
def test_accelerator_check_tiny_writes_every_record(tmp_path):
    out = tmp_path / "records"
    # One CPU device, as on a host without fake devices (the tests' 8 would multiply compiles).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run(
        ["bash", str(REPO / "tools" / "accelerator_check.sh"), "--tiny", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cpu" in (out / "device.txt").read_text()
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    kinds = sorted(r["benchmark"] for r in records)
    assert kinds == ["compile", "loader", "plain_vit_step", "plain_vit_step", "train", "train"], (
        kinds
    )
    remat = sorted(
        r["settings"]["model"]["image_encoder_kw"]["remat"]
        for r in records
        if r["benchmark"] == "compile"
    )
    assert remat == [True]  # --tiny compiles the remat step only (both on an accelerator)
    impls = sorted(
        str(r["settings"]["model"]["image_encoder_kw"]["attention_impl"])
        for r in records
        if r["benchmark"] == "train"
    )
    assert impls == ["None", "xla"]
    for r in records:
        if r["benchmark"] in ("train", "plain_vit_step"):
            (step,) = r["figures"]["runs"]
            assert step["global_batch"] == 16 and step["images_per_s"] > 0
        if r["benchmark"] == "train":  # --tiny times one round of the real loop
            assert r["settings"]["loop_rounds"] == 1
            assert len(r["figures"]["runs"][0]["loop_step_s_per_round"]) == 1
    summary = (out / "summary.txt").read_text().splitlines()
    pg = [line for line in summary if line.startswith("PG ")]
    assert len(pg) == 2 and all("FLOP rate / plain step" in line for line in pg), summary
    assert all("no peak FLOP/s known" in line for line in pg)  # a CPU: no MFU
    assert any(line.startswith("loader, 0 workers") for line in summary)
    compiled = [line for line in summary if line.startswith("compiled ")]
    assert len(compiled) == 1 and "remat True: peak" in compiled[0], summary
    assert (
        "--out DIR is required"
        in subprocess.run(
            ["bash", str(REPO / "tools" / "accelerator_check.sh")], capture_output=True, text=True
        ).stderr
    )
