#!/usr/bin/env bash
# The test command: set up (if needed), lint, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lipgraph tests bench examples
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
