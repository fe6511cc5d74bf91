#!/usr/bin/env bash
# The GPU check of issue 11, section 4, on one GPU in under 8 minutes: VQ-VAE training images/s
# and the fraction of the bf16 peak, the fast sampler at paper size, encode images/s.
# Run from anywhere; needs python3 with torch (and numpy) only. Results: the printed tables and,
# when OUT is set, $OUT/gpu_check.json (rewritten after each part, so a timeout keeps what finished).
# Extra arguments go to benchmarks/gpu_check.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 450 python3 benchmarks/gpu_check.py "$@"
