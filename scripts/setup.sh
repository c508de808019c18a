#!/usr/bin/env bash
# Installs everything lipgraph needs on a fresh machine (idempotent):
# graphviz's `dot` (Debian package), a virtual environment in .venv with
# torch 2.14.1 + torchvision 0.29.1 (the releases this machine serves locally),
# onnx/onnxruntime, and lipgraph itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! command -v dot >/dev/null 2>&1; then
  echo "setup: installing graphviz (for PNG/SVG rendering)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq graphviz >/dev/null \
    || echo "setup: WARNING: could not install graphviz; PNG/SVG rendering will fail with a clear message (DOT still works)"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, onnx, onnxruntime, onnxscript, networkx, graphviz, pytest, ruff, sklearn, matplotlib, cvxpy, cvxopt, tqdm, lipgraph" 2>/dev/null; then
  echo "setup: installing Python packages (torch 2.14.1, torchvision 0.29.1, onnx, ...)"
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
fi
# a trained model that a pip wheel ships (PP-OCR's text-direction classifier, for tests/test_shipped_models.py):
# the wheel only, without its dependencies (OpenCV and others); lipgraph reads its ONNX file and runs none of it
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('rapidocr_onnxruntime') is None)"; then
  echo "setup: installing rapidocr-onnxruntime 1.4.4 (no dependencies: only its trained ONNX models are used)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps rapidocr-onnxruntime==1.4.4 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import torch, torchvision, lipgraph; print('setup: ok, torch', torch.__version__, 'torchvision', torchvision.__version__)"
