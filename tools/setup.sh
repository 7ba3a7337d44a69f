#!/usr/bin/env bash
# Sets up a new machine for pgjax: the package, its extras and the test tools, into the
# current Python (use a virtualenv first if you prefer one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch 2.13.0 first: on the dev/CI machines it is a CPU build already on disk, and installing it
# before the `torch` extra keeps pip from fetching a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0 ||
    echo "setup: torch==2.13.0 not available here; the export extra will pick its own build" >&2
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev,torch,pacs]"
# Orthanc for the PACS tests: best effort, never fatal (tests/test_pacs.py skips without it).
bash tools/setup_pacs.sh || true
