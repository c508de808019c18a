#!/usr/bin/env bash
# The main job: set up (if needed), then analyse an example CNN and render its annotated graph to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/lipgraph analyze examples/models.py:SmallCNN --input-shape 1,1,28,28 \
  --json out/smallcnn.json --png out/smallcnn.png "$@"
