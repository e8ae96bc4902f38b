#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU, under 5 minutes (each step has a time limit):
#   1. benchmarks/gpu_check.py: the Triton seal and decode kernels against the oracle on SmolLM2
#      shapes (contexts 1k/4k/8k, batch 1/16, bits 2/3/4/8/16/mixed/low) and decode timings against a
#      stock bf16 baseline (it prints which), as ratios;
#   2. the kernel unit tests natively on the GPU (the interpreter child and the sm_90 compile-only
#      tests are deselected).
# Needs a python with torch (CUDA) and triton; vLLM and the project's .venv are not needed: the
# package is imported from this checkout. Logs, gpu_check.json and the table go to $OUT (else
# /tmp/adakv-gpu-check). Extra arguments go to gpu_check.py (e.g. --quick).
# Usage: bash benchmarks/gpu_check.sh [--quick]      PYTHON=/path/to/python to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOG_DIR="${OUT:-/tmp/adakv-gpu-check}"
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if ! "$PY" -c 'import sys, torch, triton; sys.exit(0 if torch.cuda.is_available() else 3)'; then
    echo "gpu_check: '$PY' must import torch and triton and see a CUDA GPU (set PYTHON=...)" >&2
    exit 2
fi
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
      "triton", triton.__version__, "gpu", torch.cuda.get_device_name(0))'
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv
fi

status=0
timeout 200 "$PY" benchmarks/gpu_check.py --out "$LOG_DIR" "$@" 2>&1 | tee "$LOG_DIR/gpu_check.log" || status=1

if "$PY" -c 'import pytest' 2>/dev/null; then
    timeout 80 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -k "not under_interpreter and not hopper" \
        tests/kernels/test_triton_decode.py tests/kernels/test_triton_seal.py 2>&1 \
        | tee "$LOG_DIR/gpu_tests.log" | tail -n 25 || status=1
else
    echo "pytest is not installed: native kernel tests skipped"
fi

if [ -f "$LOG_DIR/gpu_check_table.txt" ]; then
    cat "$LOG_DIR/gpu_check_table.txt"
fi
echo "gpu_check.sh: exit status $status (logs in $LOG_DIR)"
exit "$status"
