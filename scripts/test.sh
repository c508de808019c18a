#!/usr/bin/env bash
# The test command: set up (if needed), lint, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lipgraph tests bench examples
# every shipped ONNX light CNN is analysed too (about 2.5 min of the suite; LIPGRAPH_SLOW=0 skips them)
export LIPGRAPH_SLOW="${LIPGRAPH_SLOW:-1}"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
