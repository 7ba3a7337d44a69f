"""Profile the phases of `pgjax preprocess` with cProfile, one phase at a time, in-process.

    python tools/profile_preprocess.py DICOM_DIR [--top 30]

Writes a throwaway store under a temporary folder; prints the top functions by cumulative time
for each phase. cProfile's cost per call inflates pydicom's many small calls (the scan looks
~3x slower under it); for the share of each cost, sample one phase instead, e.g.

    py-spy record -r 250 --format raw -o pixels.txt -- \
        python -m pgjax.cli preprocess --out S --phase pixels --workers 1

which is how the README's current preprocessing profile was taken.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

from pgjax.data.config import PreprocessConfig
from pgjax.data.preprocess import PHASES, preprocess


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgjax-profile-") as tmp:
        store = Path(tmp) / "store"
        for phase in PHASES:
            profile = cProfile.Profile()
            profile.enable()
            preprocess(args.inputs, store, cfg=PreprocessConfig(min_patients=2), workers=1,
                       phases=[phase], salt_file=Path(tmp) / "salt")  # fmt: skip
            profile.disable()
            print(f"\n===== phase {phase} =====")
            pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
