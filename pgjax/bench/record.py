"""Benchmark records: the figures plus the machine and versions they were measured on."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
from pathlib import Path

RESULTS_DIR = Path("benchmarks/results")
PACKAGES = ("pgjax", "jax", "jaxlib", "flax", "grain", "tensorstore", "pydicom", "numpy", "torch")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        # Cores this process may use (containers often allow fewer than the host has).
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def write_record(
    name: str, figures: dict, settings: dict, out_dir: str | Path = RESULTS_DIR
) -> Path:
    """Write benchmarks/results/<name>-<UTC time>.json and return its path."""
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "benchmark": name,
        "time_utc": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        "figures": figures,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path
