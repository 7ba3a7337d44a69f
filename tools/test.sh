#!/usr/bin/env bash
# The default test suite: lint, then every test not marked slow. `tools/test.sh -m slow` runs
# the slow ones instead; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
