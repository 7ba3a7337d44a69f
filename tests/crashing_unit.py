"""A unit of work for pool tests that kills its worker process, in a module that imports
nothing heavy, so the spawned workers that import it start fast."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def crash_on_three(unit: int, out_dir: str) -> None:
    if unit == 3:
        os._exit(1)  # what a decoder's segfault looks like to the pool
    Path(out_dir, str(unit)).write_text("done")


def log_unit(unit: str, log: str) -> None:
    """Append when `unit` started and ended (monotonic clock, one line per event: appends this
    small are atomic, so workers can share the file)."""
    with open(log, "a") as f:
        f.write(f"start {unit} {time.monotonic()}\n")
    time.sleep(0.05)
    with open(log, "a") as f:
        f.write(f"end {unit} {time.monotonic()}\n")


def modules_loaded(names: list[str]) -> tuple[int, bool]:
    """This worker's pid and whether it had imported every one of `names` before this ran."""
    time.sleep(0.1)  # long enough that the other workers take the other calls
    return os.getpid(), all(n in sys.modules for n in names)
