"""A unit of work for pool tests that kills its worker process, in a module that imports
nothing heavy, so the spawned workers that import it start fast."""

from __future__ import annotations

import os
from pathlib import Path


def crash_on_three(unit: int, out_dir: str) -> None:
    if unit == 3:
        os._exit(1)  # what a decoder's segfault looks like to the pool
    Path(out_dir, str(unit)).write_text("done")
