#!/usr/bin/env bash
# One-command GPU check: AMP training steps (classifier, IRN, DeepLab) vs fp32, CAM inference
# images/s, DDP DeepLab on all visible GPUs; figures to record in the README with the device name.
# Without CUDA: skip mode (prints what it would check, runs the CPU bf16 AMP comparison, exits 0).
# Arguments go to bench/gpu_check.py (--steps, --tol, --cam-images, --ddp-images, --no-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
exec "$PY" bench/gpu_check.py "$@"
