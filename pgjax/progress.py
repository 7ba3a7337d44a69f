"""A dependency-free progress line: done/total, rate and ETA, on stderr.

On a terminal it redraws one line; in a log (CI, Slurm) it prints a line every `every_s` seconds,
so logs stay short.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, unit: str = "items", every_s: float = 10.0):
        self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
        self.done = 0
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= (0.2 if self.tty else self.every_s):
            self.last = now
            self._print(now, extra)

    def _print(self, now: float, extra: str) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        line = (
            f"{self.label}: {self.done}/{self.total} {self.unit} "
            f"{rate:.1f}/s elapsed {elapsed:.0f}s eta {eta} {extra}"
        ).rstrip()
        end = "\n" if not self.tty or self.done >= self.total else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
