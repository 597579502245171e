#!/usr/bin/env bash
# The GPU benchmark, prepared for one NVIDIA H200 (any CUDA GPU works) and sized to finish within
# 10 minutes: offline ONNX Runtime CUDA fp16 (and the TensorRT provider where it is installed) vs
# PyTorch eager and torch.compile at batch sizes 1-256, then vitserve end to end on CUDA.
#
# Setup on the GPU machine, once: the project's venv with the GPU extras. onnxruntime-gpu replaces
# the CPU build (both install the module `onnxruntime`, and the CPU one hides the CUDA provider):
#   make .venv/.dev && .venv/bin/pip uninstall -y onnxruntime && .venv/bin/pip install -e '.[gpu]'
# TensorRT provider (optional): `.venv/bin/pip install tensorrt` for the CUDA major of onnxruntime-gpu.
#
# Run:   bash benchmarks/gpu.sh [OUT_DIR]        (PYTHON=/path/to/python to use another interpreter)
# Output: OUT_DIR/machine.txt, gpu_offline.{md,json}, e2e/results.{md,json}, and the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c 'import onnxruntime as o, torch
print("onnxruntime", o.__version__, o.get_available_providers())
print("torch", torch.__version__, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/machine.txt"

# 1. Offline (~6 min): model export with the fp16 graph, then 4 backends x 9 batch sizes x 1.5 s,
#    plus TensorRT's engine build and torch.compile's compilation.
timeout 420 "$PY" -m benchmarks.gpu_offline --out "$OUT" --seconds 1.5 2>&1 | tee "$OUT/gpu_offline.log" \
  || echo "gpu_offline stopped early (exit $?): what it measured is in $OUT/gpu_offline.log"

# 2. End to end (~1.5 min): vitserve with its defaults on CUDA (fp16 graph), closed loop c=1, 64, 256.
timeout 150 "$PY" -m benchmarks --gpu --out "$OUT/e2e" 2>&1 | tee "$OUT/e2e.log" \
  || echo "end-to-end run stopped early (exit $?): partial results in $OUT/e2e/results.json"
